"""QA examples and passage corpora.

Two QA formats are read:

* FlashRAG jsonl: one JSON object per line with ``id``, ``question``, ``golden_answers`` (list of
  strings) and an optional ``metadata`` mapping.
* Search-R1 / verl parquet: ``prompt`` (chat messages), ``reward_model.ground_truth.target``,
  ``data_source`` and ``extra_info.index``. The question comes from a ``question`` column when the
  file has one, else ``extra_info.question``, else the last user message of ``prompt`` (text after
  the last "Question:" when the message is a full instruction template). ``ground_truth`` may be a
  mapping with ``target`` (Search-R1) or a bare string / list (e.g. Agentic-RAG's MuSiQue file).

Every example carries a globally unique integer ``group_id``. Unlike Search-R1, which groups GRPO
rollouts by ``extra_info.index`` (reused across the sources of its merged NQ+HotpotQA files, so two
different questions can share a group), group ids here are assigned by position over everything
loaded together (``load_qa_files`` / ``assign_group_ids``); ``extra_info.index`` is kept in
``metadata`` only.

Corpora are jsonl with ``id`` and either ``contents`` ('"Title"\\ntext', FlashRAG / Search-R1) or
``title`` + ``text``. A ``contents`` string is kept byte for byte (``Passage.contents``); the
``title`` / ``text`` fields split from it are for our own prompts only.

Bad input is never silently dropped: a malformed line, a missing field or a wrong type raises
``DataError`` naming file, line (or parquet row) and field. With ``skip_bad=True`` such rows are
skipped, logged, and counted in the returned list's ``skipped`` attribute.

``Passage`` (the corpus record every retriever returns) is defined here, beside its reader, and
``demo_file`` locates the bundled demo corpus and questions; this module imports no other layer.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rexrag.errors import DataError, UserError

log = logging.getLogger(__name__)


@dataclass
class QAExample:
    """One question with its gold answers. ``group_id`` keys the group of its rollouts (GRPO baselines,
    REX probes): unique per run (``load_qa`` / ``load_qa_files`` / ``assign_group_ids`` set it)."""

    id: str  # id in its source file ("test_0"); not necessarily unique across files
    question: str
    golden_answers: list[str]
    group_id: int = -1  # globally unique across everything loaded in one process/run
    data_source: str = ""  # dataset name ("nq", "hotpotqa", ...) or the file stem
    metadata: dict = field(default_factory=dict)


class Loaded(list):
    """A plain list of loaded rows plus ``skipped``: one message per row skipped with ``skip_bad``."""

    def __init__(self, items: Iterable = (), skipped: list[str] | None = None):
        super().__init__(items)
        self.skipped: list[str] = list(skipped or [])


# --------------------------------------------------------------------------- field checks


def _bad(path: Path, where: str, field_name: str, problem: str) -> DataError:
    return DataError(f"{path}:{where}: field {field_name!r}: {problem}")


def _get(row: dict, key: str, path: Path, where: str, types: type | tuple, name: str | None = None) -> Any:
    """``row[key]`` checked for presence and type; ``name`` is the dotted name used in errors."""
    name = name or key
    if not isinstance(row, dict) or key not in row or row[key] is None:
        raise _bad(path, where, name, "missing")
    value = row[key]
    if not isinstance(value, types) or isinstance(value, bool):
        want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise _bad(path, where, name, f"expected {want}, got {type(value).__name__} {value!r:.60}")
    return value


def _str_list(value: Any, path: Path, where: str, name: str) -> list[str]:
    """A non-empty list of non-empty strings (a bare string is accepted as a one-item list)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _bad(path, where, name, f"expected a list of strings, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _bad(path, where, f"{name}[{i}]", f"expected str, got {type(item).__name__}")
        out.append(item)
    if not any(s.strip() for s in out):
        raise _bad(path, where, name, "no non-empty answer")
    return out


def _question(value: Any, path: Path, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise _bad(path, where, name, f"expected str, got {type(value).__name__}")
    if not value.strip():
        raise _bad(path, where, name, "empty question")
    return value.strip()


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return path


def _rows_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(``"line N"``, parsed object) per non-blank line; an undecodable line yields a DataError."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"line {lineno}"
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield where, DataError(f"{path}:{where}: not UTF-8 ({exc.reason} at byte {exc.start})")
            except json.JSONDecodeError as exc:
                yield where, DataError(f"{path}:{where}: malformed JSON ({exc.msg} at column {exc.colno})")


def _parse_rows(path: Path, rows: Iterable[tuple[str, Any]], parse, skip_bad: bool,
                skipped: list[str]) -> Iterator[Any]:
    """``parse(row, where)`` per row; bad rows raise, or with ``skip_bad`` are appended to ``skipped``."""
    for where, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{path}:{where}: expected a JSON object, got {type(row).__name__}")
            yield parse(row, where)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))


