"""Evaluation reports: metrics.json, a Markdown table in the paper's layout, per-question jsonl,
before/after comparisons and training-curve plots.

Scores are per question in ``[0, 1]``; tables show them x100 with one decimal, as the REX-RAG and
Search-R1 papers do. The "Avg" column is the unweighted mean over the datasets present (the papers
average the seven benchmarks the same way), not a mean over all questions.

Per-question rows (dicts) carry at least ``dataset``, ``em``, ``f1``, ``cover_em``, ``n_searches``
and ``format_ok``; everything else (question, prediction, gold, trajectory text) is passed through
to the jsonl file unchanged.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from rexrag.fsutil import atomic_path, atomic_write_text

# (key, column title) in the order of the paper's tables; other datasets follow in first-seen order.
PAPER_COLUMNS: list[tuple[str, str]] = [
    ("nq", "NQ"),
    ("triviaqa", "TriviaQA"),
    ("popqa", "PopQA"),
    ("hotpotqa", "HotpotQA"),
    ("2wikimultihopqa", "2Wiki"),
    ("musique", "Musique"),
    ("bamboogle", "Bamboogle"),
]
SCORE_KEYS = ("em", "f1", "cover_em")
SUMMARY_KEYS = ("em", "f1", "cover_em", "mean_searches", "valid_format_rate")
AVERAGE = "average"
METRIC_TITLES = {"em": "EM (x100)", "f1": "F1 (x100)", "cover_em": "cover-EM (x100)",
                 "valid_format_rate": "valid format rate (%)", "mean_searches": "mean searches per question"}


# --------------------------------------------------------------------------- files


def write_predictions_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per question (atomic)."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def write_metrics_json(path: str | Path, metrics: dict) -> Path:
    return atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a jsonl file; a bad line raises ValueError naming file and line."""
    rows = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    return rows


