"""SearchAgent turn logic, exactly: scripted model + fake retriever + one-char-per-token tokenizer."""

from __future__ import annotations

import pytest
import torch

from _rollout_fakes import EOS_TEXT, FakeRetriever, ScriptedBackend, scripted_logprob
from fake_tokenizer import FakeTokenizer
from rexrag.config import RolloutConfig
from rexrag.data import QAExample
from rexrag.errors import RetrievalUnavailableError
from rexrag.prompts import build_prompt_ids
from rexrag.retrieval import format_information
from rexrag.protocol import INFO_CLOSE, INFO_OPEN, NOTICES
from rexrag.rollout.agent import SearchAgent, response_text
from rexrag.rollout.trajectory import Seg, Trajectory, from_batch, to_batch

TOK = FakeTokenizer()


def _agent(script, retriever=None, **cfg):
    cfg = {"max_turns": 3, "max_new_tokens_per_turn": 200, "max_obs_tokens": 500, "max_total_tokens": 4000, **cfg}
    backend = ScriptedBackend(TOK, script)
    agent = SearchAgent(backend, TOK, retriever or FakeRetriever(), RolloutConfig(**cfg), topk=2)
    return agent, backend


def _examples(*questions):
    return [QAExample(id=str(i), question=q, golden_answers=["x"], group_id=10 + i) for i, q in enumerate(questions)]


def _segments_text(traj):
    """[(kind, text)] runs of equal segment kind (PROMPT excluded)."""
    runs = []
    for tid, seg in zip(traj.token_ids, traj.segments):
        if seg == Seg.PROMPT:
            continue
        if runs and runs[-1][0] == seg:
            runs[-1][1].append(tid)
        else:
            runs.append((seg, [tid]))
    return [(Seg(s), TOK.decode(ids)) for s, ids in runs]


def _info_text(query, k=2, text_len=20):
    passages = FakeRetriever(text_len=text_len).search([query], k)[0]
    return INFO_OPEN + format_information(passages) + INFO_CLOSE


def test_search_then_answer_exact_record():
    script = {"Q1?": ["<think>need</think><search> alpha </search> trailing junk", "<answer> Alpha One </answer>"]}
    agent, backend = _agent(script)
    (t,) = agent.rollout(_examples("Q1?"))
    prompt = build_prompt_ids(TOK, "Q1?", "rexrag")
    assert t.token_ids[: len(prompt)] == prompt and t.prompt_len == len(prompt)
    assert _segments_text(t) == [
        (Seg.POLICY, "<think>need</think><search> alpha </search>"),  # cut right after the stop
        (Seg.INFO, _info_text("alpha")),
        (Seg.POLICY, "<answer> Alpha One </answer>"),
    ]
    assert agent.retriever.calls == [["alpha"]]
    assert (t.stop_reason, t.answer, t.n_searches, t.group_id) == ("answer", "Alpha One", 1, 10)
    assert TOK.decode(t.token_ids[t.answer_span[0] : t.answer_span[1]]) == "<answer> Alpha One </answer>"
    assert t.answer_span[1] == len(t)
    # turns: prompt 0, first turn + its INFO 0, second turn 1
    first_policy = t.segments.index(Seg.POLICY)
    assert set(t.turns[:first_policy]) == {0}
    assert t.turns[-1] == 1 and t.turns[t.segments.index(Seg.INFO)] == 0
    # log-probs: scripted values on POLICY tokens (index within the turn), 0 elsewhere
    turn_start = [i for i in range(len(t)) if t.segments[i] == Seg.POLICY and t.segments[i - 1] != Seg.POLICY]
    for start in turn_start:
        end = start
        while end < len(t) and t.segments[end] == Seg.POLICY:
            end += 1
        assert t.logprobs[start:end] == pytest.approx([scripted_logprob(x, i) for i, x in enumerate(t.token_ids[start:end])])
    assert all(lp == 0.0 for lp, s in zip(t.logprobs, t.segments) if s != Seg.POLICY)
    assert backend.calls[0]["stops"] == [["</search>", "</answer>"]]
    m = agent.last_metrics
    assert m["rollout/searches_per_traj"] == 1 and m["rollout/stop_answer"] == 1.0 and m["rollout/retrieval_calls"] == 1


