"""Where the demo's memory goes: run ``rexrag demo`` in this process and record RSS per phase.

A sampler thread reads this process's resident set size (``psutil``, every ``--interval`` s) and tags
each sample with the demo phase that is running (the phases announce themselves through
``rexrag.demo._say``: "1/6 preparing ...", "2/6 building ...", ..., "6/6 evaluating ..."). Per phase it
reports the RSS at the start, the highest sampled RSS and the RSS at the end, plus ``ru_maxrss`` of
this process and of its waited-for children at the end (the kernel's exact peaks; the sampler can
miss a spike shorter than its interval). Run it under ``/usr/bin/time -v`` for an outside view of
the same peak ("Maximum resident set size", which covers this process only; children are reported
separately by the kernel and by this script).

Usage: python bench/demo_memory.py [--quick] [--backend auto|hf|vllm] [--out runs/demo_mem]
                                   [--json bench/results/demo_memory.json] [--interval 0.2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import threading
import time
from pathlib import Path

import psutil

MB = 2**20


def _maxrss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


class PhaseSampler:
    """RSS samples of this process, grouped by the phase label current at each sample."""

    def __init__(self, interval: float):
        self.proc, self.interval = psutil.Process(), interval
        self.phase, self.t0 = "imports", time.perf_counter()
        self.rows: dict[str, dict] = {}
        self._stop = threading.Event()
        self._open(self.phase)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> float:
        return self.proc.memory_info().rss / MB

    def _open(self, name: str) -> None:
        rss = self._rss()
        self.rows[name] = {"start_mb": rss, "max_mb": rss, "end_mb": rss, "t_start_s": time.perf_counter() - self.t0}

    def _close(self, name: str) -> None:
        row = self.rows[name]
        row["end_mb"] = self._rss()
        row["max_mb"] = max(row["max_mb"], row["end_mb"])
        row["ru_maxrss_self_mb_at_end"] = _maxrss_mb(resource.RUSAGE_SELF)
        row["wall_s"] = time.perf_counter() - self.t0 - row["t_start_s"]

    def switch(self, name: str) -> None:
        self._close(self.phase)
        self.phase = name
        self._open(name)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            row = self.rows[self.phase]
            row["max_mb"] = max(row["max_mb"], self._rss())

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()
        self._close(self.phase)


PHASES = {"1/6": "model_import", "2/6": "index+load+engine", "3/6": "eval_before", "4/6": "warmup",
          "5/6": "train", "6/6": "eval_after"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/demo_mem")
    ap.add_argument("--json", default="")
    ap.add_argument("--interval", type=float, default=0.2)
    args = ap.parse_args()

    sampler = PhaseSampler(args.interval)
    sampler.start()
    from rexrag import demo

    original_say = demo._say

    def say(msg: str) -> None:
        key = msg.split(" ", 1)[0]
        if key in PHASES:
            sampler.switch(PHASES[key])
        original_say(msg)

    demo._say = say
    t0 = time.perf_counter()
    try:
        report = demo.run_demo(args.out, quick=args.quick, seed=args.seed, backend=args.backend)
    finally:
        sampler.switch("teardown")  # engine close and what follows run_demo's phases
        sampler.stop()
    wall = time.perf_counter() - t0
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    result = {
        "args": vars(args), "machine": platform.machine(), "wall_s": wall, "report": str(report),
        "ru_maxrss_self_mb": _maxrss_mb(resource.RUSAGE_SELF),
        "ru_maxrss_children_mb": _maxrss_mb(resource.RUSAGE_CHILDREN),
        "phases": sampler.rows,
        "eval_after": summary.get("after"), "eval_before": summary.get("before"),
        "warmup_losses": summary.get("warmup_losses"),
    }
    print(f"{'phase':20s} {'start MB':>9s} {'max MB':>9s} {'end MB':>9s} {'wall s':>7s}")
    for name, row in sampler.rows.items():
        print(f"{name:20s} {row['start_mb']:9.0f} {row['max_mb']:9.0f} {row['end_mb']:9.0f} {row['wall_s']:7.1f}")
    print(f"ru_maxrss: self {result['ru_maxrss_self_mb']:.0f} MB, children {result['ru_maxrss_children_mb']:.0f} MB; "
          f"wall {wall:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
