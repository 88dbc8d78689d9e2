"""Policy correction for mixed sampling: behaviour log-probs (``rex_token``) or sequence weights
(``rex_sequence``) that replace the plain old-policy log-probs in the PPO/GRPO loss.

Setting. A step's training batch holds N_o originals sampled from the old policy pi and N_p kept
probes sampled from the probe policy mu. We write alpha = N_p / (N_o + N_p): "batch size" is the
number of trajectories in the training batch *after* the probes were added, so alpha is the share
of the batch drawn from mu -- the sample-count weight of the balance heuristic. (The public code's
actor, which computes alpha, is not in the index we could search; DESIGN.md says "kept probes /
batch size" and this is the reading under which the mixture below is the batch's sampling law.)

Segments of a probe y (``probe_start`` = index of its first PROBE token):
    prefix       POLICY tokens before probe_start, copied from the failed source; s = their count
                 (PROMPT, INFO and NOTICE tokens are not actions and are never counted)
    PROBE        the inserted pool prompt
    continuation every token after the PROBE run (POLICY ones are actions)
Probe policy per action token, as in the public code except for s (below):
    originals: mu_t = 0
    prefix:    mu_t = pi_old(y_t) / e^(1/s), e = failure rate of the originals
               (the prefix was drawn from pi *given failure*, pi(prefix)/e, spread over s tokens)
    PROBE:     mu_t = pool trie conditional probability (``rexrag.rex.pool``; product = 1/|pool|)
    continuation: mu_t = pi_old(y_t)

The spreading exponent differs from the public code: there s counts every response token before
the probe prompt (retrieved passages and notices too), here only the POLICY tokens, which are the
only prefix tokens that get the factor. Then the prefix's factors multiply to exactly 1/e, so
mu(prefix) = pi(prefix)/e as the derivation needs; with the public count they give
e^(-s_policy/s_all), which a probe with retrieved text in its prefix (almost every one) pays as a
bias. ``tests/test_rex_correction.py`` shows a wrong exponent biases ``rex_sequence``.

``rex_token`` (default, the public code's rule): per action token
    log q_t = logaddexp(log(1-alpha) + log pi_old(y_t), log alpha + log mu_t)
replaces log pi_old in the ratio r_t = pi_theta(y_t) / q_t. On continuation tokens q_t = pi_old
exactly; on non-action tokens (prompt, retrieved text, notices) the old log-prob is kept.

``rex_sequence`` -- derivation. Treat each trajectory of the batch as a draw from the mixture
    q(y) = (1-alpha) pi(y) + alpha mu(y),   pi(y) = prod over action tokens of pi(y_t | y_<t)
(prompt and environment tokens have the same probability under both and cancel). Note that pi(y)
of a probe includes pi's probability of writing the PROBE tokens itself. For any f,
    E_{y~q}[ (pi(y)/q(y)) f(y) ] = sum_y q(y) pi(y)/q(y) f(y) = E_{y~pi}[ f(y) ],
and this also holds for the stratified batch (exactly N_o from pi, N_p from mu):
    E[(1/N) sum_i w(y_i) f(y_i)] = sum_y ((1-alpha) pi(y) + alpha mu(y)) w(y) f(y)  for w = pi/q.
With f(y) = R(y) grad log pi(y) the weighted estimate is unbiased for grad E_pi[R] (the multiple
importance sampling balance heuristic). At theta = theta_old the PPO surrogate's gradient is
w(y) * A * grad log pi(y), so we keep the ratio against pi_old (behaviour = old log-probs) and
return per-sequence weights
    w(y) = pi_old(y) / q(y) = 1 / ((1-alpha) + alpha exp(D)),  D = log mu(y) - log pi_old(y)
         = sum over action tokens of (log mu_t - log pi_old(y_t))     (D = -inf for originals)
computed as exp(-logaddexp(log(1-alpha), log alpha + D)) and truncated at ``seq_weight_cap``.
Since q >= (1-alpha) pi, w <= 1/(1-alpha): the cap only binds when alpha > 1 - 1/cap; it is a
guard, and the estimator is unbiased whenever it does not bind. Two honest caveats: (1) it is exact
only when mu(y) = 0 for originals, i.e. pi never writes a pool prompt verbatim after a failed
prefix (mu of an original is taken as 0, as in the public code); the Monte-Carlo test builds a toy
where mu is evaluated on every sequence. (2) When pi is unlikely to write the pool prompt itself,
D is large and w of a probe is tiny: the unbiased estimator lets probes teach little. ``rex_token``
trades that bias away for signal; the ablation is the point of offering both.

``rex_token`` is a biased estimator, even under the idealised sampling below: a per-token ratio
pi/q_t is not the sequence ratio pi(y)/q(y), so the expected surrogate gradient is not the policy
gradient. On the enumerable toy of ``tests/test_rex_correction.py`` (exact expectations, no
sampling noise) it misses the true gradient by about 30 % in relative norm, while ``rex_sequence``
matches it to rounding error.

``rex_sequence`` is unbiased only under the idealised sampling stated above: N_o originals from pi
and N_p probes from mu, with alpha and e fixed numbers and each trajectory's own reward as the
signal. Production sampling adds, and none of this is corrected:
  * the top-K filter: the kept probes are the K best-scoring of the candidates, not draws from mu;
    their law depends on the scores and on the other candidates;
  * failure that depends on the cut answer: a source is chosen because its answer (the part the cut
    removes) was wrong, so its prefix follows pi(prefix) P(fail | prefix) / e, not pi(prefix) / e
    (equal only if failure were decided by the prefix); the probe also needs an ``<answer>`` tag to
    cut before, and is chosen with probability p (or by the dead-end rule);
  * random alpha and e: both are measured on the same batch (kept / batch size, failed / originals)
    and vary from step to step;
  * group normalisation: GRPO advantages are normalised within groups that hold probes and
    originals, so a trajectory's signal depends on the others' rewards (plus PPO clipping and the
    loss aggregation).

``none``: probes are treated as on-policy (behaviour = old log-probs, no weights).

With no probes (alpha = 0) every mode returns ``old_logprobs`` itself and ``None`` weights.
Shapes: B = trajectories, T = padded length.
"""

