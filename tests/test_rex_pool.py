"""The exploratory prompt pool: file validation, tokenisation and the prefix trie's probabilities."""

from __future__ import annotations

import math

import pytest
from rex_fakes import rex_tokenizer

from rexrag.rex.pool import Pool, PoolError, PromptTrie, bundled_pool_path, read_pool


def _product(logprobs: list[float]) -> float:
    return math.exp(sum(logprobs))


def test_bundled_pool_has_30_valid_prompts():
    prompts = read_pool(None)
    assert len(prompts) == 30
    assert len(set(prompts)) == 30
    assert all(p.startswith("<think>") and len(p) < 200 for p in prompts)
    assert bundled_pool_path().is_file()


def test_bundled_pool_trie_products_are_one_over_n():
    pool = Pool.load("", rex_tokenizer())
    assert len(pool) == 30
    assert pool.first_token_shared  # every prompt opens with <think>: first PROBE token has prob 1
    for ids, lps in zip(pool.token_ids, pool.logprobs):
        assert len(lps) == len(ids)
        assert lps[0] == pytest.approx(0.0)  # the public code's "first token gets 1"
        assert _product(lps) == pytest.approx(1 / 30, rel=1e-9)


@pytest.mark.parametrize(
    "prompts",
    [
        ["<think> a", "<think> ab", "<think> b"],  # one prompt is a strict prefix of another
        ["<think> x", "<think> xy", "<think> xyz", "<think> xz", "<think> q"],  # nested shared prefixes
        ["<think> Maybe.", "<think> Maybe not.", "<think> Maybe not. Check", "<think> No"],
    ],
)
def test_trie_products_with_shared_prefixes(prompts):
    pool = Pool(prompts, rex_tokenizer())
    products = [_product(lps) for lps in pool.logprobs]
    assert products == pytest.approx([1 / len(prompts)] * len(prompts), rel=1e-9)
    assert sum(products) == pytest.approx(1.0)


def test_trie_conditionals_by_hand():
    # token sequences [1,2], [1,2,3], [1,4]; counts: root 3, (1) 3, (1,2) 2, (1,2,3) 1, (1,4) 1
    trie = PromptTrie([[1, 2], [1, 2, 3], [1, 4]])
    lp = trie.conditional_logprobs([1, 2])
    # P(1)=3/3, P(2|1)=2/3, P(end|1,2)=1/2
    assert [math.exp(x) for x in lp] == pytest.approx([1.0, (2 / 3) * (1 / 2)])
    assert [math.exp(x) for x in trie.conditional_logprobs([1, 2, 3])] == pytest.approx([1.0, 2 / 3, 1 / 2])
    assert [math.exp(x) for x in trie.conditional_logprobs([1, 4])] == pytest.approx([1.0, 1 / 3])
    with pytest.raises(KeyError):
        trie.conditional_logprobs([1, 5])
    with pytest.raises(KeyError):
        trie.conditional_logprobs([1])  # strict prefix, not a complete prompt


def test_first_token_probability_when_prompts_differ_in_first_token():
    trie = PromptTrie([[7, 1], [7, 2], [8, 1]])
    assert math.exp(trie.conditional_logprobs([8, 1])[0]) == pytest.approx(1 / 3)
    assert _product(trie.conditional_logprobs([7, 2])) == pytest.approx(1 / 3)


def test_texts_that_tokenise_identically_share_mass():
    # a normalising tokenizer maps two distinct texts to one id sequence: inserting those ids has
    # probability 2/N, and the trie says so
    pool = Pool(["<think> Maybe", "<think> MAYBE", "<think> no"], rex_tokenizer(lower=True))
    assert pool.token_ids[0] == pool.token_ids[1]
    assert _product(pool.logprobs[0]) == pytest.approx(2 / 3)
    assert _product(pool.logprobs[2]) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "body, line, words",
    [
        ("<think> a\n\n<think> b\n", 2, "empty line"),
        ("<think> a\nMaybe I erred.\n", 2, "must start with '<think>'"),
        ("# c\n<think> a\n<think> b\n<think> a\n", 4, "duplicate of the prompt on line 2"),
    ],
)
def test_bad_pool_files_name_file_and_line(tmp_path, body, line, words):
    path = tmp_path / "pool.txt"
    path.write_text(body)
    with pytest.raises(PoolError) as err:
        read_pool(path)
    assert f"{path}:{line}:" in str(err.value)
    assert words in str(err.value)


def test_missing_and_empty_pool_files(tmp_path):
    with pytest.raises(PoolError, match="does not exist"):
        read_pool(tmp_path / "nope.txt")
    (tmp_path / "c.txt").write_text("# only a comment\n")
    with pytest.raises(PoolError, match="no prompts"):
        read_pool(tmp_path / "c.txt")


def test_user_pool_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("<think> one\r\n<think> two\n")
    pool = Pool.load(path, rex_tokenizer())
    assert pool.prompts == ["<think> one", "<think> two"]
    assert pool.source == str(path)


def test_smollm2_tokenizer_pool(smol_tokenizer):
    """With the real policy tokenizer: ids are the prompt tokenised alone; all share the first token."""
    pool = Pool.load(None, smol_tokenizer)
    assert pool.first_token_shared
    for text, ids, lps in zip(pool.prompts, pool.token_ids, pool.logprobs):
        assert ids == smol_tokenizer.encode(text, add_special_tokens=False)
        assert smol_tokenizer.decode(ids) == text
        assert _product(lps) == pytest.approx(1 / 30, rel=1e-9)
