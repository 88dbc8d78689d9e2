"""Padding-free update: tokens computed per real token and update time, padded against packed, in one script.

    python bench/packing.py [--workloads demo,search_r1] [--demo-rows 9] [--search-rows 8] [--repeats 2]
                            [--search-repeats 1] [--scale-rows 320] [--threads 1] [--seed 0]
                            [--out bench/results/packing.json]

Both workloads run rexrag's own ``Trainer.update`` (forward + backward of every micro-batch, gradient
clipping, the AdamW step) on SmolLM2-135M-Instruct (the offline default, loaded as ``load_model`` loads it),
with a recipe's trainer and model settings, once with ``trainer.pack_sequences=false`` (the recipes as they
ship: ``micro_batch_size`` rows per forward, every row padded to the batch's longest, ``micro_batch_tokens=0``)
and once with ``true``: the same rows, the same micro-batch rows, so the same real tokens. Timed updates
alternate padded / packed ``--repeats`` times after one untimed warm-up update on a 2-row batch (lazy
initialisation, AdamW state); medians are reported. One torch thread by default: on a shared 2-core machine
the process's CPU time then measures the update's own work (two threads spin while the other is descheduled)
and the padded/packed ratio holds steady; the wall clock is recorded beside it. ``lr=0`` keeps the weights fixed, so the two modes'
log-probs (the update's own on-policy forward) are compared on the same weights. KL to a reference is off
(``algo.kl_coef=0``: its term is elementwise on precomputed log-probs, no forward of its own in the update).

Workloads (rows are token ids; only their lengths matter for the cost):

* ``demo`` -- ``configs/demo_cpu.yaml`` (fp32, no gradient checkpointing, 4 rows per micro-batch): 2 prompts
  x 4 rollouts + 1 kept probe = 9 rows. Prompt: a bundled demo question in the ``rexrag`` template (real
  tokens, 137-155). Response (``max_turns=2``, 64 new tokens a turn, ``max_obs_tokens=64``, top-2): 0/1/2
  searches with probability 0.1/0.3/0.6, each a turn of U(24, 64) generated tokens plus an <information>
  block of 2 real corpus passages cut to 64 tokens; then an answer turn of U(24, 64); the probe row gets
  25 inserted tokens more. (The demo's recorded multi-turn steps averaged ~384 tokens a row.)
* ``search_r1`` -- ``configs/search_r1_grpo_3b.yaml``'s settings on SmolLM2 (bf16 autocast, gradient
  checkpointing, 8 rows per micro-batch, ``max_total_tokens`` 4608): prompt = a bundled question in the
  ``search-r1`` template (157-175 tokens with SmolLM2's tokenizer; Qwen2.5's chat template adds ~30);
  0-5 searches with probability 0.10/0.35/0.30/0.15/0.07/0.03, each a turn of U(40, 200) generated tokens
  plus an <information> block of 3 real passages of the multi-hop corpus (../shared/data/derived) cut to
  ``max_obs_tokens`` 500; an answer turn of U(30, 150); the row cut at 4608.

Besides the timed batch (one micro-batch of the recipe's 8 rows: padded to the longest of 8), the
``search_r1`` record counts tokens computed per real token over ``--scale-rows`` rows, what a process holds
in the recipe (512 prompts x 5 over 8 GPUs = 320): there every micro-batch is padded to the longest of 320.

The record: machine (CPU model, flags, matmul peak fp32/bf16 measured here), load average before/after, the
row lengths, tokens computed per real token before/after (``update/padding_ratio``), update seconds (each
repeat and the median; wall clock, and the process's CPU time, steadier on a shared machine), the speed-ups,
the largest |log-prob| difference padded vs packed, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "derived" / "multihop_dev_corpus.flashrag.jsonl"
WORKLOADS = {
    "demo": {"config": "configs/demo_cpu.yaml", "template": "rexrag", "searches": [0.1, 0.3, 0.6], "turn": (24, 64),
             "answer": (24, 64), "docs": 2, "obs": 64, "probe_rows": 1, "probe_tokens": 25},
    "search_r1": {"config": "configs/search_r1_grpo_3b.yaml", "template": "search-r1",
                  "searches": [0.10, 0.35, 0.30, 0.15, 0.07, 0.03], "turn": (40, 200), "answer": (30, 150), "docs": 3,
                  "obs": 500, "probe_rows": 0, "probe_tokens": 0},
}


def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def passages(limit: int = 4000) -> list[SimpleNamespace]:
    rows = []
    with open(CORPUS) as f:
        for line, _ in zip(f, range(limit)):
            rows.append(SimpleNamespace(contents=json.loads(line)["contents"]))
    return rows


def info_block(tok, docs: list, obs: int) -> list[int]:
    """``\\n\\n<information>{Doc 1(Title: ...) ...}</information>\\n\\n`` with the passages cut to ``obs`` tokens."""
    from rexrag.protocol import INFO_CLOSE, INFO_OPEN, format_information

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    return ids(INFO_OPEN) + ids(format_information(docs))[:obs] + ids(INFO_CLOSE)


def draw_rows(spec: dict, n: int, cfg, tok, questions: list[str], corpus: list,
              rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """``n`` rows as (token ids, segment kinds) drawn from the workload's distribution (module docstring)."""
    from rexrag.prompts import build_prompt_ids
    from rexrag.rollout.trajectory import Seg

    vocab = tok.vocab_size
    out = []
    for i in range(n):
        ids = build_prompt_ids(tok, questions[i % len(questions)], spec["template"])
        seg = [int(Seg.PROMPT)] * len(ids)

        def gen(lo_hi, kind=Seg.POLICY):
            k = rng.randint(*lo_hi)
            ids.extend(rng.randrange(vocab) for _ in range(k))
            seg.extend([int(kind)] * k)

        k = rng.choices(range(len(spec["searches"])), weights=spec["searches"])[0]
        for _ in range(k):
            gen(spec["turn"])
            block = info_block(tok, rng.sample(corpus, spec["docs"]), spec["obs"])
            ids.extend(block)
            seg.extend([int(Seg.INFO)] * len(block))
        if i >= n - spec["probe_rows"]:
            gen((spec["probe_tokens"], spec["probe_tokens"]), Seg.PROBE)
        gen(spec["answer"])
        cap = cfg.rollout.max_total_tokens
        out.append((ids[:cap], seg[:cap]))
    return out