from __future__ import annotations

import math

import torch

from rexrag.rex.pool import PromptTrie
from rexrag.rollout.trajectory import Seg

MODES = ("rex_token", "rex_sequence", "none")

# token kinds returned by ``token_kinds``
OTHER, PREFIX, PROBE, CONT = 0, 1, 2, 3


def action_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, T] segments -> [B, T] bool: tokens chosen by the policy or the probe (POLICY | PROBE)."""
    return (segments == Seg.POLICY) | (segments == Seg.PROBE)


def token_kinds(segments: torch.Tensor, is_probe: torch.Tensor, probe_start: torch.Tensor) -> torch.Tensor:
    """[B, T] long: OTHER (originals, non-actions), PREFIX, PROBE or CONT for probe action tokens."""
    B, T = segments.shape
    pos = torch.arange(T, device=segments.device).unsqueeze(0)
    probe_row = is_probe.bool().unsqueeze(1)
    start = probe_start.long().unsqueeze(1)
    kinds = torch.full((B, T), OTHER, dtype=torch.long, device=segments.device)
    policy = segments == Seg.POLICY
    kinds[probe_row & policy & (pos < start)] = PREFIX
    kinds[probe_row & (segments == Seg.PROBE)] = PROBE
    kinds[probe_row & policy & (pos > start)] = CONT
    return kinds


def probe_log_mu(
    input_ids: torch.Tensor,
    segments: torch.Tensor,
    old_logprobs: torch.Tensor,
    is_probe: torch.Tensor,
    probe_start: torch.Tensor,
    trie: PromptTrie,
    log_e: float,
) -> torch.Tensor:
    """[B, T] log mu_t on action tokens (-inf for originals and non-action tokens).

    ``log_e``: log failure rate of the originals. PROBE tokens are looked up in ``trie``.
    """
    kinds = token_kinds(segments, is_probe, probe_start)
    log_mu = torch.full_like(old_logprobs, -math.inf)
    s = (kinds == PREFIX).sum(-1, keepdim=True).clamp(min=1).to(old_logprobs.dtype)  # [B, 1]
    prefix = kinds == PREFIX
    log_mu = torch.where(prefix, old_logprobs - log_e / s, log_mu)
    cont = kinds == CONT
    log_mu = torch.where(cont, old_logprobs, log_mu)
    rows = torch.nonzero(is_probe.bool()).flatten().tolist()
    if not rows:
        return log_mu
    probe_pos = (kinds == PROBE)[rows].cpu().tolist()
    row_ids = input_ids[rows].cpu().tolist()
    cache: dict[tuple[int, ...], list[float]] = {}
    at_b, at_t, values = [], [], []
    for b, flags, ids in zip(rows, probe_pos, row_ids):
        cols = [t for t, f in enumerate(flags) if f]
        if not cols:
            raise ValueError(f"probe row {b} has no PROBE tokens")
        key = tuple(ids[t] for t in cols)
        if key not in cache:
            cache[key] = trie.conditional_logprobs(list(key))
        at_b += [b] * len(cols)
        at_t += cols
        values += cache[key]
    log_mu[at_b, at_t] = torch.tensor(values, dtype=log_mu.dtype, device=log_mu.device)
    return log_mu


def rex_token_behaviour(
    old_logprobs: torch.Tensor, log_mu: torch.Tensor, kinds: torch.Tensor, actions: torch.Tensor, alpha: float
) -> torch.Tensor:
    """[B, T] log q_t = logaddexp(log(1-alpha) + old, log alpha + log mu) on action tokens; old
    elsewhere and on continuation tokens (where q_t = pi_old exactly)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    mixed = torch.logaddexp(old_logprobs + math.log1p(-alpha), log_mu + math.log(alpha))
    keep_old = (~actions) | (kinds == CONT)
    return torch.where(keep_old, old_logprobs, mixed)


