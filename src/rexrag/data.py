"""QA examples and passage corpora.

Loaders for FlashRAG jsonl and Search-R1 parquet live here (see the loaders below).
Every example carries a globally unique integer ``group_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QAExample:
    id: str  # id in its source file ("test_0"); not necessarily unique across files
    question: str
    golden_answers: list[str]
    group_id: int = -1  # globally unique across everything loaded in one process/run
    data_source: str = ""  # dataset name ("nq", "hotpotqa", ...) or the file stem
    metadata: dict = field(default_factory=dict)