def _collect(path: Path, rows: Iterable[tuple[str, Any]], parse, skip_bad: bool, limit: int) -> Loaded:
    out = Loaded()
    for item in _parse_rows(path, rows, parse, skip_bad, out.skipped):
        out.append(item)
        if limit and len(out) >= limit:
            break
    if out.skipped:
        log.warning("%s: skipped %d bad row(s); first: %s", path, len(out.skipped), out.skipped[0])
    return out


# --------------------------------------------------------------------------- QA loaders


def _parse_flashrag(path: Path, source: str | None):
    def parse(row: dict, where: str) -> QAExample:
        ex_id = _get(row, "id", path, where, (str, int))
        question = _question(_get(row, "question", path, where, str), path, where, "question")
        golds = _str_list(_get(row, "golden_answers", path, where, (list, str)), path, where, "golden_answers")
        metadata = row.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise _bad(path, where, "metadata", f"expected object, got {type(metadata).__name__}")
        ds = source or metadata.get("dataset") or path.name.split(".")[0]
        return QAExample(str(ex_id), question, golds, -1, str(ds), metadata)

    return parse


def _question_from_prompt(prompt: Any, path: Path, where: str) -> str:
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise _bad(path, where, "prompt", "expected a non-empty list of chat messages")
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    msg = (users or list(prompt))[-1]
    if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
        raise _bad(path, where, "prompt[-1].content", "missing or not a string")
    content = msg["content"]
    # Search-R1 stores the full instruction template; the question follows its last "Question:".
    if "Question:" in content:
        content = content.rsplit("Question:", 1)[1]
    return _question(content, path, where, "prompt[-1].content")


def _parse_searchr1(path: Path, source: str | None):
    def parse(row: dict, where: str) -> QAExample:
        extra = row.get("extra_info") or {}
        if not isinstance(extra, dict):
            raise _bad(path, where, "extra_info", f"expected struct, got {type(extra).__name__}")
        if row.get("question") is not None:
            question = _question(row["question"], path, where, "question")
        elif extra.get("question") is not None:
            question = _question(extra["question"], path, where, "extra_info.question")
        else:
            question = _question_from_prompt(row.get("prompt"), path, where)
        reward_model = _get(row, "reward_model", path, where, dict)
        truth = reward_model.get("ground_truth")
        if isinstance(truth, dict):
            golds = _get(truth, "target", path, where, (list, tuple, str), "reward_model.ground_truth.target")
        elif truth is None:
            raise _bad(path, where, "reward_model.ground_truth", "missing")
        else:
            golds = truth
        golds = _str_list(golds, path, where, "reward_model.ground_truth.target")
        index = extra.get("index")
        if row.get("id") is not None:
            ex_id = str(row["id"])
        elif index is not None:
            ex_id = f"{extra.get('split') or 'row'}_{index}"
        else:
            ex_id = where.replace(" ", "_")
        ds = source or row.get("data_source") or path.name.split(".")[0]
        meta = {k: v for k, v in extra.items() if k != "question"}
        return QAExample(ex_id, question, golds, -1, str(ds), meta)

    return parse


