"""Process rewards (rexrag.process_rewards), the turn-level advantage term (rexrag.algos.turn_credit) and the
trainer's use of them (rexrag.train.process): closed forms on hand-built batches, built-ins on hand-built turns,
and bad input through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from fake_tokenizer import FakeTokenizer

from rexrag.algos.advantages import get_adv_estimator
from rexrag.algos.turn_credit import process_advantages, turn_returns
from rexrag.config import AlgoConfig, load_config
from rexrag.data import QAExample
from rexrag.errors import ConfigError, UserError
from rexrag.process_rewards import (Turn, answer_seen, build_process_reward, check_data, evidence, process_terms,
                                    process_reward_trajectories, register_process_reward, trajectory_turns)
from rexrag.process_rewards import _REGISTRY as PROCESS_REGISTRY
from rexrag.rollout.trajectory import Retrieval, Seg, Trajectory

HUGE = 1e9


# --------------------------------------------------------------------------- the advantage term


def test_turn_returns_discount_closed_form():
    p = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.5, 0.0]])
    g = 0.5
    want = torch.tensor([[1 + g * 0 + g * g * 2, 0 + g * 2, 2.0], [0 + g * 0.5, 0.5, 0.0]])
    assert torch.allclose(turn_returns(p, g), want)
    assert torch.equal(turn_returns(p, 0.0), p)


def _batch():
    """Two groups: group 7 = rows 0, 1 (two turns each) and a probe, row 2, of row 0; group 9 = row 3 alone.
    Tokens: [prompt, turn-0 policy, turn-0 info, turn-1 policy, pad]; masked positions carry huge turn ids."""
    turns = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 0]])
    mask = torch.tensor([[0, 1, 0, 1, 0], [0, 1, 0, 1, 1], [0, 1, 0, 1, 1], [0, 1, 0, 1, 0]], dtype=torch.float32)
    group = torch.tensor([7, 7, 7, 9])
    p = torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.5, 1.0], [1.0, 0.0]])
    return p, turns, mask, group


def test_process_advantage_closed_form_per_group_and_turn():
    p, turns, mask, group = _batch()
    g = 0.9
    adv, per_turn = process_advantages(p, turns, mask, group, g)
    R = torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.5 + g * 1.0, 1.0], [1.0, 0.0]])
    mean0 = (R[0, 0] + R[1, 0] + R[2, 0]) / 3  # turn 0 of group 7 (the probe shares it)
    mean1 = (R[0, 1] + R[1, 1] + R[2, 1]) / 3
    want = torch.tensor([[R[0, 0] - mean0, R[0, 1] - mean1], [R[1, 0] - mean0, R[1, 1] - mean1],
                         [R[2, 0] - mean0, R[2, 1] - mean1], [0.0, 0.0]])  # row 3 is alone in its group
    assert torch.allclose(per_turn, want)
    for b in range(4):
        for t in range(5):
            expect = want[b, turns[b, t]] if mask[b, t] else 0.0
            assert float(adv[b, t]) == pytest.approx(float(expect))
    assert adv.shape == mask.shape and adv.dtype == mask.dtype


def test_process_advantage_ignores_what_sits_at_masked_positions():
    p, turns, mask, group = _batch()
    adv, _ = process_advantages(p, turns, mask, group, 1.0)
    wild = torch.where(mask > 0, turns, torch.full_like(turns, 10**6))  # huge turn ids where nothing is trained
    adv2, _ = process_advantages(p, wild, mask, group, 1.0)
    assert torch.equal(adv, adv2) and torch.all(adv[mask == 0] == 0)


def test_a_row_without_a_turn_is_no_member_of_that_turns_baseline():
    # row 1 answered in turn 0: it has no turn 1, so turn 1's baseline is row 0's and row 2's only
    turns = torch.tensor([[0, 1], [0, 0], [0, 1]])
    mask = torch.ones(3, 2)
    p = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    _, per_turn = process_advantages(p, turns, mask, torch.zeros(3, dtype=torch.long), 1.0)
    assert per_turn[:, 1].tolist() == [0.5, 0.0, -0.5]
    assert torch.allclose(per_turn[:, 0], torch.tensor([1 - 1 / 3, -1 / 3, -1 / 3], dtype=per_turn.dtype))


def test_dead_end_group_gets_a_gradient_on_its_searches_only_from_process_credit():
    """All outcomes wrong: GRPO's advantage is 0 everywhere; the process term is not, where searches differ."""
    turns = torch.tensor([[0, 0, 1], [0, 0, 1]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    group = torch.tensor([3, 3])
    outcome, _ = get_adv_estimator("grpo")(torch.zeros(2), mask, group, None, AlgoConfig())
    assert torch.all(outcome == 0)
    adv, _ = process_advantages(torch.tensor([[0.2, 0.0], [0.0, 0.0]]), turns, mask, group, 1.0)
    assert adv[0, :2].tolist() == pytest.approx([0.1, 0.1]) and adv[1, :2].tolist() == pytest.approx([-0.1, -0.1])
    assert adv[:, 2].tolist() == [0.0, 0.0]


def test_weight_sets_the_exchange_rate():
    p, turns, mask, group = _batch()
    a1, _ = process_advantages(p, turns, mask, group, 1.0)
    a2, _ = process_advantages(0.2 * p, turns, mask, group, 1.0)
    assert torch.allclose(a2, 0.2 * a1)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_turn_discount_outside_unit_interval_is_refused(bad):
    with pytest.raises(ConfigError, match="algo.turn_discount"):
        AlgoConfig(turn_discount=bad)


# --------------------------------------------------------------------------- the rewards


def test_evidence_pays_new_supporting_passages_once_as_a_share():
    turns = [[Turn(0, ["q"], ["a", "x"]), Turn(1, ["q"], ["a", "b"]), Turn(2, ["q"], ["b"]), Turn(3)]]
    out = evidence(turns, [["ans"]], metadata=[{"supporting_doc_ids": ["a", "b"]}])
    assert out == [[0.5, 0.5, 0.0, 0.0]]
    assert sum(out[0]) <= 1.0


def test_answer_seen_pays_the_first_turn_that_shows_the_answer():
    turns = [[Turn(0, observation="nothing here"), Turn(1, observation="The answer is Rush."),
              Turn(2, observation="rush again"), Turn(3)],
             [Turn(0, observation="Rushmore is not it")]]
    assert answer_seen(turns, [["Rush"], ["Rush"]]) == [[0.0, 1.0, 0.0, 0.0], [0.0]]


def test_weighted_sum_reuses_the_reward_parser_and_weights_each_term():
    fn = build_process_reward("evidence*0.2 + 0.5*answer_seen")
    assert fn.name == "0.2*evidence + 0.5*answer_seen" and fn.needs_metadata == ("supporting_doc_ids",)
    turns = [[Turn(0, ["q"], ["a"], "has Rush"), Turn(1)]]
    assert fn(turns, [["Rush"]], metadata=[{"supporting_doc_ids": ["a", "b"]}]) == [[0.2 * 0.5 + 0.5, 0.0]]
    assert fn.last == {"evidence": 0.25, "answer_seen": 0.5}
    assert process_terms("") == [] and build_process_reward("") is None
    assert process_terms([{"name": "answer_seen", "weight": 0.3}]) == [("answer_seen", 0.3)]


def test_unknown_name_and_dotted_path():
    with pytest.raises(ConfigError, match="trainer.process_reward.*unknown process reward 'evidnce'.*answer_seen"):
        process_terms("evidnce*0.2")
    with pytest.raises(ConfigError, match="trainer.process_reward"):
        load_config(None, ["trainer.process_reward=evidnce"])
    fn = build_process_reward("test_process_rewards:one_per_turn*2")
    assert fn([[Turn(0), Turn(1)]], [["a"]]) == [[2.0, 2.0]]


def one_per_turn(turns, answers):
    return [[1.0] * len(t) for t in turns]


def test_wrong_shape_from_a_user_reward_names_it():
    register_process_reward("short_one")(lambda turns, answers, **kw: [[1.0] for _ in turns])
    try:
        fn = build_process_reward("short_one")
        with pytest.raises(UserError, match="'short_one' must return one value per turn"):
            fn([[Turn(0), Turn(1)]], [["a"]])
    finally:
        PROCESS_REGISTRY.remove("short_one")


# --------------------------------------------------------------------------- turns of a trajectory


def _traj(tok, parts, retrievals=()):
    t = Trajectory(group_id=1, example=QAExample("e", "q?", ["Rush"], 1, "d", {"supporting_doc_ids": ["d2"]}))
    for text, seg, turn in parts:
        ids = tok.encode(text)
        t.extend(ids, seg, turn, [-0.1] * len(ids) if seg == Seg.POLICY else None)
    t.retrievals = list(retrievals)
    return t


def test_trajectory_turns_reads_searches_and_observations_and_probes_inherit_them():
    tok = FakeTokenizer()
    parts = [("P", Seg.PROMPT, 0), ("<search>a</search>", Seg.POLICY, 0), ("<information>x</information>", Seg.INFO, 0),
             ("<search>b</search>", Seg.POLICY, 1), ("<information>Rush</information>", Seg.INFO, 1),
             ("<answer>no</answer>", Seg.POLICY, 2)]
    start1 = len("P<search>a</search>")
    start2 = start1 + len("<information>x</information><search>b</search>")
    tr = _traj(tok, parts, [Retrieval(start1, 0, "a", ["d1"]), Retrieval(start2, 1, "b", ["d2", "d3"])])
    turns = trajectory_turns(tok, tr)
    assert [t.index for t in turns] == [0, 1, 2]
    assert turns[1].queries == ["b"] and turns[1].doc_ids == ["d2", "d3"] and "Rush" in turns[1].observation
    assert turns[2].observation == "" and turns[2].queries == []
    probe = tr.truncated(start2 - 3)  # cut inside turn 1, before its results: only the first search is inherited
    assert [r.query for r in probe.retrievals] == ["a"]
    assert [r.query for r in tr.truncated(len(tr) - 2).retrievals] == ["a", "b"]


def test_the_agent_records_each_search_and_evidence_reads_it():
    from _rollout_fakes import FakeRetriever, ScriptedBackend

    from rexrag.config import RolloutConfig
    from rexrag.rollout.agent import SearchAgent

    tok = FakeTokenizer()
    script = {"Q1?": ["<search> alpha </search>", "<search> beta </search>", "<answer> no </answer>"]}
    agent = SearchAgent(ScriptedBackend(tok, script), tok, FakeRetriever(), RolloutConfig(max_turns=3), topk=2)
    ex = QAExample("0", "Q1?", ["about beta"], 5, "d", {"supporting_doc_ids": ["beta-1", "gamma-0"]})
    (tr,) = agent.rollout([ex])
    assert [(r.turn, r.query, r.doc_ids) for r in tr.retrievals] == [(0, "alpha", ["alpha-0", "alpha-1"]),
                                                                     (1, "beta", ["beta-0", "beta-1"])]
    assert all(tr.segments[r.start] == Seg.INFO and tr.segments[r.start - 1] == Seg.POLICY for r in tr.retrievals)
    fn = build_process_reward("evidence + answer_seen*0.5")
    process_reward_trajectories(fn, tok, [tr])
    assert tr.meta["turn_rewards"] == [0.0, 0.5 + 0.5, 0.0]  # beta-1: half the evidence; "about beta" seen in turn 1


def test_a_probe_shares_its_sources_turn_rewards_before_the_cut_and_its_baseline():
    from rexrag.rex.probe import make_probe

    tok = FakeTokenizer()
    parts = [("P", Seg.PROMPT, 0), ("<search>a</search>", Seg.POLICY, 0), ("<information>x</information>", Seg.INFO, 0),
             ("<answer>no</answer>", Seg.POLICY, 1)]
    start = len("P<search>a</search>")
    source = _traj(tok, parts, [Retrieval(start, 0, "a", ["d2"])])
    cut = len(source) - len("<answer>no</answer>")
    probe = make_probe(source, 0, cut, tok.encode("<think>again"), 0)
    probe.extend(tok.encode("</think><search>b</search>"), Seg.POLICY, 1, [-0.1] * 26)
    probe.retrievals.append(Retrieval(len(probe), 1, "b", ["d9"]))
    probe.extend(tok.encode("<information>y</information>"), Seg.INFO, 1)
    fn = build_process_reward("evidence")
    process_reward_trajectories(fn, tok, [source, probe])
    assert source.meta["turn_rewards"] == [1.0, 0.0] and probe.meta["turn_rewards"] == [1.0, 0.0]
    assert [t.index for t in trajectory_turns(tok, probe)] == [0, 1]
    assert set(probe.turns[cut:]) == {1}  # the probe continues the turn it was cut from


# --------------------------------------------------------------------------- bad input, through the CLI


def _qa(tmp_path, with_ids: bool, n: int = 4):
    path = tmp_path / "qa.jsonl"
    rows = [{"id": str(i), "question": f"q{i}?", "golden_answers": ["a"],
             "metadata": {"supporting_doc_ids": ["x"]} if with_ids else {}} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _no_model(monkeypatch):
    import rexrag.models as models

    def loaded(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", loaded)
    monkeypatch.setattr(models, "load_tokenizer", loaded)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.process_reward=evidence*0.2"], "trainer.process_reward='evidence*0.2' needs metadata.supporting_doc_ids"),
    (["trainer.process_reward=evidnce"], "unknown process reward 'evidnce'"),
    (["trainer.process_reward=answer_seen", "algo.turn_discount=-0.5"], "algo.turn_discount"),
    (["trainer.process_reward=answer_seen", "algo.adv_estimator=gae"], "algo.adv_estimator=gae"),
])
def test_bad_process_reward_input_stops_before_any_model_loads(tmp_path, monkeypatch, capsys, overrides, message):
    from rexrag.cli import main

    _no_model(monkeypatch)
    qa = _qa(tmp_path, with_ids=False)
    rc = main(["train", f"trainer.out_dir={tmp_path / 'run'}", "rollout.backend=hf", f"data.train_files={qa}",
               "retrieval.index=/nonexistent", *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err and "Traceback" not in err
    if "needs metadata" in message:
        assert str(qa) in err


def test_check_data_accepts_data_with_the_field_and_names_what_lacks_it():
    exs = [QAExample(str(i), "q", ["a"], i, "d", {"supporting_doc_ids": ["x"]}) for i in range(2)]
    check_data("evidence*0.2 + answer_seen", exs, "x.jsonl")
    check_data("answer_seen", [QAExample("3", "q", ["a"], 3)], "x.jsonl")  # needs no metadata
    with pytest.raises(ConfigError, match="1 of 2 in x.jsonl lack it"):
        check_data("evidence", [exs[0], QAExample("3", "q", ["a"], 3)], "x.jsonl")


# --------------------------------------------------------------------------- in the trainer


def _odd_last_token(turns, answers, trajectories):
    """A per-turn reward that differs between rollouts of a group: 1 when the last sampled id is odd."""
    return [[float(tr.token_ids[-1] % 2)] * len(t) for t, tr in zip(turns, trajectories)]


def _zero(turns, answers):
    return [[0.0] * len(t) for t in turns]


def _zero_outcome(completions, answers, **kw):
    return [0.0] * len(completions)


def _step_batch(tr):
    """One step's sampling and its batch, as Trainer.step builds them."""
    from rexrag.train.batch import Batch

    trajs, rewards, probes, _ = tr.sample([tr.examples[i] for i in tr.sampler.next_batch()])
    return Batch.collate(trajs + probes, tr.pad_id, True, tr.acc.device)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_estimators_bitwise_unchanged_without_process_reward(tmp_path, estimator):
    from test_trainer import make_trainer, _varied_reward

    off = make_trainer(tmp_path / "off", f"algo.adv_estimator={estimator}", reward=_varied_reward)
    assert off.process is None
    batch = _step_batch(off)
    assert batch.turn_rewards is None
    want, _ = off.estimator(batch.rewards, batch.loss_mask, batch.group_ids, None, off.algo)
    got, _ = off._advantages(batch, None, None, None)
    assert torch.equal(got, want)
    zero = make_trainer(tmp_path / "zero", f"algo.adv_estimator={estimator}", "trainer.process_reward=test_process_rewards:_zero",
                        reward=_varied_reward)
    batch = _step_batch(zero)
    assert batch.turn_rewards is not None and torch.all(batch.turn_rewards == 0)
    want, _ = zero.estimator(batch.rewards, batch.loss_mask, batch.group_ids, None, zero.algo)
    assert torch.equal(zero._advantages(batch, None, None, None)[0], want)


def test_dead_end_batch_trains_only_with_process_credit(tmp_path):
    """Every outcome 0: no parameter moves under GRPO; with a process reward that differs within groups, all do."""
    from test_trainer import _params, make_trainer
    from toy_rl import toy_model

    for spec, moves in (("", False), ("test_process_rewards:_odd_last_token*0.5", True)):
        model = toy_model()
        before = _params(model)
        tr = make_trainer(tmp_path / str(moves), "trainer.steps=1", f"trainer.process_reward={spec}", model=model,
                          reward=_zero_outcome)
        m = tr.train()[0]
        changed = [n for n, p in _params(model).items() if not torch.equal(p, before[n])]
        assert bool(changed) == moves
        if moves:
            assert m["process/no_signal_before"] == 1.0 and m["process/no_signal_after"] < 1.0
            assert 0.0 < m["process/reward_per_turn"] <= 0.5 and "process/_odd_last_token_per_turn" not in m
            assert "process/test_process_rewards:_odd_last_token_per_turn" in m


def test_search_metrics_recall_and_hacking_sentinels():
    from rexrag.train.credit import copies_question, search_metrics

    assert copies_question("Which band released Counterparts?", "Which Canadian band released  'Counterparts'?") is False
    assert copies_question("which canadian band released counterparts", "Which Canadian band released 'Counterparts'?")
    ex = QAExample("e", "Which Canadian band released Counterparts?", ["Rush"], 1, "d", {"supporting_doc_ids": ["a", "b"]})
    one = Trajectory(group_id=1, example=ex, n_searches=2,
                     retrievals=[Retrieval(5, 0, ex.question, ["a", "x"]), Retrieval(9, 1, "Neil Peart", ["a", "c"])])
    two = Trajectory(group_id=1, example=ex, n_searches=0)
    m = search_metrics([one, two], max_turns=2)
    assert m == {"search/recall": pytest.approx(0.25), "search/query_copy_rate": 0.5, "search/turn_limit_rate": 0.5}


def test_signal_shares_before_and_after_process_credit():
    from rexrag.train.credit import signal_metrics

    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # groups 1 (dead), 2 (spread), 3 (dead)
    group = torch.tensor([1, 1, 2, 2, 3, 3])
    mask = torch.ones(6, 2)
    term = torch.zeros(6, 2)
    term[0, 1], term[1, 1] = 0.1, -0.1  # group 1's searches differ; group 3's do not
    term[4, 0] = HUGE
    mask[4, 0] = 0  # masked: never counts
    m = signal_metrics(rewards, group, term, mask)
    assert m == {"process/no_signal_before": pytest.approx(2 / 3), "process/no_signal_after": pytest.approx(1 / 3)}


def _group(turn_rewards: list[list[float]], outcome: list[float] | None = None, probe_turns: list[list[float]] = ()):
    """(originals, rewards, probes) as dynamic sampling groups them; each member's per-turn process rewards in meta."""
    outcome = outcome or [0.0] * len(turn_rewards)
    originals = [Trajectory(group_id=1, meta={"turn_rewards": t}) for t in turn_rewards]
    probes = [Trajectory(group_id=1, meta={"turn_rewards": t, "reward": 0.0}) for t in probe_turns]
    return originals, outcome, probes


def _term_is_nonzero(group, gamma: float) -> bool:
    """process_advantages on the group's members, one trainable token per turn."""
    rows = [tr.meta["turn_rewards"] for tr in [*group[0], *group[2]]]
    K = max(map(len, rows))
    p = torch.tensor([r + [0.0] * (K - len(r)) for r in rows])
    turns = torch.tensor([list(range(K))] * len(rows))
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (K - len(r)) for r in rows])
    term, _ = process_advantages(p, turns, mask, torch.ones(len(rows), dtype=torch.long), gamma)
    return bool(term.abs().max() > 1e-9)


@pytest.mark.parametrize("turn_rewards,probe_turns,gamma", [
    ([[0.0, 0.1], [0.0, 0.0]], [], 1.0),         # second searches differ: a signal
    ([[0.1, 0.0], [0.0, 0.1]], [], 1.0),         # equal sums but turn 1 differs
    ([[0.1, 0.0], [0.0, 0.1]], [], 0.0),         # each turn on its own differs
    ([[0.1], [0.1, 0.0]], [], 1.0),              # turn 1 has one member: nothing to compare
    ([[0.2, 0.0], [0.2, 0.0]], [], 0.5),         # alike
    ([[0.0, 0.0], [0.0, 0.0]], [[0.2]], 1.0),    # a probe's search found evidence its source did not
])
def test_dynamic_sampling_keeps_the_groups_process_credit_gives_a_gradient(turn_rewards, probe_turns, gamma):
    """A dead-end group (all outcome rewards equal) is kept by dynamic sampling exactly when the turn-level
    term is non-zero for one of its members; without a process reward only the outcome rewards count."""
    from rexrag.train.dynamic import has_signal

    group = _group(turn_rewards, probe_turns=probe_turns)
    assert has_signal(group, gamma) == _term_is_nonzero(group, gamma)
    assert has_signal(group, None) is False
    assert has_signal(_group(turn_rewards, outcome=[1.0] + [0.0] * (len(turn_rewards) - 1)), None) is True
