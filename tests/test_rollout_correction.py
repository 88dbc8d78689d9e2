"""Rollout correction (rexrag.algos.rollout_correction), GSPO's sequence ratio and dynamic sampling.

Closed forms on hand-built tensors; the reduction to today's loss when the engine agrees with the
trainer; an enumerable toy on which sequence-level IS is exactly unbiased (and a Monte-Carlo estimate
agrees within its error) while truncation's bias stays inside its stated bound; dynamic sampling on
the toy trainer.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rexrag.algos.losses import policy_loss, sequence_log_ratio
from rexrag.algos.rollout_correction import rollout_correction, rollout_corrections
from rexrag.config import AlgoConfig, ConfigError, DataConfig, load_config
from rexrag.rollout.trajectory import Seg

P, PR, I = int(Seg.POLICY), int(Seg.PROBE), int(Seg.INFO)


def _cfg(**kw) -> AlgoConfig:
    return AlgoConfig(**kw)


def _batch():
    """Two rows: an original (3 POLICY tokens, one INFO) and a probe (POLICY, PROBE, POLICY)."""
    segments = torch.tensor([[0, P, I, P, P], [0, P, PR, P, 0]])
    mask = torch.tensor([[0, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.float32)
    old = torch.tensor([[0.0, -1.0, -5.0, -2.0, -0.5], [0.0, -1.0, -3.0, -0.7, 0.0]])
    d = torch.tensor([[0.0, 0.5, 9.0, -0.2, 1.5], [0.0, -1.0, 4.0, 0.1, 0.0]])  # only POLICY entries count
    return segments, mask, old, old - d, d, torch.tensor([False, True])


def test_weights_and_masks_against_closed_forms():
    segments, mask, old, engine, d, is_probe = _batch()
    pol = segments == P
    dp = torch.where(pol, d, torch.zeros_like(d))
    w, keep, m = rollout_correction(old, engine, segments == P, mask, is_probe, _cfg(rollout_correction="token_tis",
                                                                                  rollout_correction_cap=2.0))
    assert torch.allclose(w, torch.where(pol, dp.exp().clamp(max=2.0), torch.ones_like(d))) and bool((keep == 1).all())
    assert m["rollout_corr/policy/truncated_frac"] == pytest.approx(1 / 3)  # e^1.5 > 2
    assert m["rollout_corr/policy/ratio_max"] == pytest.approx(math.exp(1.5))
    w, _, _ = rollout_correction(old, engine, segments == P, mask, is_probe, _cfg(rollout_correction="seq_tis",
                                                                             rollout_correction_cap=3.0))
    assert torch.allclose(w[0], torch.full((5,), min(math.exp(0.5 - 0.2 + 1.5), 3.0)))
    assert torch.allclose(w[1], torch.full((5,), math.exp(-1.0 + 0.1)))  # the PROBE token's 4.0 is not the engine's
    _, keep, m = rollout_correction(old, engine, segments == P, mask, is_probe, _cfg(rollout_correction="token_mask",
                                                                               rollout_correction_low=0.5, rollout_correction_high=2.0))
    want = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 1, 1, 1]], dtype=torch.float32)  # e^1.5 and e^-1 out; PROBE and INFO stay
    assert torch.equal(keep, want) and m["rollout_corr/probe_policy/rejected_frac"] == pytest.approx(0.5)
    _, keep, _ = rollout_correction(old, engine, segments == P, mask, is_probe, _cfg(rollout_correction="seq_mask",
                                                                               rollout_correction_low=0.4, rollout_correction_high=2.0))
    assert keep[:, 0].tolist() == [0.0, 1.0]  # e^1.8 = 6.0 out, e^-0.9 = 0.41 in
    _, keep, _ = rollout_correction(old, engine, segments == P, mask, is_probe, _cfg(rollout_correction="geo_mask",
                                                                               rollout_correction_low=0.6, rollout_correction_high=2.0))
    assert keep[:, 0].tolist() == [1.0, 1.0]  # geometric means e^0.6 = 1.82 and e^-0.45 = 0.638
    _, keep, _ = rollout_correction(old, engine, segments == P, mask, is_probe, _cfg(rollout_correction="geo_mask",
                                                                               rollout_correction_low=0.65, rollout_correction_high=2.0))
    assert keep[:, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("name", rollout_corrections())
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_engine_equal_to_trainer_gives_todays_loss_bitwise(name, level):
    """With engine log-probs equal to the trainer's every weight is exactly 1 and nothing is rejected,
    so the loss (and its gradient) is bitwise the uncorrected one, REX-RAG row weights included."""
    torch.manual_seed(0)
    segments, mask, old, _, _, is_probe = _batch()
    cfg = _cfg(rollout_correction=name, ratio_level=level, rollout_correction_low=0.9, rollout_correction_high=1.1)
    w, keep, _ = rollout_correction(old, old.clone(), segments == P, mask, is_probe, cfg)
    assert bool((w == 1).all()) and bool((keep == 1).all())
    logp = (old + 0.05 * torch.randn_like(old)).requires_grad_(True)
    adv, seq_w = torch.randn(2, 5), torch.tensor([1.0, 0.7])
    base, _ = policy_loss(logp, old, adv, mask, cfg, seq_w)
    base.backward()
    g0, logp.grad = logp.grad.clone(), None
    ours, _ = policy_loss(logp, old, adv, mask * keep, cfg, seq_w, w)
    ours.backward()
    assert torch.equal(base, ours) and torch.equal(g0, logp.grad)


def test_gspo_sequence_ratio_value_clip_and_gradient():
    cfg = _cfg(ratio_level="sequence", gspo_clip_low=0.01, gspo_clip_high=0.01, loss_agg="seq-mean-token-mean")
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.004, -0.002, 7.0], [0.3, 0.3, 0.3]], requires_grad=True)
    adv = torch.ones(2, 3)
    lr = sequence_log_ratio(logp, logp - old, mask)
    assert torch.allclose(lr[0, :2], torch.full((2,), 0.001)) and torch.allclose(lr[1], torch.full((3,), 0.3))
    loss, _ = policy_loss(logp, old, adv, mask, cfg)
    s0 = math.exp(0.001)
    assert float(loss.detach()) == pytest.approx(0.5 * (-s0 - 1.01))  # row 1's ratio e^0.3 is clipped at 1 + 0.01
    loss.backward()
    # row 0: d/dlogp_t of -A s over the row's token mean = -s / 2; row 1 clipped: no gradient
    assert torch.allclose(logp.grad[0, :2], torch.full((2,), -0.5 * s0 / 2)) and float(logp.grad[1].abs().sum()) == 0.0


# --------------------------------------------------------------------------- unbiasedness on an enumerable toy

L, V = 3, 3


def _seq_logprob(theta: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [S, L] of sequences under independent per-position softmaxes theta [L, V]."""
    return torch.log_softmax(theta, -1)[torch.arange(L), seqs]


