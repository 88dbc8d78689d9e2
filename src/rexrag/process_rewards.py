"""Process rewards: a reward for each agent turn, not only for the final answer.

An outcome reward (``rexrag.rewards``) gives a group in which every rollout is wrong no gradient at all.
A process reward scores each turn of a trajectory, mostly its search: did the search find something
useful? ``rexrag.algos.turn_credit`` turns these per-turn rewards into per-turn advantages that are added
to the outcome advantage (``trainer.process_reward``), so a dead-end group still learns which searches
were better.

A process reward has one signature, ``fn(turns, answers, **kw) -> list[list[float]]``:

- ``turns[i]``: the :class:`Turn` records of trajectory ``i``, one per agent turn (turn 0 first, the answer
  turn last), each with the queries the turn ran, the ids of the passages they returned, and the
  retrieved text the agent read in that turn (after truncation to ``rollout.max_obs_tokens``);
- ``answers[i]``: the gold answers;
- keywords, given when ``fn`` names them (or takes ``**kw``): ``questions``, ``metadata`` (the example's
  metadata plus ``id``, ``data_source``, ``group_id``) and ``trajectories`` (the token-exact records).

It returns, per trajectory, one finite number per turn (``len(out[i]) == len(turns[i])``). Rewards are
found by registered name or by dotted path, and ``trainer.process_reward`` is a weighted sum parsed like
``trainer.reward`` (``"evidence*0.2 + answer_seen*0.1"``). A reward that needs fields the data may lack
declares them (``needs_metadata``); :func:`check_data` refuses such data before any model loads.

Built-ins:

- ``evidence``: a turn scores the share of the question's supporting passages
  (``metadata.supporting_doc_ids``) that its searches retrieved for the first time in the trajectory.
  Over a trajectory the rewards add up to the recall of the supporting passages, at most 1.
- ``answer_seen``: 1 for the first turn whose retrieved text contains a gold answer (normalised, on word
  boundaries: ``rexrag.rewards.cover_em``), 0 otherwise. Works on data without passage ids (Search-R1).

Both pay for novelty only. Paying every turn that shows the answer (or a supporting passage) would pay
the agent for issuing the same search again and again until the turn limit instead of answering: the
reward-hacking loop the turn-limit sentinel (``process/turn_limit_rate``) watches for. With novelty only
a trajectory's process reward is bounded (by 1 per term) whatever it does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from rexrag.errors import ConfigError, UserError
from rexrag.registry import Registry
from rexrag.rewards import call_with_accepted, cover_em, example_fields, load_dotted, reward_terms
from rexrag.rollout.trajectory import Seg, Trajectory

ProcessRewardFn = Callable[..., list[list[float]]]
KEY = "trainer.process_reward"
_REGISTRY: Registry[ProcessRewardFn] = Registry("process reward")


@dataclass
class Turn:
    """One agent turn as a process reward sees it."""

    index: int  # 0 = the first turn
    queries: list[str] = field(default_factory=list)  # the searches the turn ran (tags format: at most one)
    doc_ids: list[str] = field(default_factory=list)  # ids of the passages they returned, in order
    observation: str = ""  # the retrieved text the agent read after this turn ("" without a search)


def register_process_reward(name: str, needs_metadata: tuple[str, ...] = ()) -> Callable[[ProcessRewardFn], ProcessRewardFn]:
    """Decorator registering ``fn(turns, answers, **kw) -> list[list[float]]`` under ``name``; ``needs_metadata``
    names the example metadata fields it reads (checked on the training data before any model loads)."""

    def add(fn: ProcessRewardFn) -> ProcessRewardFn:
        fn.needs_metadata = tuple(needs_metadata)
        return _REGISTRY.add(name, fn)

    return add


def available_process_rewards() -> list[str]:
    return _REGISTRY.names()


def get_process_reward(name: str) -> ProcessRewardFn:
    """A registered process reward, or a user function by dotted path ``pkg.mod:fn``."""
    if name in _REGISTRY or not _is_path(name):
        return _REGISTRY.get(name, hint=" or a dotted path 'pkg.module:fn'")
    return load_dotted(name, "process reward")


def _is_path(name: str) -> bool:
    return name not in _REGISTRY and (":" in name or "." in name)


def process_terms(spec: str | list) -> list[tuple[str, float]]:
    """``trainer.process_reward`` as ``[(name, weight), ...]``; ``""`` (off) is ``[]``. Names are checked:
    an unknown registered name is a ``ConfigError`` listing the choices."""
    if spec in ("", None, []):
        return []
    terms = reward_terms(spec, KEY)
    for name, _ in terms:
        if not _is_path(name) and name not in _REGISTRY:
            raise ConfigError(f"{KEY}={spec!r}: unknown process reward {name!r}; choose one of "
                              f"{available_process_rewards()} or a dotted path 'pkg.module:fn'")
    return terms


# --------------------------------------------------------------------------- turns of a trajectory


def trajectory_turns(tokenizer, traj: Trajectory) -> list[Turn]:
    """The :class:`Turn` records of ``traj``: one per turn index from 0 to its last turn; a turn's
    observation is its INFO tokens decoded (what the agent read), its queries and passage ids come from
    ``traj.retrievals`` (a probe's include its source's searches before the cut)."""
    start = traj.prompt_len
    last = max(traj.turns[start:], default=traj.turns[-1] if traj.turns else 0)
    turns = [Turn(k) for k in range(last + 1)]
    for r in traj.retrievals:
        if 0 <= r.turn <= last:
            turns[r.turn].queries.append(r.query)
            turns[r.turn].doc_ids.extend(r.doc_ids)
    info: dict[int, list[int]] = {}
    for tok, seg, k in zip(traj.token_ids[start:], traj.segments[start:], traj.turns[start:]):
        if seg == Seg.INFO:
            info.setdefault(k, []).append(tok)
    for k, ids in info.items():
        turns[k].observation = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return turns


def call_process_reward(fn: ProcessRewardFn, name: str, turns: list[list[Turn]], answers: list, **kw) -> list[list[float]]:
    """``fn(turns, answers, **kw)`` with the keywords it accepts; one finite number per turn, else a
    ``UserError`` naming ``name``."""
    out = call_with_accepted(fn, turns, answers, **kw)
    try:
        values = [[float(x) for x in row] for row in out]
    except (TypeError, ValueError) as exc:
        raise UserError(f"process reward {name!r} must return a list of per-turn lists of numbers ({exc})") from None
    if len(values) != len(turns) or any(len(v) != len(t) for v, t in zip(values, turns)):
        raise UserError(f"process reward {name!r} must return one value per turn of each trajectory "
                        f"(got lengths {[len(v) for v in values][:8]} for {[len(t) for t in turns][:8]})")
    if any(not math.isfinite(x) for row in values for x in row):
        raise UserError(f"process reward {name!r} returned a non-finite value; rewards must be finite numbers")
    return values


class WeightedProcessReward:
    """``sum_j weight_j * reward_j`` turn by turn; ``last`` holds each term's mean reward per turn of the last call."""

    def __init__(self, terms: list[tuple[str, ProcessRewardFn, float]]):
        self.terms = terms
        self.name = " + ".join(n if w == 1.0 else f"{w:g}*{n}" for n, _, w in terms)
        self.last: dict[str, float] = {}

    def __call__(self, turns: list[list[Turn]], answers: list, **kw) -> list[list[float]]:
        total = [[0.0] * len(t) for t in turns]
        n_turns = max(sum(len(t) for t in turns), 1)
        for name, fn, weight in self.terms:
            values = call_process_reward(fn, name, turns, answers, **kw)
            self.last[name] = sum(map(sum, values)) / n_turns
            total = [[a + weight * b for a, b in zip(ta, tb)] for ta, tb in zip(total, values)]
        return total

    @property
    def needs_metadata(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for _, fn, _ in self.terms for f in getattr(fn, "needs_metadata", ())))