def test_one_retriever_call_per_turn_for_all_searching_rows():
    script = {
        "A?": ["<search> a1 </search>", "<search> a2 </search>", "<answer> a </answer>"],
        "B?": ["<answer> b </answer>"],
        "C?": ["<search> c1 </search>", "<answer> c </answer>"],
    }
    agent, backend = _agent(script)
    trajs = agent.rollout(_examples("A?", "B?", "C?"))
    assert agent.retriever.calls == [["a1", "c1"], ["a2"]]
    assert [b["n"] for b in backend.calls] == [3, 2, 1]  # finished rows leave the batch
    assert [t.n_searches for t in trajs] == [2, 0, 1]
    assert [t.answer for t in trajs] == ["a", "b", "c"]
    assert agent.last_metrics["rollout/searches_per_traj"] == pytest.approx(1.0)


def test_invalid_action_gets_notice_and_continues():
    script = {"Q?": ["I think it is 42.", "<answer> 42 </answer>"]}
    agent, _ = _agent(script)
    (t,) = agent.rollout(_examples("Q?"))
    assert _segments_text(t) == [
        (Seg.POLICY, "I think it is 42."),
        (Seg.NOTICE, NOTICES["invalid"]),
        (Seg.POLICY, "<answer> 42 </answer>"),
    ]
    assert t.invalid_actions == 1 and agent.last_metrics["rollout/invalid_actions"] == 1
    assert t.answer == "42" and t.n_searches == 0


def test_eos_ends_row_without_notice():
    (t,) = _agent({"Q?": [f"I give up{EOS_TEXT}more"]})[0].rollout(_examples("Q?"))
    assert t.stop_reason == "eos" and t.answer is None
    assert _segments_text(t) == [(Seg.POLICY, f"I give up{EOS_TEXT}")]


def test_final_turn_offers_no_search():
    script = {"Q?": ["<search> one </search>", "<search> two </search> so <answer> X </answer> tail"]}
    agent, backend = _agent(script, max_turns=1)
    (t,) = agent.rollout(_examples("Q?"))
    assert backend.calls[1]["stops"] == [["</answer>"]]
    assert agent.retriever.calls == [["one"]]
    assert t.n_searches == 1 and t.answer == "X" and t.stop_reason == "answer"
    assert _segments_text(t)[-1] == (Seg.POLICY, "<search> two </search> so <answer> X </answer>")


def test_turn_budget_exhausted_by_invalid_actions():
    agent, backend = _agent({"Q?": ["blah", "blah", "blah", "never reached"]}, max_turns=2)
    (t,) = agent.rollout(_examples("Q?"))
    assert len(backend.calls) == 3  # max_turns + 1 generations
    assert t.stop_reason == "turns" and t.count(Seg.NOTICE) == 2 * len(NOTICES["invalid"])
    assert t.invalid_actions == 2 and t.segments[-1] == Seg.POLICY


def test_empty_and_whitespace_queries_get_notice_without_retrieval():
    script = {"Q?": ["<search></search>", "<search>  \n </search>", "<answer> z </answer>"]}
    agent, _ = _agent(script)
    (t,) = agent.rollout(_examples("Q?"))
    assert agent.retriever.calls == []
    assert [s for s, _ in _segments_text(t)] == [Seg.POLICY, Seg.NOTICE, Seg.POLICY, Seg.NOTICE, Seg.POLICY]
    assert _segments_text(t)[1][1] == NOTICES["empty_query"]
    assert agent.last_metrics["rollout/empty_queries"] == 2 and t.n_searches == 0 and t.answer == "z"


