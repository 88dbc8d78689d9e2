"""The one registry mechanism behind rewards, advantage estimators and index kinds."""

import pytest

from rexrag.algos.advantages import adv_estimators, get_adv_estimator, register_adv_estimator
from rexrag.errors import UserError
from rexrag.registry import Registry
from rexrag.retrieval.index import get_index_kind, index_kinds
from rexrag.rewards import get_reward, register_reward


def test_registry_add_get_duplicate_and_miss():
    reg = Registry("widget")
    reg.register("a")(len)
    assert reg.get("a") is len and "a" in reg and reg.names() == ["a"]
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.add("a", max)
    with pytest.raises(UserError, match=r"unknown widget 'b'; choose one of \['a'\]"):
        reg.get("b")


def test_shipped_registries_list_choices_and_refuse_duplicates():
    assert {"grpo", "rloo", "reinforce_pp", "gae"} <= set(adv_estimators())
    assert {"bm25", "dense"} <= set(index_kinds())
    with pytest.raises(UserError, match="grpo"):
        get_adv_estimator("grpoo")
    with pytest.raises(UserError, match="bm25"):
        get_index_kind("sparse")
    with pytest.raises(UserError, match="em.*dotted path"):
        get_reward("exact")
    with pytest.raises(ValueError, match="already registered"):
        register_adv_estimator("grpo")(lambda *a: a)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("em")(lambda c, a, **kw: [0.0] * len(c))
