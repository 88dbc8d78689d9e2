"""Instruction templates: names, files, literals, chat template application."""

from __future__ import annotations

import pytest

from fake_tokenizer import FakeTokenizer
from rexrag.errors import UserError
from rexrag.prompts import TEMPLATES, build_prompt_ids, render_prompt, resolve_template


def test_builtin_templates_have_the_tags_and_placeholder():
    for name, text in TEMPLATES.items():
        assert "{question}" in text, name
        for tag in ("<think>", "<search>", "</search>", "<information>", "<answer>", "</answer>"):
            assert tag in text, (name, tag)
    assert TEMPLATES["rexrag"] != TEMPLATES["search-r1"]
    assert TEMPLATES["search-r1"].startswith("Answer the given question. You must conduct reasoning inside <think>")


def test_template_by_literal_file_and_errors(tmp_path):
    assert render_prompt(" Who? ", "Q={question} {other braces}") == "Q=Who? {other braces}"
    f = tmp_path / "tpl.txt"
    f.write_text("From file: {question}\n")
    assert render_prompt("Why?", str(f)) == "From file: Why?\n"
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder")
    with pytest.raises(UserError, match="placeholder"):
        resolve_template(str(bad))
    with pytest.raises(UserError, match="rexrag"):
        resolve_template("no-such-template")


def test_plain_tokenizer_without_chat_template():
    tok = FakeTokenizer()
    ids = build_prompt_ids(tok, "Why?", "Q: {question}")
    assert ids == [tok.bos_token_id] + tok.encode("Q: Why?")


def test_chat_template_applied_once(smol_tokenizer):
    ids = build_prompt_ids(smol_tokenizer, "Who wrote Hamlet?", "search-r1")
    text = smol_tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert "Question: Who wrote Hamlet?" in text and "<|im_start|>user\nAnswer the given question." in text
    assert ids.count(smol_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant
