"""``rexrag demo``: index, evaluate, warm up, train with REX-RAG, evaluate again, report; offline."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline offline on CPU in minutes, ending in a report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Default: about 10 minutes on 2 CPU cores (vLLM backend); --quick: under 3 minutes "
                              "(2.2 min measured on 2026-12-04). "
                              "Prints the held-out table (untrained, warm-up, warm-up + RL; 95 % intervals) and "
                              "whether RL added anything beyond the warm-up; the full report is OUT/report.md.")
    p.add_argument("--quick", action="store_true", help="smallest sizes (a smoke run)")
    p.add_argument("--out", default="runs/demo", help="report directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); use 1 when other jobs share the cores")
    p.add_argument("--backend", default="auto", help="generation backend: auto (vllm when installed, else hf) | hf | vllm")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="engine and update precision: auto = bf16 where the CPU has bf16 matrix units (AMX or "
                        "AVX512-BF16), else fp32")
    p.add_argument("--max-memory-gb", default=None, metavar="GIB",
                   help="memory cap in GiB: the fastest settings whose worst case fits it (gradient checkpointing, tokens "
                        "per forward/backward, KV cache; rexrag.memory_plan), or one line with the floor and exit 2 "
                        "(default 4, a laptop: where this run's floor is above it, e.g. an fp32 engine on a CPU without bf16 "
                        "units, the default plans the floor instead of refusing; 0 = no cap, fastest settings)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rexrag.demo import run_demo

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from rexrag.rollout.backends import resolve_backend_name

    from rexrag.demo import DEFAULT_MAX_MEMORY_GB

    cap = DEFAULT_MAX_MEMORY_GB if args.max_memory_gb is None else args.max_memory_gb
    report = run_demo(args.out, quick=args.quick, seed=args.seed, backend=resolve_backend_name(args.backend),
                      max_memory_gb=cap, precision=args.precision, cap_is_default=args.max_memory_gb is None)
    print(f"report: {report}")
    return 0
