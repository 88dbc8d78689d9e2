"""REX-RAG inside the real trainer and the real SearchAgent: a tiny-model training step with probes,
and the exact reduction to plain GRPO when no probe is kept.

The agent runs a scripted backend (``_rollout_fakes``): every original of question "q0" searches once
and answers wrongly (a dead-end group), every original of "q1" answers right; a probe of "q0"
continues in its third scripted turn and answers right. The trainer scores with a tiny random Llama.
"""

from __future__ import annotations

import re

import torch
from _rollout_fakes import FakeRetriever, ScriptedBackend
from fake_tokenizer import FakeTokenizer

from rexrag.config import load_config
from rexrag.data import QAExample
from rexrag.models import tiny_llama
from rexrag.rex.explorer import RexExplorer
from rexrag.rollout.agent import SearchAgent
from rexrag.train.trainer import Trainer

SCRIPT = {
    "q0": ["<think>find it</think><search> q0 city </search>", "<think>it is Rome</think> So.<answer> Rome</answer>",
           " I retry.</think><answer> Paris</answer>"],
    "q1": ["<think>easy</think><answer> Oslo</answer>"],
}


def em_reward(completions, answers, **kw):
    out = []
    for c, golds in zip(completions, answers):
        found = re.findall(r"<answer>(.*?)</answer>", c, re.S)
        out.append(1.0 if found and found[-1].strip().lower() in [g.lower() for g in golds] else 0.0)
    return out


def _setup(tmp_path, *overrides, rex: bool = True):
    cfg = load_config(None, [
        f"trainer.out_dir={tmp_path}", "trainer.steps=1", "trainer.lr=0.01", "trainer.mini_batch_size=16",
        "trainer.micro_batch_size=8", "trainer.log_tensorboard=false", "data.batch_size=2", "data.shuffle=false",
        "rollout.n=4", "rollout.max_turns=2", "algo.kl_coef=0.0",
        "rex.enabled=true", "rex.probe_prob=1.0", "rex.keep_ratio=0.5", *overrides,
    ])
    cfg.rollout.template = "Q: {question}\n"  # a literal template (as a dotted override YAML would parse it)
    tok = FakeTokenizer()
    agent = SearchAgent(ScriptedBackend(tok, SCRIPT), tok, FakeRetriever(), cfg.rollout,
                        format_fn=lambda ps: " ".join(p.text for p in ps))
    examples = [QAExample(id="a", question="q0", golden_answers=["Paris"], group_id=0),
                QAExample(id="b", question="q1", golden_answers=["Oslo"], group_id=1)]
    model = tiny_llama(len(tok), hidden=32, layers=2, heads=2, seed=0, pad_token_id=0, eos_token_id=3, bos_token_id=1)
    explorer = RexExplorer(cfg.rex, cfg.rollout, tok, None, seed=0) if rex else None
    trainer = Trainer(cfg, model, tok, examples, agent=agent, explorer=explorer, reward_fn=em_reward, progress=False)
    return trainer, model, explorer


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_training_step_with_probes(tmp_path):
    trainer, model, explorer = _setup(tmp_path)
    before = _params(model)
    captured = {}
    real_correct = explorer.correct

    def spy(batch, old, is_probe, probe_start):
        captured.update(group_ids=batch["group_ids"].clone(), is_probe=is_probe.clone(), rewards=batch["rewards"].clone())
        return real_correct(batch, old, is_probe, probe_start)

    explorer.correct = spy
    m = trainer.step()
    # 4 wrong originals in group 0 (a dead end), K = floor(8 * 0.5) = 4 probes kept, all rescued
    assert m["rex/probes_made"] == 4 and m["rex/probes_kept"] == 4
    assert m["rex/dead_end_frac"] == 0.5 and m["rex/probe_acc"] == 1.0
    assert abs(m["rex/alpha"] - 4 / 12) < 1e-9
    assert captured["is_probe"].tolist() == [False] * 8 + [True] * 4
    assert captured["group_ids"].tolist() == [0] * 4 + [1] * 4 + [0] * 4  # probes join their source's group
    assert captured["rewards"].tolist() == [0.0] * 4 + [1.0] * 4 + [1.0] * 4
    assert m["rex/ratio_max"] > 1.0 and m["rex/tokens_probe"] > 0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed  # group 0 now has signal (originals 0, probes 1)
    assert abs(m["rex/rho"] - (0.9 * 0.5 + 0.1 * 1.0)) < 1e-9
    # rollout/ agent metrics describe the 8 originals, not the probe continuation that ran last
    assert m["rollout/n"] == 8 and m["rollout/searches_per_traj"] == 0.5  # 4 searches