def test_very_long_query_is_cut_before_retrieval():
    long_query = "word " * 1000
    script = {"Q?": [f"<search>{long_query}</search>", "<answer> y </answer>"]}
    agent, _ = _agent(script, max_new_tokens_per_turn=6000, max_total_tokens=8000, max_query_chars=100)
    (t,) = agent.rollout(_examples("Q?"))
    (sent,) = agent.retriever.calls[0]
    assert sent == long_query.strip()[:100]
    assert agent.last_metrics["rollout/truncated_queries"] == 1 and t.n_searches == 1


def test_nested_and_unclosed_tags():
    script = {
        "N?": ["<search> outer <search> inner </search>", "<answer> n </answer>"],
        "U?": ["no opening tag here </search>", "close only </answer>", "<answer> u </answer>"],
        "O?": ["<search> never closed <answer> nor this", "<answer> o </answer>"],
    }
    agent, _ = _agent(script)
    n, u, o = agent.rollout(_examples("N?", "U?", "O?"))
    assert agent.retriever.calls == [["inner"]]
    assert _segments_text(o) == [
        (Seg.POLICY, "<search> never closed <answer> nor this"),
        (Seg.NOTICE, NOTICES["invalid"]),
        (Seg.POLICY, "<answer> o </answer>"),
    ]
    assert n.answer == "n" and n.n_searches == 1
    assert [s for s, _ in _segments_text(u)] == [Seg.POLICY, Seg.NOTICE, Seg.POLICY, Seg.NOTICE, Seg.POLICY]
    assert u.invalid_actions == 2 and u.answer == "u" and u.n_searches == 0


def test_answer_inside_think_stops_at_first_close():
    agent, _ = _agent({"Q?": ["<think> maybe <answer> A </answer> hmm </think><answer> B </answer>"]})
    (t,) = agent.rollout(_examples("Q?"))
    assert t.answer == "A" and t.stop_reason == "answer"
    assert TOK.decode(t.token_ids[t.answer_span[0] : t.answer_span[1]]) == "<answer> A </answer>"


def test_model_written_information_stays_policy():
    fake = "<information>Doc 1(Title: fake) the answer is 7</information>"
    script = {"Q?": [f"{fake}<search> real </search>", "<answer> 7 </answer>"]}
    agent, _ = _agent(script)
    (t,) = agent.rollout(_examples("Q?"))
    runs = _segments_text(t)
    assert runs[0] == (Seg.POLICY, f"{fake}<search> real </search>")
    info = "".join(text for s, text in runs if s == Seg.INFO)
    assert info == _info_text("real") and "answer is 7" not in info
    assert t.n_searches == 1


def test_retrieval_error_becomes_a_notice_without_agent_retries():
    """The agent does not retry (the HTTP client does): one RetrievalError -> one call, a NOTICE per row."""
    script = {"Q?": ["<search> q </search>", "<answer> a </answer>"], "R?": ["<search> r </search>", "<answer> b </answer>"]}
    agent, _ = _agent(script, retriever=FakeRetriever(fail_times=1))
    t1, t2 = agent.rollout(_examples("Q?", "R?"))
    assert len(agent.retriever.calls) == 1
    for t in (t1, t2):
        assert _segments_text(t)[1] == (Seg.NOTICE, NOTICES["retrieval_failed"])
        assert t.retrieval_failures == 1 and t.n_searches == 0 and t.stop_reason == "answer"
    assert agent.last_metrics["rollout/retrieval_failures"] == 2 and agent.failed_turns == 1
    agent.backend = ScriptedBackend(TOK, script)
    (t,) = agent.rollout(_examples("Q?"))  # the next call succeeds: the streak resets
    assert t.n_searches == 1 and agent.failed_turns == 0


