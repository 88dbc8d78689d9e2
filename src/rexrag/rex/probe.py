"""Mixed sampling: choose probe sources, build probes, filter them, adapt the keep ratio.

A probe restarts a failed original just before the ``<answer>`` tag of its answering turn, inserts
one exploratory prompt from the pool (PROBE tokens) and lets the policy continue with the source's
remaining search budget. Everything here is pure bookkeeping on ``Trajectory`` records; generation
is the agent's job (``rexrag.rex.explorer``).

Differences from the public code, on purpose:
- Trigger ``dead_end_group`` (the paper's framing: every original of the question failed) is offered
  beside the public code's ``per_trajectory`` coin flip with probability ``p``.
- "Wrong" means ``reward < success_reward`` (public code: score < 1).
- Which originals can be probed (``answer_cut``): every wrong original whose last run of POLICY
  tokens contains an ``<answer>`` tag -- a complete answer, an empty one, or an ``<answer>`` left
  unclosed (cut by ``max_new_tokens_per_turn`` / ``max_total_tokens``, or followed by EOS) -- in
  any turn, the final answer-only turn included. The public code clones a rollout only when it
  gives a complete answer in a search-enabled turn (its final turn, without search, makes no
  probes). We probe more sources; a probe of a final-turn answer continues with the search budget
  below.
- Search budget of a probe (``rexrag.rex.explorer``): ``max_turns - n_searches``, where
  ``n_searches`` counts the retrievals in the kept prefix; the agent then allows that many searches
  and one more turn (the answer-only turn). So the turn the probe is cut from is refunded (the probe
  re-does it), and so are the source's turns that ended in a notice (invalid action, empty query,
  failed retrieval). The public code makes the clone inside its rollout loop at the answering turn
  k and lets it go on in that loop: ``max_turns - k`` turns, whatever the earlier turns did.
- rho when no probe is kept (``AdaptiveRatio``): held. The public code updates rho from the kept
  probes' accuracy every step and pushes it toward 0 when none is kept; since K = floor(N * rho),
  once rho is small enough that K = 0 no probe is ever kept again and rho collapses for good. Ours
  cannot be dragged down by steps without probes (e.g. no wrong, cuttable original), but a long run
  of steps whose kept probes all fail can still bring it below 1/N, and then it stays there;
  ``rex.keep_min`` > 0 rules that out.
- The cut is made on token boundaries: the probe keeps the source's exact ids up to the token that
  contains the ``<`` of the final ``<answer>``. When a BPE token merges preceding text with the tag
  (e.g. ``".<"`` in SmolLM2), that preceding text is dropped with it -- we never re-tokenise.
- The top-K filter only needs log-probs of the PROBE tokens, which under a causal policy depend on
  earlier tokens only, so the explorer filters *before* generating continuations and generates only
  the kept probes. The kept set is identical to filtering after generation; it saves compute.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

import torch

from rexrag.protocol import ANSWER_OPEN
from rexrag.rollout.trajectory import Seg, Trajectory

# --------------------------------------------------------------------------- outcomes


def failed_mask(rewards: list[float], success_reward: float) -> list[bool]:
    """[N] rewards -> [N] True where the original is wrong (reward below ``success_reward``)."""
    return [float(r) < success_reward for r in rewards]


def dead_end_groups(group_ids: list[int], failed: list[bool]) -> list[int]:
    """Group ids (in first-seen order) whose originals all failed."""
    members: dict[int, list[bool]] = defaultdict(list)
    for g, f in zip(group_ids, failed):
        members[g].append(f)
    return [g for g, fs in members.items() if all(fs)]


def dead_end_fraction(group_ids: list[int], failed: list[bool]) -> float:
    """Share of groups in which every original failed (0.0 for an empty batch)."""
    n_groups = len(set(group_ids))
    return len(dead_end_groups(group_ids, failed)) / n_groups if n_groups else 0.0


# --------------------------------------------------------------------------- cut point


def _last_policy_run(segments: list[int]) -> tuple[int, int] | None:
    end = len(segments)
    while end > 0 and segments[end - 1] != Seg.POLICY:
        end -= 1
    if end == 0:
        return None
    start = end
    while start > 0 and segments[start - 1] == Seg.POLICY:
        start -= 1
    return start, end


def answer_cut(traj: Trajectory, tokenizer, tag: str = ANSWER_OPEN) -> int | None:
    """Index of the token holding the start of the final ``<answer>`` tag (the probe's cut), or None.

    Any ``<answer>`` in the last POLICY run counts: closed or not, empty or not, in the final
    answer-only turn too (the public code probes complete answers of search-enabled turns only; see
    the module docstring).

    Uses ``traj.answer_span[0]`` when the token there holds the tag's ``<``; otherwise scans the
    answering turn (the last run of POLICY tokens) token by token for the last tag. Per-token decoding
    is enough because the tag is ASCII (a partial UTF-8 byte never decodes to ``<``).

    ``rollout.format=tool_calls``: the cut is the start of the final message (``answer_span[0]``), whose
    answer, with or without an ``<answer>`` span, is what the probe replaces.
    """
    if traj.is_probe:
        return None
    if traj.meta.get("format") == "tool_calls":  # the answer is the final message: cut where it starts
        span = traj.answer_span
        return span[0] if traj.stop_reason == "answer" and span is not None and span[0] < len(traj) else None
    run = _last_policy_run(traj.segments)
    if run is None:
        return None
    start, end = run
    pieces = [tokenizer.decode([t]) for t in traj.token_ids[start:end]]
    span = traj.answer_span
    if span is not None and start <= span[0] < end:
        i = span[0] - start
        tail = "".join(pieces[i:])
        pos = tail.find(tag)
        if 0 <= pos < len(pieces[i]):
            return span[0]
    text = "".join(pieces)
    pos = text.rfind(tag)
    if pos < 0:
        return None
    acc = 0
    for i, piece in enumerate(pieces):
        if acc + len(piece) > pos:
            return start + i
        acc += len(piece)
    return None  # unreachable: pos < len(text)


# --------------------------------------------------------------------------- sources


def select_sources(
    group_ids: list[int],
    failed: list[bool],
    cuttable: list[bool],
    trigger: str,
    rng: random.Random,
    probe_prob: float = 0.2,
    probes_per_dead_group: int = 2,
) -> list[int]:
    """Indices of originals to probe (an index may repeat under ``dead_end_group``).

    ``per_trajectory``: each failed, cuttable original with probability ``probe_prob``.
    ``dead_end_group``: for each group whose originals all failed, ``probes_per_dead_group`` sources
    drawn from its cuttable members (without replacement while possible, then again).
    """
    if trigger == "per_trajectory":
        # one draw per original in batch order, so the choice is reproducible from the seed
        return [i for i in range(len(failed)) if rng.random() < probe_prob and failed[i] and cuttable[i]]
    if trigger != "dead_end_group":
        raise ValueError(f"unknown rex trigger {trigger!r}; choose per_trajectory or dead_end_group")
    out = []
    for g in dead_end_groups(group_ids, failed):
        members = [i for i, gid in enumerate(group_ids) if gid == g and cuttable[i]]
        if not members:
            continue
        chosen: list[int] = []
        while len(chosen) < probes_per_dead_group:
            chosen += rng.sample(members, min(len(members), probes_per_dead_group - len(chosen)))
        out += chosen
    return out


def make_probe(source: Trajectory, source_index: int, cut: int, prompt_ids: list[int], pool_index: int) -> Trajectory:
    """The source's exact first ``cut`` tokens + the pool prompt's ids as PROBE tokens (log-prob 0)."""
    if source.is_probe:
        raise ValueError("probes are never probed again")
    if not 0 < cut <= len(source):
        raise ValueError(f"cut {cut} outside the source trajectory (length {len(source)})")
    probe = source.truncated(cut)
    turn = source.turns[cut] if cut < len(source) else source.turns[-1]
    probe.extend(prompt_ids, Seg.PROBE, turn)
    probe.is_probe = True
    probe.source_index = source_index
    probe.probe_start = cut
    probe.stop_reason = "running"
    probe.meta = {"pool_index": pool_index}
    return probe


# --------------------------------------------------------------------------- filter


def probe_token_span(traj: Trajectory) -> tuple[int, int]:
    """[start, end) of the PROBE run of a probe."""
    start = traj.probe_start
    end = start
    while end < len(traj) and traj.segments[end] == Seg.PROBE:
        end += 1
    if start < 0 or end == start:
        raise ValueError("trajectory has no PROBE tokens at probe_start")
    return start, end


def probe_scores(probes: list[Trajectory], token_logprobs: list[torch.Tensor]) -> list[float]:
    """Mean old-policy log-prob over each probe's PROBE tokens. ``token_logprobs[i]``: [len(probe)]."""
    out = []
    for traj, lp in zip(probes, token_logprobs, strict=True):
        a, b = probe_token_span(traj)
        out.append(float(torch.as_tensor(lp, dtype=torch.float64)[a:b].mean()))
    return out


def keep_count(n_originals: int, rho: float, n_candidates: int, cap: int = 0, keep_min: int = 0) -> int:
    """K = floor(n_originals * rho), then at most ``cap`` (0 = none), at least ``keep_min``,
    never more than the candidates."""
    k = math.floor(n_originals * rho + 1e-9)
    if cap > 0:
        k = min(k, cap)
    k = max(k, keep_min)
    return max(0, min(k, n_candidates))


def top_k(scores: list[float], k: int) -> list[int]:
    """Indices of the k highest scores (ties: earlier first), returned in ascending index order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


class AdaptiveRatio:
    """rho <- m * rho + (1 - m) * accuracy of the kept probes; steps without kept probes leave rho.

    Holding rho on such steps differs from the public code, which moves it toward 0 then and can
    collapse it permanently (K = floor(N * rho) = 0 keeps no probe, so rho never recovers). Here a
    rho brought below 1/N by failing probes stays there for the same reason (``keep_min`` > 0
    prevents it).
    """

    def __init__(self, rho0: float, momentum: float = 0.9):
        self.rho = float(rho0)
        self.momentum = float(momentum)

    def update(self, accuracy: float | None) -> float:
        if accuracy is not None:
            self.rho = self.momentum * self.rho + (1.0 - self.momentum) * float(accuracy)
        return self.rho

    def state_dict(self) -> dict:
        return {"rho": self.rho, "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.rho = float(state["rho"])
        self.momentum = float(state.get("momentum", self.momentum))