def test_no_probes_equals_plain_grpo(tmp_path):
    """probe_prob = 0: the explorer keeps nothing, and one step gives bitwise the same weights as a
    trainer without any explorer."""
    tr_rex, model_rex, _ = _setup(tmp_path / "rex", "rex.probe_prob=0.0")
    tr_plain, model_plain, _ = _setup(tmp_path / "plain", rex=False)
    m_rex, m_plain = tr_rex.step(), tr_plain.step()
    assert m_rex["rex/probes_kept"] == 0
    for (n, a), (_, b) in zip(model_rex.named_parameters(), model_plain.named_parameters()):
        assert torch.equal(a, b), n
    assert m_rex["actor/pg_loss"] == m_plain["actor/pg_loss"]


def test_probe_correction_is_the_same_from_either_old_logprob_source_and_any_micro_split(tmp_path):
    """With probes kept: pi_old from the on-policy update's own forward (the correction then runs per
    micro-batch) gives bitwise the gradients of the separate no-grad pass, and token-budget micro-batches
    (sorted, cut to their longest row) the same gradients within fp32 tolerance; rex/ metrics agree."""
    runs = {}
    for name, ov in {"reuse": [], "separate": ["trainer.reuse_update_forward=false"],
                     "packed": ["trainer.micro_batch_tokens=120"]}.items():
        tr, model, _ = _setup(tmp_path / name, "rex.correction=rex_token", *ov)
        grads, real_step = {}, tr.optimizer.step

        def step(*a, _model=model, _grads=grads, _real=real_step, **k):
            _grads.update({n: p.grad.clone() for n, p in _model.named_parameters()})
            return _real(*a, **k)

        tr.optimizer.step = step
        runs[name] = (tr.step(), grads)
    (m_reuse, p_reuse), (m_sep, p_sep), (m_packed, p_packed) = runs["reuse"], runs["separate"], runs["packed"]
    assert m_reuse["rex/probes_kept"] == 4 and m_reuse["passes/old_logprobs"] == 0 and m_sep["passes/old_logprobs"] == 1
    for k in ("rex/ratio_mean", "rex/ratio_max", "rex/ratio_clipfrac", "actor/pg_loss", "actor/clip_frac"):
        assert m_reuse[k] == m_sep[k], k
        assert abs(m_packed[k] - m_reuse[k]) <= 1e-5 * max(1.0, abs(m_reuse[k])), k
    assert m_packed["train/padding_fraction"] < m_reuse["train/padding_fraction"]
    for n in p_reuse:
        assert torch.equal(p_reuse[n], p_sep[n]), n
        torch.testing.assert_close(p_packed[n], p_reuse[n], atol=1e-6, rtol=1e-4)


def test_sample_is_a_steps_rollouts_rewards_and_probes_without_an_update(tmp_path):
    trainer, model, explorer = _setup(tmp_path)
    before = _params(model)
    trajs, rewards, probes, _ = trainer.sample(trainer.examples)
    assert [t.group_id for t in trajs] == [0] * 4 + [1] * 4 and rewards == [0.0] * 4 + [1.0] * 4
    assert len(probes) == 4 and all(p.is_probe and p.group_id == 0 and p.meta["reward"] == 1.0 for p in probes)
    assert explorer.end_step()["rex/dead_end_frac"] == 0.5
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # no update
    assert trainer.step_idx == 0
