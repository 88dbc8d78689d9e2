"""BM25 (bm25s) at scale: build time and memory, index size, serving RSS and queries/s at several corpus sizes,
extrapolated to wiki-18's 21,015,324 passages.

Corpus: ``--sizes`` passages made from the shared 23,630-passage Wikipedia corpus, a documented synthetic
stand-in (wiki-18 itself is not available offline). Copy ``c`` of passage ``j`` keeps its text, except that
every word rare in the base corpus (at most 2 occurrences: names, numbers, rare terms) gets the suffix
``c`` written in letters, so each copy brings new words as new articles do. The vocabulary therefore grows
linearly with the corpus, faster than in real text (Heaps' law: about the square root), so the vocabulary-
driven part of memory is overstated, not understated; the posting lists (one entry per distinct word of a
passage) grow linearly either way.

Each size: ``rexrag.retrieval.build_index(corpus, "bm25", dir)`` (the shipped path, as ``rexrag index``)
runs in a fresh process that reports its wall time and peak RSS (``VmHWM``); then another fresh process
loads the index as ``rexrag serve`` does (``load_index``: bm25s' arrays memory-mapped, the passage store
memory-mapped) and reports its RSS after loading, its peak while serving, and queries/s at batch 1 and 64
for the 1,451 real dev questions (top-10, one thread). The last table row extrapolates each quantity
linearly from the two largest sizes.

    python bench/bm25_scale.py --sizes 100000,300000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WIKI18 = 21_015_324
WORD = re.compile(r"\w+")
QUESTIONS = ("hotpotqa_dev_ctx.flashrag.jsonl", "2wikimultihopqa_dev_ctx.flashrag.jsonl")


def letters(c: int) -> str:
    """0 -> "", 1 -> "a", 26 -> "z", 27 -> "aa", ...: a suffix the tokenizer keeps inside the word."""
    out = ""
    while c > 0:
        c, r = divmod(c - 1, 26)
        out = chr(97 + r) + out
    return out


def synth_corpus(base: Path, n: int, out: Path) -> int:
    """Write ``n`` passages built from ``base`` (see the module doc); returns the vocabulary growth base."""
    rows = [json.loads(line) for line in base.read_text().splitlines() if line.strip()]
    freq = Counter(w.lower() for r in rows for w in WORD.findall(r["contents"]))
    rare = {w for w, c in freq.items() if c <= 2}
    with open(out, "w") as fh:
        for i in range(n):
            c, j = divmod(i, len(rows))
            text = rows[j]["contents"]
            if c:
                suffix = letters(c)
                text = WORD.sub(lambda m: m.group(0) + suffix if m.group(0).lower() in rare else m.group(0), text)
            fh.write(json.dumps({"id": f"{rows[j]['id']}~{c}", "contents": text}, ensure_ascii=False) + "\n")
    return len(rare)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_build(corpus: Path, index: Path, res: Path) -> None:
    from rexrag.cli import quiet_libraries

    quiet_libraries()
    from rexrag.retrieval import build_index

    t0 = time.perf_counter()
    build_index(corpus, "bm25", index)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec (a child would show its parent's peak)
    res.write_text(json.dumps({"build_s": time.perf_counter() - t0, "build_peak_mb": _status_mb("VmHWM:")}))


def child_serve(index: Path, res: Path) -> None:
    from rexrag.cli import quiet_libraries

    quiet_libraries()
    from rexrag.data import load_qa
    from rexrag.retrieval import load_index

    questions = [e.question for f in QUESTIONS for e in load_qa(DATA / "derived" / f)]
    retriever = load_index(index, expect_kind="bm25")
    loaded = _status_mb("VmRSS:")
    retriever.search(questions[-64:], 10)  # first-call costs (lazy imports, page faults) out of the timing
    qps = {}
    for batch in (1, 64):
        todo = questions if batch > 1 else questions[:300]
        t0 = time.perf_counter()
        for a in range(0, len(todo), batch):
            retriever.search(todo[a : a + batch], 10)
        qps[str(batch)] = len(todo) / (time.perf_counter() - t0)
    res.write_text(json.dumps({"rss_loaded_mb": loaded, "serve_peak_mb": _status_mb("VmHWM:"), "qps": qps,
                               "vocab": len(retriever.tokenizer.word_to_id)}))


def run_child(*args: str) -> dict:
    res = Path(args[-1])
    subprocess.run([sys.executable, __file__, *args], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(res.read_text())


def dir_bytes(path: Path) -> dict:
    files = {p.name: p.stat().st_size for p in path.rglob("*") if p.is_file()}
    store = sum(v for k, v in files.items() if k.startswith("passages") or k.startswith("offsets"))
    return {"index_bytes": sum(files.values()) - store, "store_bytes": store}


KEYS = ("build_s", "build_peak_mb", "index_bytes", "store_bytes", "rss_loaded_mb", "serve_peak_mb")


def extrapolate(rows: list[dict], n: int) -> dict:
    """Each quantity at ``n`` passages on the line through the two largest measured sizes."""
    a, b = sorted(rows, key=lambda r: r["n"])[-2:]
    return {k: b[k] + (b[k] - a[k]) * (n - b["n"]) / (b["n"] - a["n"]) for k in KEYS}


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['cpu']}; load average {report['load_before']} before, {report['load_after']} after; "
             f"{report['date']}. Command: `{report['command']}`.", "",
             "| passages | vocabulary | build (s) | build peak RSS (GB) | index on disk (GB) | passage store (GB) | "
             "serving RSS after load / peak (GB) | q/s batch 1 | q/s batch 64 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["sizes"]:
        lines.append(f"| {r['n']:,} | {r['vocab']:,} | {r['build_s']:.0f} | {r['build_peak_mb'] / 1024:.2f} | "
                     f"{r['index_bytes'] / 1e9:.2f} | {r['store_bytes'] / 1e9:.2f} | {r['rss_loaded_mb'] / 1024:.2f} / "
                     f"{r['serve_peak_mb'] / 1024:.2f} | {r['qps']['1']:.0f} | {r['qps']['64']:.0f} |")
    e = report["wiki18"]
    lines.append(f"| {WIKI18:,} (wiki-18, extrapolated) | | {e['build_s']:.0f} | {e['build_peak_mb'] / 1024:.1f} | "
                 f"{e['index_bytes'] / 1e9:.1f} | {e['store_bytes'] / 1e9:.1f} | {e['rss_loaded_mb'] / 1024:.1f} / "
                 f"{e['serve_peak_mb'] / 1024:.1f} | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,300000,1000000")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bm25_scale"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--child", choices=("build", "serve"))
    ap.add_argument("paths", nargs="*", type=Path)
    args = ap.parse_args()
    if args.child == "build":
        return child_build(*args.paths)
    if args.child == "serve":
        return child_serve(*args.paths)
    import shutil

    from rexrag.hardware import finish_record, run_record

    sizes = sorted(int(s) for s in args.sizes.split(","))
    if len(sizes) < 2:
        raise SystemExit("--sizes: give at least two sizes (the extrapolation needs a line)")
    args.work.mkdir(parents=True, exist_ok=True)
    report = {**run_record("python bench/bm25_scale.py " + " ".join(sys.argv[1:])), "sizes": []}
    base = DATA / "derived" / "multihop_dev_corpus.flashrag.jsonl"
    for n in sizes:
        corpus, index = args.work / f"corpus_{n}.jsonl", args.work / f"bm25_{n}"
        shutil.rmtree(index, ignore_errors=True)
        rare = synth_corpus(base, n, corpus)
        print(f"{n:,} passages ({corpus.stat().st_size / 1e9:.2f} GB): building ...", flush=True)
        row = {"n": n, "corpus_bytes": corpus.stat().st_size, "rare_words": rare}
        row |= run_child("--child", "build", str(corpus), str(index), str(args.work / "build.json"))
        row |= dir_bytes(index)
        row |= run_child("--child", "serve", str(index), str(args.work / "serve.json"))
        print(json.dumps(row), flush=True)
        report["sizes"].append(row)
        shutil.rmtree(index)
        corpus.unlink()
    report["wiki18"] = extrapolate(report["sizes"], WIKI18)
    finish_record(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bm25_scale.json").write_text(json.dumps(report, indent=1))
    (args.out / "bm25_scale.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
