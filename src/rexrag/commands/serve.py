"""``rexrag serve``: serve an index over HTTP with Search-R1's ``/retrieve`` JSON (uvicorn)."""

from __future__ import annotations

import argparse
import os
import sys

from rexrag.errors import UserError
from rexrag.protocol import DEFAULT_TOPK


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an index with a Search-R1-compatible POST /retrieve",
        description="Serve an index directory over HTTP: POST /retrieve with Search-R1's JSON "
        '({"queries": [...], "topk": 3, "return_scores": true}) and GET /health.',
    )
    p.add_argument("--index", required=True, help="index directory built by `rexrag index`")
    from rexrag.retrieval import index_kinds  # the package registers the shipped kinds

    p.add_argument("--kind", choices=index_kinds(), default=None, help="fail unless the index is of this kind")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--nprobe", type=int, default=0, help="dense IVF indexes: inverted lists searched per query "
                   "(default: the manifest's, set at build)")
    p.add_argument("--ef-search", type=int, default=0, help="dense HNSW indexes: search candidate list (default: the manifest's)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key-env", default="", metavar="VAR", help="require the key held in env var VAR in the X-API-Key header"
    )
    p.add_argument("--default-topk", type=int, default=DEFAULT_TOPK, help="topk when a request leaves it out")
    p.add_argument("--max-topk", type=int, default=100)
    p.add_argument(
        "--max-queries",
        type=int,
        default=4096,
        help="queries per request (default 4096: a Search-R1 GRPO batch sends 2,560)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=32 << 20,
        help="request body limit (default 32 MiB: 4096 queries of up to 4096 ASCII characters)",
    )
    p.add_argument(
        "--max-results",
        type=int,
        default=None,
        metavar="N",
        help="queries x topk per request (default 12288: every query at topk 3; a Search-R1 "
        "GRPO batch asks 2,560 x 3); bounds each response's size",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        metavar="N",
        help="/retrieve requests in flight before 503 + Retry-After (default 64)",
    )
    p.add_argument(
        "--search-threads",
        type=int,
        default=None,
        metavar="N",
        help="requests parsed and searched at once; the rest wait holding only their body (default 4)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help="open sockets; beyond, the longest-idle one is closed (default 1000)",
    )
    p.add_argument(
        "--timeout-keep-alive",
        type=int,
        default=None,
        metavar="S",
        help="seconds an idle kept-alive connection stays open (default 5)",
    )
    p.add_argument(
        "--timeout-read",
        type=float,
        default=None,
        metavar="S",
        help="seconds for a request head, and for a body, to arrive (default 10)",
    )
    p.add_argument("--access-log", action="store_true", help="one log line per request (default off)")
    p.add_argument("--device", default=None, help="device for dense query encoding (cpu, cuda, ...; default cuda "
                   "with --gpu, else cpu)")
    p.add_argument("--gpu", action="store_true", help="dense indexes: search on every visible GPU, the vectors "
                   "sharded across them in fp16 (faiss's GPU build, as Search-R1's --faiss_gpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for dense query encoding (0 = torch default; 1 helps on busy small machines)",
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def _check_gpu(args: argparse.Namespace) -> int:
    """GPUs ``--gpu`` will use (0 without it); a UserError when the index is not dense or faiss has no GPUs."""
    if not args.gpu:
        return 0
    from rexrag.retrieval import read_manifest
    from rexrag.retrieval.faiss_gpu import require_gpus

    kind = read_manifest(args.index)["kind"]
    if kind != "dense":
        raise UserError(f"--gpu: {args.index} is a {kind!r} index; only dense (faiss) indexes go on a GPU")
    return require_gpus()


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import uvicorn

    from rexrag.retrieval import load_index
    from rexrag.retrieval.server import create_app, is_loopback, server_config

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    if not 1 <= args.default_topk <= args.max_topk:
        raise UserError(f"--default-topk {args.default_topk} must be between 1 and --max-topk {args.max_topk}")
    for flag in (
        "max_results",
        "max_concurrency",
        "search_threads",
        "max_connections",
        "timeout_keep_alive",
        "timeout_read",
    ):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.max_results is not None and args.max_results < args.default_topk:
        raise UserError(f"--max-results {args.max_results} must be at least --default-topk {args.default_topk}")
    if not api_key and not is_loopback(args.host):
        print(
            f"warning: serving on {args.host} without an API key: anyone who can reach port {args.port} can "
            "query this index; pass --api-key-env VAR (clients send the key in X-API-Key)",
            file=sys.stderr,
            flush=True,
        )
    app_limits = {
        "max_results": args.max_results,
        "max_concurrency": args.max_concurrency,
        "search_threads": args.search_threads,
        "timeout_read_s": args.timeout_read,
    }
    conn_limits = {
        "max_connections": args.max_connections,
        "timeout_keep_alive_s": args.timeout_keep_alive,
        "timeout_read_s": args.timeout_read,
    }
    n_gpus = _check_gpu(args)  # before the index loads: a missing GPU build fails in a second, not after minutes
    device = args.device or ("cuda" if args.gpu else "cpu")
    retriever = load_index(args.index, expect_kind=args.kind, device=device, nprobe=args.nprobe,
                           ef_search=args.ef_search)
    if n_gpus:
        from rexrag.retrieval.faiss_gpu import index_to_gpus

        retriever.index = index_to_gpus(retriever.index, nprobe=args.nprobe)
        print(f"index on {n_gpus} GPU(s), sharded, fp16", flush=True)
    app = create_app(
        retriever,
        default_topk=args.default_topk,
        max_topk=args.max_topk,
        max_queries=args.max_queries,
        max_body_bytes=args.max_body_bytes,
        api_key=api_key,
        **{k: v for k, v in app_limits.items() if v is not None},
    )
    config = server_config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        **{k: v for k, v in conn_limits.items() if v is not None},
    )
    print(
        f"serving {retriever.manifest['kind']} index {args.index} "
        f"({retriever.manifest['passages']} passages) on http://{args.host}:{args.port}/retrieve",
        flush=True,
    )
    uvicorn.Server(config).run()
    return 0
