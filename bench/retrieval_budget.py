"""Do the HTTP client's defaults (``retrieval.timeout_s`` 30 s a try, ``retrieval.deadline_s`` 60 s a call) hold
for wiki-18 at the paper recipe's batch? A stated model from measured pieces.

One search turn of ``configs/rexrag_grpo_3b.yaml`` sends at most ``batch_size x n`` = 2,560 queries, one request
per process (320 queries each on 8 GPUs), all at once. The server answers them in about
``Q x (1 / encoder q/s + 1 / index q/s)`` seconds, and the last request waits for nearly all of it, so a turn
fits the defaults when that time is below ``timeout_s``.

Measured here: query encoding with the offline MiniLM-L6 encoder (the shipped ``encode``, batch 64) on this CPU.
Scaled, and said so in the table: e5-base-v2 (Search-R1's encoder: 12 layers of 768 against MiniLM's 6 of 384)
costs ~8x MiniLM's FLOPs a token, so ~1/8 of its queries/s; a server with C cores encodes C/2 times faster than
these 2 cores and searches C times faster than one thread (upper bounds: linear scaling). Index queries/s at 1M vectors come from ``bench/dense_scale.py``
(BENCHMARKS, 2026-12-02/03, one search thread) and are scaled to 21,015,324 vectors: exhaustive types (Flat, SQ)
as 1/N, HNSW as log N. GPU rows are estimates, not measurements (no GPU was lent with faiss's GPU build).

Usage: python bench/retrieval_budget.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKI18, MEASURED_N = 21_015_324, 1_000_000
# bench/dense_scale.py at 1M x 768-d, one search thread (BENCHMARKS "Dense index types on 1M vectors"): best batch
INDEX_QPS_1M = {"hnsw_sq8": 2837.0, "sq8": 19.0, "flat": 69.0}  # hnsw_sq8 at the served efSearch 128 (2026-12-07)
E5_OVER_MINILM_FLOPS = (12 * 768**2) / (6 * 384**2)  # per token, layers x hidden^2 (FFN = 4 x hidden in both): 8
GPU_ENCODER_QPS = 20_000.0  # estimate: e5-base on one H100, ~20-token queries (not measured here)
GPU_FLAT_QPS = 50_000.0  # estimate: 21M x 768 fp16 inner products sharded over 8 GPUs (not measured here)


def index_qps_at(kind: str, n: int) -> float:
    """Index-only queries/s at ``n`` vectors, scaled from the 1M measurement."""
    qps = INDEX_QPS_1M[kind]
    return qps * math.log(MEASURED_N) / math.log(n) if kind.startswith("hnsw") else qps * MEASURED_N / n


def turn_seconds(queries: int, encoder_qps: float, index_qps: float) -> float:
    """Seconds to answer one turn's ``queries`` (the last request's wait), encoding and search one after the other."""
    return queries * (1.0 / encoder_qps + 1.0 / index_qps)


def measure_minilm_qps(n: int = 512) -> float:
    import torch

    from rexrag.retrieval.dense import DEFAULT_MODEL, encode, load_encoder

    torch.set_num_threads(os.cpu_count() or 1)
    from rexrag.data import load_qa

    loaded = load_qa(REPO.parent / "shared" / "data" / "hotpotqa" / "hotpotqa_dev_7405.flashrag.jsonl", limit=n)
    questions = [ex.question for ex in loaded]
    model = load_encoder(DEFAULT_MODEL)
    encode(model, questions[:64])  # warm
    start = time.perf_counter()
    encode(model, questions, batch_size=64)
    return len(questions) / (time.perf_counter() - start)


def rows(minilm_qps: float, queries: int, timeout_s: float, deadline_s: float) -> list[dict]:
    """One row per (server, index): encoder and index queries/s (both scaled linearly with cores from the 2-core
    encoder measurement and the one-thread index measurement: upper bounds) and the turn's seconds."""
    e5_cpu2 = minilm_qps / E5_OVER_MINILM_FLOPS
    servers = {"this machine: 2 cores": (e5_cpu2, 2), "32-core CPU server": (e5_cpu2 * 16, 32),
               "32 cores + encoder on a GPU (`--device cuda`)": (GPU_ENCODER_QPS, 32)}
    out = []
    for server, (enc, cores) in servers.items():
        for kind in ("hnsw_sq8", "sq8", "flat"):
            out.append(_row(server, kind, enc, index_qps_at(kind, WIKI18) * cores, queries, timeout_s, deadline_s))
    out.append(_row("encoder and index on GPUs (`--gpu`, estimate)", "flat", GPU_ENCODER_QPS, GPU_FLAT_QPS,
                    queries, timeout_s, deadline_s))
    return out


def _row(server: str, kind: str, enc: float, idx: float, queries: int, timeout_s: float, deadline_s: float) -> dict:
    t = turn_seconds(queries, enc, idx)
    return {"server": server, "index": kind, "encoder_qps": enc, "index_qps": idx, "turn_s": t, "fits": t < timeout_s,
            "within_deadline": t < deadline_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    import yaml

    from rexrag.config import RetrievalConfig

    recipe = yaml.safe_load((REPO / "configs" / "rexrag_grpo_3b.yaml").read_text())
    queries = recipe["data"]["batch_size"] * recipe["rollout"]["n"]
    defaults = RetrievalConfig()
    load_before = os.getloadavg()[0]
    minilm = measure_minilm_qps()
    table = rows(minilm, queries, defaults.timeout_s, defaults.deadline_s)
    record = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "load_before": load_before,
              "load_after": os.getloadavg()[0], "minilm_qps_measured": minilm, "queries_per_turn": queries,
              "timeout_s": defaults.timeout_s, "deadline_s": defaults.deadline_s, "rows": table}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval_budget.json").write_text(json.dumps(record, indent=2))
    lines = [f"MiniLM-L6 query encoding measured: {minilm:.0f} q/s (batch 64, {os.cpu_count()} threads); load "
             f"{load_before:.2f} before, {record['load_after']:.2f} after; {queries} queries a turn "
             f"(configs/rexrag_grpo_3b.yaml); defaults timeout_s={defaults.timeout_s:g}, deadline_s={defaults.deadline_s:g}.",
             "", "| server | index at 21M | e5 encoder q/s | index q/s | one turn (s) | within timeout_s |",
             "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['server']} | {r['index']} | {r['encoder_qps']:,.0f} | {r['index_qps']:,.1f} | "
                     f"{r['turn_s']:,.1f} | {'yes' if r['fits'] else 'no'} |")
    (out / "retrieval_budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
