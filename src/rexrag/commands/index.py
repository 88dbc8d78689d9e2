"""``rexrag index``: build a BM25 or dense index directory from a corpus jsonl (atomically)."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    from rexrag.retrieval import index_kinds  # the package registers the shipped kinds

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
    g.add_argument("--index-type", default="flat", choices=["flat", "hnsw"])
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
    from rexrag.retrieval import build_index, read_manifest

    if args.kind == "bm25":
        params = dict(k1=args.k1, b=args.b, method=args.method,
                      stopwords=None if args.stopwords == "none" else args.stopwords,
                      stemmer=None if args.stemmer == "none" else args.stemmer)
    else:
        params = dict(model=args.model, index_type=args.index_type, query_prefix=args.query_prefix,
                      passage_prefix=args.passage_prefix, batch_size=args.batch_size, hnsw_m=args.hnsw_m,
                      device=args.device)
    start = time.perf_counter()
    out = build_index(args.corpus, args.kind, args.out, skip_bad=args.skip_bad, overwrite=args.overwrite, **params)
    manifest = read_manifest(out)
    skipped = f", skipped {manifest['skipped_rows']} bad rows" if manifest["skipped_rows"] else ""
    print(f"built {args.kind} index of {manifest['passages']} passages in {out} "
          f"({time.perf_counter() - start:.1f}s{skipped})")
    return 0
