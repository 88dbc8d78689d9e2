"""Closed-form checks of the advantage estimators and losses (huge values at masked positions)."""

from __future__ import annotations

import math

import pytest
import torch

from rexrag.algos import advantages as A
from rexrag.algos import losses as L
from rexrag.config import AlgoConfig
from rexrag.errors import UserError

HUGE = 1e9


def _mask(rows):
    return torch.tensor(rows, dtype=torch.float32)


# --------------------------------------------------------------------------- registry


def test_registry_lists_choices_and_rejects_duplicates():
    assert {"grpo", "rloo", "reinforce_pp", "gae"} <= set(A.adv_estimators())
    with pytest.raises(UserError, match="grpo"):
        A.get_adv_estimator("nope")
    with pytest.raises(ValueError, match="already registered"):
        A.register_adv_estimator("grpo")(lambda *a: None)


# --------------------------------------------------------------------------- grpo / rloo


def test_grpo_variable_group_sizes_closed_form():
    # groups: 7 -> 3 members, 9 -> 2 members, 4 -> singleton
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 3.0])
    gids = torch.tensor([7, 7, 7, 9, 9, 4])
    mask = _mask([[0, 1, 1, 0]] * 6)
    adv, ret = A.get_adv_estimator("grpo")(rewards, mask, gids, None, AlgoConfig())
    g1 = torch.tensor([1.0, 0.0, 0.0])
    g2 = torch.tensor([1.0, 0.5])
    exp = torch.cat([(g1 - g1.mean()) / (g1.std() + A.EPS), (g2 - g2.mean()) / (g2.std() + A.EPS), torch.zeros(1)])
    assert torch.allclose(adv[:, 1], exp, atol=1e-5)
    assert torch.allclose(adv[:, 2], exp, atol=1e-5)
    assert (adv[:, 0] == 0).all() and (adv[:, 3] == 0).all()
    assert torch.equal(adv, ret)


def test_dr_grpo_skips_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 5.0])
    gids = torch.tensor([1, 1, 1, 2])
    mask = _mask([[1, 1]] * 4)
    adv, _ = A.grpo(rewards, mask, gids, None, AlgoConfig(norm_adv_by_std=False))
    assert torch.allclose(adv[:, 0], torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0]), atol=1e-6)


def test_grpo_token_rewards_ignore_masked_entries():
    tok = torch.tensor([[HUGE, 1.0, 0.0], [HUGE, 0.0, 0.0]])
    mask = _mask([[0, 1, 1], [0, 1, 1]])
    adv, _ = A.grpo(tok, mask, torch.tensor([0, 0]), None, AlgoConfig())
    s = torch.tensor([1.0, 0.0])
    assert torch.allclose(adv[:, 1], (s - s.mean()) / (s.std() + A.EPS), atol=1e-5)


def test_rloo_leave_one_out():
    rewards = torch.tensor([1.0, 0.0, 2.0, 4.0, 7.0])
    gids = torch.tensor([0, 0, 0, 1, 2])
    mask = _mask([[1, 0]] * 5)
    adv, _ = A.get_adv_estimator("rloo")(rewards, mask, gids, None, AlgoConfig())
    exp = torch.tensor([1 - 1.0, 0 - 1.5, 2 - 0.5, 0.0, 0.0])
    assert torch.allclose(adv[:, 0], exp, atol=1e-6)
    assert (adv[:, 1] == 0).all()


# --------------------------------------------------------------------------- reinforce++