def rex_sequence_weights(
    old_logprobs: torch.Tensor, log_mu: torch.Tensor, actions: torch.Tensor, alpha: float, cap: float
) -> torch.Tensor:
    """[B] w = pi_old(y) / q(y), truncated at ``cap`` (see the module docstring for the derivation).

    D = sum over action tokens of (log mu_t - log pi_old_t); originals (log mu = -inf) get 1/(1-alpha).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    diff = torch.where(actions, log_mu - old_logprobs, torch.zeros_like(old_logprobs))
    D = diff.sum(-1)  # -inf for rows with mu = 0 somewhere (originals)
    log_w = -torch.logaddexp(torch.full_like(D, math.log1p(-alpha)), D + math.log(alpha))
    return log_w.exp().clamp(max=cap)


def behaviour_logprobs(
    mode: str,
    input_ids: torch.Tensor,
    segments: torch.Tensor,
    old_logprobs: torch.Tensor,
    is_probe: torch.Tensor,
    probe_start: torch.Tensor,
    trie: PromptTrie,
    alpha: float,
    failure_rate: float,
    seq_weight_cap: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(behaviour [B, T], seq_weights [B] | None) for one correction ``mode``.

    ``alpha`` = kept probes / trajectories in the step's batch; ``failure_rate`` = e.
    Exact reduction: with alpha == 0 (no probes), or mode ``none``, returns ``old_logprobs`` itself.
    """
    if mode not in MODES:
        raise ValueError(f"unknown rex correction {mode!r}; choose one of {list(MODES)}")
    if mode == "none" or alpha <= 0.0:
        return old_logprobs, None
    if failure_rate <= 0.0:
        raise ValueError("probes exist but the failure rate e of the originals is 0")
    kinds = token_kinds(segments, is_probe, probe_start)
    actions = action_mask(segments)
    log_mu = probe_log_mu(input_ids, segments, old_logprobs, is_probe, probe_start, trie, math.log(failure_rate))
    if mode == "rex_token":
        return rex_token_behaviour(old_logprobs, log_mu, kinds, actions, alpha), None
    return old_logprobs, rex_sequence_weights(old_logprobs, log_mu, actions, alpha, seq_weight_cap)
