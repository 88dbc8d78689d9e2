"""Answer metrics and outcome rewards for search agents.

Metrics follow the SQuAD evaluation script (lowercase, strip punctuation, drop a/an/the, collapse
whitespace) with two deliberate differences for non-ASCII text: the string is NFKC-normalised and
case-folded first (so "Röntgen" written with a combining diaeresis equals "röntgen"), and every
Unicode punctuation character (category P*, e.g. curly quotes, en dashes) is removed, not only
ASCII ``string.punctuation``. Accents are kept ("Röntgen" != "Rontgen"), as in SQuAD.

Answer extraction differs from Search-R1: the caller passes only the model's response (everything
after the prompt), so the last complete ``<answer>...</answer>`` is the model's own answer and no
"at least two matches" rule is needed (Search-R1 needs one because its prompt contains an example
answer). Text inside inserted ``<information>`` blocks is never taken as an answer.

A reward function has one signature, ``fn(completions, answers, **kw) -> list[float]``, where
``completions[i]`` is a response text and ``answers[i]`` its list of gold answers; rewards are found by
registered name or by dotted path ``"pkg.module:fn"`` / ``"pkg.module.fn"``.
"""

from __future__ import annotations

import importlib
import re
import string
import unicodedata
from collections import Counter
from typing import Callable, Iterable

from rexrag.errors import UserError
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


def f1_score(pred: str | None, golds: str | Iterable[str] | None) -> float:
    """Token-level F1 of the normalised prediction, max over golds (0.0 for no prediction)."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred).split()
    if not p:
        return 0.0
    return max((_token_f1(p, g.split()) for g in _golds(golds)), default=0.0)


def cover_em(pred: str | None, golds: str | Iterable[str] | None) -> float:
    """1.0 if some normalised gold occurs in the normalised prediction on word boundaries."""
    if pred is None:
        return 0.0
    p = f" {normalize_answer(pred)} "
    return float(any(f" {g} " in p for g in _golds(golds)))


# --------------------------------------------------------------------------- response parsing

_INFO_BLOCK = re.compile(r"<information>.*?</information>", re.DOTALL)
_TAG = re.compile(r"<(/?)(think|search|answer|information)>")


def extract_answer(response: str | None) -> str | None:
    """The stripped text of the last complete ``<answer>...</answer>`` in ``response``, else None.

    ``response`` is the model's own response (never the prompt). Inserted ``<information>`` blocks
    are ignored. With nested openings (``<answer>a <answer>b</answer>``) the innermost wins ("b").
    An answer written inside ``<think>`` still counts here; ``format_ok`` rejects it.
    """
    if not response:
        return None
    text = _INFO_BLOCK.sub(" ", response)
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


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
            if name in ("search", "answer") and not chunk.strip():
                return False  # empty query or answer
            inside, last = None, name
            answered = answered or name == "answer"
            pos = m.end()
            continue
        if closing or answered:
            return False  # closing without opening, or anything after the answer (rule 4)
        if name == "information":
            end = response.find("</information>", m.end())
            if last != "search" or end < 0:
                return False  # rule 3
            last, pos = "information", end + len("</information>")
            continue
        inside, pos = name, m.end()
    return inside is None and answered


# --------------------------------------------------------------------------- registry

_REWARDS: Registry[RewardFn] = Registry("reward")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(completions, answers, **kw) -> list[float]`` under ``name``."""
    return _REWARDS.register(name)


def available_rewards() -> list[str]:
    return _REWARDS.names()


def get_reward(name: str) -> RewardFn:
    """A registered reward by name, or a user function by dotted path ``pkg.mod:fn`` / ``pkg.mod.fn``."""
    if name in _REWARDS or (":" not in name and "." not in name):
        return _REWARDS.get(name, hint=" or a dotted path 'pkg.module:fn'")
    module_name, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"reward {name!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"reward {name!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def _check(completions: list[str], answers: list) -> None:
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answer lists")


def _answer_reward(metric: Callable[[str | None, list[str]], float], doc: str) -> RewardFn:
    """A reward that scores the extracted answer of each completion with ``metric``."""

    def reward(completions: list[str], answers: list[list[str]], **kw) -> list[float]:
        _check(completions, answers)
        return [metric(extract_answer(c), g) for c, g in zip(completions, answers)]

    reward.__doc__ = doc
    return reward


em_reward = register_reward("em")(_answer_reward(exact_match, "Exact match of the extracted answer (0 when there is none)."))
f1_reward = register_reward("f1")(_answer_reward(f1_score, "Token F1 of the extracted answer."))
cover_em_reward = register_reward("cover_em")(_answer_reward(cover_em, "Cover-EM of the extracted answer."))


@register_reward("format")
def format_reward(completions: list[str], answers: list[list[str]], **kw) -> list[float]:
    """1.0 when ``format_ok``, else 0.0 (answers unused)."""
    _check(completions, answers)
    return [float(format_ok(c)) for c in completions]


@register_reward("em_format")
def em_format_reward(completions: list[str], answers: list[list[str]], format_bonus: float = 0.1, **kw) -> list[float]:
    """EM plus a format term for small models that rarely emit the tags.

    reward = 1.0 if EM else (format_bonus if format_ok else 0.0), with ``format_bonus`` = 0.1 by
    default; a correct answer scores 1.0 even if badly formatted, so EM stays the objective.
    """
    _check(completions, answers)
    out = []
    for c, g in zip(completions, answers):
        em = exact_match(extract_answer(c), g)
        out.append(1.0 if em else (format_bonus if format_ok(c) else 0.0))
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
