"""Dense index types on real embeddings: recall@3/@10 against Flat, gold-passage recall and answer recall.

Corpus: the shared 23,630-passage Wikipedia corpus (``derived/multihop_dev_corpus.flashrag.jsonl``), encoded
once with the offline MiniLM encoder (``all-MiniLM-L6-v2``, 384-d) into a rexrag Flat index
(``rexrag index --kind dense``, kept in ``--work``). Questions: the 1,451 HotpotQA and 2WikiMultihopQA dev
questions whose gold paragraphs are in that corpus. Every other type is made from the Flat index the way a
Search-R1 user converts their ``e5_Flat.index``: ``build_index(..., from_faiss=<flat file>, index_type=T)``
(vectors read from the stored index in chunks, no re-encoding), with the shipped defaults (``nlist = 4
sqrt(N)`` = 615, ``pq_m = d / 8`` = 48, nprobe 32, efSearch 128). Each type then answers the same encoded
questions (top-10, faiss directly, so only the index differs):

* ``r@k vs Flat``: share of Flat's top-k that the type also returns in its top-k;
* ``gold r@k``: share of each question's gold paragraphs in the top-k (``bench/retrieval.py``'s recall);
* ``answer r@k``: share of questions whose gold answer string is in the top-k passages' text (cover-EM),
  what the agent can read.

    python bench/dense_real.py --types sq8,fp16,ivf_flat,ivf_pq,opq_ivf_pq,hnsw,hnsw_sq8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
QUESTIONS = {"hotpotqa": "hotpotqa_dev_ctx.flashrag.jsonl", "2wiki": "2wikimultihopqa_dev_ctx.flashrag.jsonl"}


def flat_index(work: Path, corpus: Path) -> Path:
    """The Flat index dir of the corpus (encoded once; minutes on two cores)."""
    from rexrag.retrieval import build_index

    out = work / "flat"
    if not (out / "manifest.json").is_file():
        t0 = time.perf_counter()
        build_index(corpus, "dense", out, index_type="flat")
        print(f"encoded and indexed the corpus in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def search_ids(index_dir: Path, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, dict]:
    """Top-k ids of each query through the index dir's faiss index, loaded as ``rexrag serve`` loads it."""
    from rexrag.retrieval import load_index

    retriever = load_index(index_dir, expect_kind="dense")
    t0 = time.perf_counter()
    _, ids = retriever.index.search(queries, k)
    qps = len(queries) / (time.perf_counter() - t0)
    return ids, {"qps_batch_all": qps, "faiss_class": type(retriever.index).__name__}


def overlap(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids.tolist(), truth.tolist())]))


def gold_recall(ids: np.ndarray, golds: list[list[int]], k: int) -> float:
    return float(np.mean([len(set(g) & set(row[:k])) / len(g) for row, g in zip(ids.tolist(), golds)]))


def answer_recall(ids: np.ndarray, texts: list[str], answers: list[list[str]], k: int) -> float:
    from rexrag.rewards import cover_em

    return float(np.mean([cover_em(" ".join(texts[i] for i in row[:k] if i >= 0), a)
                          for row, a in zip(ids.tolist(), answers)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="sq8,fp16,ivf_flat,ivf_pq,opq_ivf_pq,hnsw,hnsw_sq8")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dense_real"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--corpus", type=Path, default=DATA / "derived" / "multihop_dev_corpus.flashrag.jsonl",
                    help="another corpus (a pipeline check): questions keep the gold paragraphs it holds")
    args = ap.parse_args()
    from rexrag.cli import quiet_libraries

    quiet_libraries()
    import torch

    torch.set_num_threads(2)
    from rexrag.data import load_qa
    from rexrag.hardware import finish_record, run_record
    from rexrag.retrieval import build_index, load_index
    from rexrag.retrieval.dense import encode

    report = {**run_record("python bench/dense_real.py " + " ".join(sys.argv[1:])), "types": {}}
    corpus = args.corpus
    args.work.mkdir(parents=True, exist_ok=True)
    flat = flat_index(args.work, corpus)
    base = load_index(flat, expect_kind="dense")
    row_of = {p.id: i for i, p in enumerate(base.passages)}
    texts = [p.contents for p in base.passages]
    exs = [e for f in QUESTIONS.values() for e in load_qa(DATA / "derived" / f)
           if any(d in row_of for d in e.metadata["supporting_doc_ids"])]
    golds = [[row_of[d] for d in e.metadata["supporting_doc_ids"] if d in row_of] for e in exs]
    answers = [list(e.golden_answers) for e in exs]
    queries = encode(base.encoder, [base.query_prefix + e.question for e in exs])
    truth, info = search_ids(flat, queries)
    report |= {"passages": len(texts), "questions": len(exs), "dim": int(queries.shape[1])}
    kinds = ["flat", *[t for t in args.types.split(",") if t and t != "flat"]]
    for kind in kinds:
        if kind == "flat":
            ids, out_dir, build_s = truth, flat, 0.0
        else:
            out_dir = args.work / kind
            t0 = time.perf_counter()
            build_index(corpus, "dense", out_dir, overwrite=True, index_type=kind,
                        from_faiss=str(flat / "faiss.index"))
            build_s = time.perf_counter() - t0
            ids, info = search_ids(out_dir, queries)
        manifest = json.loads((out_dir / "manifest.json").read_text())["params"]
        rec = {"factory": manifest.get("factory", manifest.get("index_type")), "build_s": build_s,
               "file_bytes": (out_dir / "faiss.index").stat().st_size, "nprobe": manifest.get("nprobe", 0),
               "ef_search": manifest.get("ef_search", 0), **info}
        for k in (3, 10):
            rec[f"r@{k}_vs_flat"] = overlap(ids, truth, k)
            rec[f"gold_r@{k}"] = gold_recall(ids, golds, k)
            rec[f"answer_r@{k}"] = answer_recall(ids, texts, answers, k)
        report["types"][kind] = rec
        print(kind, json.dumps(rec), flush=True)
    finish_record(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dense_real.json").write_text(json.dumps(report, indent=1))
    (args.out / "dense_real.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['cpu']}; load average {report['load_before']} before, {report['load_after']} after; "
             f"{report['date']}. Command: `{report['command']}`. {report['passages']:,} passages, "
             f"{report['questions']:,} questions, {report['dim']}-d MiniLM vectors.", "",
             "| type | factory | build from Flat (s) | file (MB) | bytes/vector | r@3 vs Flat | r@10 vs Flat | gold r@3 | "
             "gold r@10 | answer r@3 | answer r@10 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in report["types"].items():
        lines.append(f"| {kind} | `{r['factory']}` | {r['build_s']:.1f} | {r['file_bytes'] / 2**20:.1f} | "
                     f"{r['file_bytes'] / report['passages']:.0f} | {r['r@3_vs_flat']:.3f} | {r['r@10_vs_flat']:.3f} | "
                     f"{r['gold_r@3']:.3f} | {r['gold_r@10']:.3f} | {r['answer_r@3']:.3f} | {r['answer_r@10']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
