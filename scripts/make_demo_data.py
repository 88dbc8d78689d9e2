"""Build the small demo data set bundled in ``src/rexrag/resources/demo/`` (deterministic).

Sources (see ``../shared/data/SOURCES.md``): the derived closed multi-hop corpus
``derived/multihop_dev_corpus.flashrag.jsonl`` and its question files
``derived/hotpotqa_dev_ctx.flashrag.jsonl`` / ``derived/2wikimultihopqa_dev_ctx.flashrag.jsonl``.

Selection:
1. Keep questions that have their own per-question context (``context_doc_ids``) and whose gold
   (supporting) passages are all inside that context, so the bundled corpus can answer them.
2. Draw ``--per-dataset`` questions per dataset with ``random.Random(--seed)``, stratified by the
   question type so bridge / comparison / compositional questions all appear.
3. The corpus is the union of the chosen questions' context passages (gold + distractors), in the
   order of the source corpus; passage text is copied unchanged.
4. ``--eval-per-dataset`` questions per dataset go to ``eval.jsonl`` (held out), the rest to
   ``train.jsonl`` (used by the warm-up and RL). Metadata is slimmed to what the demo uses.

Usage:  python scripts/make_demo_data.py [--shared ../shared/data] [--out src/rexrag/resources/demo]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTION_FILES = {
    "hotpotqa": "derived/hotpotqa_dev_ctx.flashrag.jsonl",
    "2wikimultihopqa": "derived/2wikimultihopqa_dev_ctx.flashrag.jsonl",
}
CORPUS_FILE = "derived/multihop_dev_corpus.flashrag.jsonl"
KEEP_META = ("dataset", "type", "supporting_titles", "supporting_doc_ids")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def answerable(row: dict) -> bool:
    meta = row.get("metadata") or {}
    ctx = meta.get("context_doc_ids")
    gold = meta.get("supporting_doc_ids") or []
    return bool(ctx) and bool(gold) and set(gold) <= set(ctx)


def stratified_sample(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """``n`` rows, spread over ``metadata.type`` in proportion to the pool (round-robin)."""
    by_type: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_type[str(row["metadata"].get("type"))].append(row)
    for key in sorted(by_type):
        rng.shuffle(by_type[key])
    out: list[dict] = []
    keys = sorted(by_type)
    while len(out) < n and any(by_type.values()):
        for key in keys:
            if by_type[key] and len(out) < n:
                out.append(by_type[key].pop())
    return out


def slim(row: dict) -> dict:
    meta = {k: row["metadata"][k] for k in KEEP_META if k in row["metadata"]}
    return {"id": row["id"], "question": row["question"], "golden_answers": row["golden_answers"], "metadata": meta}


def build(shared: Path, out: Path, per_dataset: int, eval_per_dataset: int, seed: int) -> dict:
    rng = random.Random(seed)
    train, held_out, needed = [], [], set()
    for name, rel in QUESTION_FILES.items():
        pool = [r for r in read_jsonl(shared / rel) if answerable(r)]
        chosen = stratified_sample(pool, per_dataset, rng)
        rng.shuffle(chosen)
        for row in chosen:
            needed.update(row["metadata"]["context_doc_ids"])
        held_out += [slim(r) for r in chosen[:eval_per_dataset]]
        train += [slim(r) for r in chosen[eval_per_dataset:]]
    corpus = [p for p in read_jsonl(shared / CORPUS_FILE) if p["id"] in needed]
    missing = needed - {p["id"] for p in corpus}
    if missing:
        raise SystemExit(f"{len(missing)} context passages missing from the corpus, e.g. {sorted(missing)[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "corpus.jsonl", corpus)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held_out)
    manifest = {
        "seed": seed,
        "per_dataset": per_dataset,
        "eval_per_dataset": eval_per_dataset,
        "counts": {"corpus": len(corpus), "train": len(train), "eval": len(held_out)},
        "sha256": {
            f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in ("corpus.jsonl", "train.jsonl", "eval.jsonl")
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "src" / "rexrag" / "resources" / "demo")
    ap.add_argument("--per-dataset", type=int, default=100)
    ap.add_argument("--eval-per-dataset", type=int, default=20)
    ap.add_argument("--seed", type=int, default=20261122)
    args = ap.parse_args()
    manifest = build(args.shared, args.out, args.per_dataset, args.eval_per_dataset, args.seed)
    print(json.dumps(manifest["counts"]), "->", args.out)


if __name__ == "__main__":
    main()