def build_process_reward(spec: str | list) -> WeightedProcessReward | None:
    """The process reward ``trainer.process_reward`` names, as one callable; None when it is off."""
    terms = process_terms(spec)
    return WeightedProcessReward([(n, get_process_reward(n), w) for n, w in terms]) if terms else None


def process_reward_trajectories(fn: WeightedProcessReward, tokenizer, trajs: list[Trajectory]) -> list[list[float]]:
    """Per-turn process rewards of each trajectory, also stored in ``traj.meta['turn_rewards']``."""
    if not trajs:
        return []
    answers, questions, metadata = example_fields(trajs)
    out = fn([trajectory_turns(tokenizer, tr) for tr in trajs], answers, questions=questions, metadata=metadata,
             trajectories=trajs)
    for tr, r in zip(trajs, out):
        tr.meta["turn_rewards"] = r
    return out


def check_data(spec: str | list, examples: list, where: str) -> None:
    """Refuse (``ConfigError`` naming ``trainer.process_reward`` and ``where``, the data files) a process reward
    whose terms read example metadata that the training examples lack."""
    fn = build_process_reward(spec)
    for name in fn.needs_metadata if fn is not None else ():
        missing = [ex for ex in examples if not (getattr(ex, "metadata", None) or {}).get(name)]
        if missing:
            raise ConfigError(f"{KEY}={spec!r} needs metadata.{name} on every training example; {len(missing)} of "
                              f"{len(examples)} in {where} lack it (first: {getattr(missing[0], 'id', '?')!r}); "
                              "use answer_seen, which needs none, or data that has the field")


# --------------------------------------------------------------------------- built-ins


@register_process_reward("evidence", needs_metadata=("supporting_doc_ids",))
def evidence(turns: list[list[Turn]], answers: list, metadata: list[dict] | None = None, **kw) -> list[list[float]]:
    """Share of the supporting passages (``metadata.supporting_doc_ids``) a turn retrieved for the first time."""
    if metadata is None:
        raise UserError("process reward 'evidence' needs the examples' metadata (supporting_doc_ids)")
    out = []
    for row, meta in zip(turns, metadata, strict=True):
        gold = {str(d) for d in (meta.get("supporting_doc_ids") or [])}
        seen: set[str] = set()
        rewards = []
        for t in row:
            new = (set(t.doc_ids) & gold) - seen
            seen |= new
            rewards.append(len(new) / len(gold) if gold else 0.0)
        out.append(rewards)
    return out


@register_process_reward("answer_seen")
def answer_seen(turns: list[list[Turn]], answers: list, **kw) -> list[list[float]]:
    """1.0 for the first turn whose retrieved text contains a gold answer (``cover_em``), else 0.0."""
    out = []
    for row, golds in zip(turns, answers, strict=True):
        found, rewards = False, []
        for t in row:
            hit = not found and bool(t.observation) and cover_em(t.observation, golds) > 0
            found = found or hit
            rewards.append(float(hit))
        out.append(rewards)
    return out
