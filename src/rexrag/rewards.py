"""Answer metrics and outcome rewards for search agents.

Metrics follow the SQuAD evaluation script (lowercase, strip punctuation, drop a/an/the, collapse
whitespace) with two deliberate differences for non-ASCII text: the string is NFKC-normalised and
case-folded first (so "Röntgen" written with a combining diaeresis equals "röntgen"), and every
Unicode punctuation character (category P*, e.g. curly quotes, en dashes) is removed, not only
ASCII ``string.punctuation``. Accents are kept ("Röntgen" != "Rontgen"), as in SQuAD. F1 follows the
official HotpotQA script (and FlashRAG) for yes / no / noanswer: when either normalised side is one
of them and they differ, F1 is 0 ("yes it is" against "yes" scores 0, not 0.5).

Answer extraction differs from Search-R1: the caller passes only the model's response (everything
after the prompt), so the last complete ``<answer>...</answer>`` is the model's own answer and no
"at least two matches" rule is needed (Search-R1 needs one because its prompt contains an example
answer). An empty ``<answer></answer>`` is no answer.

Where the response holds retrieved passages, the answer must come from the model's tokens, not from
text: the trainer and ``rexrag eval`` read it by segment kind (``rexrag.rollout.views.policy_answer``)
and pass it to rewards as ``predictions``; ``extract_answer`` on text only drops whole
``<information>...</information>`` blocks by pattern, which a passage quoting
``</information><answer>X</answer>`` defeats. Use it for text with no inserted blocks.

A reward function has one signature, ``fn(completions, answers, **kw) -> list[float]``, where
``completions[i]`` is the model's own response text (its POLICY and PROBE tokens only: no prompt, no
retrieved ``<information>`` text, no notices of ours) and ``answers[i]`` its list of gold answers;
rewards are found by registered name or by dotted path ``"pkg.module:fn"`` / ``"pkg.module.fn"``. The
trainer also passes, as keywords, ``predictions`` (``predictions[i]``: the model's answer read from
its own tokens, None when there is none), ``formatted`` (``format_ok`` of the response with every
retrieved block emptied, ``rexrag.rollout.views.format_view``), ``questions``, ``metadata``
(``metadata[i]``: the example's metadata plus ``id``, ``data_source`` and ``group_id``) and
``trajectories`` (the token-exact ``Trajectory`` records); a function gets only the keywords it names
unless it takes ``**kw``, so ``fn(completions, answers)`` still works. The built-in rewards use
``predictions`` / ``formatted`` when given and fall back to reading ``completions`` otherwise.
``trainer.reward`` may be a weighted sum (``"em + 0.1*format"`` or a YAML list of ``{name, weight}``);
every term must return one finite number per completion (``call_reward`` checks, naming the reward).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import string
import unicodedata
from collections import Counter
from typing import Callable, Iterable

from rexrag.errors import ConfigError, UserError
from rexrag.protocol import ANSWER, INFORMATION, INFORMATION_CLOSE, INFORMATION_OPEN, SEARCH, TAGS, last_answer_span
from rexrag.registry import Registry

RewardFn = Callable[..., list[float]]

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

# --------------------------------------------------------------------------- metrics


def normalize_answer(s: str) -> str:
    """SQuAD normalisation, Unicode-aware: NFKC + casefold, drop punctuation, a/an/the, extra spaces."""
    s = unicodedata.normalize("NFKC", s).casefold()
    s = "".join(ch for ch in s if ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P"))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _golds(golds: str | Iterable[str] | None) -> list[str]:
    """Normalised gold answers; those that normalise to "" (e.g. "", "the") can never be matched."""
    if golds is None:
        return []
    if isinstance(golds, str):
        golds = [golds]
    return [g for g in (normalize_answer(str(x)) for x in golds) if g]


def exact_match(pred: str | None, golds: str | Iterable[str] | None) -> float:
    """1.0 if the normalised prediction equals any normalised (non-empty) gold, else 0.0."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(bool(p) and p in _golds(golds))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# The official HotpotQA rule (hotpot_evaluate_v1.py, also FlashRAG's F1): when the normalised
# prediction or gold is one of these and the two differ, F1 is 0 -- no partial credit for
# "yes it is" against "yes", or for "no" against "no man's land".
YES_NO_NOANSWER = frozenset({"yes", "no", "noanswer"})


def _f1_one(pred_norm: str, gold_norm: str) -> float:
    if (pred_norm in YES_NO_NOANSWER or gold_norm in YES_NO_NOANSWER) and pred_norm != gold_norm:
        return 0.0
    return _token_f1(pred_norm.split(), gold_norm.split())