def test_consecutive_failed_turns_stop_with_a_named_error():
    script = {"Q?": ["<search> q </search>", "<search> q2 </search>", "<search> q3 </search>", "<answer> a </answer>"]}
    agent, _ = _agent(script, retriever=FakeRetriever(fail_times=100), max_turns=5)
    agent.max_failed_turns = 3
    with pytest.raises(RetrievalUnavailableError, match=r"3 consecutive turns.*FakeRetriever.*retriever is down"):
        agent.rollout(_examples("Q?"))
    assert len(agent.retriever.calls) == 3
    agent, _ = _agent(script, retriever=FakeRetriever(fail_times=100), max_turns=5)
    agent.max_failed_turns = 0  # never stop: every turn gets a notice
    (t,) = agent.rollout(_examples("Q?"))
    assert t.retrieval_failures == 3 and t.stop_reason == "answer"


def test_a_bug_in_a_user_retriever_propagates():
    """Only RetrievalError becomes a notice: a user's bug is raised, not turned into "could not be reached"."""

    class Buggy:
        def search(self, queries, k):
            return [len(q) + "passages" for q in queries]  # a bug: int + str

    class Short:
        def search(self, queries, k):
            return []

    script = {"Q?": ["<search> q </search>", "<answer> a </answer>"]}
    agent, _ = _agent(script, retriever=Buggy())
    with pytest.raises(TypeError, match="unsupported operand"):
        agent.rollout(_examples("Q?"))
    agent, _ = _agent(script, retriever=Short())
    with pytest.raises(TypeError, match=r"Short returned 0 result lists for 1 queries"):
        agent.rollout(_examples("Q?"))


def test_observation_truncated_keeps_closing_tag():
    agent, _ = _agent({"Q?": ["<search> q </search>", "<answer> a </answer>"]}, max_obs_tokens=30, retriever=FakeRetriever(text_len=200))
    (t,) = agent.rollout(_examples("Q?"))
    info = [text for s, text in _segments_text(t) if s == Seg.INFO][0]
    full = _info_text("q", text_len=200)
    body = full[len(INFO_OPEN) : -len(INFO_CLOSE)]
    assert info == INFO_OPEN + body[:30] + INFO_CLOSE
    assert agent.last_metrics["rollout/obs_truncated"] == 1


def test_total_length_cap_cuts_generation_and_blocks():
    prompt_len = len(build_prompt_ids(TOK, "Q?"))
    # the second turn would need 40 tokens but only 10 remain
    agent, backend = _agent({"Q?": ["<search> q </search>", "x" * 40]}, max_total_tokens=prompt_len + 20 + len(_info_text("q")) + 10)
    (t,) = agent.rollout(_examples("Q?"))
    assert len(t) == agent.cfg.max_total_tokens and t.stop_reason == "length"
    assert backend.calls[1]["max_new_tokens"] == 10
    # a cap that falls inside the INFO block cuts the block
    agent, _ = _agent({"Q?": ["<search> q </search>", "never"]}, max_total_tokens=prompt_len + 20 + 5)
    (t,) = agent.rollout(_examples("Q?"))
    assert len(t) == agent.cfg.max_total_tokens and t.stop_reason == "length"
    assert _segments_text(t)[-1] == (Seg.INFO, _info_text("q")[:5])


def test_rows_with_different_room_share_one_call():
    p = len(build_prompt_ids(TOK, "Q1?"))
    script = {"Q1?": ["a" * 30], "Q222222222?": ["b" * 30]}
    agent, backend = _agent(script, max_total_tokens=p + 25, max_new_tokens_per_turn=100)
    t1, t2 = agent.rollout(_examples("Q1?", "Q222222222?"))
    assert backend.calls[0]["max_new_tokens"] == 25
    assert len(t1) == len(t2) == p + 25 and t1.stop_reason == t2.stop_reason == "length"