def _estimator_terms(cap: float):
    torch.manual_seed(3)
    theta = torch.randn(L, V, requires_grad=True)
    engine_theta = theta.detach() + 0.6 * torch.randn(L, V)  # a perturbed engine
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))
    reward = torch.randn(len(seqs))
    lp = _seq_logprob(theta, seqs)
    lp_eng = _seq_logprob(engine_theta, seqs)
    segments = torch.full((len(seqs), L), P)
    cfg = _cfg(rollout_correction="seq_tis", rollout_correction_cap=cap)
    w, _, _ = rollout_correction(lp.detach(), lp_eng, segments == P, torch.ones(len(seqs), L), torch.zeros(len(seqs), dtype=torch.bool), cfg)
    exact = torch.autograd.grad((lp.sum(-1).exp() * reward).sum(), theta, retain_graph=True)[0]
    score = torch.stack([torch.autograd.grad(lp[i].sum(), theta, retain_graph=True)[0] for i in range(len(seqs))])
    q = lp_eng.sum(-1).exp()
    return exact, score, reward, q, w[:, 0], lp.detach().sum(-1).exp()


def test_sequence_is_without_truncation_is_unbiased_and_truncation_bias_is_bounded():
    exact, score, reward, q, w, p = _estimator_terms(cap=1e9)
    terms = (w * reward)[:, None, None] * score  # the estimator's value on each sequence
    assert torch.allclose((q[:, None, None] * terms).sum(0), exact, atol=1e-5)  # expectation under the engine
    gen = torch.Generator().manual_seed(0)
    idx = torch.multinomial(q, 40_000, replacement=True, generator=gen)
    mc, se = terms[idx].mean(0), terms[idx].std(0) / math.sqrt(len(idx))
    assert bool(((mc - exact).abs() <= 4 * se + 1e-6).all())
    cap = 1.2
    _, _, _, _, w_cap, _ = _estimator_terms(cap=cap)
    bias = (q * (w_cap - w) * reward)[:, None, None] * score
    bias = bias.sum(0)
    bound = float(p[w > cap].sum()) * float(((reward.abs())[:, None, None] * score.abs()).amax(0).norm())
    assert 0 < float(bias.norm()) <= bound


