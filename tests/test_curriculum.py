"""The pass-rate curriculum (rexrag.curriculum, data.curriculum): the estimate in closed form, draws that favour
questions with mixed results, determinism, its checkpointed state, and bad input through the CLI."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rexrag.curriculum import FLOOR, PRIOR_STRENGTH, PassRateSampler, group_results, make_sampler
from rexrag.config import DataConfig, load_config
from rexrag.data import PromptSampler
from rexrag.errors import ConfigError


def test_estimate_closed_form_with_decay_and_population_prior():
    s = PassRateSampler(5, 2, seed=0, decay=0.5)
    assert s.prior() == 0.5 and s.pass_rates().tolist() == [0.5] * 5  # nothing seen: every question alike
    s.observe([(0, 2, 4), (1, 0, 4)])
    s.observe([(0, 1, 4)])
    S0, N0 = 0.5 * 2 + 1, 0.5 * 4 + 4
    p_bar = (S0 + 0) / (N0 + 4)
    p = s.pass_rates()
    assert s.prior() == pytest.approx(p_bar)
    assert p[0] == pytest.approx((S0 + PRIOR_STRENGTH * p_bar) / (N0 + PRIOR_STRENGTH))
    assert p[1] == pytest.approx((0 + PRIOR_STRENGTH * p_bar) / (4 + PRIOR_STRENGTH))
    assert p[2] == pytest.approx(p_bar)  # unseen: the population's rate
    assert s.weights()[0] == pytest.approx(p[0] * (1 - p[0]) + FLOOR)


def test_draws_favour_questions_neither_always_right_nor_always_wrong():
    s = PassRateSampler(30, 3, seed=1)
    s.observe([(i, 0, 4) for i in range(10)] + [(i, 2, 4) for i in range(10, 20)] + [(i, 4, 4) for i in range(20, 30)])
    counts = Counter()
    for _ in range(300):
        batch = s.next_batch()
        assert len(set(batch)) == 3  # distinct questions in a step
        counts.update(batch)
    by = [sum(counts[i] for i in range(a, a + 10)) for a in (0, 10, 20)]
    assert by[1] > 2 * by[0] and by[1] > 2 * by[2] and min(by) > 0  # mixed first (weights 0.26 : 0.1); the others still drawn


def test_deterministic_by_seed_and_resumable_from_its_state():
    def run(seed, k):
        s = PassRateSampler(20, 4, seed=seed)
        out = []
        for step in range(k):
            b = s.next_batch()
            s.observe([(i, (i + step) % 3, 4) for i in b])
            out.append(b)
        return s, out

    a, draws_a = run(0, 6)
    _, draws_b = run(0, 6)
    _, draws_c = run(1, 6)
    assert draws_a == draws_b and draws_a != draws_c
    half, first = run(0, 3)
    state = json.loads(json.dumps(half.state_dict()))  # saved in trainer_state.json: plain JSON
    resumed = PassRateSampler(20, 4, seed=0)
    resumed.load_state_dict(state)
    rest = []
    for step in range(3, 6):
        b = resumed.next_batch()
        resumed.observe([(i, (i + step) % 3, 4) for i in b])
        rest.append(b)
    assert first + rest == draws_a and resumed.state_dict() == a.state_dict()


def test_make_sampler_and_group_results():
    assert type(make_sampler(10, DataConfig(batch_size=2), 0)) is PromptSampler
    assert isinstance(make_sampler(10, DataConfig(batch_size=2, curriculum="pass_rate"), 0), PassRateSampler)

    class T:
        def __init__(self, g):
            self.group_id = g

    res = group_results([T(5), T(5), T(7)], [1.0, 0.1, 1.0], 1.0, {5: 0, 7: 3})
    assert sorted(res) == [(0, 1, 2), (3, 1, 1)]


def test_config_checks():
    with pytest.raises(ConfigError, match="data.curriculum"):
        load_config(None, ["data.curriculum=hardest"])
    with pytest.raises(ConfigError, match="data.curriculum_decay"):
        load_config(None, ["data.curriculum=pass_rate", "data.curriculum_decay=1.0"])


def test_curriculum_on_too_small_a_dataset_stops_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import rexrag.models as models
    from rexrag.cli import main

    def loaded(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", loaded)
    monkeypatch.setattr(models, "load_tokenizer", loaded)
    qa = tmp_path / "small.jsonl"
    qa.write_text("".join(json.dumps({"id": str(i), "question": f"q{i}?", "golden_answers": ["a"]}) + "\n" for i in range(4)))
    rc = main(["train", f"trainer.out_dir={tmp_path / 'run'}", "rollout.backend=hf", f"data.train_files={qa}",
               "retrieval.index=/nonexistent", "data.curriculum=pass_rate", "data.batch_size=4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "data.curriculum=pass_rate" in err and str(qa) in err and "\n" not in err


def test_trainer_saves_and_restores_the_estimate(tmp_path):
    from test_trainer import make_trainer

    tr = make_trainer(tmp_path, "data.curriculum=pass_rate", "data.batch_size=4", "trainer.steps=2")
    hist = tr.train()
    assert isinstance(tr.sampler, PassRateSampler) and len(tr.sampler.stats) > 0
    assert "curriculum/seen_frac" in hist[-1] and "search/turn_limit_rate" in hist[-1]
    saved = tr.sampler.state_dict()
    again = make_trainer(tmp_path, "data.curriculum=pass_rate", "data.batch_size=4", "trainer.steps=2",
                         "trainer.resume=true")
    again.resume()
    assert again.sampler.state_dict() == saved