def test_reinforce_pp_whitened_over_batch_tokens():
    rewards = torch.tensor([1.0, 0.0])
    mask = _mask([[1, 1, 0, 1], [0, 1, 1, 0]])
    cfg = AlgoConfig(gamma=0.5)
    adv, ret = A.get_adv_estimator("reinforce_pp")(rewards, mask, torch.tensor([0, 0]), None, cfg)
    # row 0: reward on token 3; returns 0.25, 0.5, -, 1.0 (token 2 skipped); row 1 all zero
    exp_ret = torch.tensor([[0.25, 0.5, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(ret, exp_ret)
    vals = torch.tensor([0.25, 0.5, 1.0, 0.0, 0.0])
    white = (vals - vals.mean()) / (vals.std() + A.EPS)
    assert torch.allclose(adv[mask > 0], white[[0, 1, 2, 3, 4]], atol=1e-5)
    assert (adv[mask == 0] == 0).all()


# --------------------------------------------------------------------------- gae


def _gae_reference(r, v, gamma, lam):
    """Plain GAE over a list of (reward, value) pairs with terminal value 0."""
    adv, last, nv = [0.0] * len(r), 0.0, 0.0
    for i in reversed(range(len(r))):
        d = r[i] + gamma * nv - v[i]
        last = d + gamma * lam * last
        adv[i], nv = last, v[i]
    return adv


def test_gae_skips_observation_tokens():
    # PROMPT PROMPT POLICY POLICY INFO INFO POLICY POLICY PAD
    mask = _mask([[0, 0, 1, 1, 0, 0, 1, 1, 0]])
    values = torch.tensor([[HUGE, HUGE, 0.3, 0.6, HUGE, -HUGE, 0.2, 0.9, HUGE]])
    cfg = AlgoConfig(gamma=0.9, lam=0.8)
    adv, ret = A.get_adv_estimator("gae")(torch.tensor([1.0]), mask, torch.tensor([0]), values, cfg)
    ref = _gae_reference([0.0, 0.0, 0.0, 1.0], [0.3, 0.6, 0.2, 0.9], 0.9, 0.8)
    assert torch.allclose(adv[0, [2, 3, 6, 7]], torch.tensor(ref), atol=1e-6)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    assert torch.allclose(ret[0, [2, 3, 6, 7]], torch.tensor(ref) + torch.tensor([0.3, 0.6, 0.2, 0.9]), atol=1e-6)
    # changing values at observation / prompt tokens (even to inf) changes nothing
    values2 = values.clone()
    values2[0, [0, 1, 4, 5, 8]] = torch.tensor([float("inf"), 5.0, -3.0, float("nan"), 7.0])
    adv2, ret2 = A.gae(torch.tensor([1.0]), mask, torch.tensor([0]), values2, cfg)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_gae_needs_values():
    with pytest.raises(UserError, match="value model"):
        A.gae(torch.tensor([1.0]), _mask([[1]]), torch.tensor([0]), None, AlgoConfig())


# --------------------------------------------------------------------------- aggregate


def test_aggregate_modes_closed_form():
    loss = torch.tensor([[1.0, 2.0, HUGE, HUGE], [3.0, HUGE, HUGE, HUGE], [HUGE] * 4])
    mask = _mask([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert math.isclose(float(L.aggregate(loss, mask, "token-mean")), 2.0, rel_tol=1e-6)
    assert math.isclose(float(L.aggregate(loss, mask, "seq-mean-token-mean")), (1.5 + 3.0) / 2, rel_tol=1e-6)
    assert math.isclose(float(L.aggregate(loss, mask, "seq-mean-token-sum-norm")), (3.0 + 3.0) / (2 * 4), rel_tol=1e-6)
    assert math.isclose(float(L.aggregate(loss, mask, "token-mean", num_tokens=6.0)), 1.0, rel_tol=1e-6)
    with pytest.raises(UserError, match="token-mean"):
        L.aggregate(loss, mask, "bogus")


def test_micro_batch_losses_sum_to_mini_batch_loss():
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.4).float()
    mask[:, 0] = 1
    for mode in L.AGG_MODES:
        full = L.aggregate(loss, mask, mode)
        n_tok, n_seq = float(mask.sum()), float((mask.sum(-1) > 0).sum())
        parts = sum(L.aggregate(loss[i : i + 2], mask[i : i + 2], mode, num_tokens=n_tok, num_seqs=n_seq, horizon=5) for i in (0, 2, 4))
        assert torch.allclose(full, parts, atol=1e-6), mode


# --------------------------------------------------------------------------- policy loss


def test_policy_loss_clip_higher_closed_form():
    cfg = AlgoConfig(clip_low=0.2, clip_high=0.28)
    r = torch.tensor([[1.5, 0.5, 1.1, 0.7, 3.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0, HUGE]])
    mask = _mask([[1, 1, 1, 1, 0]])
    old = torch.zeros(1, 5)
    old[0, 4] = -HUGE
    logp = torch.log(r).requires_grad_(True)
    loss, m = L.policy_loss(logp, old, adv, mask, cfg)
    # per token: max(-A r, -A clip(r, .8, 1.28))
    exp = [max(-1.0 * 1.5, -1.28), max(0.5, 0.8), max(-2.2, -2.2), max(-0.7, -0.8)]
    assert math.isclose(float(loss.detach()), sum(exp) / 4, rel_tol=1e-5)
    assert math.isclose(m["actor/clip_frac"], 2 / 4, rel_tol=1e-6)  # tokens 0 and 1 clipped
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 4] == 0 and logp.grad[0, 0] == 0


def test_dual_clip_caps_negative_advantages():
    cfg = AlgoConfig(dual_clip_c=3.0)
    logp = torch.log(torch.tensor([[10.0, 10.0]]))
    adv = torch.tensor([[-1.0, 1.0]])
    loss, m = L.policy_loss(logp, torch.zeros(1, 2), adv, _mask([[1, 1]]), cfg)
    # token 0: max(10, 1.2) = 10 -> capped to 3; token 1: max(-10, -1.2) = -1.2
    assert math.isclose(float(loss), (3.0 - 1.2) / 2, rel_tol=1e-6)
    assert m["actor/dual_clip_frac"] == 0.5


def test_policy_loss_seq_weights_and_behaviour_logp():
    cfg = AlgoConfig()
    logp = torch.zeros(2, 2)
    adv = torch.ones(2, 2)
    mask = torch.ones(2, 2)
    beh = torch.full((2, 2), math.log(1.1))  # ratio 1/1.1 ~ 0.909, inside the clip range
    loss, _ = L.policy_loss(logp, beh, adv, mask, cfg, seq_weights=torch.tensor([2.0, 0.0]))
    assert math.isclose(float(loss), -(2 * 2 / 1.1) / 4, rel_tol=1e-5)


# --------------------------------------------------------------------------- kl / value / entropy


def test_kl_estimators_closed_form():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    d = logp - ref
    assert torch.allclose(L.kl_penalty(logp, ref, "k1"), d)
    assert torch.allclose(L.kl_penalty(logp, ref, "k2"), 0.5 * d**2)
    assert torch.allclose(L.kl_penalty(logp, ref, "k3"), torch.exp(-d) + d - 1)
    assert (L.kl_penalty(logp, ref, "k3") >= 0).all()
    loss, m = L.kl_loss(torch.tensor([[-1.0, HUGE]]), torch.tensor([[-1.5, -HUGE]]), _mask([[1, 0]]), AlgoConfig())
    assert math.isclose(float(loss), math.exp(-0.5) + 0.5 - 1, rel_tol=1e-5)


def test_value_loss_clipping():
    v = torch.tensor([[1.0, 0.0, HUGE]])
    old = torch.tensor([[0.0, 0.0, -HUGE]])
    ret = torch.tensor([[2.0, 1.0, HUGE]])
    loss, m = L.value_loss(v, old, ret, _mask([[1, 1, 0]]), clip=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: 1
    assert math.isclose(float(loss), 0.5 * (3.24 + 1.0) / 2, rel_tol=1e-5)
    assert m["critic/vf_clip_frac"] == 0.5


def test_entropy_from_logits_uniform_and_peaked():
    logits = torch.zeros(1, 2, 8)
    logits[0, 1, 3] = 1e4
    ent = L.entropy_from_logits(logits)
    assert math.isclose(float(ent[0, 0]), math.log(8), rel_tol=1e-6)
    assert float(ent[0, 1]) < 1e-6
