"""Retrieval benchmark: build time, queries/s (batch 1 and 64), recall@3/@10, and bm25s vs rank_bm25.

Corpus: ../shared/data/derived/multihop_dev_corpus.flashrag.jsonl (23,630 real Wikipedia paragraphs).
Questions: derived/hotpotqa_dev_ctx (462) and derived/2wikimultihopqa_dev_ctx (989); gold passages are
``metadata.supporting_doc_ids``. recall@k = mean over questions of |gold in top-k| / |gold|.

BM25 runs on the full corpus. Dense (MiniLM, Flat and HNSW) encodes ~40 passages/s on 2 CPU cores,
so ``--dense-limit N`` indexes a sub-corpus: every gold passage of every question plus random
distractors up to N passages; BM25 is re-measured on that same sub-corpus so the numbers compare.
The HNSW index is built from the Flat index's vectors (the encoding is shared; its build time is the
graph construction only). rank_bm25 is timed on a subset of the questions (it scores every document
per query in Python) and the ratio is measured in this script, on the same queries.

    python bench/retrieval.py --dense-limit 5000 --out bench_results/retrieval.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def recall(results, golds, k: int) -> float:
    """Mean over questions of the share of gold ids found in the top-k."""
    vals = [len(set(g) & {p.id for p in row[:k]}) / len(g) for row, g in zip(results, golds)]
    return float(np.mean(vals))


def qps(retriever, queries: list[str], batch: int, k: int = 10) -> tuple[float, list]:
    out = []
    start = time.perf_counter()
    for i in range(0, len(queries), batch):
        out += retriever.search(queries[i : i + batch], k)
    return len(queries) / (time.perf_counter() - start), out


def evaluate(name: str, retriever, sets: dict, n_batch1: int, build_s: float) -> dict:
    """Recall per question set (batch 64 over all questions) and q/s at batch 1 and 64."""
    all_q = [q for qs, _ in sets.values() for q in qs]
    retriever.search(all_q[:2], 10)  # warm-up (lazy loads, first-call allocation)
    qps64, res = qps(retriever, all_q, 64)
    qps1, _ = qps(retriever, all_q[:n_batch1], 1)
    row = {"name": name, "build_s": round(build_s, 2), "qps_batch1": round(qps1, 1), "qps_batch64": round(qps64, 1)}
    start = 0
    for set_name, (qs, golds) in sets.items():
        part = res[start : start + len(qs)]
        start += len(qs)
        row[f"{set_name}_r@3"] = round(recall(part, golds, 3), 3)
        row[f"{set_name}_r@10"] = round(recall(part, golds, 10), 3)
    print(json.dumps(row), flush=True)
    return row


def rank_bm25_ratio(bm25_retriever, passages, queries: list[str]) -> dict:
    """q/s of rank_bm25 (BM25Okapi, same tokens) vs our BM25 path, batch 1 and 64, on the same queries."""
    from rank_bm25 import BM25Okapi

    tok = bm25_retriever.tokenizer
    start = time.perf_counter()
    ref = BM25Okapi(tok.tokenize([p.contents for p in passages], update_vocab=False, return_as="string",
                                 show_progress=False))
    ref_build = time.perf_counter() - start
    q_tokens = tok.tokenize(queries, update_vocab=False, return_as="string", show_progress=False)
    start = time.perf_counter()
    ref_top = [np.argsort(-ref.get_scores(q))[:10] for q in q_tokens]
    ref_qps = len(queries) / (time.perf_counter() - start)
    ours1, res = qps(bm25_retriever, queries, 1)
    ours64, _ = qps(bm25_retriever, queries, 64)
    top1_agree = float(np.mean([passages[t[0]].id == row[0].id for t, row in zip(ref_top, res)]))
    row = {"rank_bm25_build_s": round(ref_build, 2), "rank_bm25_qps": round(ref_qps, 2), "n_queries": len(queries),
           "ours_qps_batch1": round(ours1, 1), "ours_qps_batch64": round(ours64, 1),
           "ratio_batch1": round(ours1 / ref_qps, 1), "ratio_batch64": round(ours64 / ref_qps, 1),
           "top1_agreement": round(top1_agree, 3)}
    print(json.dumps(row), flush=True)
    return row


def write_subcorpus(corpus: Path, gold: set[str], limit: int, out: Path, seed: int = 0) -> int:
    lines = corpus.read_text().splitlines(keepends=True)
    ids = [json.loads(line)["id"] for line in lines]
    keep = {i for i, pid in enumerate(ids) if pid in gold}
    others = [i for i in range(len(ids)) if i not in keep]
    random.Random(seed).shuffle(others)
    keep |= set(others[: max(0, limit - len(keep))])
    out.write_text("".join(lines[i] for i in sorted(keep)))
    return len(keep)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA), help="shared data dir")
    ap.add_argument("--dense-limit", type=int, default=5000, help="passages in the dense sub-corpus (0 = skip dense)")
    ap.add_argument("--batch1-queries", type=int, default=300, help="queries timed at batch size 1 (dense: /3)")
    ap.add_argument("--rank-bm25-queries", type=int, default=50)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (1: on a 2-core machine shared with other jobs, 2 threads "
                    "made each tiny op wait for a descheduled thread; 0 = torch default)")
    ap.add_argument("--out", default="", help="write all results as JSON here")
    args = ap.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    sys.path.insert(0, str(REPO / "src"))
    from rexrag.data import load_corpus, load_qa
    from rexrag.retrieval import build_index, load_index
    from rexrag.retrieval.dense import DenseRetriever, make_faiss_index

    data = Path(args.data)
    corpus = data / "derived" / "multihop_dev_corpus.flashrag.jsonl"
    sets = {}
    files = {"hotpotqa": "hotpotqa_dev_ctx.flashrag.jsonl", "2wiki": "2wikimultihopqa_dev_ctx.flashrag.jsonl"}
    for name, fname in files.items():
        exs = load_qa(data / "derived" / fname)
        sets[name] = ([e.question for e in exs], [e.metadata["supporting_doc_ids"] for e in exs])
    results = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
               "torch_threads": args.torch_threads,
               "questions": {k: len(v[0]) for k, v in sets.items()}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        bm25 = load_index(build_index(corpus, "bm25", tmp / "bm25"))
        build_s = time.perf_counter() - start
        results["corpus_passages"] = len(bm25.passages)
        results["rows"].append(evaluate("BM25 (bm25s, full corpus)", bm25, sets, args.batch1_queries, build_s))
        all_q = [q for qs, _ in sets.values() for q in qs]
        sub_q = random.Random(0).sample(all_q, args.rank_bm25_queries)
        results["rank_bm25"] = rank_bm25_ratio(bm25, load_corpus(corpus), sub_q)

        if args.dense_limit:
            gold = {g for _, golds in sets.values() for gs in golds for g in gs}
            sub = tmp / "sub.jsonl"
            results["dense_subcorpus"] = {"passages": write_subcorpus(corpus, gold, args.dense_limit, sub),
                                          "gold_passages": len(gold)}
            start = time.perf_counter()
            bm25_sub = load_index(build_index(sub, "bm25", tmp / "bm25_sub"))
            results["rows"].append(evaluate("BM25 (sub-corpus)", bm25_sub, sets, args.batch1_queries,
                                            time.perf_counter() - start))
            start = time.perf_counter()
            flat = load_index(build_index(sub, "dense", tmp / "flat", index_type="flat"))
            flat_s = time.perf_counter() - start
            results["rows"].append(evaluate("MiniLM Flat (sub-corpus)", flat, sets, args.batch1_queries // 3, flat_s))
            start = time.perf_counter()
            hnsw_index = make_faiss_index(flat.index.d, "hnsw")
            hnsw_index.add(flat.index.reconstruct_n(0, flat.index.ntotal))
            hnsw_s = time.perf_counter() - start
            hnsw = DenseRetriever(flat.encoder, hnsw_index, flat.passages)
            results["rows"].append(evaluate("MiniLM HNSW32 (sub-corpus; build = graph only)", hnsw, sets,
                                            args.batch1_queries // 3, hnsw_s))
    results["load_avg_end"] = os.getloadavg()[0]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
