"""The one registry mechanism behind rewards, advantage estimators, index kinds and backends; the
registries are the only list of choices (config and CLI ask them)."""

import pytest

from rexrag.algos.advantages import (
    adv_estimators,
    get_adv_estimator,
    register_adv_estimator,
)
from rexrag.config import ConfigError, load_config
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


# --------------------------------------------------------------------------- the registry is the list of choices


@pytest.fixture
def registered():
    """Register test-only entries; they are removed again after the test."""
    added = []

    def add(registry, name, item):
        registry.add(name, item)
        added.append((registry, name))
        return item

    yield add
    for registry, name in added:
        registry.remove(name)


def test_a_registered_estimator_is_selectable_with_no_other_edit(registered):
    from rexrag.algos import advantages

    with pytest.raises(ConfigError, match=r"algo\.adv_estimator='my_est' is not allowed; choose one of \[.*'grpo'.*\]"):
        load_config(None, ["algo.adv_estimator=my_est"])
    registered(advantages._REGISTRY, "my_est", lambda rewards, mask, gids, values, cfg: (mask * 0, mask * 0))
    assert load_config(None, ["algo.adv_estimator=my_est"]).algo.adv_estimator == "my_est"
    with pytest.raises(ConfigError, match=r"'my_est'"):  # the error lists what is registered now
        load_config(None, ["algo.adv_estimator=my_estt"])


def test_a_registered_reward_is_selectable_and_dotted_paths_pass(registered):
    from rexrag import rewards

    with pytest.raises(ConfigError, match=r"trainer\.reward='my_reward' is not allowed; choose one of \[.*'em'.*\] or a dotted path"):
        load_config(None, ["trainer.reward=my_reward"])
    registered(rewards._REWARDS, "my_reward", lambda completions, answers, **kw: [0.0] * len(completions))
    assert load_config(None, ["trainer.reward=my_reward"]).trainer.reward == "my_reward"
    # a dotted path names user code: it is imported when the trainer is built, not by the config
    assert load_config(None, ["trainer.reward=no_such_pkg_rexrag.mod:fn"]).trainer.reward == "no_such_pkg_rexrag.mod:fn"


def test_a_registered_backend_is_selectable(registered):
    from rexrag.rollout import backends

    with pytest.raises(ConfigError, match=r"rollout\.backend='my_backend' is not allowed; choose one of \['auto', .*'hf'"):
        load_config(None, ["rollout.backend=my_backend"])
    registered(backends.BACKENDS, "my_backend", lambda model, tokenizer, cfg, **kw: None)
    assert load_config(None, ["rollout.backend=my_backend"]).rollout.backend == "my_backend"


def test_a_registered_index_kind_is_selectable_in_the_cli(registered):
    from rexrag.cli import build_parser
    from rexrag.retrieval import index as index_mod

    argv = ["index", "--corpus", "c.jsonl", "--kind", "my_kind", "--out", "o"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    registered(index_mod._KINDS, "my_kind", index_mod.IndexKind("my_kind", lambda *a, **k: {}, lambda *a, **k: None))
    assert build_parser().parse_args(argv).kind == "my_kind"
    assert build_parser().parse_args(["serve", "--index", "o", "--kind", "my_kind"]).kind == "my_kind"
    assert get_index_kind("my_kind").name == "my_kind"


def test_config_docs_name_exactly_the_shipped_choices():
    import re

    from rexrag.algos.advantages import adv_estimators
    from rexrag.config import describe
    from rexrag.rewards import available_rewards

    docs = {key: text for key, _, text in describe()}
    for key, names in (("algo.adv_estimator", adv_estimators()), ("trainer.reward", available_rewards())):
        (shipped,) = re.findall(r"shipped: ([\w |]+)\)", docs[key])
        assert sorted(s.strip() for s in shipped.split("|")) == sorted(names), key
