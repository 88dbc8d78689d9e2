"""The token-exact trajectory record.

One ``Trajectory`` per sequence: the exact token ids (prompt + response), and per token a segment
kind, the turn index and, for sampled tokens, the log-prob under the sampling distribution that was
actually used. The ids that are trained are exactly the ids that were sampled or inserted; nothing is
ever decoded and re-tokenised (Search-R1 does, which makes train and rollout tokens disagree).

Shapes in ``to_batch``: B = trajectories, T = longest sequence (right padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch


class Seg(IntEnum):
    """Segment kind of one token."""

    PAD = -1
    PROMPT = 0  # instruction + question (chat template)
    POLICY = 1  # sampled by the model
    INFO = 2  # retrieved <information> block, inserted by the system
    NOTICE = 3  # invalid-action / retrieval-failure notice, inserted by the system
    PROBE = 4  # REX-RAG exploratory prompt, inserted by the system


@dataclass
class Retrieval:
    """One search that ran: the token index where its results start in the trajectory, the agent turn that
    issued it, the query sent and the ids of the passages returned (what process rewards such as
    ``evidence`` read: ``rexrag.process_rewards``)."""

    start: int
    turn: int
    query: str
    doc_ids: list[str] = field(default_factory=list)


def passage_ids(passages) -> list[str]:
    """The ids of a search's returned passages (``Passage.id``; "" for a record without one)."""
    return [str(getattr(p, "id", "") or "") for p in passages]


# answer: ended with </answer> (``answer`` is None when that span is empty); eos: the model emitted EOS without an answer; length: hit
# rollout.max_total_tokens; turns: the turn budget ran out without an answer; running: not finished.
STOP_REASONS = ("answer", "eos", "length", "turns", "running")


@dataclass
class Trajectory:
    """A token-exact record of one prompt + multi-turn response.

    Invariant: ``token_ids``, ``segments``, ``logprobs`` and ``turns`` have equal length.
    ``logprobs[i]`` is the rollout log-prob for POLICY tokens and 0.0 elsewhere.
    """

    token_ids: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    group_id: int = 0  # GRPO group (globally unique per prompt; probes share their source's)
    example: Any = None  # the QA example (rexrag.data.QAExample) this trajectory answers
    n_searches: int = 0
    stop_reason: str = "running"
    answer_span: tuple[int, int] | None = None  # token range [start, end) of the final <answer>...</answer>
    answer: str | None = None  # the model's answer text (None when no answer or an empty one)
    is_probe: bool = False
    source_index: int = -1  # for probes: index of the source trajectory in the batch
    probe_start: int = -1  # for probes: token index of the first PROBE token
    retrieval_failures: int = 0
    invalid_actions: int = 0
    meta: dict = field(default_factory=dict)  # free-form per-trajectory extras (reward, etc.)
    retrievals: list[Retrieval] = field(default_factory=list)  # the searches that ran, in order

    # ------------------------------------------------------------------ building
    def extend(self, ids: list[int], seg: Seg, turn: int, logprobs: list[float] | None = None) -> None:
        """Append tokens of one segment kind; ``logprobs`` is required for POLICY tokens."""
        if seg == Seg.POLICY and (logprobs is None or len(logprobs) != len(ids)):
            raise ValueError("POLICY tokens need exactly one rollout log-prob each")
        self.token_ids.extend(int(i) for i in ids)
        self.segments.extend([int(seg)] * len(ids))
        self.logprobs.extend([float(x) for x in logprobs] if logprobs is not None else [0.0] * len(ids))
        self.turns.extend([turn] * len(ids))

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_len(self) -> int:
        """Number of leading PROMPT tokens."""
        n = 0
        for s in self.segments:
            if s != Seg.PROMPT:
                break
            n += 1
        return n

    @property
    def response_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    def count(self, seg: Seg) -> int:
        return sum(1 for s in self.segments if s == seg)

    def truncated(self, end: int) -> "Trajectory":
        """A copy of the first ``end`` tokens (used to start a probe from its source's state)."""
        return Trajectory(
            token_ids=self.token_ids[:end],
            segments=self.segments[:end],
            logprobs=self.logprobs[:end],
            turns=self.turns[:end],
            group_id=self.group_id,
            example=self.example,
            n_searches=sum(1 for i in range(1, end) if self.segments[i] == Seg.INFO and self.segments[i - 1] != Seg.INFO),
            meta={},
            retrievals=[r for r in self.retrievals if r.start < end],  # a probe inherits its source's searches
        )

    def check(self) -> None:
        n = len(self.token_ids)
        if not (len(self.segments) == len(self.logprobs) == len(self.turns) == n):
            raise ValueError("trajectory arrays have different lengths")


def loss_mask_for(segments: torch.Tensor, train_probe_tokens: bool = True) -> torch.Tensor:
    """[B, T] segment ids -> [B, T] float mask: POLICY (and PROBE if trained) tokens."""
    mask = segments == Seg.POLICY
    if train_probe_tokens:
        mask = mask | (segments == Seg.PROBE)
    return mask.float()


def to_batch(trajs: list[Trajectory], pad_id: int, train_probe_tokens: bool = True) -> dict[str, torch.Tensor]:
    """Right-pad a list of trajectories into tensors.

    Returns ``input_ids`` [B, T] long, ``attention_mask`` [B, T] long, ``segments`` [B, T] long
    (PAD = -1), ``rollout_logprobs`` [B, T] float, ``turns`` [B, T] long, ``loss_mask`` [B, T] float,
    ``group_ids`` [B] long and ``lengths`` [B] long.
    """
    B = len(trajs)
    T = max((len(t) for t in trajs), default=0)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    segments = torch.full((B, T), int(Seg.PAD), dtype=torch.long)
    logprobs = torch.zeros((B, T), dtype=torch.float32)
    turns = torch.zeros((B, T), dtype=torch.long)
    for i, t in enumerate(trajs):
        t.check()
        n = len(t)
        input_ids[i, :n] = torch.tensor(t.token_ids, dtype=torch.long)
        attention[i, :n] = 1
        segments[i, :n] = torch.tensor(t.segments, dtype=torch.long)
        logprobs[i, :n] = torch.tensor(t.logprobs, dtype=torch.float32)
        turns[i, :n] = torch.tensor(t.turns, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "segments": segments,
        "rollout_logprobs": logprobs,
        "turns": turns,
        "loss_mask": loss_mask_for(segments, train_probe_tokens),
        "group_ids": torch.tensor([t.group_id for t in trajs], dtype=torch.long),
        "lengths": attention.sum(-1),
    }


def from_batch(batch: dict[str, torch.Tensor]) -> list[Trajectory]:
    """Inverse of ``to_batch`` for the token-level fields (ids, segments, log-probs, turns, group)."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        out.append(
            Trajectory(
                token_ids=batch["input_ids"][i, :n].tolist(),
                segments=batch["segments"][i, :n].tolist(),
                logprobs=batch["rollout_logprobs"][i, :n].tolist(),
                turns=batch["turns"][i, :n].tolist(),
                group_id=int(batch["group_ids"][i]),
            )
        )
    return out
