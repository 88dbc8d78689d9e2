"""The tensors one RL step works on, and how they are cut into micro-batches.

Shapes (one place for all of them): B = rows on this process (the step's originals, then its kept
REX-RAG probes), T = the longest row (right padding), b / w = the rows / columns of a micro-batch.

:class:`Batch` holds what the rollout produced; :class:`Targets` what the step computed from it for the
update. Both are plain dataclasses of tensors: each stage of ``Trainer.step`` returns its piece and the
step assembles them, so nothing is written into a shared dict behind the reader's back.

Micro-batches (:func:`micro_batches`): ``trainer.micro_batch_tokens == 0`` keeps the row-count split
(``micro_batch_size`` consecutive rows, all T columns). A token budget instead sorts the rows by length
(longest first) and packs consecutive rows while rows x longest <= budget; each micro-batch is cut to its
longest row (``width``), which is exact for right padding and a causal model. Losses are normalised by
the mini-batch's token/sequence counts, not the micro-batch's, so any split gives the same loss.

Padding-free (``trainer.pack_sequences``): each micro-batch's rows run as one sequence of their real
tokens (``models.sequence_logprobs(pack=True)``, ``rexrag.packing``), so its cost follows the sum of its
rows' lengths, not rows x longest. The token budget then packs consecutive rows while that sum <= budget;
the row split is unchanged. :func:`padding_ratio` is the computed tokens per real token (1.0 packed).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

from rexrag.rollout.trajectory import Seg, Trajectory, to_batch


@dataclass
class Batch:
    """The step's rollout as tensors (rows: originals, then kept probes).

    input_ids         [B, T] long   the token-exact sequences (``pad_id`` after each row's end)
    attention_mask    [B, T] long   1 = real token
    segments          [B, T] long   ``Seg`` kind of each token (PAD = -1)
    loss_mask         [B, T] float  tokens trained: POLICY, and PROBE when ``rex.train_probe_tokens``
    rollout_logprobs  [B, T] float  the sampler's log-prob of each sampled token (recorded, not trained on)
    turns             [B, T] long   agent turn of each token
    group_ids         [B]    long   GRPO group (probes share their source's)
    lengths           [B]    long   real tokens per row
    rewards           [B]    float  outcome reward
    is_probe          [B]    bool   REX-RAG probe rows
    probe_start       [B]    long   index of a probe's first PROBE token; -1 for originals
    turn_rewards      [B, K] float  process reward of each turn (``trainer.process_reward``), else None
    """

    input_ids: Tensor
    attention_mask: Tensor
    segments: Tensor
    loss_mask: Tensor
    rollout_logprobs: Tensor
    turns: Tensor
    group_ids: Tensor
    lengths: Tensor
    rewards: Tensor
    is_probe: Tensor
    probe_start: Tensor
    turn_rewards: Tensor | None = None

    @classmethod
    def collate(cls, trajs: list[Trajectory], pad_id: int, train_probe_tokens: bool, device) -> Batch:
        """Right-pad ``trajs`` (rewards from ``meta['reward']``, per-turn process rewards from ``meta['turn_rewards']``
        when any trajectory has them) onto ``device``."""
        t = {k: v.to(device) for k, v in to_batch(trajs, pad_id, train_probe_tokens).items()}
        return cls(**t, rewards=torch.tensor([tr.meta["reward"] for tr in trajs], dtype=torch.float32, device=device),
                   is_probe=torch.tensor([tr.is_probe for tr in trajs], dtype=torch.bool, device=device),
                   probe_start=torch.tensor([tr.probe_start for tr in trajs], dtype=torch.long, device=device),
                   turn_rewards=_turn_rewards(trajs, device))

    @property
    def sampled(self) -> Tensor:
        """[B, T] bool: the tokens the generation backend sampled (POLICY), whose ``rollout_logprobs`` are real."""
        return self.segments == Seg.POLICY

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def mapping(self, rows: Tensor | None = None, width: int | None = None) -> dict[str, Tensor]:
        """The fields by name (rows ``rows``, [B, T] fields cut to ``width`` columns) for hooks that take
        a dict of tensors (``Explorer.correct``)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            v = v if rows is None else v[rows]
            out[f.name] = v[:, :width] if (width is not None and v.dim() == 2) else v
        return out


def _turn_rewards(trajs: list[Trajectory], device) -> Tensor | None:
    """[B, K] per-turn process rewards, 0 beyond a row's turns; None when no trajectory has them."""
    rows = [tr.meta.get("turn_rewards") for tr in trajs]
    if all(r is None for r in rows):
        return None
    out = torch.zeros(len(rows), max(1, max(len(r or []) for r in rows)), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r or [])] = torch.tensor(r or [], dtype=torch.float32)
    return out.to(device)


@dataclass
class Targets:
    """What the update trains against, per row of the :class:`Batch` ([B, T] unless noted).

    advantages      [B, T]  from the estimator (0 outside the loss mask)
    returns         [B, T]  value targets (``gae``), else None
    old_logp        [B, T]  pi_old; None = on-policy reuse: the update's own forward, detached
    behaviour_logp  [B, T]  the PPO ratio's denominator: REX-RAG's mixture log q, else ``old_logp``;
                            None exactly when ``old_logp`` is None (then computed per micro-batch)
    seq_weights     [B]     REX-RAG ``rex_sequence`` row weights, else None
    token_weights   [B, T]  rollout-correction importance weights (``algo.rollout_correction``), else None
    ref_logp        [B, T]  reference policy (KL in the loss), else None
    old_values      [B, T]  critic before the update (``gae``), else None
    """

    advantages: Tensor
    returns: Tensor | None = None
    old_logp: Tensor | None = None
    behaviour_logp: Tensor | None = None
    seq_weights: Tensor | None = None
    token_weights: Tensor | None = None
    ref_logp: Tensor | None = None
    old_values: Tensor | None = None


class Micro(NamedTuple):
    """One forward/backward: row indices [b] and the number of columns kept (w <= T)."""

    rows: Tensor
    width: int


def micro_batches(rows: Tensor, lengths: Tensor, width: int, max_rows: int, max_tokens: int = 0,
                  packed: bool = False) -> list[Micro]:
    """Split ``rows`` [n] (``lengths`` [B] per row of the batch, ``width`` = T) into micro-batches.

    ``max_tokens == 0``: ``max_rows`` consecutive rows each, all ``width`` columns (the row-count split).
    ``max_tokens > 0``: rows sorted by length (longest first, ties by position), packed greedily while
    rows x longest <= ``max_tokens`` (a row longer than the budget goes alone), each cut to its longest.
    ``packed``: rows computed without padding; the budget holds consecutive rows while their summed
    lengths <= ``max_tokens`` (a longer row alone); every micro-batch is cut to its longest row.
    """
    if packed:
        return _packed_micro_batches(rows, lengths, max_rows, max_tokens)
    if max_tokens <= 0:
        return [Micro(rows[i : i + max_rows], width) for i in range(0, len(rows), max_rows)]
    lens = lengths[rows].tolist()
    order = sorted(range(len(lens)), key=lambda i: (-lens[i], i))
    out, cur = [], []
    for i in order:
        longest = lens[cur[0]] if cur else lens[i]
        if cur and (len(cur) + 1) * longest > max_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return [Micro(rows[torch.tensor(g, dtype=torch.long)], max(1, int(lens[g[0]]))) for g in out]


def _packed_micro_batches(rows: Tensor, lengths: Tensor, max_rows: int, max_tokens: int) -> list[Micro]:
    lens = lengths[rows].tolist()
    groups: list[list[int]] = []
    total = 0  # real tokens in the last group
    for i, n in enumerate(lens):
        if groups and (len(groups[-1]) < max_rows if max_tokens <= 0 else total + n <= max_tokens):
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return [Micro(rows[torch.tensor(g, dtype=torch.long)], max(1, max(lens[j] for j in g))) for g in groups]


def _token_counts(micros: list[Micro], lengths: Tensor, packed: bool) -> tuple[int, int]:
    """(tokens computed, real tokens) over ``micros``: rows x width padded, the real tokens packed."""
    real = sum(int(lengths[m.rows].clamp(max=m.width).sum()) for m in micros)
    return (real if packed else sum(len(m.rows) * m.width for m in micros)), real


def padding_fraction(micros: list[Micro], lengths: Tensor, packed: bool = False) -> float:
    """Share of the computed token slots (rows x width over ``micros``; none when ``packed``) that are padding."""
    computed, real = _token_counts(micros, lengths, packed)
    return 1.0 - real / computed if computed else 0.0


def padding_ratio(micros: list[Micro], lengths: Tensor, packed: bool = False) -> float:
    """Tokens computed per real token over ``micros`` (1.0 when ``packed``; rows x width / real tokens padded)."""
    computed, real = _token_counts(micros, lengths, packed)
    return computed / real if real else 1.0