# --------------------------------------------------------------------------- config and dynamic sampling


def test_bad_settings_name_the_key_at_config_load():
    with pytest.raises(ConfigError, match=r"algo.rollout_correction='tis'.*token_tis"):
        load_config(None, ["algo.rollout_correction=tis"])
    with pytest.raises(ConfigError, match="algo.ratio_level"):
        load_config(None, ["algo.ratio_level=group"])
    with pytest.raises(ConfigError, match="rollout_correction_cap must be > 1"):
        load_config(None, ["algo.rollout_correction_cap=1.0"])
    with pytest.raises(ConfigError, match="rollout_correction_low.*below"):
        load_config(None, ["algo.rollout_correction_low=2.0", "algo.rollout_correction_high=1.5"])
    with pytest.raises(ConfigError, match="dynamic_sampling_max_rounds must be >= 1"):
        DataConfig(dynamic_sampling=True, dynamic_sampling_max_rounds=0)


def _signal_on_odd_groups(completions, answers, metadata=None, **kw):
    """Even group ids: every rollout 0 (no signal); odd ones: distinct-letter ratio (spread)."""
    return [0.0 if m["group_id"] % 2 == 0 else len(set(c)) / max(len(c), 1) for c, m in zip(completions, metadata)]


def _toy(tmp_path, *overrides):
    from test_trainer import make_trainer

    return make_trainer(tmp_path, "data.dynamic_sampling=true", *overrides, reward=_signal_on_odd_groups)


def test_dynamic_sampling_fills_the_batch_with_signal_and_never_repeats_a_group(tmp_path, one_thread):
    from rexrag.train.dynamic import sample_step

    tr = _toy(tmp_path, "data.batch_size=4", "data.dynamic_sampling_max_rounds=4")
    for _ in range(3):
        trajs, rewards, probes, m = sample_step(tr, {})
        gids = [t.group_id for t in trajs]
        groups = sorted(set(gids))
        assert len(groups) == 4 and all(g % 2 == 1 for g in groups)  # every kept group carries a signal
        assert all(gids.count(g) == tr.cfg.rollout.n for g in groups)  # a group is never there twice
        assert 2 <= m["dynamic_rounds"] <= 4 and m["dynamic_groups_filled"] == 0
    hist = tr.train()
    assert all(h["rollout/groups_with_signal"] == 1.0 for h in hist) and "rollout/dynamic_rounds" in hist[-1]


