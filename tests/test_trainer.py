"""End-to-end trainer tests on a tiny random model with a learnable toy reward (CPU, seconds each)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rexrag.errors import UserError
from rexrag.train import checkpoint as ckpt
from rexrag.train.logging import read_metrics
from rexrag.data import PromptSampler
from rexrag.train.trainer import Trainer, warmup_schedule
from toy_rl import ToyRollout, early_target_reward, toy_config, toy_examples, toy_model, toy_tokenizer

HERE = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_groups_with_signal_counts_groups_with_reward_spread(tmp_path):
    from rexrag.train.metrics import groups_with_signal

    assert groups_with_signal([1, 1, 2, 2, 3, 3], [0.1, 0.1, 0.0, 1.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert groups_with_signal([1, 1, 2], [0.5, 0.5, 0.0]) == 0.0  # a lone member has no spread
    assert groups_with_signal([], []) == 0.0
    m = make_trainer(tmp_path, "trainer.steps=1", reward=_varied_reward).train()[0]
    assert 0.0 <= m["rollout/groups_with_signal"] <= 1.0
    assert m["rollout/groups_with_signal_after_probes"] == m["rollout/groups_with_signal"]  # no explorer
    assert m["rollout/em_rate"] == 0.0  # the toy gold "c" is never the whole answer


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


def test_nan_loss_skips_update_and_counts(tmp_path):
    """A non-finite loss (here: a NaN advantage in one row) never reaches the weights or Adam's moments."""
    model = toy_model()
    before = _params(model)
    tr = make_trainer(tmp_path, "trainer.steps=1", "trainer.mini_batch_size=32", model=model)
    estimator = tr.estimator

    def nan_first_row(rewards, mask, *args):
        adv, ret = estimator(rewards, mask, *args)
        adv = adv.clone()
        adv[0] = float("nan")
        return adv, ret

    tr.estimator = nan_first_row
    m = tr.train()[0]
    assert m["actor/nan_skips"] == 1.0
    after = _params(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    # the optimizer holds no corrupted moments either
    assert all(torch.isfinite(v).all() for s in tr.optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def test_bad_reward_output_is_an_error_naming_the_reward(tmp_path):
    def nan_reward(completions, answers, **kw):
        return [float("nan")] + [1.0] * (len(completions) - 1)

    def short_reward(completions, answers):
        return [1.0]

    for fn, match in ((nan_reward, r"reward '.*nan_reward' returned nan for completion 0"),
                      (short_reward, r"reward '.*short_reward' returned 1 values for 32 completions")):
        tr = make_trainer(tmp_path / fn.__name__, "trainer.steps=1", reward=fn)
        with pytest.raises(UserError, match=match):
            tr.train()


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
    for f in ("trainer_state.json", "manifest.json", "state/dcp/.metadata", "state/dcp/__0_0.distcp",
              "state/random_states_0.pkl", "state/objects.pt", "model/model.safetensors"):
        assert (last / f).is_file(), f
    assert ckpt.check_checkpoint(last) is None
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs left


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
        self.calls, self.rho, self.correct_rows = [], 0.5, []

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
        # row-local, as the protocol asks: the on-policy update calls it per micro-batch, then on all rows
        if not self.calls or self.calls[-1] != "correct":
            self.calls.append("correct")
        self.correct_rows.append(len(is_probe))
        assert old_logprobs.shape == batch["input_ids"].shape and not old_logprobs.requires_grad
        assert torch.equal(probe_start == 3, is_probe) and torch.equal(probe_start == -1, ~is_probe)
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
    # on-policy (one mini-batch of 33 rows): per micro-batch of 8 for the loss, then all rows for the metrics
    assert ex.correct_rows == [8, 8, 8, 8, 1, 33] * 2
    m = hist[-1]
    assert m["rex/fake_metric"] == 7.0 and math.isclose(m["rex/rho"], 0.5 * 0.9 * 0.9)
    assert m["rollout/trajectories"] == 33  # 8 prompts x 4 + 1 probe
    # a probe joins its source's group: it can add spread to a group, never remove it
    assert 0.0 <= m["rollout/groups_with_signal"] <= m["rollout/groups_with_signal_after_probes"] <= 1.0
    # the probe's ratio starts at 2 (outside the clip range), so some tokens are clipped at once
    assert hist[0]["actor/clip_frac"] > 0
    # checkpointed after the scheduler and the sampler, one state per process
    state = torch.load(tmp_path / "checkpoints" / "step_000002" / "state" / "objects.pt", weights_only=False)["objects"][2]
    assert math.isclose(state["per_process"][0]["rho"], 0.5 * 0.81)


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


# --------------------------------------------------------------------------- passes, micro-batches, checkpointing


class RaggedRollout(ToyRollout):
    """The toy rollout with each row cut to 1..6 policy tokens, so rows differ in length (padding)."""

    def __call__(self, examples, n):
        from rexrag.rollout.trajectory import Seg, Trajectory

        out = []
        for j, tr in enumerate(super().__call__(examples, n)):
            p, keep = tr.prompt_len, tr.prompt_len + 1 + (j * 5) % 6
            t = Trajectory(group_id=tr.group_id, example=tr.example, stop_reason="length")
            t.extend(tr.token_ids[:p], Seg.PROMPT, 0)
            t.extend(tr.token_ids[p:keep], Seg.POLICY, 0, tr.logprobs[p:keep])
            out.append(t)
        return out


def _ragged_trainer(tmp_path, *overrides, model=None):
    cfg = toy_config(tmp_path, *overrides)
    model = model if model is not None else toy_model()
    roll = RaggedRollout(model, seed=cfg.trainer.seed)
    tr = Trainer(cfg, model, toy_tokenizer(), toy_examples(), rollout_fn=roll, reward_fn=_varied_reward, progress=False)
    roll.trainer = tr
    return tr


def _step_grads(tr) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """One step; the gradients each optimizer update saw (after clipping) and the step's metrics."""
    seen, real_step = [], tr.optimizer.step

    def step(*a, **k):
        seen.append({n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None})
        return real_step(*a, **k)

    tr.optimizer.step = step
    return seen, tr.step()


def _decoder_calls(model) -> dict[str, int]:
    calls = {"grad": 0, "no_grad": 0}

    def hook(module, args, kwargs):
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1

    model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_on_policy_step_takes_old_logprobs_from_one_source(tmp_path):
    """One epoch, one mini-batch: pi_old comes from the update's own forward (no separate pass) and the
    weights are bitwise those of the run with the separate no-grad pass; off-policy runs that pass."""
    runs = {}
    for reuse in (True, False):
        model = toy_model()
        calls = _decoder_calls(model)
        tr = make_trainer(tmp_path / str(reuse), "trainer.mini_batch_size=32", f"trainer.reuse_update_forward={reuse}",
                          "algo.kl_coef=0.01", model=model, reward=_varied_reward)
        hist = [tr.step() for _ in range(2)]
        runs[reuse] = (hist, dict(calls), _params(model))
    (h_on, c_on, p_on), (h_off, c_off, p_off) = runs[True], runs[False]
    n_micro = 32 // 8
    for m_on, m_off in zip(h_on, h_off, strict=True):
        assert m_on["passes/old_logprobs"] == 0 and m_off["passes/old_logprobs"] == 1
        assert m_on["passes/update"] == m_off["passes/update"] == 1
        assert m_on["passes/reference"] == m_off["passes/reference"] == 1
        for k in ("actor/pg_loss", "actor/kl_loss", "actor/ratio_mean", "actor/entropy_mc", "actor/grad_norm"):
            assert m_on[k] == m_off[k], k
        assert m_on["actor/ratio_mean"] == 1.0
    # the policy's decoder: the same with-grad forwards; the separate pass is n_micro no-grad forwards a step
    assert c_on["grad"] == c_off["grad"] == 2 * n_micro
    assert c_off["no_grad"] - c_on["no_grad"] == 2 * n_micro
    assert all(torch.equal(p_on[n], p_off[n]) for n in p_on)
    # two mini-batches are off-policy for the second: pi_old is recomputed once
    m = make_trainer(tmp_path / "off", "trainer.mini_batch_size=16", reward=_varied_reward).step()
    assert m["passes/old_logprobs"] == 1 and m["passes/update"] == 1


def test_kl_coef_zero_runs_no_reference_pass(tmp_path):
    tr = make_trainer(tmp_path / "zero", "algo.kl_coef=0.0")
    m = tr.step()
    assert tr.reference is None and m["passes/reference"] == 0 and "actor/kl_loss" not in m
    tr = make_trainer(tmp_path / "in_reward", "algo.kl_coef=0.0", "algo.kl_in_reward=true", "algo.adv_estimator=rloo")
    m = tr.step()
    assert tr.reference is None and m["passes/reference"] == 0 and m["passes/old_logprobs"] == 1
    tr = make_trainer(tmp_path / "on", "algo.kl_coef=0.01")
    m = tr.step()
    assert tr.reference is not None and m["passes/reference"] == 1 and math.isfinite(m["actor/kl_loss"])


@pytest.mark.parametrize("mini", [32, 16])
def test_token_budget_micro_batches_give_the_same_gradients(tmp_path, mini):
    """Rows of 4..9 tokens: packing by a token budget (sorted, each micro-batch cut to its longest row)
    gives the gradients of the whole mini-batch in one forward, within fp32 tolerance, with less padding."""
    common = (f"trainer.mini_batch_size={mini}", "algo.kl_coef=0.01", "algo.entropy_coef=0.01")
    whole, m_whole = _step_grads(_ragged_trainer(tmp_path / "whole", *common, f"trainer.micro_batch_size={mini}"))
    rows, m_rows = _step_grads(_ragged_trainer(tmp_path / "rows", *common, "trainer.micro_batch_size=4"))
    packed, m_packed = _step_grads(_ragged_trainer(tmp_path / "packed", *common, "trainer.micro_batch_size=4",
                                                   "trainer.micro_batch_tokens=20"))
    assert len(whole) == len(rows) == len(packed) == 32 // mini
    for g_whole, g_rows, g_packed in zip(whole, rows, packed, strict=True):
        assert g_whole.keys() == g_packed.keys() and len(g_whole) > 0
        for n in g_whole:
            torch.testing.assert_close(g_packed[n], g_whole[n], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(g_rows[n], g_whole[n], atol=1e-6, rtol=1e-4)
    for k in ("actor/pg_loss", "actor/kl_loss"):  # the loss terms add up over micro-batches (other metrics: means of means)
        assert math.isclose(m_packed[k], m_whole[k], rel_tol=1e-4, abs_tol=1e-6), k
    # row split keeps every row at T = 9 columns; the packed split cuts each micro-batch to its longest row
    assert m_rows["train/padding_fraction"] == m_whole["train/padding_fraction"] > 0.2
    assert m_packed["train/padding_fraction"] < 0.5 * m_rows["train/padding_fraction"]


def test_micro_batches_pack_under_the_budget():
    from rexrag.train.batch import micro_batches, padding_fraction

    lengths = torch.tensor([3, 9, 5, 9, 2, 7, 4, 1])
    rows = torch.arange(8)
    by_rows = micro_batches(rows, lengths, 9, max_rows=3)
    assert [m.rows.tolist() for m in by_rows] == [[0, 1, 2], [3, 4, 5], [6, 7]] and {m.width for m in by_rows} == {9}
    packed = micro_batches(rows, lengths, 9, max_rows=3, max_tokens=16)
    assert sorted(i for m in packed for i in m.rows.tolist()) == list(range(8))  # every row exactly once
    assert all(len(m.rows) * m.width <= 16 or len(m.rows) == 1 for m in packed)
    assert all(m.width == int(lengths[m.rows].max()) for m in packed)
    assert [m.rows.tolist() for m in packed] == [[1], [3], [5, 2], [6, 0, 4, 7]]
    assert padding_fraction(by_rows, lengths) == 1 - 40 / 72
    assert padding_fraction(packed, lengths) == 1 - 40 / (9 + 9 + 14 + 16)
    assert micro_batches(rows, lengths, 9, max_rows=3, max_tokens=4)[0].rows.tolist() == [1]  # longer than the budget: alone


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    from rexrag.models import gradient_checkpointing_on

    base, m_base = _step_grads(_ragged_trainer(tmp_path / "plain", "trainer.mini_batch_size=32"))
    model = toy_model()
    layer_calls = []
    model.get_decoder().layers[0].register_forward_pre_hook(lambda *a: layer_calls.append(torch.is_grad_enabled()))
    tr = _ragged_trainer(tmp_path / "ckpt", "trainer.mini_batch_size=32", "model.gradient_checkpointing=true", model=model)
    assert gradient_checkpointing_on(tr.model)
    ckpt_grads, m_ckpt = _step_grads(tr)
    n_micro = 32 // 8
    # each with-grad forward of the layer runs once more in backward (recomputation)
    assert sum(layer_calls) == 2 * n_micro
    for n, g in base[0].items():
        torch.testing.assert_close(ckpt_grads[0][n], g, atol=1e-6, rtol=1e-5)
    assert m_ckpt["actor/pg_loss"] == m_base["actor/pg_loss"]


@pytest.mark.parametrize("temperature, expected", [(0.7, 0.7), (0.0, 1.0)])
def test_every_logprob_pass_uses_the_sampling_temperature(tmp_path, monkeypatch, temperature, expected):
    """pi_old, the reference and the update take log-probs at rollout.temperature (greedy: T=1), so the
    ratio compares the distribution that sampled the tokens (as verl divides logits by it)."""
    import rexrag.train.passes as passes_mod

    seen = []
    real = passes_mod.sequence_logprobs

    def spy(*args, **kwargs):
        seen.append(kwargs.get("temperature", 1.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(passes_mod, "sequence_logprobs", spy)
    tr = make_trainer(tmp_path, f"rollout.temperature={temperature}", "algo.kl_coef=0.01", "trainer.steps=1",
                      "trainer.reuse_update_forward=false")
    tr.train()
    assert len(seen) >= 3 and set(seen) == {expected}  # old log-probs, reference, update


def test_update_flops_match_the_matmuls_torch_counts():
    from torch.utils.flop_counter import FlopCounterMode

    from rexrag.models import sequence_logprobs, tiny_llama
    from rexrag.train.metrics import update_flops
    from rexrag.train.trainer import _flop_shape

    model = tiny_llama(500, hidden=64, layers=2, heads=2)  # untied: the input embedding is no matmul
    model.train()
    ids = torch.randint(0, 500, (2, 48))
    with FlopCounterMode(display=False) as counter:
        sequence_logprobs(model, ids, torch.ones_like(ids)).sum().backward()
    shape = _flop_shape(model)
    assert shape["params"] == sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    matmuls = update_flops(torch.tensor([48, 48]), **{**shape, "layers": 0})  # attention aside: torch's count has none
    head_recompute = 2 * 500 * 64 * 2 * 47  # sequence_logprobs recomputes the head's logits in backward
    assert counter.get_total_flops() == pytest.approx(matmuls + head_recompute, rel=0.02)
    lengths = torch.tensor([10, 5])
    assert update_flops(lengths, 100, 0, 2, 8) == 4 * 100 * 15 + 6 * 2 * 8 * (100 + 25)  # frozen: no weight grads


def test_step_reports_the_update_rate_and_share(tmp_path):
    m = make_trainer(tmp_path).step()
    assert m["timing/update_gflops"] > 0 and 0 < m["timing/update_share"] <= 1


def test_trainer_with_bf16_adamw_moments_updates_every_parameter(tmp_path):
    model = toy_model()
    before = _params(model)
    tr = make_trainer(tmp_path, "trainer.optimizer_state_dtype=bfloat16", model=model, reward=_varied_reward)
    tr.step()
    states = list(tr.optimizer.state.values())
    assert states and all(s["exp_avg"].dtype == torch.bfloat16 for s in states)
    assert all(not torch.equal(before[n], p) for n, p in _params(model).items())