def f1_score(pred: str | None, golds: str | Iterable[str] | None) -> float:
    """Token-level F1 of the normalised prediction, max over golds (0.0 for no prediction).

    Follows the official HotpotQA rule for yes / no / noanswer: a prediction or gold that normalises
    to one of them scores 0 against anything but itself.
    """
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    if not p:
        return 0.0
    return max((_f1_one(p, g) for g in _golds(golds)), default=0.0)


def cover_em(pred: str | None, golds: str | Iterable[str] | None) -> float:
    """1.0 if some normalised gold occurs in the normalised prediction on word boundaries."""
    if pred is None:
        return 0.0
    p = f" {normalize_answer(pred)} "
    return float(any(f" {g} " in p for g in _golds(golds)))


# --------------------------------------------------------------------------- response parsing

_INFO_BLOCK = re.compile(f"{re.escape(INFORMATION_OPEN)}.*?{re.escape(INFORMATION_CLOSE)}", re.DOTALL)
_TAG = re.compile(f"<(/?)({'|'.join(TAGS)})>")


def extract_answer(response: str | None) -> str | None:
    """The stripped text of the last complete ``<answer>...</answer>`` in ``response``, else None.

    ``response`` is the model's own response (never the prompt). Well-formed ``<information>``
    blocks are skipped by pattern -- a best effort only: for responses with retrieved text use
    ``rexrag.rollout.views.policy_answer``, which reads the model's tokens. With nested openings
    (``<answer>a <answer>b</answer>``) the innermost wins ("b"). An empty answer is None. An answer
    written inside ``<think>`` still counts here; ``format_ok`` rejects it.
    """
    if not response:
        return None
    text = _INFO_BLOCK.sub(" ", response)
    span = last_answer_span(text)
    if span is None:
        return None
    return text[span[0] : span[1]].strip() or None


def format_ok(response: str | None) -> bool:
    """True iff ``response`` follows the search-agent protocol exactly.

    Precisely, scanning the tags ``<think> <search> <answer> <information>`` (and their closings):
    1. outside blocks only whitespace may appear (any other text, e.g. an invalid-action notice,
       fails);
    2. ``think``, ``search`` and ``answer`` blocks are flat: inside one, the next tag must be its own
       closing tag (so nested, crossed or unclosed tags fail); search queries must be non-empty;
    3. an ``<information>`` block may only directly follow a ``</search>`` (whitespace between),
       at most one per search, as the system inserts it; its content is not checked;
    4. there is exactly one ``answer`` block, it is non-empty, and nothing but whitespace follows it.
    A think block is allowed but not required.
    """
    if not response:
        return False
    pos, inside, last, answered = 0, None, None, False
    while True:
        m = _TAG.search(response, pos)
        chunk = response[pos : m.start() if m else len(response)]
        if inside is None and chunk.strip():
            return False  # stray text outside blocks (rule 1)
        if m is None:
            break
        closing, name = m.group(1) == "/", m.group(2)
        if inside is not None:
            if not closing or name != inside:
                return False  # nested / crossed (rule 2)
            if name in (SEARCH, ANSWER) and not chunk.strip():
                return False  # empty query or answer
            inside, last = None, name
            answered = answered or name == ANSWER
            pos = m.end()
            continue
        if closing or answered:
            return False  # closing without opening, or anything after the answer (rule 4)
        if name == INFORMATION:
            end = response.find(INFORMATION_CLOSE, m.end())
            if last != SEARCH or end < 0:
                return False  # rule 3
            last, pos = INFORMATION, end + len(INFORMATION_CLOSE)
            continue
        inside, pos = name, m.end()
    return inside is None and answered


# --------------------------------------------------------------------------- registry