def _rows_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for item in batch.to_pylist():
            yield f"row {row}", item
            row += 1


def load_qa(path: str | Path, *, skip_bad: bool = False, source: str | None = None, limit: int = 0) -> Loaded:
    """QA examples from a FlashRAG ``.jsonl`` or Search-R1 ``.parquet`` file.

    Group ids are 0..n-1 within the file; use ``load_qa_files`` (or ``assign_group_ids``) when
    several files are loaded together. ``source`` overrides ``data_source``; ``limit`` > 0 stops
    after that many good examples.
    """
    path = _check_path(path)
    if path.suffix == ".parquet":
        out = _collect(path, _rows_parquet(path), _parse_searchr1(path, source), skip_bad, limit)
    elif path.suffix == ".jsonl":
        out = _collect(path, _rows_jsonl(path), _parse_flashrag(path, source), skip_bad, limit)
    else:
        raise DataError(
            f"{path}: unknown QA file type {path.suffix!r}; expected .jsonl (FlashRAG) or .parquet (Search-R1)"
        )
    if not out:
        skipped = f" ({len(out.skipped)} bad rows skipped)" if out.skipped else ""
        raise DataError(f"{path}: no QA examples loaded{skipped}")
    assign_group_ids(out)
    return out


def assign_group_ids(examples: list[QAExample], start: int = 0) -> None:
    """Give every example its own group id ``start, start+1, ...`` (in place)."""
    for i, ex in enumerate(examples):
        ex.group_id = start + i


def load_qa_files(paths: Iterable[str | Path], skip_bad: bool = False, limit: int = 0) -> Loaded:
    """Load several QA files; group ids are unique across all of them (never taken from the files)."""
    out = Loaded()
    for path in paths:
        part = load_qa(path, skip_bad=skip_bad, limit=limit)
        out.extend(part)
        out.skipped.extend(part.skipped)
    assign_group_ids(out)
    return out


# --------------------------------------------------------------------------- corpora


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
    def from_contents(cls, id: str, contents: str, score: float = 0.0) -> Passage:
        title, text = split_contents(contents)
        return cls(id, title, text, score, contents)

    @property
    def contents(self) -> str:
        """The stored ``contents``; for title + text corpora the FlashRAG / Search-R1 form '"Title"\\ntext'."""
        if self.raw_contents is not None:
            return self.raw_contents
        return f'"{self.title}"\n{self.text}'

    def with_score(self, score: float) -> Passage:
        return dataclasses.replace(self, score=float(score))


def _parse_passage(path: Path):
    def parse(row: dict, where: str) -> Passage:
        pid = _get(row, "id", path, where, (str, int))
        if "contents" in row:  # kept verbatim: it is what the server hands Search-R1 clients
            p = Passage.from_contents(str(pid), _get(row, "contents", path, where, str))
        elif "title" in row or "text" in row:
            p = Passage(str(pid), _get(row, "title", path, where, str), _get(row, "text", path, where, str))
        else:
            raise _bad(path, where, "contents", "missing (need 'contents' or 'title' + 'text')")
        if not (p.title.strip() or p.text.strip()):
            raise _bad(path, where, "contents", "empty passage")
        return p

    return parse


def iter_corpus(path: str | Path, *, skip_bad: bool = False, skipped: list[str] | None = None) -> Iterator[Passage]:
    """Stream passages from a corpus jsonl (bad rows raise, or with ``skip_bad`` go to ``skipped``)."""
    path = _check_path(path)
    skipped = skipped if skipped is not None else []
    yield from _parse_rows(path, _rows_jsonl(path), _parse_passage(path), skip_bad, skipped)
    if skipped:
        log.warning("%s: skipped %d bad row(s); first: %s", path, len(skipped), skipped[0])


