"""Policy correction: q_t by hand, sequence weights by hand, exact no-probe reduction, the exact
expectation of the ``rex_sequence`` gradient estimate on an enumerable toy (it equals the policy
gradient, and alpha or e 10 % off or a wrong prefix-spreading exponent break that), the bias of
``rex_token`` on the same toy, and a Monte-Carlo check with real sampling (``none`` is biased)."""

from __future__ import annotations

import math

import pytest
import torch

from rexrag.rex.correction import MODES, behaviour_logprobs
from rexrag.rex.pool import PromptTrie
from rexrag.rollout.trajectory import Seg

PR, PO, IN, PB, PAD = Seg.PROMPT, Seg.POLICY, Seg.INFO, Seg.PROBE, Seg.PAD


def _batch():
    """Two originals and one probe (prefix POLICY at 2 and 4, INFO at 3, PROBE 50,51 at 5-6, cont at 7)."""
    segments = torch.tensor(
        [
            [PR, PR, PO, PO, IN, PO, PO, PAD],
            [PR, PR, PO, PO, PO, PAD, PAD, PAD],
            [PR, PR, PO, IN, PO, PB, PB, PO],
        ]
    )
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 0], [5, 6, 7, 8, 9, 0, 0, 0], [5, 6, 7, 9, 8, 50, 51, 12]])
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 8, generator=g, dtype=torch.float64) * 3
    old[:, 0] = 0.0
    is_probe = torch.tensor([False, False, True])
    probe_start = torch.tensor([-1, -1, 5])
    trie = PromptTrie([[50, 51], [50, 52, 53]])
    return ids, segments, old, is_probe, probe_start, trie


def test_rex_token_matches_hand_computation():
    ids, segments, old, is_probe, probe_start, trie = _batch()
    alpha, e = 1 / 3, 0.5
    beh, w = behaviour_logprobs("rex_token", ids, segments, old, is_probe, probe_start, trie, alpha, e)
    assert w is None
    expected = old.clone()
    p = old.exp()
    for b, t in [(0, 2), (0, 3), (0, 5), (0, 6), (1, 2), (1, 3), (1, 4)]:
        expected[b, t] = math.log((1 - alpha) * p[b, t].item())  # originals: mu = 0
    s = 2  # POLICY tokens of the probe before probe_start (positions 2 and 4; INFO at 3 is not counted)
    for t in (2, 4):
        expected[2, t] = math.log((1 - alpha) * p[2, t].item() + alpha * p[2, t].item() / e ** (1 / s))
    expected[2, 5] = math.log((1 - alpha) * p[2, 5].item() + alpha * 1.0)  # P(50) = 2/2
    expected[2, 6] = math.log((1 - alpha) * p[2, 6].item() + alpha * 0.5)  # P(51 | 50) * P(end) = 1/2 * 1
    # position 7 (continuation) and all non-action tokens keep pi_old
    torch.testing.assert_close(beh, expected, rtol=0, atol=1e-12)
    assert torch.equal(beh[:, 0], old[:, 0]) and beh[2, 7] == old[2, 7] and beh[0, 4] == old[0, 4]


def test_rex_sequence_weights_match_hand_computation():
    ids, segments, old, is_probe, probe_start, trie = _batch()
    alpha, e = 0.25, 0.4
    beh, w = behaviour_logprobs("rex_sequence", ids, segments, old, is_probe, probe_start, trie, alpha, e, seq_weight_cap=10.0)
    assert beh is old
    D = -math.log(e) + (math.log(1.0) - old[2, 5].item()) + (math.log(0.5) - old[2, 6].item())
    expected = torch.tensor([1 / (1 - alpha), 1 / (1 - alpha), 1 / ((1 - alpha) + alpha * math.exp(D))], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=0)
    # the cap truncates (originals' weight 1/(1-alpha) = 1.333 > 1.2)
    _, w_cap = behaviour_logprobs("rex_sequence", ids, segments, old, is_probe, probe_start, trie, alpha, e, seq_weight_cap=1.2)
    assert w_cap.max().item() == pytest.approx(1.2)


@pytest.mark.parametrize("mode", MODES)
def test_no_probes_reduces_exactly(mode):
    ids, segments, old, _, _, trie = _batch()
    segments = segments.clone()
    segments[2][segments[2] == PB] = PO
    none = torch.zeros(3, dtype=torch.bool)
    beh, w = behaviour_logprobs(mode, ids, segments, old, none, torch.full((3,), -1), trie, 0.0, 0.3)
    assert beh is old and w is None  # the very same tensor: bitwise-identical plain algorithm


