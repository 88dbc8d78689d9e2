"""The search protocol's one home (``rexrag.protocol``): its strings, its parser, and no second spelling."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from rexrag import protocol as P
from rexrag.config import RetrievalConfig
from rexrag.data import Passage
from rexrag.eval.evaluate import DIRECT_TEMPLATE, RAG_TEMPLATE, EvalOptions
from rexrag.prompts import TEMPLATES
from rexrag.warmup import WarmupConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "rexrag"
TAG = re.compile(r"</?(think|search|answer|information)>")


def test_strings_are_the_ones_the_model_was_trained_with():
    assert (P.THINK_OPEN, P.SEARCH_CLOSE, P.ANSWER_OPEN, P.INFORMATION_CLOSE) == (
        "<think>",
        "</search>",
        "<answer>",
        "</information>",
    )
    assert (P.INFO_OPEN, P.INFO_CLOSE) == ("\n\n<information>", "</information>\n\n")
    assert P.NOTICES == {
        "invalid": "\nThat was not a valid step. To look something up I write <search> query </search>; "
        "to finish I write <answer> answer </answer>. Let me continue.\n",
        "empty_query": "\nMy search query was empty, so nothing was searched. I need to write a query between "
        "<search> and </search>.\n",
        "retrieval_failed": "\nThe search engine could not be reached for that query. I can search again or "
        "answer with what I know.\n",
    }
    assert TEMPLATES["rexrag"] == (
        "You answer questions with the help of a search engine. Think step by step inside <think> </think>. "
        "Whenever a fact is missing, write a search query as <search> query </search>; the system then shows "
        "the best matching passages inside <information> </information>. Search again if the passages are not "
        "enough. When you know the answer, give only the short answer inside <answer> </answer>, for example "
        "<answer> Paris </answer>.\nQuestion: {question}\n"
    )
    assert TEMPLATES["search-r1"] == (  # Search-R1's instruction, word for word
        "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you "
        "get new information. After reasoning, if you find you lack some knowledge, you can call a search engine "
        "by <search> query </search> and it will return the top searched results between <information> and "
        "</information>. You can search as many times as your want. If you find no further external knowledge "
        "needed, you can directly provide the answer inside <answer> and </answer>, without detailed "
        "illustrations. For example, <answer> Beijing </answer>. Question: {question}\n"
    )
    assert DIRECT_TEMPLATE == (
        "Answer the given question. Think step by step inside <think> and </think>, then give the final answer "
        "inside <answer> and </answer>, without detailed explanation. For example, <answer> Beijing </answer>. "
        "Question: {question}\n"
    )
    assert RAG_TEMPLATE == (
        "Answer the given question using the documents below. Think step by step inside <think> and </think>, "
        "then give the final answer inside <answer> and </answer>, without detailed explanation. For example, "
        "<answer> Beijing </answer>.\n\n{question}\n"
    )


def test_default_topk_has_one_home():
    assert P.DEFAULT_TOPK == 3
    assert RetrievalConfig().topk == WarmupConfig().topk == EvalOptions().topk == P.DEFAULT_TOPK


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("<think> x </think>\n<search> capital of France </search>", "</search>", ("search", "capital of France")),
        ("<search> a </search> then <search> b </search>", "</search>", ("search", "a")),  # the tag that stopped it
        ("<search> a <search> b </search>", "</search>", ("search", "b")),  # the last opening before it
        ("<search>  </search>", "</search>", ("search", "")),  # empty: the agent answers with a notice
        ("so <answer> Paris </answer>", "</answer>", ("answer", "Paris")),
        ("no opening </search>", "</search>", None),
        ("<search> q </search>", None, None),  # not stopped on a stop string (eos, length)
        ("<answer> a </answer>", "</search>", None),  # stopped on </search> without a search
    ],
)
def test_parse_action(text, stop, expected):
    action = P.parse_action(text, stop)
    if expected is None:
        assert action is None
    else:
        assert (action.kind, action.content) == expected
        assert text[action.span[0] : action.span[1]].strip() == action.content


def test_last_answer_span_and_stops():
    text = "<answer> a </answer> <answer>b <answer> c </answer>"
    start, end = P.last_answer_span(text)
    assert text[start:end] == " c "
    assert P.last_answer_span("<answer> open only") is None
    assert P.last_answer_span("close only </answer>") is None
    assert P.stop_strings(final_turn=False) == ["</search>", "</answer>"]
    assert P.stop_strings(final_turn=True) == ["</answer>"]


def test_format_information_is_search_r1_passages2string():
    passages = [Passage("1", "Paris", "Capital of France."), Passage.from_contents("2", "no newline")]
    assert P.format_information(passages) == 'Doc 1(Title: "Paris") Capital of France.\nDoc 2(Title: no newline)'
    assert P.format_information([]) == ""


def _code_strings(tree: ast.AST):
    """String constants that are code, not docstrings or bare string statements."""
    prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            yield node


def test_no_module_but_protocol_spells_a_tag():
    """Templates, notices, parsers and checks build their tags from ``rexrag.protocol``; docstrings may quote them."""
    found, paths = [], sorted(SRC.rglob("*.py"))
    assert len(paths) > 20, f"too few modules found under {SRC}"
    for path in paths:
        if path == SRC / "protocol.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _code_strings(tree):
            if TAG.search(node.value):
                found.append(f"{path.relative_to(SRC.parents[1])}:{node.lineno}: {node.value[:70]!r}")
    assert not found, "tags spelled outside rexrag/protocol.py (import them from there):\n" + "\n".join(found)