# --------------------------------------------------------------------------- metrics


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per-dataset means plus the unweighted average over datasets.

    Returns ``{dataset: {n, em, f1, cover_em, mean_searches, valid_format_rate}, ..., "average": {...}}``.
    """
    by_ds: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_ds[str(r["dataset"])].append(r)
    out: dict[str, dict[str, float]] = {}
    for ds, items in by_ds.items():
        out[ds] = {
            "n": len(items),
            **{k: _mean([float(r[k]) for r in items]) for k in SCORE_KEYS},
            "mean_searches": _mean([float(r.get("n_searches", 0)) for r in items]),
            "valid_format_rate": _mean([1.0 if r.get("format_ok") else 0.0 for r in items]),
        }
    if out:
        out[AVERAGE] = {"n": sum(int(v["n"]) for v in out.values())}
        out[AVERAGE].update({k: _mean([v[k] for d, v in out.items() if d != AVERAGE]) for k in SUMMARY_KEYS})
    return out


def ordered_datasets(names: Iterable[str]) -> list[str]:
    """Paper order first, then the rest in the order given (``average`` excluded)."""
    names = [n for n in dict.fromkeys(names) if n != AVERAGE]
    known = [k for k, _ in PAPER_COLUMNS if k in names]
    return known + [n for n in names if n not in known]


def column_title(name: str) -> str:
    return dict(PAPER_COLUMNS).get(name, name)


def _fmt(value: Any, scale: float = 100.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value) * scale:.1f}"


# --------------------------------------------------------------------------- tables


def metrics_table_md(results: dict[str, dict], metric: str = "em", info: dict[str, Any] | None = None) -> str:
    """Markdown table: rows = method/model label, columns = datasets (paper order) + Avg.

    ``results`` maps a row label to a ``summarize`` output. ``info`` (model, corpus, retriever,
    top-k, ...) is written above the table as a bullet list.
    """
    datasets = ordered_datasets(d for m in results.values() for d in m)
    lines = []
    for key, value in (info or {}).items():
        lines.append(f"- {key}: {value}")
    if lines:
        lines.append("")
    scale = 1.0 if metric == "mean_searches" else 100.0
    lines.append(METRIC_TITLES.get(metric, metric))
    lines.append("")
    header = ["Method"] + [column_title(d) for d in datasets] + ["Avg"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for label, summary in results.items():
        cells = [label]
        for d in datasets:
            cells.append(_fmt(summary[d][metric], scale) if d in summary else "–")
        cells.append(_fmt(summary.get(AVERAGE, {}).get(metric), scale))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def n_table_md(summary: dict) -> str:
    """One-line table of question counts per dataset."""
    datasets = ordered_datasets(summary)
    return (
        "| " + " | ".join(["n"] + [column_title(d) for d in datasets]) + " |\n"
        + "|" + "|".join(["---"] + ["---:"] * len(datasets)) + "|\n"
        + "| " + " | ".join(["questions"] + [str(int(summary[d]["n"])) for d in datasets]) + " |\n"
    )


def metrics_markdown(label: str, summary: dict, info: dict[str, Any] | None = None) -> str:
    """The full metrics.md of one evaluation: EM, F1, cover-EM tables plus searches and format rate."""
    parts = [f"# Evaluation: {label}\n", metrics_table_md({label: summary}, "em", info)]
    for metric in ("f1", "cover_em", "valid_format_rate", "mean_searches"):
        parts.append(metrics_table_md({label: summary}, metric))
    parts.append(n_table_md(summary))
    return "\n".join(parts)


def comparison_table_md(before: dict, after: dict, labels: tuple[str, str] = ("before", "after"),
                        metrics: tuple[str, ...] = SUMMARY_KEYS) -> str:
    """Before/after table: one row per (dataset, metric), with the change. Scores x100."""
    datasets = ordered_datasets(list(before) + list(after)) + [AVERAGE]
    lines = [
        f"| Dataset | Metric | {labels[0]} | {labels[1]} | change |",
        "|---|---|---:|---:|---:|",
    ]
    for d in datasets:
        if d not in before and d not in after:
            continue
        for m in metrics:
            scale = 1.0 if m == "mean_searches" else 100.0
            b = before.get(d, {}).get(m)
            a = after.get(d, {}).get(m)
            delta = (a - b) if a is not None and b is not None else None
            sign = "+" if delta is not None and delta >= 0 else ""
            title = "Avg" if d == AVERAGE else column_title(d)
            lines.append(f"| {title} | {m} | {_fmt(b, scale)} | {_fmt(a, scale)} | "
                         f"{sign + _fmt(delta, scale) if delta is not None else '–'} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- intervals and paired tests

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (rates in [0, 1]; (0, 1) when n = 0).

    Unlike the normal ("Wald") interval it stays inside [0, 1] and is not degenerate at 0 or n
    successes, which is what small held-out sets give.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _by_dataset(rows: list[dict], metric: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        out[str(r["dataset"])].append(float(r[metric]))
    return out


def _stratified_bootstrap(groups: list[list[float]], n_boot: int, seed: int) -> list[float]:
    """``n_boot`` bootstrap replicates of the unweighted mean over groups of per-group means
    (each group resampled with replacement on its own, so every replicate keeps each group's size)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for values in groups:
        v = np.asarray(values, dtype=np.float64)
        total += v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return list(total / len(groups))


def _percentiles(samples: list[float], conf: float = 0.95) -> tuple[float, float]:
    import numpy as np

    a = np.asarray(samples)
    return float(np.quantile(a, (1 - conf) / 2)), float(np.quantile(a, 1 - (1 - conf) / 2))


def score_intervals(rows: list[dict], metric: str = "em", n_boot: int = 10_000, seed: int = 0) -> dict[str, dict]:
    """Per dataset ``{n, mean, lo, hi, method}`` with a 95 % Wilson interval (per-question scores are
    0/1), plus ``average``: the unweighted mean over datasets (as ``summarize``). When every dataset
    has the same n that mean is the pooled proportion and gets a Wilson interval too; otherwise a 95 %
    stratified bootstrap interval (each dataset resampled on its own; ``n_boot`` replicates, seeded)."""
    by = _by_dataset(rows, metric)
    out = {}
    for ds, values in by.items():
        lo, hi = wilson_interval(sum(values), len(values))
        out[ds] = {"n": len(values), "mean": _mean(values), "lo": lo, "hi": hi, "method": "wilson"}
    if by:
        n_total = sum(len(v) for v in by.values())
        if len({len(v) for v in by.values()}) == 1:
            (lo, hi), method = wilson_interval(sum(sum(v) for v in by.values()), n_total), "wilson"
        else:
            (lo, hi), method = _percentiles(_stratified_bootstrap(list(by.values()), n_boot, seed)), "bootstrap"
        out[AVERAGE] = {"n": n_total, "mean": _mean([_mean(v) for v in by.values()]), "lo": lo, "hi": hi,
                        "method": method}
    return out


def paired_difference(rows_a: list[dict], rows_b: list[dict], metric: str = "em", n_boot: int = 10_000,
                      seed: int = 0) -> dict[str, float]:
    """``b - a`` on the same questions: the difference of the unweighted mean over datasets, a 95 %
    paired bootstrap interval (questions resampled within each dataset, both scores of a question kept
    together), and how many questions ``b`` got right that ``a`` got wrong (``gained``) and the reverse
    (``lost``). Questions are paired by (dataset, id); both sides must hold the same questions."""
    def key(r: dict, i: int) -> tuple[str, str]:
        return str(r["dataset"]), str(r.get("id", i))

    a = {key(r, i): float(r[metric]) for i, r in enumerate(rows_a)}
    b = {key(r, i): float(r[metric]) for i, r in enumerate(rows_b)}
    if set(a) != set(b):
        raise ValueError(f"paired_difference needs the same questions on both sides ({len(a)} vs {len(b)}, "
                         f"{len(set(a) ^ set(b))} unpaired)")
    diffs: dict[str, list[float]] = defaultdict(list)
    for k, score_a in a.items():
        diffs[k[0]].append(b[k] - score_a)
    if not diffs:
        return {"n": 0, "diff": 0.0, "lo": 0.0, "hi": 0.0, "gained": 0, "lost": 0}
    lo, hi = _percentiles(_stratified_bootstrap(list(diffs.values()), n_boot, seed))
    return {"n": len(a), "diff": _mean([_mean(v) for v in diffs.values()]), "lo": lo, "hi": hi,
            "gained": sum(1 for k in a if b[k] > a[k]), "lost": sum(1 for k in a if b[k] < a[k])}


def difference_sentence(d: dict[str, float], what: str, baseline: str, metric: str = "EM") -> str:
    """One plain sentence about a ``paired_difference`` result, x100 points: is it beyond noise?
    ``what`` is the subject ("RL (REX-RAG)", "the format warm-up"); the sentence starts capitalised."""
    x, lo, hi = 100 * d["diff"], 100 * d["lo"], 100 * d["hi"]
    subject = what[:1].upper() + what[1:]
    stats = (f"{x:+.1f} {metric} over {baseline} (95% paired-bootstrap CI {lo:+.1f}..{hi:+.1f} on the same "
             f"{int(d['n'])} held-out questions; {int(d['gained'])} newly right, {int(d['lost'])} newly wrong)")
    if d["gained"] == 0 and d["lost"] == 0:
        return f"{subject} changed no held-out answer's {metric}: {stats}; it added nothing measurable."
    if lo > 0:
        return f"{subject} added {stats}: a gain beyond noise."
    if hi < 0:
        return f"{subject} changed the score by {stats}: a loss beyond noise."
    return (f"{subject} changed the score by {stats}: within noise, so {what} added nothing measurable beyond "
            f"{baseline} at this sample size.")


def interval_table_md(results: dict[str, list[dict]], metrics: tuple[str, ...] = ("em", "cover_em")) -> str:
    """Markdown table, one row per label: per metric, each dataset and Avg as ``mean [lo, hi]`` x100.

    ``results`` maps a row label to its per-question rows; the header names n per dataset. Intervals
    as in ``score_intervals`` (Wilson; Avg by stratified bootstrap when the datasets differ in n)."""
    datasets = ordered_datasets(str(r["dataset"]) for rows in results.values() for r in rows)
    ns = {d: max((sum(1 for r in rows if str(r["dataset"]) == d) for rows in results.values()), default=0) for d in datasets}
    header, cells_by_label = ["Method"], {label: [label] for label in results}
    for m in metrics:
        title = {"em": "EM", "cover_em": "cover-EM", "f1": "F1"}.get(m, m)
        header += [f"{title} {column_title(d)} (n={ns[d]})" for d in datasets] + [f"{title} Avg"]
        for label, rows in results.items():
            iv = score_intervals(rows, m)
            for d in datasets + [AVERAGE]:
                c = iv.get(d)
                cells_by_label[label].append(f"{100 * c['mean']:.1f} [{100 * c['lo']:.1f}, {100 * c['hi']:.1f}]" if c else "–")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in cells_by_label.values()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots

# Plot name -> predicate on a metric key. Trainer metric names are matched loosely (substring), so
# the plots keep working when a key is renamed from e.g. "reward/mean" to "train/reward_mean".
PLOT_GROUPS: dict[str, Any] = {
    "reward": lambda k: ("reward" in k and "std" not in k and not k.startswith(("rex/", "timing/")))
    or k == "rollout/valid_format_rate",
    "dead_end": lambda k: "dead" in k,
    "probe": lambda k: (k.startswith("rex/") or "probe" in k) and "dead" not in k,
}


# Shown first (in this order) when a plot group has more keys than fit; the rest follow by name.
PLOT_PRIORITY = ("reward/mean", "reward/positive_rate", "rollout/valid_format_rate", "rex/dead_end_frac",
                 "rex/dead_groups_rescued", "rex/probes_kept", "rex/probes_made", "rex/probe_acc", "rex/rho",
                 "rex/alpha", "rex/failure_rate", "rex/ratio_mean", "rex/ratio_clipfrac")


def _priority(key: str) -> tuple[int, str]:
    return (PLOT_PRIORITY.index(key) if key in PLOT_PRIORITY else len(PLOT_PRIORITY), key)


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    """Training metrics, one JSON object per step (as written by ``rexrag train``)."""
    return read_jsonl(path)


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, rec in enumerate(records):
        v = rec.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
            continue
        xs.append(float(rec.get("step", i)))
        ys.append(float(v))
    return xs, ys


def plot_curves(records: list[dict], keys: list[str], path: str | Path, title: str) -> Path | None:
    """One small subplot per key (metrics have different scales); saves a PNG, or None if no data."""
    keys = [k for k in keys if _series(records, k)[0]]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot import
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs, ys = _series(records, key)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, linewidth=1.5)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path


def plot_training(records: list[dict], out_dir: str | Path, max_keys: int = 9) -> dict[str, Path]:
    """PNG per plot group (reward, dead_end, probe) that has data; returns {group: path}."""
    keys = list(dict.fromkeys(k for rec in records for k in rec if k != "step"))
    out = {}
    for name, pred in PLOT_GROUPS.items():
        chosen = sorted((k for k in keys if pred(k)), key=_priority)[:max_keys]
        path = plot_curves(records, chosen, Path(out_dir) / f"{name}.png", name.replace("_", " "))
        if path is not None:
            out[name] = path
    return out
