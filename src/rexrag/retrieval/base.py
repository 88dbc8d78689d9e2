"""The one retrieval protocol every backend (BM25, dense, HTTP) implements."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


def split_contents(contents: str) -> tuple[str, str]:
    """'"Title"\\ntext' -> (title, text) for our own use (prompts, warmup queries).

    The first line is the title with ONE pair of surrounding quotes removed (so '"I Cannot Say
    "Farewell""' keeps its inner quotes, which ``strip('"')`` would eat) and a CR of a CRLF line end
    dropped; an unquoted first line is the title as it is; no newline -> no title. What is served
    and shown to the model is ``Passage.contents``, never a rebuild from these two fields.
    """
    if "\n" not in contents:
        return "", contents
    first, rest = contents.split("\n", 1)
    first = first.removesuffix("\r")
    if len(first) >= 2 and first[0] == first[-1] == '"':
        first = first[1:-1]
    return first, rest


@dataclass(frozen=True)
class Passage:
    """A passage and its score. ``raw_contents`` is the corpus line's own ``contents`` string when the
    corpus had one: Search-R1 clients parse ``contents`` themselves, so it must reach them unchanged."""

    id: str
    title: str
    text: str
    score: float = 0.0
    raw_contents: str | None = None

    @classmethod
    def from_contents(cls, id: str, contents: str, score: float = 0.0) -> "Passage":
        title, text = split_contents(contents)
        return cls(id, title, text, score, contents)

    @property
    def contents(self) -> str:
        """The stored ``contents``; for title + text corpora the FlashRAG / Search-R1 form '"Title"\\ntext'."""
        if self.raw_contents is not None:
            return self.raw_contents
        return f'"{self.title}"\n{self.text}'

    def with_score(self, score: float) -> "Passage":
        return dataclasses.replace(self, score=float(score))


@runtime_checkable
class Retriever(Protocol):
    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Up to ``k`` passages for each query, best first (BM25 returns only passages that match)."""
        ...