_REWARDS: Registry[RewardFn] = Registry("reward")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(completions, answers, **kw) -> list[float]`` under ``name``."""
    return _REWARDS.register(name)


def available_rewards() -> list[str]:
    """Names of the registered rewards."""
    return _REWARDS.names()


def is_reward_path(name: str) -> bool:
    """A dotted path ``pkg.mod:fn`` / ``pkg.mod.fn`` to a user function, not a registered name."""
    return name not in _REWARDS and (":" in name or "." in name)


def get_reward(name: str) -> RewardFn:
    """A registered reward by name, or a user function by dotted path ``pkg.mod:fn`` / ``pkg.mod.fn``."""
    if not is_reward_path(name):
        return _REWARDS.get(name, hint=" or a dotted path 'pkg.module:fn'")
    return load_dotted(name, "reward")


def load_dotted(name: str, kind: str) -> Callable:
    """The callable a dotted path ``pkg.mod:fn`` / ``pkg.mod.fn`` names; a ``UserError`` naming ``kind`` otherwise."""
    module_name, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{kind} {name!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{kind} {name!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def reward_terms(spec: str | list, key: str = "trainer.reward") -> list[tuple[str, float]]:
    """``trainer.reward`` (or the config ``key`` named) as ``[(name, weight), ...]``: ``"em"``, ``"em + 0.1*format"``
    (terms joined by ``+``, each ``[weight*]name`` or ``name*weight``) or a list of ``{"name": ..., "weight": ...}`` (weight default 1)."""
    if isinstance(spec, str):
        items = []
        for term in spec.split("+"):
            weight, _, name = (x.strip() for x in term.rpartition("*"))
            if _is_number(name) and not _is_number(weight):  # "em*0.5": the weight may follow the name
                weight, name = name, weight
            items.append({"name": name, "weight": weight or 1.0})
    elif isinstance(spec, (list, tuple)):
        items = [{"name": x} if isinstance(x, str) else x for x in spec]
    else:
        raise ConfigError(f"{key} must be a name, 'em + 0.1*format' or a list of {{name, weight}}; got {spec!r}")
    out = []
    for item in items:
        if not isinstance(item, dict) or set(item) - {"name", "weight"} or not isinstance(item.get("name"), str):
            raise ConfigError(f"{key} entry {item!r} must be {{name: <reward>, weight: <number>}}")
        try:
            weight = float(item.get("weight", 1.0))
        except (TypeError, ValueError):
            weight = float("nan")
        if not item["name"] or not math.isfinite(weight):
            raise ConfigError(f"{key} term {item!r} needs a reward name and a finite weight (spec {spec!r})")
        out.append((item["name"], weight))
    if not out:
        raise ConfigError(f"{key} names no reward")
    return out


def _accepted_keywords(fn: Callable) -> set[str] | None:
    """Keyword names ``fn`` takes after ``(completions, answers)``; None when it takes ``**kw``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params[2:] if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def call_with_accepted(fn: Callable, *args, **kw):
    """``fn(*args, **kw)`` with only the keywords ``fn`` names (all of them when it takes ``**kw``)."""
    accepted = _accepted_keywords(fn)
    return fn(*args, **(kw if accepted is None else {k: v for k, v in kw.items() if k in accepted}))


def call_reward(fn: RewardFn, name: str, completions: list[str], answers: list, **kw) -> list[float]:
    """``fn(completions, answers, **kw)`` with the keywords ``fn`` accepts; the result must hold one
    finite number per completion, else a ``UserError`` naming ``name``. Exceptions ``fn`` raises propagate."""
    out = call_with_accepted(fn, completions, answers, **kw)
    try:
        values = [float(r) for r in out]
    except (TypeError, ValueError) as exc:
        raise UserError(f"reward {name!r} must return a list of numbers, got {str(out)[:100]} ({exc})") from None
    if len(values) != len(completions):
        raise UserError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
    bad = [i for i, r in enumerate(values) if not math.isfinite(r)]
    if bad:
        raise UserError(f"reward {name!r} returned {values[bad[0]]} for completion {bad[0]} ({len(bad)} of "
                        f"{len(values)} non-finite); rewards must be finite numbers")
    return values


class WeightedReward:
    """``sum_i weight_i * reward_i(completions, answers, **kw)``, each term checked by ``call_reward``
    under its own name. ``name`` is the spec as text; ``last`` holds each term's mean of the last call."""

    def __init__(self, terms: list[tuple[str, RewardFn, float]]):
        self.terms = terms
        self.name = " + ".join(n if w == 1.0 else f"{w:g}*{n}" for n, _, w in terms)
        self.last: dict[str, float] = {}

    def __call__(self, completions: list[str], answers: list, **kw) -> list[float]:
        total = [0.0] * len(completions)
        for name, fn, weight in self.terms:
            values = call_reward(fn, name, completions, answers, **kw)
            self.last[name] = sum(values) / len(values) if values else 0.0
            total = [t + weight * v for t, v in zip(total, values)]
        return total


def build_reward(spec: str | list) -> WeightedReward:
    """The reward ``trainer.reward`` names (see ``reward_terms``), as one callable."""
    return WeightedReward([(name, get_reward(name), weight) for name, weight in reward_terms(spec)])


def _check(completions: list[str], answers: list) -> None:
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answer lists")


def _predictions(completions: list[str], predictions: list[str | None] | None) -> list[str | None]:
    """The given token-level answers, or answers extracted from the texts."""
    if predictions is None:
        return [extract_answer(c) for c in completions]
    if len(predictions) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(predictions)} predictions")
    return list(predictions)


def _formatted(completions: list[str], formatted: list[bool] | None) -> list[bool]:
    if formatted is None:
        return [format_ok(c) for c in completions]
    if len(formatted) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(formatted)} format flags")
    return [bool(f) for f in formatted]


def _answer_reward(metric: Callable[[str | None, list[str]], float], doc: str) -> RewardFn:
    """A reward that scores each completion's answer (``predictions`` when given) with ``metric``."""

    def reward(completions: list[str], answers: list[list[str]], predictions: list[str | None] | None = None, **kw) -> list[float]:
        _check(completions, answers)
        return [metric(p, g) for p, g in zip(_predictions(completions, predictions), answers)]

    reward.__doc__ = doc
    return reward