def load_corpus(path: str | Path, *, skip_bad: bool = False) -> Loaded:
    """All passages of a corpus jsonl in memory (``iter_corpus`` streams instead)."""
    path = _check_path(path)
    out = _collect(path, _rows_jsonl(path), _parse_passage(path), skip_bad, 0)
    if not out:
        raise DataError(f"{path}: no passages loaded")
    return out


# --------------------------------------------------------------------------- bundled demo data

DEMO_FILES = ("corpus.jsonl", "train.jsonl", "eval.jsonl", "NOTICE", "manifest.json")


def demo_file(name: str) -> Path:
    """Path of a bundled demo data file (``resources/demo/<name>``)."""
    if name not in DEMO_FILES:
        raise ValueError(f"unknown demo file {name!r}; choose one of {list(DEMO_FILES)}")
    return Path(str(resources.files("rexrag") / "resources" / "demo" / name))


def check_group_ids(examples: list) -> None:
    """Rollouts of one example form one group (GRPO / RLOO baselines, REX probes), keyed by
    ``example.group_id``: every example needs its own non-negative integer id."""
    ids = [getattr(ex, "group_id", None) for ex in examples]
    fix = ("each training example needs a unique group_id >= 0 (its rollouts are grouped by it); load data with "
           "rexrag.data.load_qa / load_qa_files, or call rexrag.data.assign_group_ids(examples)")
    for i, g in enumerate(ids):
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise UserError(f"example {i} ({getattr(examples[i], 'id', '?')!r}) has group_id={g!r}: {fix}")
    shared = [(g, n) for g, n in Counter(ids).items() if n > 1]
    if shared:
        g, n = shared[0]
        raise UserError(f"group_id {g} is shared by {n} examples ({len(shared)} id(s) repeated): {fix}")


def check_examples(examples: list, data_cfg=None) -> None:
    """Unique group ids (:func:`check_group_ids`); with ``data.curriculum``, more questions than ``batch_size``; with
    ``data.dynamic_sampling``, enough distinct prompts for every round of a step (``batch_size * dynamic_sampling_max_rounds``)."""
    check_group_ids(examples)
    if data_cfg is not None and getattr(data_cfg, "curriculum", "none") != "none" and len(examples) <= data_cfg.batch_size:
        from rexrag.errors import ConfigError

        where = ", ".join(map(str, data_cfg.train_files)) or "the bundled demo questions"
        raise ConfigError(f"data.curriculum={data_cfg.curriculum} chooses data.batch_size={data_cfg.batch_size} of the "
                          f"training questions each step, but {where} holds {len(examples)}: there is nothing to choose "
                          "(add questions, lower data.batch_size, or set data.curriculum=none)")
    if data_cfg is not None and data_cfg.dynamic_sampling:
        need = data_cfg.batch_size * data_cfg.dynamic_sampling_max_rounds
        if len(examples) < need:
            from rexrag.errors import ConfigError

            raise ConfigError(f"data.dynamic_sampling with data.batch_size={data_cfg.batch_size} and "
                              f"data.dynamic_sampling_max_rounds={data_cfg.dynamic_sampling_max_rounds} needs up to "
                              f"{need} distinct prompts per step; the training data has {len(examples)} (lower "
                              "data.dynamic_sampling_max_rounds or data.batch_size, or add data)")


class PromptSampler:
    """Deterministic epoch-wise shuffled prompt order; state = number of prompts consumed."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        if n == 0:
            raise UserError("no training examples (data.train_files is empty or every row was skipped)")
        self.n, self.batch_size, self.seed, self.shuffle, self.consumed = n, batch_size, seed, shuffle, 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        import torch

        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()

    def next_batch(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            epoch, pos = divmod(self.consumed, self.n)
            out.append(self._order(epoch)[pos])
            self.consumed += 1
        return out

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])