def make_batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    from rexrag.rollout.trajectory import Seg
    from rexrag.train.batch import Batch

    B, T = len(rows), max(len(r[0]) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    for i, (r, s) in enumerate(rows):
        ids[i, : len(r)], seg[i, : len(s)] = torch.tensor(r), torch.tensor(s)
    am = (seg >= 0).long()
    loss = ((seg == int(Seg.POLICY)) | (seg == int(Seg.PROBE))).float()
    z = torch.zeros(B, T)
    return Batch(input_ids=ids, attention_mask=am, segments=seg, loss_mask=loss, rollout_logprobs=z, turns=z.long(),
                 group_ids=torch.arange(B) // 4, lengths=am.sum(-1), rewards=torch.zeros(B),
                 is_probe=torch.zeros(B, dtype=torch.bool), probe_start=torch.full((B,), -1))


def targets_for(batch, seed: int):
    from rexrag.train.batch import Targets

    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(batch.size, 1, generator=g).expand_as(batch.loss_mask) * batch.loss_mask
    return Targets(advantages=adv.contiguous())  # old_logp None: on-policy, pi_old from the update's own forward


def scale_ratio(name: str, rows_n: int, seed: int, cfg, tok, questions: list[str], corpus: list) -> dict:
    """Tokens computed per real token over ``rows_n`` rows of the workload's distribution (a process's rows
    at the recipe's scale), lengths only: the recipe's split (``micro_batch_size`` rows, every row padded to
    the batch's longest) against packed (1.0 by construction: only real tokens are computed)."""
    from rexrag.train.batch import micro_batches, padding_ratio

    rows = draw_rows(WORKLOADS[name], rows_n, cfg, tok, questions, corpus, random.Random(seed + 1))
    lengths = torch.tensor([len(r) for r, _ in rows])
    width = int(lengths.max())
    split = micro_batches(torch.arange(rows_n), lengths, width, cfg.trainer.micro_batch_size, cfg.trainer.micro_batch_tokens)
    packed = micro_batches(torch.arange(rows_n), lengths, width, cfg.trainer.micro_batch_size, cfg.trainer.micro_batch_tokens,
                           packed=True)
    return {"rows": rows_n, "mean_length": float(lengths.float().mean()), "max_length": width,
            "computed_per_real": {"padded": padding_ratio(split, lengths), "packed": padding_ratio(packed, lengths, True)}}


def run_workload(name: str, rows_n: int, repeats: int, seed: int, model_cache: dict, scale_rows: int = 0) -> dict:
    from rexrag.config import load_config
    from rexrag.data import demo_file, load_qa_files
    from rexrag.models import load_model, load_tokenizer
    from rexrag.train.trainer import Trainer

    spec = WORKLOADS[name]
    cfg = load_config(str(REPO / spec["config"]), ["model.name_or_path=smollm2-135m", "algo.kl_coef=0.0", "trainer.lr=0.0",
                                                    "trainer.warmup_steps=0", "rex.enabled=false",
                                                    f"trainer.out_dir={REPO / 'runs' / 'bench_packing'}"])
    tok = load_tokenizer(cfg.model.name_or_path)
    examples = list(load_qa_files([demo_file("train.jsonl")]))
    cfg.data.batch_size = min(cfg.data.batch_size, len(examples))
    rng = random.Random(seed)
    corpus = model_cache.setdefault("corpus", passages())
    rows = draw_rows(spec, rows_n, cfg, tok, [ex.question for ex in examples], corpus, rng)
    batch = make_batch(rows, tok.pad_token_id)
    scale = scale_ratio(name, scale_rows, seed, cfg, tok, [ex.question for ex in examples], corpus) if scale_rows else None
    model = load_model(cfg.model)
    model.train()
    trainer = Trainer(cfg, model, tok, examples, rollout_fn=lambda ex, n: [], reward_fn=lambda *a, **k: [], reference=None,
                      progress=False)
    warm = make_batch([(r[:32], s[:32]) for r, s in rows[:2]], tok.pad_token_id)
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    ratio, fresh = {}, {}
    for pack in (False, True):  # untimed: lazy init, AdamW state, the varlen kernel's registration
        trainer.tc.pack_sequences = pack
        trainer.update(warm, targets_for(warm, seed), trainer._chunks(warm.size))
    for _ in range(repeats):
        for pack in (False, True):
            trainer.tc.pack_sequences = pack
            t0, c0 = time.perf_counter(), time.process_time()
            m, lp = trainer.update(batch, targets_for(batch, seed), trainer._chunks(batch.size))
            times[pack].append(time.perf_counter() - t0)
            cpu[pack].append(time.process_time() - c0)
            ratio[pack], fresh[pack] = m["update/padding_ratio"], lp
    real = batch.attention_mask.bool()
    lengths = batch.lengths.tolist()
    med = {p: statistics.median(v) for p, v in times.items()}
    med_cpu = {p: statistics.median(v) for p, v in cpu.items()}
    return {"workload": name, "config": spec["config"], "rows": len(rows), "micro_batch_size": cfg.trainer.micro_batch_size,
            "micro_batch_tokens": cfg.trainer.micro_batch_tokens, "autocast_bf16": cfg.model.autocast_bf16,
            "gradient_checkpointing": cfg.model.gradient_checkpointing, "lengths": lengths,
            "real_tokens": int(real.sum()), "padded_slots": batch.size * batch.input_ids.shape[1],
            "computed_per_real": {"padded": ratio[False], "packed": ratio[True]},
            "update_s": {"padded": times[False], "packed": times[True]},
            "update_median_s": {"padded": med[False], "packed": med[True]}, "speedup": med[False] / med[True],
            "update_cpu_s": {"padded": cpu[False], "packed": cpu[True]}, "speedup_cpu_time": med_cpu[False] / med_cpu[True],
            "logprob_max_abs_diff": float((fresh[False] - fresh[True])[real].abs().max()),
            "attn_implementation": model.config._attn_implementation, "at_scale": scale}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="demo,search_r1")
    p.add_argument("--demo-rows", type=int, default=9)
    p.add_argument("--search-rows", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timed padded/packed pairs (demo)")
    p.add_argument("--search-repeats", type=int, default=1, help="timed padded/packed pairs (search_r1)")
    p.add_argument("--scale-rows", type=int, default=320,
                   help="search_r1 rows a process holds in the recipe (512 x 5 over 8 GPUs): lengths-only ratio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time measures the work alone)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "packing.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    from rexrag.hardware import finish_record, run_record

    record = run_record("python bench/packing.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    torch.set_num_threads(args.threads)
    record["threads"] = torch.get_num_threads()
    record["matmul_gflops"] = {"fp32": matmul_rate(torch.float32) / 1e9, "bf16": matmul_rate(torch.bfloat16) / 1e9}
    record["results"] = []
    cache: dict = {}
    for name in args.workloads.split(","):
        demo = name == "demo"
        res = run_workload(name, args.demo_rows if demo else args.search_rows, args.repeats if demo else args.search_repeats,
                           args.seed, cache, 0 if demo else args.scale_rows)
        record["results"].append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "lengths"}), flush=True)
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finish_record(record)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "results"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