def test_group_rollouts_share_group_id():
    agent, _ = _agent({"Q?": ["<answer> a </answer>"]})
    trajs = agent.rollout(_examples("Q?"), n=3)
    assert [t.group_id for t in trajs] == [10, 10, 10]
    assert all(t.example.question == "Q?" for t in trajs)
    assert trajs[0].token_ids == trajs[2].token_ids


def test_run_continues_a_probe_in_the_same_turn():
    script = {"Q?": ["<search> q </search>", "<think> so </think><answer> wrong </answer>"]}
    agent, _ = _agent(script)
    (src,) = agent.rollout(_examples("Q?"))
    cut = src.answer_span[0]
    probe = src.truncated(cut)
    assert probe.n_searches == 1
    probe.is_probe, probe.probe_start = True, cut
    probe.extend(TOK.encode("<think> maybe I was wrong </think>"), Seg.PROBE, src.turns[cut - 1])
    agent2, backend2 = _agent({"Q?": ["<search> q again </search>", "<answer> right </answer>"]})
    (out,) = agent2.run([probe], [agent.cfg.max_turns - probe.n_searches])
    assert out is probe and out.answer == "right" and out.n_searches == 2
    runs = _segments_text(out)
    assert [s for s, _ in runs][-5:] == [Seg.POLICY, Seg.PROBE, Seg.POLICY, Seg.INFO, Seg.POLICY]
    cont = out.segments.index(Seg.PROBE) + len("<think> maybe I was wrong </think>")
    assert out.turns[cont] == src.turns[cut - 1]  # continued in the same turn
    assert out.token_ids[:cut] == src.token_ids[:cut] and out.logprobs[:cut] == src.logprobs[:cut]
    assert agent2.retriever.calls == [["q again"]]


def test_run_final_budget_and_bad_inputs():
    agent, backend = _agent({"Q?": ["<search> no </search> <answer> ok </answer>"]})
    (ex,) = _examples("Q?")

    traj = Trajectory(group_id=1, example=ex)
    traj.extend(build_prompt_ids(TOK, "Q?"), Seg.PROMPT, 0)
    agent.run([traj], [0])
    assert backend.calls[0]["stops"] == [["</answer>"]] and traj.answer == "ok" and agent.retriever.calls == []
    with pytest.raises(ValueError):
        agent.run([traj], [1])  # already finished
    with pytest.raises(ValueError):
        agent.run([Trajectory()], [1])
    with pytest.raises(ValueError):
        agent.run([traj], [])


def test_batch_round_trip_and_response_text():
    script = {"A?": ["<search> a </search>", "<answer> a </answer>"], "B?": ["oops", "<answer> b </answer>"]}
    agent, _ = _agent(script)
    trajs = agent.rollout(_examples("A?", "B?"))
    batch = to_batch(trajs, pad_id=TOK.pad_token_id)
    assert torch.equal(batch["loss_mask"].bool(), batch["segments"] == Seg.POLICY)
    back = from_batch(batch)
    for a, b in zip(trajs, back):
        assert (a.token_ids, a.segments, a.turns, a.group_id) == (b.token_ids, b.segments, b.turns, b.group_id)
        assert b.logprobs == pytest.approx(a.logprobs)
    assert response_text(TOK, trajs[1], include_notices=True) == "oops" + NOTICES["invalid"] + "<answer> b </answer>"
    assert response_text(TOK, trajs[1]) == "oops<answer> b </answer>"  # rewards never read our notices


def test_metrics_time_split():
    agent, _ = _agent({"Q?": ["<search> q </search>", "<answer> a </answer>"]})
    agent.rollout(_examples("Q?"))
    m = agent.last_metrics
    parts = m["rollout/time_gen_s"] + m["rollout/time_retrieval_s"] + m["rollout/time_bookkeeping_s"]
    assert parts == pytest.approx(m["rollout/time_total_s"])
    assert m["rollout/gen_tokens"] == len("<search> q </search>") + len("<answer> a </answer>")