em_reward = register_reward("em")(_answer_reward(exact_match, "Exact match of the extracted answer (0 when there is none)."))
f1_reward = register_reward("f1")(_answer_reward(f1_score, "Token F1 of the extracted answer."))
cover_em_reward = register_reward("cover_em")(_answer_reward(cover_em, "Cover-EM of the extracted answer."))


@register_reward("format")
def format_reward(completions: list[str], answers: list[list[str]], formatted: list[bool] | None = None, **kw) -> list[float]:
    """1.0 when ``format_ok`` (``formatted`` when given), else 0.0 (answers unused)."""
    _check(completions, answers)
    return [float(f) for f in _formatted(completions, formatted)]


@register_reward("em_format")
def em_format_reward(completions: list[str], answers: list[list[str]], format_bonus: float = 0.1,
                     predictions: list[str | None] | None = None, formatted: list[bool] | None = None, **kw) -> list[float]:
    """EM plus a format term for small models that rarely emit the tags.

    reward = 1.0 if EM else (format_bonus if format_ok else 0.0), with ``format_bonus`` = 0.1 by
    default; a correct answer scores 1.0 even if badly formatted, so EM stays the objective.
    """
    _check(completions, answers)
    out = []
    for p, f, g in zip(_predictions(completions, predictions), _formatted(completions, formatted), answers):
        out.append(1.0 if exact_match(p, g) else (format_bonus if f else 0.0))
    return out


def answer_metrics(response: str | None, golds: str | Iterable[str] | None) -> dict[str, float]:
    """All metrics of one response: em, f1, cover_em, format, has_answer."""
    pred = extract_answer(response)
    return {
        "em": exact_match(pred, golds),
        "f1": f1_score(pred, golds),
        "cover_em": cover_em(pred, golds),
        "format": float(format_ok(response)),
        "has_answer": float(pred is not None),
    }


def trajectory_format_ok(tokenizer, traj) -> bool:
    """The format check of one trajectory. Tags format: ``format_ok`` of the response with every retrieved block
    emptied (``rexrag.rollout.views.format_view``). ``rollout.format=tool_calls``: the chat template carries the
    format, so it is followed when every call parsed and ran (no notice) and the final message gave an answer."""
    from rexrag.rollout.views import format_view

    if traj.meta.get("format") == "tool_calls":
        return traj.stop_reason == "answer" and traj.invalid_actions == 0 and traj.answer is not None
    return format_ok(format_view(tokenizer, traj))


def example_fields(trajs: list) -> tuple[list[list[str]], list[str], list[dict]]:
    """(gold answers, questions, metadata) of each trajectory's example; ``metadata[i]`` is the example's
    metadata plus ``id``, ``data_source`` and ``group_id``."""
    exs = [tr.example for tr in trajs]
    answers = [list(getattr(ex, "golden_answers", []) or []) for ex in exs]
    metadata = [{**(getattr(ex, "metadata", None) or {}), "id": getattr(ex, "id", ""),
                 "data_source": getattr(ex, "data_source", ""), "group_id": tr.group_id} for ex, tr in zip(exs, trajs)]
    return answers, [getattr(ex, "question", "") for ex in exs], metadata


def reward_trajectories(fn: RewardFn, name: str, tokenizer, trajs: list) -> list[float]:
    """Reward of each trajectory (``rexrag.rollout.trajectory.Trajectory``), also stored in ``traj.meta['reward']``.

    ``fn`` gets ``completions`` (the model's own text: POLICY and PROBE tokens, no prompt, no retrieved
    passages, no notices; ``rexrag.rollout.views.policy_text``) and the gold answers, and as keywords
    (those it names, or all with ``**kw``): ``predictions`` (the model's answer read from its own tokens,
    ``policy_answer``), ``formatted`` (``trajectory_format_ok``: ``format_ok`` of the response with every
    retrieved block emptied; in the tool_calls format, clean calls and an answer),
    ``questions``, ``metadata`` (the example's metadata plus ``id``, ``data_source``, ``group_id``) and
    ``trajectories``. A wrong count or a non-finite value is an error naming ``name``.
    """
    from rexrag.rollout.views import policy_answer, policy_text

    if not trajs:
        return []
    answers, questions, metadata = example_fields(trajs)
    out = call_reward(
        fn, name, [policy_text(tokenizer, tr) for tr in trajs], answers,
        predictions=[policy_answer(tokenizer, tr) for tr in trajs],
        formatted=[trajectory_format_ok(tokenizer, tr) for tr in trajs],
        questions=questions, metadata=metadata, trajectories=trajs)
    for tr, r in zip(trajs, out):
        tr.meta["reward"] = r
    return out