def test_none_mode_ignores_probes_and_bad_mode_lists_choices():
    ids, segments, old, is_probe, probe_start, trie = _batch()
    beh, w = behaviour_logprobs("none", ids, segments, old, is_probe, probe_start, trie, 1 / 3, 0.5)
    assert beh is old and w is None
    with pytest.raises(ValueError, match="rex_token"):
        behaviour_logprobs("bogus", ids, segments, old, is_probe, probe_start, trie, 1 / 3, 0.5)


# --------------------------------------------------------------------------- unbiasedness: exact and Monte-Carlo
#
# Toy: a tabular policy writes y = (a1, [info], a2, m, b). The info token after a1 is inserted by the
# environment (deterministic, not an action), so a probe's prefix holds s = 2 POLICY tokens around
# one INFO token: a wrong prefix-spreading exponent (e.g. counting the INFO token, or no spreading)
# changes mu. A prefix (a1, a2) "fails" when it is in FAIL; the probe policy mu draws a failed prefix
# from pi given failure, then a pool middle m uniformly from POOL, then b from pi. Every sequence with
# a failed prefix and a pool middle is labelled a probe (labels are a function of the sequence), so
# mu is evaluated on every sequence and w = pi / q must hold exactly.

FAIL = ((0, 0), (0, 1), (1, 1))  # failing prefixes (a1, a2)
POOL = (2, 3)  # middle tokens m that the probe policy inserts
SHAPE = (2, 2, 4, 2)  # a1, a2, m, b


def _toy(seed=0):
    """Logits for pi(a1), pi(a2 | a1), pi(m | a1, a2), pi(b | a1, a2, m), and a reward table."""
    g = torch.Generator().manual_seed(seed)
    theta = [torch.randn(*SHAPE[: k + 1], generator=g, dtype=torch.float64) for k in range(4)]
    R = torch.rand(*SHAPE, generator=g, dtype=torch.float64)
    return theta, R


def _log_tables(theta):
    return [t.log_softmax(-1) for t in theta]


def _joint(theta):
    """log pi(a1, a2, m, b) [2, 2, 4, 2]."""
    l1, l2, l3, l4 = _log_tables(theta)
    return l1[:, None, None, None] + l2[:, :, None, None] + l3[:, :, :, None] + l4


def _exact_gradient(theta, R):
    th = [t.clone().requires_grad_(True) for t in theta]
    J = (_joint(th).exp() * R).sum()
    return torch.cat([g.flatten() for g in torch.autograd.grad(J, th)])


def _failure_rate(theta):
    l1, l2, _, _ = _log_tables(theta)
    return sum((l1[a1] + l2[a1, a2]).exp().item() for a1, a2 in FAIL)


def _log_mu(theta, e):
    """log mu(a1, a2, m, b) [2, 2, 4, 2] of the probe policy (-inf off its support)."""
    l1, l2, _, l4 = _log_tables(theta)
    out = torch.full(SHAPE, -math.inf, dtype=torch.float64)
    for a1, a2 in FAIL:
        for m in POOL:
            out[a1, a2, m] = l1[a1] + l2[a1, a2] - math.log(e) - math.log(len(POOL)) + l4[a1, a2, m]
    return out


def _all_sequences():
    idx = torch.cartesian_prod(*(torch.arange(n) for n in SHAPE))
    return idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]


def _per_sample_grads(theta, a1, a2, m, b):
    """[N, 54] grad of log pi(y) for tabular softmax: onehot - probs in the rows used."""
    p1, p2, p3, p4 = (t.exp() for t in _log_tables(theta))
    N, r = a1.shape[0], torch.arange(a1.shape[0])
    g1 = torch.nn.functional.one_hot(a1, 2).double() - p1
    g2 = torch.zeros(N, 2, 2, dtype=torch.float64)
    g2[r, a1] = torch.nn.functional.one_hot(a2, 2).double() - p2[a1]
    g3 = torch.zeros(N, 2, 2, 4, dtype=torch.float64)
    g3[r, a1, a2] = torch.nn.functional.one_hot(m, 4).double() - p3[a1, a2]
    g4 = torch.zeros(N, 2, 2, 4, 2, dtype=torch.float64)
    g4[r, a1, a2, m] = torch.nn.functional.one_hot(b, 2).double() - p4[a1, a2, m]
    return torch.cat([g1, g2.flatten(1), g3.flatten(1), g4.flatten(1)], 1)


