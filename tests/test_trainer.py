"""End-to-end trainer tests on a tiny random model with a learnable toy reward (CPU, seconds each)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rexrag.train import checkpoint as ckpt
from rexrag.train.logging import read_metrics
from rexrag.train.trainer import PromptSampler, Trainer, warmup_schedule
from toy_rl import ToyRollout, early_target_reward, toy_config, toy_examples, toy_model, toy_tokenizer

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _one_thread():
    """The toy model is tiny: one intra-op thread is ~50x faster than two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_trainer(tmp_path, *overrides, model=None, reward=early_target_reward, per_group_seed=False, **kw):
    cfg = toy_config(tmp_path, *overrides)
    model = model if model is not None else toy_model()
    roll = ToyRollout(model, per_group_seed=per_group_seed, seed=cfg.trainer.seed)
    tr = Trainer(cfg, model, toy_tokenizer(), toy_examples(), rollout_fn=roll, reward_fn=reward, progress=False, **kw)
    roll.trainer = tr
    return tr


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _varied_reward(completions, answers, **kw):
    """Distinct letters / length: differs within almost every group, so every step has signal."""
    return [len(set(c)) / max(len(c), 1) for c in completions]


def test_every_trainable_parameter_changes_and_losses_finite(tmp_path):
    model = toy_model()
    before = _params(model)
    tr = make_trainer(tmp_path, "algo.kl_coef=0.01", "algo.entropy_coef=0.001", model=model, reward=_varied_reward)
    hist = tr.train()
    assert len(hist) == 2
    for m in hist:
        for key in ("actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/grad_norm", "reward/mean"):
            assert math.isfinite(m[key]), key
        assert m["actor/nan_skips"] == 0
    after = _params(model)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, unchanged
    # metrics.jsonl has one namespaced record per step and the checkpoint exists
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert {k.split("/")[0] for k in recs[0] if "/" in k} >= {"rollout", "reward", "actor", "timing", "memory"}
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000002"


def _learning_curve(tmp_path, *overrides, steps):
    tr = make_trainer(tmp_path, f"trainer.steps={steps}", *overrides)
    return [m["reward/mean"] for m in tr.train()]


def test_grpo_learns_toy_reward(tmp_path):
    curve = _learning_curve(tmp_path, "algo.adv_estimator=grpo", steps=25)
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last > first + 0.3 and last > 0.6, curve


def test_ppo_gae_learns_toy_reward(tmp_path):
    curve = _learning_curve(
        tmp_path, "algo.adv_estimator=gae", "algo.gamma=1.0", "algo.lam=0.95", "trainer.critic_lr=0.01", steps=25
    )
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last > first + 0.3 and last > 0.6, curve


