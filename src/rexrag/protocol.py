"""The search protocol between the policy and the system: tags, actions, observations, notices.

The model thinks in ``<think> ... </think>``, searches with ``<search> query </search>``, reads the
system's ``<information> ... </information>`` and ends with ``<answer> ... </answer>`` -- the tags of
Search-R1 and REX-RAG. This module is their one home: the agent parses actions and inserts
observations and notices with it, the instruction templates (``rexrag.prompts``, the evaluation
templates) are written from its constants, rewards check responses against it, the warm-up writes it
and REX-RAG cuts probes at its answer tag. It imports nothing from the rest of the package.

The tags, the observation layout and the passage rendering are Search-R1's; the notice texts are our
own wording. How a turn is read (the content between the tag that stopped it and the last opening
tag before it) and where that differs from the public code is described in ``rexrag.rollout.agent``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rexrag.data import Passage

THINK, SEARCH, ANSWER, INFORMATION = "think", "search", "answer", "information"
TAGS = (THINK, SEARCH, ANSWER, INFORMATION)


def open_tag(name: str) -> str:
    return f"<{name}>"


def close_tag(name: str) -> str:
    return f"</{name}>"


THINK_OPEN, THINK_CLOSE = open_tag(THINK), close_tag(THINK)
SEARCH_OPEN, SEARCH_CLOSE = open_tag(SEARCH), close_tag(SEARCH)
ANSWER_OPEN, ANSWER_CLOSE = open_tag(ANSWER), close_tag(ANSWER)
INFORMATION_OPEN, INFORMATION_CLOSE = open_tag(INFORMATION), close_tag(INFORMATION)
# The observation exactly as inserted after a search (INFO tokens), blank lines around it as in Search-R1.
INFO_OPEN, INFO_CLOSE = f"\n\n{INFORMATION_OPEN}", f"{INFORMATION_CLOSE}\n\n"

DEFAULT_TOPK = 3  # passages per search (Search-R1's default); every topk default refers to this

# System text for a turn that did not search or answer (NOTICE tokens, never trained on).
NOTICES = {
    "invalid": (
        f"\nThat was not a valid step. To look something up I write {SEARCH_OPEN} query {SEARCH_CLOSE}; "
        f"to finish I write {ANSWER_OPEN} answer {ANSWER_CLOSE}. Let me continue.\n"
    ),
    "empty_query": (
        f"\nMy search query was empty, so nothing was searched. I need to write a query between {SEARCH_OPEN} "
        f"and {SEARCH_CLOSE}.\n"
    ),
    "retrieval_failed": (
        "\nThe search engine could not be reached for that query. I can search again or answer with what I know.\n"
    ),
}


def stop_strings(final_turn: bool) -> list[str]:
    """Where a turn ends: after ``</search>`` or ``</answer>``; the final turn may only answer."""
    return [ANSWER_CLOSE] if final_turn else [SEARCH_CLOSE, ANSWER_CLOSE]


def last_tag_content(text: str, open_tag: str, close_tag: str) -> tuple[int, int] | None:
    """Char range of the content between the first ``close_tag`` and the last ``open_tag`` before it."""
    end = text.find(close_tag)
    if end < 0:
        return None
    start = text.rfind(open_tag, 0, end)
    if start < 0:
        return None
    return start + len(open_tag), end


@dataclass(frozen=True)
class Action:
    """What a turn asked for: ``kind`` is ``search`` or ``answer``; ``span`` is the char range of the
    content between its tags in the turn's text, ``content`` that text stripped."""

    kind: str
    span: tuple[int, int]
    content: str


def parse_action(text: str, stop: str | None) -> Action | None:
    """The action of one turn whose decoded ``text`` stopped on ``stop`` (a string of ``stop_strings``,
    or None when the turn ended otherwise); None is an invalid action: no stop string, or its
    closing tag without an opening one."""
    for kind, open_, close in ((SEARCH, SEARCH_OPEN, SEARCH_CLOSE), (ANSWER, ANSWER_OPEN, ANSWER_CLOSE)):
        if stop == close:
            span = last_tag_content(text, open_, close)
            return None if span is None else Action(kind, span, text[span[0] : span[1]].strip())
    return None


def last_answer_span(text: str) -> tuple[int, int] | None:
    """Char range of the content of the last complete ``<answer>...</answer>`` in ``text``, else None
    (with nested openings, ``<answer>a <answer>b</answer>``, the innermost)."""
    end = text.rfind(ANSWER_CLOSE)
    start = text.rfind(ANSWER_OPEN, 0, end) if end >= 0 else -1
    if start < 0:
        return None
    return start + len(ANSWER_OPEN), end


def format_information(passages: Sequence[Passage]) -> str:
    """Search-R1's ``_passages2string``: ``Doc 1(Title: "T") text\\nDoc 2(Title: ...) ...``.

    Built from ``contents`` as Search-R1 builds it, so the model sees what it would see there: the
    title is the first line as stored (quotes, a CR, all kept; no newline -> the whole passage is
    the title and the text is empty), and the result is ``strip()``-ed as Search-R1 strips it
    inside <information>. No passages (BM25 found nothing) -> "".
    """
    docs = []
    for i, p in enumerate(passages, 1):
        title, _, text = p.contents.partition("\n")
        docs.append(f"Doc {i}(Title: {title}) {text}\n")
    return "".join(docs).strip()
