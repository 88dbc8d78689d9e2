"""Dense index types at scale: build time, file size, serving RSS, queries/s and recall@10 against Flat.

Vectors: ``--n`` unit vectors of ``--dim`` dimensions (768, e5-base-v2's) drawn around 1,000 random centres
with Gaussian spread, a documented synthetic stand-in (real wiki-18 e5 vectors are not available offline),
written to an on-disk memmap; 256 query vectors drawn the same way. Each index type is built with the
shipped path (``rexrag.retrieval.compressed``: factory string, training on a sample, chunked add) and
written; then a fresh subprocess loads it as ``rexrag serve`` would (memory-mapped where faiss can) and
reports its RSS after loading, queries/s at batch 1, 64 and 512 (k = 10, one thread per process as the
server's search threads use) and recall@10 against exact (Flat) search. Sizes scale linearly with the
vector count, so the table extrapolates them to wiki-18's 21,015,324 passages.

Usage: python bench/dense_scale.py [--n 1000000] [--dim 768] [--types flat,sq8,fp16,ivf_flat,ivf_pq,opq_ivf_pq]
                                   [--train-size 65536] [--work /tmp/dense_scale] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WIKI18 = 21_015_324


def make_vectors(path: Path, n: int, dim: int, seed: int, chunk: int = 100_000) -> np.memmap:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x = centres[rng.integers(0, 1000, b - a)] + 0.5 * rng.standard_normal((b - a, dim)).astype(np.float32)
        mm[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    mm.flush()
    return mm


def build(kind: str, vectors: np.memmap, out: Path, train_size: int) -> dict:
    import faiss

    from rexrag.retrieval import compressed as C

    n, dim = vectors.shape
    spec = "Flat" if kind == "flat" else C.factory_string(kind, "", dim, n)
    t0 = time.perf_counter()
    index = C.new_index(spec, dim)
    used = C.fill(index, n, lambda a, b: vectors[a:b], lambda ids: vectors[ids], train_size)
    build_s = time.perf_counter() - t0
    faiss.write_index(index, str(out))
    return {"factory": spec, "build_s": build_s, "train_vectors": used, "file_bytes": out.stat().st_size}


def serve(path: Path, queries: Path, truth: Path | None, out: Path, seconds: float = 3.0) -> None:
    """The child: load like the server, measure RSS, speed and recall."""
    import faiss

    from rexrag.retrieval.compressed import DEFAULT_EF_SEARCH, DEFAULT_NPROBE, set_search_params
    from rexrag.retrieval.faiss_files import open_mapped

    faiss.omp_set_num_threads(1)
    index = open_mapped(path)  # as `rexrag serve` opens it: memory-mapped, or a one-line error naming the type
    knobs = set_search_params(index, nprobe=DEFAULT_NPROBE if faiss.try_extract_index_ivf(index) is not None else 0,
                              ef_search=DEFAULT_EF_SEARCH)  # the server's defaults
    rss_loaded = _rss_mb()
    q = np.load(queries)
    qps = {}
    for batch in (1, 64, 512):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or done == 0:
            rows = q[(done % len(q)) : (done % len(q)) + batch] if batch < len(q) else np.tile(q, (2, 1))[:batch]
            index.search(rows, 10)
            done += len(rows)
        qps[batch] = done / (time.perf_counter() - t0)
    _, ids = index.search(q, 10)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child would report the parent's peak
    rec = {"rss_loaded_mb": rss_loaded, "peak_rss_mb": _rss_mb("VmHWM:"),
           "qps": qps, "search": knobs, "ids": ids.tolist()}
    if truth is not None:
        t = np.load(truth)
        rec["recall_at_10"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), t.tolist())]))
    out.write_text(json.dumps(rec))


def _rss_mb(field: str = "VmRSS:") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(path: Path, queries: Path, truth: Path | None, work: Path) -> dict:
    res = work / f"{path.stem}.serve.json"
    cmd = [sys.executable, __file__, "--serve", str(path), "--queries", str(queries), "--res", str(res)]
    if truth is not None:
        cmd += ["--truth", str(truth)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(res.read_text())


def previous_types(path: Path, n: int, dim: int) -> dict:
    """The types an earlier run at the same size recorded (each with its own machine record), kept beside
    the ones this run measures: a type can be added (e.g. HNSW) without rebuilding the others."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if (old.get("n"), old.get("dim")) != (n, dim):
        return {}
    header = {k: old[k] for k in ("cpu", "date", "command", "load_before", "load_after") if k in old}
    return {k: {"run": header, **v} for k, v in old["types"].items()}


def _mb(x) -> str:
    return "—" if x is None else f"{x:.0f}"


def markdown(report: dict) -> str:
    n = report["n"]
    runs = {json.dumps(r["run"], sort_keys=True): r["run"] for r in report["types"].values() if "run" in r}
    lines = [f"Machine: {r['cpu']}; load average {r['load_before']} before, {r['load_after']} after; {r['date']}. "
             f"Command: `{r['command']}`." for r in runs.values()] + ["",
             f"| type | factory | build (s) | file (MB) | RSS loaded / serving (MB) | q/s batch 1 | 64 | 512 | recall@10 vs Flat | "
             f"wiki-18 file (GB, x{WIKI18 / n:.1f}) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in report["types"].items():
        lines.append(f"| {kind} | `{r['factory']}` | {r['build_s']:.0f} | {r['file_bytes'] / 2**20:.0f} | "
                     f"{r['rss_loaded_mb']:.0f} / {_mb(r.get('peak_rss_mb'))} | {r['qps']['1']:.0f} | {r['qps']['64']:.0f} | {r['qps']['512']:.0f} | "
                     f"{r.get('recall_at_10', 1.0):.3f} | {r['file_bytes'] * WIKI18 / n / 1e9:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--types", default="flat,sq8,fp16,ivf_flat,ivf_pq,opq_ivf_pq")
    ap.add_argument("--train-size", type=int, default=65536)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dense_scale"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--serve", type=Path)
    ap.add_argument("--queries", type=Path)
    ap.add_argument("--truth", type=Path)
    ap.add_argument("--res", type=Path)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.queries, args.truth, args.res)
        return
    from rexrag.hardware import finish_record, run_record

    args.work.mkdir(parents=True, exist_ok=True)
    report = {**run_record("python bench/dense_scale.py " + " ".join(sys.argv[1:])), "n": args.n, "dim": args.dim,
              "types": {}}
    earlier = previous_types(args.out / "dense_scale.json", args.n, args.dim)
    vectors = make_vectors(args.work / "vectors.npy", args.n, args.dim, seed=1)
    queries = args.work / "queries.npy"
    np.save(queries, np.asarray(make_vectors(args.work / "q.npy", 256, args.dim, seed=2)))
    truth = None
    for kind in args.types.split(","):
        print(f"{kind} ...", flush=True)
        rec = build(kind, vectors, args.work / f"{kind}.index", args.train_size)
        rec.update(measure(args.work / f"{kind}.index", queries, truth, args.work))
        if kind == "flat":
            truth = args.work / "truth.npy"
            np.save(truth, np.asarray(rec["ids"]))
        rec.pop("ids")
        report["types"][kind] = rec
        print(json.dumps(rec), flush=True)
        (args.work / f"{kind}.index").unlink()
    finish_record(report)
    run = {k: report[k] for k in ("cpu", "date", "command", "load_before", "load_after")}
    report["types"] = {**earlier, **{k: {**v, "run": run} for k, v in report["types"].items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dense_scale.json").write_text(json.dumps(report, indent=1))
    (args.out / "dense_scale.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