def test_nan_reward_skips_update_and_counts(tmp_path):
    def nan_reward(completions, answers, **kw):
        return [float("nan")] + [1.0 * (i % 2) for i in range(1, len(completions))]

    model = toy_model()
    before = _params(model)
    tr = make_trainer(tmp_path, "trainer.steps=1", "trainer.mini_batch_size=32", model=model, reward=nan_reward)
    m = tr.train()[0]
    assert m["actor/nan_skips"] == 1.0
    after = _params(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    # the optimizer holds no corrupted moments either
    assert all(torch.isfinite(v).all() for s in tr.optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def _comparable(m):
    return {k: v for k, v in m.items() if not k.startswith(("timing/", "memory/"))}


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    common = ("trainer.steps=3", "algo.kl_coef=0.01", "trainer.mini_batch_size=16", "trainer.warmup_steps=2")
    full = make_trainer(tmp_path / "full", *common)
    full_hist = full.train()
    part = make_trainer(tmp_path / "part", *common[1:], "trainer.steps=2")
    part.train()
    resumed = make_trainer(tmp_path / "part", *common, "trainer.resume=true")
    res_hist = resumed.train()
    assert len(res_hist) == 1 and resumed.step_idx == 3
    a, b = _params(full.acc.unwrap_model(full.model)), _params(resumed.acc.unwrap_model(resumed.model))
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    fa, fb = _comparable(full_hist[-1]), _comparable(res_hist[-1])
    assert fa.keys() == fb.keys()
    for k in fa:
        assert math.isclose(fa[k], fb[k], rel_tol=1e-5, abs_tol=1e-7), k
    recs = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]


def test_checkpoints_pruned_and_atomic(tmp_path):
    tr = make_trainer(tmp_path, "trainer.steps=3", "trainer.save_every=1", "trainer.keep_last=2")
    tr.train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000003"]
    last = tmp_path / "checkpoints" / "step_000003"
    for f in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_0.pt", "model/model.safetensors"):
        assert (last / f).is_file(), f


def test_lora_trains_only_adapters_with_disabled_adapter_reference(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(toy_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _params(model)
    tr = make_trainer(tmp_path, "algo.kl_coef=0.05", "model.lora_rank=4", model=model, reward=_varied_reward)
    assert tr.reference is None  # the base with adapters disabled is the reference
    hist = tr.train()
    assert all(math.isfinite(m["actor/kl_loss"]) for m in hist) and hist[-1]["actor/kl"] > 0
    after = _params(model)
    assert all("lora_" in n for n in before)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in base_before.items())
    assert (tmp_path / "checkpoints" / "step_000002" / "model" / "adapter_model.safetensors").is_file()
    # resume restores the adapters into a fresh LoRA model
    fresh = get_peft_model(toy_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    tr2 = make_trainer(tmp_path, "algo.kl_coef=0.05", "model.lora_rank=4", "trainer.resume=true", model=fresh)
    assert tr2.train() == [] and tr2.step_idx == 2
    restored = _params(fresh)
    assert all(torch.equal(after[n], restored[n]) for n in after)


def test_sampler_and_schedule():
    s = PromptSampler(5, 3, seed=1)
    seen = s.next_batch() + s.next_batch()[:2]
    assert sorted(seen) == list(range(5))  # first epoch is a permutation
    s2 = PromptSampler(5, 3, seed=1)
    s2.load_state_dict({"consumed": 3})
    s.consumed = 3
    assert s.next_batch() == s2.next_batch()
    f = warmup_schedule(3)
    assert [f(i) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """Two gloo CPU processes == one process with the same global batch.

    Launched with ``accelerate launch --multi_gpu --num_processes N``: on a CPU-only machine that
    starts N torchrun workers and Accelerator(cpu=True) makes them MULTI_CPU/gloo. (``--cpu`` would
    start a single process in accelerate 1.x, silently making this test compare 1 with 1.)
    """
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        launcher = ["--multi_gpu", "--num_processes", str(nproc)] if nproc > 1 else ["--num_processes", "1", "--cpu"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher,
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(HERE / "train_worker.py"), str(out)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[nproc] = torch.load(out / "final_params.pt")
    init = dict(toy_model().named_parameters())
    assert sum(not torch.equal(init[n].detach(), p) for n, p in outs[1].items()) > len(init) // 2  # it trained
    for n, p in outs[1].items():
        assert torch.allclose(p, outs[2][n], atol=2e-5, rtol=1e-4), n
    m1 = read_metrics(tmp_path / "p1" / "metrics.jsonl")
    m2 = read_metrics(tmp_path / "p2" / "metrics.jsonl")
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        assert b["rollout/trajectories"] == a["rollout/trajectories"] / 2  # really split over 2 processes
        assert math.isclose(a["reward/mean"], b["reward/mean"], abs_tol=1e-9)
        assert math.isclose(a["actor/pg_loss"], b["actor/pg_loss"], rel_tol=1e-3, abs_tol=1e-5)


class FakeExplorer:
    """Records the hook calls; makes one probe per step (a copy of the first original with a PROBE
    segment), lowers the behaviour log-prob of probe rows by log 2 and weights rows 1 / 0.5."""

    def __init__(self):
        self.calls, self.rho = [], 0.5

    def explore(self, originals, rewards, agent, score_fn, reward_fn):
        from rexrag.rollout.trajectory import Seg, Trajectory

        self.calls.append("explore")
        assert len(rewards) == len(originals) and all("reward" in t.meta for t in originals)
        src = originals[0]
        probe = Trajectory(group_id=src.group_id, example=src.example, is_probe=True, source_index=0)
        probe.extend(src.token_ids[: src.prompt_len], Seg.PROMPT, 0)
        probe.probe_start = len(probe)
        probe.extend([3, 3], Seg.PROBE, 0)
        probe.extend(src.token_ids[src.prompt_len :][:2], Seg.POLICY, 0, [-1.0, -1.0])
        lps = score_fn([probe])
        assert lps[0].shape == (len(probe),) and lps[0][0] == 0
        assert reward_fn([probe]) == [1.0]  # "cc..." pays under the toy reward
        probe.meta["reward"] = 1.0
        self.seen_groups = {t.group_id for t in originals}
        return [probe]

    def correct(self, batch, old_logprobs, is_probe, probe_start):
        self.calls.append("correct")
        assert is_probe.tolist() == [False] * (len(is_probe) - 1) + [True]
        assert int(probe_start[-1]) == 3 and int(probe_start[0]) == -1
        beh = old_logprobs.clone()
        beh[is_probe] -= math.log(2.0)
        return beh, torch.where(is_probe, 0.5, 1.0), {"rex/fake_metric": 7.0}

    def end_step(self):
        self.calls.append("end_step")
        self.rho *= 0.9
        return {"rho": self.rho}

    def state_dict(self):
        return {"rho": self.rho}

    def load_state_dict(self, state):
        self.rho = state["rho"]


def test_explorer_hook_call_order_and_checkpoint(tmp_path):
    ex = FakeExplorer()
    tr = make_trainer(tmp_path, "trainer.steps=2", "trainer.mini_batch_size=33", explorer=ex)
    hist = tr.train()
    assert ex.calls == ["explore", "correct", "end_step"] * 2
    m = hist[-1]
    assert m["rex/fake_metric"] == 7.0 and math.isclose(m["rex/rho"], 0.5 * 0.9 * 0.9)
    assert m["rollout/trajectories"] == 33  # 8 prompts x 4 + 1 probe
    # the probe's ratio starts at 2 (outside the clip range), so some tokens are clipped at once
    assert hist[0]["actor/clip_frac"] > 0
    state = torch.load(tmp_path / "checkpoints" / "step_000002" / "explorer.pt")
    assert math.isclose(state["rho"], 0.5 * 0.81)


def test_bf16_autocast_trains(tmp_path):
    model = toy_model()
    before = _params(model)
    hist = make_trainer(tmp_path, "model.autocast_bf16=true", "algo.kl_coef=0.01", model=model, reward=_varied_reward).train()
    assert all(math.isfinite(m["actor/pg_loss"]) and m["actor/nan_skips"] == 0 for m in hist)
    assert any(not torch.equal(before[n], p) for n, p in _params(model).items())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_kl_in_reward_and_rloo_reinforce_pp_run(tmp_path):
    for est in ("rloo", "reinforce_pp"):
        model = toy_model()
        before = _params(model)
        hist = make_trainer(tmp_path / est, f"algo.adv_estimator={est}", "algo.kl_in_reward=true", "algo.kl_coef=0.1",
                            "trainer.steps=2", model=model, reward=_varied_reward).train()
        assert len(hist) == 2 and all(math.isfinite(m["actor/pg_loss"]) and m["actor/nan_skips"] == 0 for m in hist)
        # the estimator's advantages reach the policy (an estimator returning zeros would leave it unchanged)
        assert any(not torch.equal(before[n], p) for n, p in _params(model).items()), est
        assert "actor/kl_loss" not in hist[-1]  # KL went into the reward, not the loss


def test_cli_help_config_lists_trainer_keys(capsys):
    from rexrag.cli import main

    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "trainer.mini_batch_size" in out and "algo.adv_estimator" in out and "trainer.critic_lr" in out


@pytest.mark.slow
def test_rexrag_train_cli_end_to_end_smollm2(tmp_path):
    """`rexrag train` with the demo recipe: SmolLM2, BM25 over the bundled corpus, SearchAgent, REX on."""
    from rexrag.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--config", str(HERE.parent / "configs" / "demo_cpu.yaml"), "--no-progress",
               f"trainer.out_dir={out}", "trainer.steps=1", "data.batch_size=2", "rollout.n=2", "rollout.max_turns=1",
               "rollout.max_new_tokens_per_turn=16", "trainer.mini_batch_size=4", "trainer.micro_batch_size=2"])
    assert rc == 0
    rec = read_metrics(out / "metrics.jsonl")[0]
    assert rec["step"] == 1 and rec["rollout/trajectories"] >= 4 and "rex/rho" in rec
    assert (out / "checkpoints" / "step_000001" / "model" / "config.json").is_file()
    assert (out / "index").is_dir()


def test_probe_filter_scores_in_eval_mode(tmp_path):
    """``score_fn`` (the REX-RAG probe filter's scorer) sees no dropout and restores the model's mode."""
    from rexrag.models import tiny_llama
    from rexrag.rollout.trajectory import Seg, Trajectory
    from toy_rl import VOCAB

    model = tiny_llama(VOCAB, hidden=32, layers=2, heads=2, seed=0, pad_token_id=0, eos_token_id=0, bos_token_id=0,
                       attention_dropout=0.5)
    tr = make_trainer(tmp_path, model=model)
    trajs = []
    for k in range(3):
        t = Trajectory(group_id=k)
        t.extend([1 + k, 2, 3, 4], Seg.PROMPT, 0)
        t.extend([5, 6 + k, 7, 8, 9, 10, 11, 12], Seg.POLICY, 0, [0.0] * 8)
        trajs.append(t)
    assert tr.model.training  # the trainer keeps the policy in train mode between its passes
    torch.manual_seed(0)
    first = tr.score_fn(trajs)
    assert tr.model.training  # restored
    second = tr.score_fn(trajs)
    tr.model.eval()
    reference = tr.score_fn(trajs)
    assert not tr.model.training  # eval mode stays eval
    tr.model.train()
    for a, b, c in zip(first, second, reference):
        assert torch.equal(a, b) and torch.equal(a, c)  # with dropout active these would differ
