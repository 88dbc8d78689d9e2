"""Policy correction: q_t by hand, sequence weights by hand, exact no-probe reduction, and a
Monte-Carlo check that the ``rex_sequence`` gradient estimate is unbiased (and ``none`` is not)."""

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


# --------------------------------------------------------------------------- Monte-Carlo unbiasedness

FAIL = (0, 1)  # prefixes a that "fail"
POOL = (2, 3)  # middle tokens m that the probe policy inserts


def _toy(seed=0):
    """Tabular policy over y = (a, m, b), a in 3, m in 4, b in 2; returns params and reward table."""
    g = torch.Generator().manual_seed(seed)
    theta = [torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64),
             torch.randn(3, 4, 2, generator=g, dtype=torch.float64)]
    R = torch.rand(3, 4, 2, generator=g, dtype=torch.float64)
    return theta, R


def _log_tables(theta):
    return theta[0].log_softmax(-1), theta[1].log_softmax(-1), theta[2].log_softmax(-1)


def _exact_gradient(theta, R):
    th = [t.clone().requires_grad_(True) for t in theta]
    la, lm, lb = _log_tables(th)
    logp = la[:, None, None] + lm[:, :, None] + lb  # [3, 4, 2]
    J = (logp.exp() * R).sum()
    grads = torch.autograd.grad(J, th)
    return torch.cat([g.flatten() for g in grads])


def _per_sample_grads(theta, a, m, b):
    """[N, 39] grad of log pi(a, m, b) for tabular softmax: onehot - probs in the used rows."""
    pa, pm, pb = (t.exp() for t in _log_tables(theta))
    N = a.shape[0]
    ga = torch.nn.functional.one_hot(a, 3).double() - pa
    gm = torch.zeros(N, 3, 4, dtype=torch.float64)
    gm[torch.arange(N), a] = torch.nn.functional.one_hot(m, 4).double() - pm[a]
    gb = torch.zeros(N, 3, 4, 2, dtype=torch.float64)
    gb[torch.arange(N), a, m] = torch.nn.functional.one_hot(b, 2).double() - pb[a, m]
    return torch.cat([ga, gm.flatten(1), gb.flatten(1)], 1)


def _sample(theta, n_orig, n_probe, g):
    la, lm, lb = _log_tables(theta)
    pi = (la[:, None, None] + lm[:, :, None] + lb).exp()  # [3, 4, 2]
    e = pi[list(FAIL)].sum().item()
    mu = torch.zeros_like(pi)
    for a in FAIL:
        for m in POOL:
            mu[a, m] = la[a].exp() / e * (1 / len(POOL)) * lb[a, m].exp()
    flat = torch.cat([torch.multinomial(pi.flatten(), n_orig, True, generator=g),
                      torch.multinomial(mu.flatten(), n_probe, True, generator=g)])
    a, m, b = flat // 8, (flat // 2) % 4, flat % 2
    return a, m, b, e


def _toy_batch(theta, a, m, b):
    """Token batch [N, 4]: prompt, a, m, b; rows with a failed prefix and a pool middle are probe-shaped
    (labels are a function of the sequence, so mu is evaluated on every sample exactly)."""
    la, lm, lb = _log_tables(theta)
    N = a.shape[0]
    ids = torch.stack([torch.full_like(a, 99), 10 + a, 20 + m, 30 + b], 1)
    old = torch.stack([torch.zeros(N, dtype=torch.float64), la[a], lm[a, m], lb[a, m, b]], 1)
    is_probe = torch.isin(a, torch.tensor(FAIL)) & torch.isin(m, torch.tensor(POOL))
    segments = torch.full((N, 4), int(Seg.POLICY))
    segments[:, 0] = Seg.PROMPT
    segments[is_probe, 2] = Seg.PROBE
    probe_start = torch.where(is_probe, 2, -1)
    return ids, segments, old, is_probe, probe_start


def test_rex_sequence_gradient_is_unbiased_and_none_is_biased():
    theta, R = _toy(seed=3)
    exact = _exact_gradient(theta, R)
    g = torch.Generator().manual_seed(11)
    n_orig, n_probe = 14000, 6000
    a, m, b, e = _sample(theta, n_orig, n_probe, g)
    alpha = n_probe / (n_orig + n_probe)
    ids, segments, old, is_probe, probe_start = _toy_batch(theta, a, m, b)
    trie = PromptTrie([[20 + p] for p in POOL])
    _, w = behaviour_logprobs("rex_sequence", ids, segments, old, is_probe, probe_start, trie, alpha, e, seq_weight_cap=10.0)
    G = _per_sample_grads(theta, a, m, b) * R[a, m, b][:, None]  # R(y) grad log pi(y)
    N = n_orig + n_probe

    def estimate(weights):
        f = G * weights[:, None]
        mean = f.sum(0) / N
        # stratified sampling: exactly n_orig from pi and n_probe from mu
        var = (n_orig * f[:n_orig].var(0) + n_probe * f[n_orig:].var(0)) / N**2
        return mean, var.sqrt() + 1e-12

    mean, se = estimate(w)
    z = ((mean - exact) / se).abs()
    assert z.max() < 5.0, f"rex_sequence deviates by {z.max():.1f} standard errors"
    _, w_none = behaviour_logprobs("none", ids, segments, old, is_probe, probe_start, trie, alpha, e)
    assert w_none is None
    mean_none, se_none = estimate(torch.ones(N, dtype=torch.float64))
    z_none = ((mean_none - exact) / se_none).abs()
    assert z_none.max() > 10.0, f"'none' should be measurably biased (max z {z_none.max():.1f})"
