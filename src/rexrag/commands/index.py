"""``rexrag index``: build a BM25 or dense index directory from a corpus jsonl (atomically)."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    from rexrag.retrieval import index_kinds  # the package registers the shipped kinds
    from rexrag.retrieval.compressed import DEFAULT_EF_SEARCH, PRESETS

    p = subparsers.add_parser(
        "index",
        help="build a retrieval index directory from a corpus jsonl",
        description="Build a BM25 or dense index directory (with manifest.json) from a FlashRAG-style corpus "
        "jsonl ('id' + 'contents' or 'title' + 'text'). The build is atomic: a failed or interrupted "
        "build leaves no directory that loads.",
    )
    p.add_argument("--corpus", required=True, help="corpus jsonl")
    p.add_argument("--kind", required=True, choices=index_kinds(), help="index kind (the registered ones)")
    p.add_argument("--out", required=True, help="index directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (swapped in atomically)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed corpus lines (counted) instead of failing")
    g = p.add_argument_group("bm25")
    g.add_argument("--k1", type=float, default=1.5)
    g.add_argument("--b", type=float, default=0.75)
    g.add_argument("--method", default="lucene", help="bm25s scoring variant (lucene, robertson, atire, bm25l, bm25+)")
    g.add_argument("--stopwords", default="en", help="stop-word language for bm25s ('en') or 'none'")
    g.add_argument("--stemmer", default="english", help="PyStemmer language, or 'none'")
    g = p.add_argument_group("dense")
    g.add_argument("--model", default="all-MiniLM-L6-v2",
                   help="sentence-transformers model dir or id (default: bundled all-MiniLM-L6-v2, offline)")
    g.add_argument("--index-type", default="flat", choices=["flat", "hnsw", *PRESETS],
                   help="flat (exact), hnsw, or a compressed preset (rexrag.retrieval.compressed): sq8, fp16, ivf_flat, "
                        "ivf_pq, opq_ivf_pq, hnsw_sq8")
    g.add_argument("--factory", default="", help='any faiss index_factory string (e.g. "IVF4096,PQ64"); overrides --index-type')
    g.add_argument("--nlist", type=int, default=0, help="IVF lists (default 4 sqrt(N))")
    g.add_argument("--pq-m", type=int, default=0, help="PQ sub-quantisers, bytes per vector (default d / 8)")
    g.add_argument("--train-size", type=int, default=0, help="training vectors (default max(65536, 50 nlist), at most N)")
    g.add_argument("--nprobe", type=int, default=0, help="IVF lists searched per query, stored as the default (32)")
    g.add_argument("--ef-search", type=int, default=DEFAULT_EF_SEARCH, help="HNSW search candidate list, stored as the default")
    g.add_argument("--from-faiss", default="", metavar="FILE",
                   help="serve this existing faiss index (e.g. Search-R1's e5_Flat.index) over --corpus: no re-encoding, "
                        "no copy (linked); its vector count, dimension (--model) and metric are checked")
    g.add_argument("--query-prefix", default="", help='e.g. "query: " for e5 models')
    g.add_argument("--passage-prefix", default="", help='e.g. "passage: " for e5 models')
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--hnsw-m", type=int, default=32)
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=0, help="torch threads for encoding (0 = torch default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from rexrag.errors import UserError
    from rexrag.retrieval import build_index, read_manifest

    if args.from_faiss and args.kind != "dense":
        raise UserError(f"--from-faiss imports a dense index: use it with --kind dense (not --kind {args.kind})")
    if args.kind == "bm25":
        params = dict(k1=args.k1, b=args.b, method=args.method,
                      stopwords=None if args.stopwords == "none" else args.stopwords,
                      stemmer=None if args.stemmer == "none" else args.stemmer)
    else:
        params = dict(model=args.model, index_type=args.index_type, query_prefix=args.query_prefix,
                      passage_prefix=args.passage_prefix, batch_size=args.batch_size, hnsw_m=args.hnsw_m,
                      device=args.device, from_faiss=args.from_faiss, factory=args.factory, nlist=args.nlist,
                      pq_m=args.pq_m, train_size=args.train_size, nprobe=args.nprobe, ef_search=args.ef_search)
    start = time.perf_counter()
    out = build_index(args.corpus, args.kind, args.out, skip_bad=args.skip_bad, overwrite=args.overwrite, **params)
    manifest = read_manifest(out)
    skipped = f", skipped {manifest['skipped_rows']} bad rows" if manifest["skipped_rows"] else ""
    print(f"built {args.kind} index of {manifest['passages']} passages in {out} "
          f"({time.perf_counter() - start:.1f}s{skipped})")
    return 0
