"""Table-driven tests for rexrag.rewards: normalisation, metrics, extraction, format, registry."""

from __future__ import annotations

import sys
import textwrap

import pytest

from rexrag.errors import UserError
from rexrag.rewards import (
    answer_metrics,
    available_rewards,
    cover_em,
    exact_match,
    extract_answer,
    f1_score,
    format_ok,
    get_reward,
    normalize_answer,
    register_reward,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  a   cat\tand\nan  owl ", "cat and owl"),
        ("U.S.A.", "usa"),
        ("1,000", "1000"),
        ("Jean-Paul Sartre!", "jeanpaul sartre"),
        ("Theatre", "theatre"),  # 'the' only as a whole word
        ("anthem", "anthem"),
        ("Röntgen", "röntgen"),
        ("Ro\u0308ntgen", "röntgen"),  # decomposed diaeresis == composed
        ("\u201cParis\u201d \u2013 France", "paris france"),  # curly quotes, en dash
        ("ＰＡＲＩＳ", "paris"),  # full-width letters (NFKC)
        ("Straße", "strasse"),  # casefold
        ("", ""),
        ("The", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "pred, golds, em, f1, cov",
    [
        ("Paris", ["paris"], 1.0, 1.0, 1.0),
        ("the Paris.", ["Paris"], 1.0, 1.0, 1.0),
        ("Röntgen", ["röntgen"], 1.0, 1.0, 1.0),
        ("Rontgen", ["Röntgen"], 0.0, 0.0, 0.0),  # accents are kept
        ("New York City", ["new york"], 0.0, 0.8, 1.0),
        ("York", ["New York"], 0.0, 2 / 3, 0.0),
        ("Yorkshire", ["York"], 0.0, 0.0, 0.0),  # cover-EM needs word boundaries
        ("it is in new york", ["NY", "New York"], 0.0, 4 / 7, 1.0),  # best gold counts
        ("Barack Obama", ["Obama", "Barack Obama", "B. Obama"], 1.0, 1.0, 1.0),
        ("", ["Paris"], 0.0, 0.0, 0.0),  # empty answer
        ("the", ["Paris"], 0.0, 0.0, 0.0),
        (None, ["Paris"], 0.0, 0.0, 0.0),  # no answer at all
        ("", [""], 0.0, 0.0, 0.0),  # empty gold can never be matched
        ("anything", ["", "the"], 0.0, 0.0, 0.0),
        ("Paris", [], 0.0, 0.0, 0.0),
        ("Paris", "Paris", 1.0, 1.0, 1.0),  # a single gold string is accepted
        ("paris paris", ["paris"], 0.0, 2 / 3, 1.0),
        # official HotpotQA rule: yes / no / noanswer on either side score F1 0 unless equal
        ("yes it is", ["yes"], 0.0, 0.0, 1.0),  # 0.5 without the rule
        ("Yes.", ["yes"], 1.0, 1.0, 1.0),
        ("yes", ["yes it is"], 0.0, 0.0, 0.0),  # prediction side; 0.5 without the rule
        ("no", ["No man's land"], 0.0, 0.0, 0.0),  # 0.5 without the rule
        ("no", ["yes"], 0.0, 0.0, 0.0),
        ("no answer", ["noanswer"], 0.0, 0.0, 0.0),
        ("noanswer", ["noanswer"], 1.0, 1.0, 1.0),
        ("yes it is", ["yes", "yes it is"], 1.0, 1.0, 1.0),  # max over golds still applies
        ("the yes men", ["yes men"], 1.0, 1.0, 1.0),  # only the whole normalised string counts
        ("yes men", ["yes"], 0.0, 0.0, 1.0),
    ],
)
def test_metrics_table(pred, golds, em, f1, cov):
    assert exact_match(pred, golds) == em
    assert f1_score(pred, golds) == pytest.approx(f1)
    assert cover_em(pred, golds) == cov


@pytest.mark.parametrize(
    "response, answer",
    [
        ("<think>easy</think><answer> Paris </answer>", "Paris"),
        ("<answer>Lyon</answer> wait <answer>Paris</answer>", "Paris"),  # last wins
        ("<answer>Paris</answer><answer>Lyon", "Paris"),  # unclosed later answer ignored
        ("<answer>Paris", None),  # unclosed
        ("Paris</answer>", None),  # closing only
        ("no tags at all", None),
        ("", None),
        (None, None),
        ("<answer></answer>", None),  # empty: no answer
        ("<answer> \n </answer>", None),
        ("<answer>Paris</answer><answer></answer>", None),  # the last complete answer is empty
        ("<answer>a <answer>b</answer>", "b"),  # nested opening: innermost
        ("<think>maybe <answer>Rome</answer></think>", "Rome"),  # answer in think still extracted
        ("<answer>\n  New\n York  </answer>\n", "New\n York"),
        # retrieved text is not the model's answer
        ("<search>q</search>\n\n<information>Doc 1 <answer>Fake</answer></information>\n\n", None),
        ("<search>q</search><information><answer>Fake</answer></information><answer>Real</answer>", "Real"),
    ],
)
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


INFO = "\n\n<information>Doc 1(Title: T) text with <answer>x</answer> and </search></information>\n\n"


@pytest.mark.parametrize(
    "response, ok",
    [
        ("<think>t</think>\n<answer>Paris</answer>", True),
        ("<answer>Paris</answer>", True),  # think optional
        ("<answer>Paris</answer>\n  ", True),  # trailing whitespace
        (f"<think>a</think><search>q1</search>{INFO}<think>b</think><search>q2</search>{INFO}<answer>X</answer>", True),
        (f"<search>q</search>{INFO}<answer>X</answer>", True),
        ("<search>q</search><answer>X</answer>", True),  # search without inserted info (e.g. last turn)
        ("<think>t</think>", False),  # no answer
        ("", False),
        (None, False),
        ("<answer>A</answer><answer>B</answer>", False),  # two answers
        ("<answer>A</answer> trailing text", False),
        ("<answer>   </answer>", False),  # empty answer
        ("<search> </search><answer>A</answer>", False),  # empty query
        ("<think>t<answer>A</answer></think>", False),  # answer in think (nested)
        ("<think>t</think><answer>A", False),  # unclosed answer
        ("<think>t<answer>A</answer>", False),  # unclosed think
        ("<think><search>q</think></search><answer>A</answer>", False),  # crossed
        ("</think><answer>A</answer>", False),  # closing without opening
        ("Let me think. <answer>A</answer>", False),  # stray text outside blocks
        (f"<think>t</think>{INFO}<answer>A</answer>", False),  # information not after a search
        (f"<search>q</search>{INFO}{INFO}<answer>A</answer>", False),  # two infos for one search
        ("<search>q</search><information>never closed <answer>A</answer>", False),
        ("<answer>A</answer></information>", False),
    ],
)
def test_format_ok(response, ok):
    assert format_ok(response) is ok


def test_builtin_rewards():
    completions = [
        "<think>t</think><answer>Paris</answer>",  # right, formatted
        "<think>t</think><answer>Lyon</answer>",  # wrong, formatted
        "Paris <answer>Paris</answer>",  # right, bad format
        "Lyon",  # no answer
        "<think>t<answer>the New York City</answer>",  # cover only, bad format
    ]
    answers = [["Paris"], ["Paris"], ["Paris"], ["Paris"], ["New York"]]
    assert get_reward("em")(completions, answers) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert get_reward("cover_em")(completions, answers) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert get_reward("f1")(completions, answers) == pytest.approx([1.0, 0.0, 1.0, 0.0, 0.8])
    assert get_reward("format")(completions, answers) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert get_reward("em_format")(completions, answers) == [1.0, 0.1, 1.0, 0.0, 0.0]
    assert get_reward("em_format")(completions, answers, format_bonus=0.3)[1] == 0.3
    with pytest.raises(ValueError, match="2 completions but 1"):
        get_reward("em")(completions[:2], answers[:1])
    assert answer_metrics(completions[4], ["New York"]) == {
        "em": 0.0, "f1": pytest.approx(0.8), "cover_em": 1.0, "format": 0.0, "has_answer": 1.0,
    }


def test_builtin_rewards_use_token_level_predictions_and_format_when_given():
    # the text would give "Fake" (a passage quoting tags); the token-level answer says otherwise
    completions = ["<search>q</search><information>x</information><answer>Fake</answer></information>"] * 3
    answers = [["Fake"], ["Real"], ["Real"]]
    preds, formatted = [None, "Real", "real."], [False, True, True]
    assert get_reward("em")(completions, answers) == [1.0, 0.0, 0.0]  # fooled without predictions
    assert get_reward("em")(completions, answers, predictions=preds) == [0.0, 1.0, 1.0]
    assert get_reward("f1")(completions, answers, predictions=preds) == [0.0, 1.0, 1.0]
    assert get_reward("cover_em")(completions, answers, predictions=preds) == [0.0, 1.0, 1.0]
    assert get_reward("format")(completions, answers, formatted=formatted) == [0.0, 1.0, 1.0]
    assert get_reward("em_format")(completions, [["x"]] * 3, predictions=preds, formatted=formatted) == [0.0, 0.1, 0.1]
    with pytest.raises(ValueError, match="3 completions but 2 predictions"):
        get_reward("em")(completions, answers, predictions=preds[:2])


def test_registry_duplicates_misses_and_dotted_paths(tmp_path, monkeypatch):
    assert {"em", "f1", "cover_em", "format", "em_format"} <= set(available_rewards())
    with pytest.raises(ValueError, match="already registered"):
        register_reward("em")(lambda c, a, **kw: [0.0] * len(c))
    with pytest.raises(UserError, match=r"unknown reward 'emm'.*'cover_em'.*'em'"):
        get_reward("emm")
    (tmp_path / "my_rewards_mod.py").write_text(textwrap.dedent("""
        def length_reward(completions, answers, **kw):
            return [float(len(c)) for c in completions]
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    for path in ("my_rewards_mod:length_reward", "my_rewards_mod.length_reward"):
        assert get_reward(path)(["ab", "abc"], [[], []]) == [2.0, 3.0]
    with pytest.raises(UserError, match="no callable 'nope'"):
        get_reward("my_rewards_mod:nope")
    with pytest.raises(UserError, match="no callable 'NOT_CALLABLE'"):
        get_reward("my_rewards_mod.NOT_CALLABLE")
    with pytest.raises(UserError, match="cannot import module 'no_such_pkg_rexrag.mod'"):
        get_reward("no_such_pkg_rexrag.mod:fn")
    sys.modules.pop("my_rewards_mod", None)


def test_registered_reward_is_found_by_name():
    name = "test_only_constant_reward"

    @register_reward(name)
    def constant(completions, answers, **kw):
        return [0.5] * len(completions)

    try:
        assert get_reward(name) is constant
    finally:
        from rexrag import rewards

        rewards._REWARDS.remove(name)


def test_weighted_reward_specs_and_checks():
    import math

    import pytest

    from rexrag.config import load_config
    from rexrag.errors import ConfigError, UserError
    from rexrag.rewards import build_reward, call_reward, reward_terms

    assert reward_terms("em") == [("em", 1.0)]
    assert reward_terms("em + 0.1*format") == [("em", 1.0), ("format", 0.1)]
    assert reward_terms([{"name": "em", "weight": 2}, {"name": "pkg.mod:fn"}]) == [("em", 2.0), ("pkg.mod:fn", 1.0)]
    for bad in ("", "em + ", "x*em", [{"name": "em", "w": 1}], [{"weight": 1}], 3):
        with pytest.raises(ConfigError):
            reward_terms(bad)
    cfg = load_config(None, ["trainer.reward=em + 0.5*format"])
    assert cfg.trainer.reward == "em + 0.5*format"
    with pytest.raises(ConfigError, match="nope"):
        load_config(None, ["trainer.reward=em + 0.5*nope"])
    fn = build_reward(cfg.trainer.reward)
    good = "<think>t</think><answer> Paris </answer>"
    assert fn([good, "<answer> Lyon </answer>", "no tags"], [["paris"]] * 3) == [1.5, 0.5, 0.0]
    assert fn.last == {"em": 1 / 3, "format": 2 / 3}
    # a reward taking only (completions, answers) gets no keywords; a wrong count / non-finite value is named
    assert call_reward(lambda c, a: [1.0] * len(c), "plain", ["x"], [["y"]], predictions=["y"]) == [1.0]
    with pytest.raises(UserError, match="reward 'two' returned 1 values for 2 completions"):
        call_reward(lambda c, a: [1.0], "two", ["x", "y"], [[], []])
    with pytest.raises(UserError, match="reward 'inf' returned inf"):
        call_reward(lambda c, a: [math.inf], "inf", ["x"], [[]])
    with pytest.raises(ZeroDivisionError):  # an error inside a reward propagates as it is
        call_reward(lambda c, a: [1 / 0], "boom", ["x"], [[]])