def test_dynamic_sampling_stops_at_its_bound_and_fills_up(tmp_path, one_thread):
    from rexrag.train.dynamic import sample_step

    tr = _toy(tmp_path, "data.batch_size=8", "data.dynamic_sampling_max_rounds=1")
    trajs, _, _, m = sample_step(tr, {})
    gids = {t.group_id for t in trajs}
    assert m["dynamic_rounds"] == 1 and len(gids) == 8 and m["dynamic_groups_filled"] == 4
    with pytest.raises(ConfigError, match=r"needs up to 48 distinct prompts per step; the training data has 16"):
        _toy(tmp_path / "b", "data.batch_size=8", "data.dynamic_sampling_max_rounds=6")


def test_token_tis_in_the_trainer_reports_ratios_near_one_for_the_same_model(tmp_path, one_thread):
    """The toy rollout samples with the policy itself (fp32): every weight is 1 up to float error and
    the correction's metrics are logged per step."""
    from test_trainer import make_trainer

    tr = make_trainer(tmp_path, "algo.rollout_correction=token_tis")
    hist = tr.train()
    assert abs(hist[-1]["rollout_corr/policy/ratio_mean"] - 1) < 1e-4 and hist[-1]["passes/old_logprobs"] == 1.0


def _positive_varied(completions, answers, **kw):
    return [1.0 + len(set(c)) / max(len(c), 1) for c in completions]


def _advantages_with_row_0_rejected(tmp_path, monkeypatch, reject: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B, T], loss mask [B, T]) of one toy step with KL in the reward; row 0 wholly
    rejected by the rollout correction when ``reject``."""
    import rexrag.train.trainer as trainer_mod
    from test_trainer import make_trainer

    real = trainer_mod.rollout_correction

    def rejecting(*args, **kw):
        w, keep, m = real(*args, **kw)
        if reject:
            keep = keep.clone()
            keep[0] = 0
        return w, keep, m

    monkeypatch.setattr(trainer_mod, "rollout_correction", rejecting)
    tr = make_trainer(tmp_path, "algo.rollout_correction=token_tis", "algo.kl_in_reward=true", "algo.kl_coef=0.01",
                      "trainer.steps=1", reward=_positive_varied)
    seen = {}

    def update(batch, targets, chunks):
        seen["adv"], seen["mask"] = targets.advantages.clone(), batch.loss_mask.clone()
        return {}, None

    monkeypatch.setattr(tr, "update", update)
    tr.step()
    return seen["adv"], seen["mask"]


def test_a_rejected_row_keeps_its_outcome_in_its_group(tmp_path, monkeypatch, one_thread):
    """Rejection removes tokens from the loss, not a rollout from its GRPO group: the other rows'
    advantages are those of the unrejected batch (before the fix row 0 scored 0 in its group)."""
    adv, mask = _advantages_with_row_0_rejected(tmp_path / "a", monkeypatch, reject=False)
    adv_r, mask_r = _advantages_with_row_0_rejected(tmp_path / "b", monkeypatch, reject=True)
    assert mask_r[0].sum() == 0 and torch.equal(mask_r[1:], mask[1:])
    others = mask[1:] > 0
    assert adv[1:][others].abs().max() > 0.1  # the group has signal
    torch.testing.assert_close(adv_r[1:][others], adv[1:][others], rtol=0, atol=1e-6)


def test_dynamic_sampling_rounds_draw_with_fresh_seeds(tmp_path, one_thread, monkeypatch):
    from rexrag.train.dynamic import sample_step

    tr = _toy(tmp_path, "data.batch_size=4", "data.dynamic_sampling_max_rounds=4")
    seeds: list[int] = []
    monkeypatch.setattr(tr.colocation, "reseed", seeds.append)
    _, _, _, m = sample_step(tr, {})
    assert m["dynamic_rounds"] >= 2 and len(seeds) == m["dynamic_rounds"]
    assert len(set(seeds)) == len(seeds), f"rounds reused sampling seeds: {seeds}"