def _toy_batch(theta, a1, a2, m, b):
    """Token batch [N, 6]: prompt, a1, info, a2, m, b (probe rows: m is PROBE, probe_start = 4)."""
    l1, l2, l3, l4 = _log_tables(theta)
    N = a1.shape[0]
    ids = torch.stack([torch.full_like(a1, 99), 10 + a1, 40 + a1, 20 + a2, 30 + m, 50 + b], 1)
    zero = torch.zeros(N, dtype=torch.float64)
    old = torch.stack([zero, l1[a1], zero, l2[a1, a2], l3[a1, a2, m], l4[a1, a2, m, b]], 1)
    failed = torch.zeros(N, dtype=torch.bool)
    for f1, f2 in FAIL:
        failed |= (a1 == f1) & (a2 == f2)
    is_probe = failed & torch.isin(m, torch.tensor(POOL))
    segments = torch.tensor([int(Seg.PROMPT), int(Seg.POLICY), int(Seg.INFO), int(Seg.POLICY), int(Seg.POLICY), int(Seg.POLICY)]).repeat(N, 1)
    segments[is_probe, 4] = Seg.PROBE
    probe_start = torch.where(is_probe, 4, -1)
    return ids, segments, old, is_probe, probe_start


TRIE = PromptTrie([[30 + p] for p in POOL])


def _seq_weights(theta, y, alpha, e):
    ids, segments, old, is_probe, probe_start = _toy_batch(theta, *y)
    _, w = behaviour_logprobs("rex_sequence", ids, segments, old, is_probe, probe_start, TRIE, alpha, e, seq_weight_cap=10.0)
    return w


def _expected_estimate(theta, R, weights, alpha, e):
    """E over the stratified batch of (1/N) sum_i w(y_i) R(y_i) grad log pi(y_i), computed exactly:
    sum over all sequences of q(y) w(y) f(y), q = (1 - alpha) pi + alpha mu."""
    y = _all_sequences()
    log_q = torch.logaddexp(math.log1p(-alpha) + _joint(theta)[y], math.log(alpha) + _log_mu(theta, e)[y])
    f = _per_sample_grads(theta, *y) * R[y][:, None]
    return (log_q.exp() * weights)[:, None].mul(f).sum(0)


def _rel_error(est, exact):
    return float((est - exact).norm() / exact.norm())


