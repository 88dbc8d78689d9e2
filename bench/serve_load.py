"""Load test of `rexrag serve` on loopback: queries/s, latency percentiles, errors, server RSS, and
how quickly ``/health`` answers while ``/retrieve`` is under load, at several client concurrencies.

The server is a real ``rexrag serve`` subprocess bound to 127.0.0.1 (BM25 over the shared corpus, or
``--index`` DIR); each level runs ``--duration`` seconds of closed-loop clients (each sends its next
request when the last is answered) with Search-R1's body (``{"queries": [...], "topk": k,
"return_scores": true}``, HotpotQA questions), while a prober times ``GET /health`` every 0.2 s and
samples the server's RSS. Bounded: every level stops at its deadline, and the server is stopped at
the end whatever happens. Client and server share the machine: on a small one the client's own CPU
use lowers the numbers, so compare runs made on the same machine only.

    python bench/serve_load.py                                   # 1/8/32/64 clients, 10 s each
    python bench/serve_load.py --concurrency 1,8 --duration 2 --corpus-limit 2000   # quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (Linux /proc; NaN elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "rexrag.cli",
        "serve",
        "--index",
        str(index),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--log-level",
        "warning",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"rexrag serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("rexrag serve did not answer /health within 120 s")
        time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


async def run_level(
    url: str, pid: int, questions: list[str], concurrency: int, duration: float, per_request: int, topk: int
) -> dict:
    """``concurrency`` closed-loop clients for ``duration`` s, plus a /health prober."""
    latencies: list[float] = []
    health: list[float] = []
    errors: dict[str, int] = {}
    rss_peak = rss_before = rss_mb(pid)
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        i = worker * per_request
        while time.perf_counter() < deadline:
            batch = [questions[(i + j) % len(questions)] for j in range(per_request)]
            i += concurrency * per_request
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/retrieve", json={"queries": batch, "topk": topk, "return_scores": True})
                ok = r.status_code == 200 and len(r.json()["result"]) == per_request
                key = "" if ok else f"HTTP {r.status_code}"
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                key = type(exc).__name__
            if key:
                errors[key] = errors.get(key, 0) + 1
            else:
                latencies.append(time.perf_counter() - start)

    async def prober() -> None:
        nonlocal rss_peak
        async with httpx.AsyncClient(timeout=10) as http:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    ok = (await http.get(f"{url}/health")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    health.append(time.perf_counter() - start)
                else:
                    errors["health"] = errors.get("health", 0) + 1
                rss_peak = max(rss_peak, rss_mb(pid))
                await asyncio.sleep(0.2)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(prober(), *(client(w, http) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests_ok": len(latencies),
        "errors": errors,
        "queries_per_s": round(len(latencies) * per_request / elapsed, 1),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(latencies, 50),
        "p95_ms": pct(latencies, 95),
        "p99_ms": pct(latencies, 99),
        "health_p50_ms": pct(health, 50),
        "health_p99_ms": pct(health, 99),
        "health_max_ms": round(max(health) * 1000, 1) if health else float("nan"),
        "rss_before_mb": round(rss_before, 1),
        "rss_peak_mb": round(rss_peak, 1),
        "rss_after_mb": round(rss_mb(pid), 1),
        "elapsed_s": round(elapsed, 2),
    }


def build_subcorpus_index(corpus: Path, limit: int, tmp: Path) -> Path:
    from rexrag.retrieval import build_index

    if limit:
        sub = tmp / "corpus.jsonl"
        with corpus.open() as src, sub.open("w") as dst:
            for _, line in zip(range(limit), src):
                dst.write(line)
        corpus = sub
    return build_index(corpus, "bm25", tmp / "bm25")


def markdown(rows: list[dict]) -> str:
    head = (
        "| clients | queries/s | req/s | p50 ms | p95 ms | p99 ms | errors | /health p50 / p99 / max ms "
        "| server RSS before / peak / after MB |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        lines.append(
            f"| {r['concurrency']} | {r['queries_per_s']} | {r['requests_per_s']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['p99_ms']} | {errs} | {r['health_p50_ms']} / {r['health_p99_ms']} / "
            f"{r['health_max_ms']} | {r['rss_before_mb']} / {r['rss_peak_mb']} / {r['rss_after_mb']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DATA), help="shared data dir (corpus and HotpotQA questions)")
    ap.add_argument("--index", default="", help="serve this index dir instead of building BM25 over the corpus")
    ap.add_argument("--corpus-limit", type=int, default=0, help="index only the first N passages (0 = all 23,630)")
    ap.add_argument("--concurrency", default="1,8,32,64", help="client concurrencies, one level each")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    ap.add_argument("--queries-per-request", type=int, default=8)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--server-args", default="", help="extra `rexrag serve` flags, e.g. '--max-concurrency 128'")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_load.json"), help="JSON results")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    if not levels or min(levels) < 1 or args.duration <= 0 or args.queries_per_request < 1:
        ap.error("--concurrency needs positive integers; --duration and --queries-per-request must be positive")

    sys.path.insert(0, str(REPO / "src"))
    from rexrag.data import load_qa

    data = Path(args.data_dir)
    corpus = data / "derived" / "multihop_dev_corpus.flashrag.jsonl"
    qa_file = data / "derived" / "hotpotqa_dev_ctx.flashrag.jsonl"
    if not args.index and not corpus.is_file():
        ap.error(f"{corpus} not found: pass --data-dir (the shared data dir) or --index")
    questions = [e.question for e in load_qa(qa_file)] if qa_file.is_file() else ["rock band drummer"]
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "load_avg_start": os.getloadavg()[0],
        "duration_s": args.duration,
        "queries_per_request": args.queries_per_request,
        "topk": args.topk,
        "server_args": args.server_args,
        "levels": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(args.index) if args.index else build_subcorpus_index(corpus, args.corpus_limit, Path(tmp))
        results["index"] = str(args.index or f"bm25 over {args.corpus_limit or 'all'} passages of {corpus.name}")
        port = free_port()
        proc = start_server(index, port, args.server_args.split())
        try:
            results["server_rss_start_mb"] = round(rss_mb(proc.pid), 1)
            url = f"http://127.0.0.1:{port}"
            for c in levels:
                row = asyncio.run(
                    run_level(url, proc.pid, questions, c, args.duration, args.queries_per_request, args.topk)
                )
                print(json.dumps(row), flush=True)
                results["levels"].append(row)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    results["load_avg_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}\n")
    print(markdown(results["levels"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
