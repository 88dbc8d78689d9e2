"""Two demo runs on the same held-out questions, compared stage by stage with a paired bootstrap.

Made for the precision check of issue 24: ``rexrag demo --out runs/demo`` (bf16 where the CPU has bf16
units) against ``rexrag demo --precision fp32 --out runs/demo_fp32``; any two demo report directories
work. For each stage (``eval_before``, ``eval_warmup``, ``eval_after``) and metric (EM, cover-EM): both
scores and the paired difference second - first with its 95 % interval
(``rexrag.eval.report.paired_difference``). Writes JSON and a Markdown table.

Usage: python bench/demo_precision.py FIRST_DIR SECOND_DIR [--labels bf16,fp32] [--out bench/results/demo_precision]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rexrag.eval.report import paired_difference

STAGES = ("eval_before", "eval_warmup", "eval_after")


def load_rows(run: Path, stage: str) -> list[dict]:
    path = run / stage / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score(rows: list[dict], metric: str) -> float:
    """Unweighted mean over datasets of the per-dataset mean (the report's Avg)."""
    by_ds: dict[str, list[float]] = {}
    for r in rows:
        by_ds.setdefault(str(r["dataset"]), []).append(float(r[metric]))
    return sum(sum(v) / len(v) for v in by_ds.values()) / len(by_ds)


def compare(first: Path, second: Path) -> list[dict]:
    out = []
    for stage in STAGES:
        a, b = load_rows(first, stage), load_rows(second, stage)
        for metric in ("em", "cover_em"):
            d = paired_difference(a, b, metric)
            out.append({"stage": stage, "metric": metric, "a": score(a, metric), "b": score(b, metric), **d})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--labels", default="first,second")
    ap.add_argument("--out", default="bench/results/demo_precision")
    args = ap.parse_args()
    la, lb = args.labels.split(",")
    rows = compare(Path(args.first), Path(args.second))
    lines = [f"| stage | metric | n | {la} | {lb} | {lb} - {la} [95 % paired CI] | newly right / wrong |", "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['metric']} | {r['n']} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | "
                     f"{100 * r['diff']:+.1f} [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] | {r['gained']} / {r['lost']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"first": args.first, "second": args.second, "labels": [la, lb],
                                                    "rows": rows}, indent=1))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