def test_rex_sequence_expected_gradient_is_exact_and_sensitive_to_alpha_e_and_spreading():
    theta, R = _toy(seed=3)
    exact, e, alpha = _exact_gradient(theta, R), _failure_rate(theta), 0.3
    y = _all_sequences()
    assert torch.isclose(_joint(theta).exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    assert math.isclose(_log_mu(theta, e).exp().sum().item(), 1.0, rel_tol=1e-12)
    est = _expected_estimate(theta, R, _seq_weights(theta, y, alpha, e), alpha, e)
    assert _rel_error(est, exact) < 1e-12
    # power: alpha or e passed 10 % off gives a clearly wrong expectation ...
    for a_used, e_used in ((alpha * 1.1, e), (alpha * 0.9, e), (alpha, e * 1.1), (alpha, e * 0.9)):
        assert _rel_error(_expected_estimate(theta, R, _seq_weights(theta, y, a_used, e_used), alpha, e), exact) > 0.01  # 3-7 %
    # ... and so does the wrong prefix-spreading exponent: mu_t = pi_t / e^(1/s') with s' = 3 response
    # tokens before the probe (the INFO token counted) instead of s = 2 POLICY tokens
    ids, segments, old, is_probe, probe_start = _toy_batch(theta, *y)
    D = torch.where(is_probe, -2 * math.log(e) / 3 + TRIE.conditional_logprobs([30 + POOL[0]])[0] - old[:, 4], -math.inf)
    w_wrong = (-torch.logaddexp(torch.full_like(D, math.log1p(-alpha)), D + math.log(alpha))).exp()
    assert _rel_error(_expected_estimate(theta, R, w_wrong, alpha, e), exact) > 0.01  # 3 %
    # the same formula with the right exponent reproduces the module's weights
    D_right = torch.where(is_probe, -math.log(e) + TRIE.conditional_logprobs([30 + POOL[0]])[0] - old[:, 4], -math.inf)
    w_right = (-torch.logaddexp(torch.full_like(D_right, math.log1p(-alpha)), D_right + math.log(alpha))).exp()
    torch.testing.assert_close(w_right, _seq_weights(theta, y, alpha, e), rtol=1e-12, atol=0)


def test_rex_token_expected_gradient_is_biased():
    """At theta = theta_old the rex_token surrogate's gradient is sum_t (pi_old(y_t) / q_t) R grad log pi(y_t);
    its expectation under the batch's sampling law is not the policy gradient (the docstring's caveat)."""
    theta, R = _toy(seed=3)
    exact, e, alpha = _exact_gradient(theta, R), _failure_rate(theta), 0.3
    y = _all_sequences()
    ids, segments, old, is_probe, probe_start = _toy_batch(theta, *y)
    beh, _ = behaviour_logprobs("rex_token", ids, segments, old, is_probe, probe_start, TRIE, alpha, e)
    ratio = (old - beh).exp()  # pi_old / q_t, 1 on non-action tokens
    p1, p2, p3, p4 = (t.exp() for t in _log_tables(theta))
    a1, a2, m, b = y
    N, r = a1.shape[0], torch.arange(a1.shape[0])
    # per-token grads of log pi(y_t), each weighted by its own ratio (token positions 1, 3, 4, 5)
    g1 = (torch.nn.functional.one_hot(a1, 2).double() - p1) * ratio[:, 1:2]
    g2 = torch.zeros(N, 2, 2, dtype=torch.float64)
    g2[r, a1] = (torch.nn.functional.one_hot(a2, 2).double() - p2[a1]) * ratio[:, 3:4]
    g3 = torch.zeros(N, 2, 2, 4, dtype=torch.float64)
    g3[r, a1, a2] = (torch.nn.functional.one_hot(m, 4).double() - p3[a1, a2]) * ratio[:, 4:5]
    g4 = torch.zeros(N, 2, 2, 4, 2, dtype=torch.float64)
    g4[r, a1, a2, m] = (torch.nn.functional.one_hot(b, 2).double() - p4[a1, a2, m]) * ratio[:, 5:6]
    f = torch.cat([g1, g2.flatten(1), g3.flatten(1), g4.flatten(1)], 1) * R[y][:, None]
    log_q = torch.logaddexp(math.log1p(-alpha) + _joint(theta)[y], math.log(alpha) + _log_mu(theta, e)[y])
    est = (log_q.exp()[:, None] * f).sum(0)
    assert _rel_error(est, exact) > 0.1  # about 30 % here


def _sample(theta, n_orig, n_probe, e, g):
    pi = _joint(theta).exp().flatten()
    mu = _log_mu(theta, e).exp().flatten()
    flat = torch.cat([torch.multinomial(pi, n_orig, True, generator=g), torch.multinomial(mu, n_probe, True, generator=g)])
    b, m, a2, a1 = flat % 2, (flat // 2) % 4, (flat // 8) % 2, flat // 16
    return a1, a2, m, b


def test_rex_sequence_gradient_is_unbiased_and_none_is_biased():
    """Monte-Carlo: a stratified batch actually sampled from pi and mu."""
    theta, R = _toy(seed=3)
    exact, e = _exact_gradient(theta, R), _failure_rate(theta)
    g = torch.Generator().manual_seed(11)
    n_orig, n_probe = 14000, 6000
    y = _sample(theta, n_orig, n_probe, e, g)
    alpha = n_probe / (n_orig + n_probe)
    w = _seq_weights(theta, y, alpha, e)
    G = _per_sample_grads(theta, *y) * R[y][:, None]  # R(y) grad log pi(y)
    N = n_orig + n_probe

    def z_scores(weights):
        f = G * weights[:, None]
        mean = f.sum(0) / N
        # stratified sampling: exactly n_orig from pi and n_probe from mu
        var = (n_orig * f[:n_orig].var(0) + n_probe * f[n_orig:].var(0)) / N**2
        return ((mean - exact) / (var.sqrt() + 1e-12)).abs()

    z = z_scores(w)
    assert z.max() < 5.0, f"rex_sequence deviates by {z.max():.1f} standard errors"
    ids, segments, old, is_probe, probe_start = _toy_batch(theta, *y)
    _, w_none = behaviour_logprobs("none", ids, segments, old, is_probe, probe_start, TRIE, alpha, e)
    assert w_none is None
    z_none = z_scores(torch.ones(N, dtype=torch.float64))
    assert z_none.max() > 10.0, f"'none' should be measurably biased (max z {z_none.max():.1f})"
