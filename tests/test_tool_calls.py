"""rollout.format=tool_calls: parsers, rendered deltas, token-exact records, drift, notices, probes, bad input.

The chat templates are written for these tests in the style of each family (tests/_chat_templates.py) over
the real SmolLM2 tokenizer; the backend plays scripted messages and scores them under the tiny random model,
so the recorded log-probs can be compared with the trainer's re-scoring forward.
"""

from __future__ import annotations

import pytest
import torch
from _chat_templates import HERMES, LLAMA3, QWEN3, PlayedBackend, with_template
from _rollout_fakes import FakeRetriever

from rexrag.config import RolloutConfig
from rexrag.data import QAExample
from rexrag.errors import ConfigError, UserError
from rexrag.models import sequence_logprobs
from rexrag.rex.probe import answer_cut
from rexrag.rollout.agent import SearchAgent
from rexrag.rollout.tool_calls import TOOLS, parse_hermes, parse_llama3_json, register_tool
from rexrag.rollout.trajectory import Seg, to_batch
from rexrag.rollout.views import _runs, policy_answer

CALL = '<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def _ex(*questions):
    return [QAExample(id=str(i), question=q, golden_answers=["x"], group_id=i) for i, q in enumerate(questions)]


def _agent(tok, script, model=None, retriever=None, **cfg):
    cfg = {"format": "tool_calls", "max_turns": 3, "max_new_tokens_per_turn": 64, "max_total_tokens": 2048,
           "max_obs_tokens": 40, "temperature": 1.0, **cfg}
    return SearchAgent(PlayedBackend(tok, script, model), tok, retriever or FakeRetriever(), RolloutConfig(**cfg))




def _same_as_rendered(tok, traj, rendered: str) -> None:
    """The record decodes to the template's rendering of the whole conversation, up to the final message's EOS."""
    text = _decode(tok, traj.token_ids)
    assert rendered.startswith(text) and rendered[len(text) :] in ("", "\n")


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------- parsers


def test_hermes_parser_accepts_calls_and_flags_malformed_ones():
    (c,) = parse_hermes(CALL.format(name="search", args='{"query": "x"}'))
    assert (c.name, c.arguments, c.error) == ("search", {"query": "x"}, None)
    two = parse_hermes("a" + CALL.format(name="f", args='"{\\"k\\": 1}"') + CALL.format(name="g", args="{}"))
    assert [(c.name, c.arguments) for c in two] == [("f", {"k": 1}), ("g", {})]  # arguments as a JSON string too
    assert parse_hermes("Lima") == []
    bad = parse_hermes("<tool_call>{not json}</tool_call>" + CALL.format(name="f", args="[1]") + '<tool_call>{"name": "f"')
    assert [c.error is not None for c in bad] == [True, True, True]
    assert "JSON" in bad[0].error and "object" in bad[1].error and "closed" in bad[2].error
    assert parse_hermes('<tool_call>{"arguments": {}}</tool_call>')[0].error.startswith("a tool call must")


def test_llama3_parser_accepts_json_calls_and_flags_malformed_ones():
    (c,) = parse_llama3_json(' {"name": "search", "parameters": {"query": "x"}}')
    assert (c.name, c.arguments) == ("search", {"query": "x"})
    two = parse_llama3_json('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"k": 2}}')
    assert [(c.name, c.arguments) for c in two] == [("a", {}), ("b", {"k": 2})]
    assert parse_llama3_json("The answer is Lima.") == []
    assert parse_llama3_json('{"name": "search", "parameters": ')[0].error is not None
    assert parse_llama3_json('{"name": "search", "parameters": "q"}')[0].error is not None


# --------------------------------------------------------------------------- token-exact rollouts


HERMES_SCRIPT = {
    "Who wrote Hamlet?": [CALL.format(name="search", args='{"query": "hamlet author"}'), "<answer> Shakespeare </answer>"],
    "Capital of Peru?": [
        CALL.format(name="search", args='{"query": "peru"}') + "\n" + CALL.format(name="nope", args="{}"),
        "<tool_call>{bad json}</tool_call>",
        "Lima",
    ],
}


def test_hermes_rollout_is_sampled_plus_rendered_deltas(smol_tokenizer, tiny_model):
    tok = with_template(smol_tokenizer, HERMES)
    agent = _agent(tok, HERMES_SCRIPT, tiny_model)
    trajs = agent.rollout(_ex(*HERMES_SCRIPT))
    m = agent.last_metrics
    assert m["rollout/template_drift_turns"] == 0 and m["rollout/searches_per_traj"] == 1.0
    assert m["rollout/tool_errors"] == 2 and m["rollout/invalid_actions"] == 2
    assert agent.retriever.calls == [["hamlet author", "peru"]]  # one retriever call for the turn's searches
    played = list(agent.backend.outputs)
    for t, q in zip(trajs, HERMES_SCRIPT):
        assert t.stop_reason == "answer" and t.meta["format"] == "tool_calls"
        runs = _runs(t)
        policy = [ids for seg, ids in runs if seg == Seg.POLICY]
        assert all(p in played for p in policy) and len(policy) == len(HERMES_SCRIPT[q])  # the sampled ids, untouched
        # inserted runs are exactly the template's rendering of the new messages: the whole record decodes to
        # the template's rendering of the conversation (HERMES rewrites nothing)
        messages = t.meta["messages"] + [{"role": "assistant", "content": HERMES_SCRIPT[q][-1]}]
        _same_as_rendered(tok, t, agent.chat.render(messages, False))
        assert t.token_ids[: t.prompt_len] == agent.chat.prompt(messages[0]["content"])[0]
    hamlet, peru = trajs
    assert [seg for seg, _ in _runs(hamlet)] == [Seg.POLICY, Seg.INFO, Seg.POLICY]
    assert [seg for seg, _ in _runs(peru)] == [Seg.POLICY, Seg.INFO, Seg.POLICY, Seg.NOTICE, Seg.POLICY]
    assert "unknown tool 'nope'" in _decode(tok, _runs(peru)[1][1]) and "not valid JSON" in _decode(tok, _runs(peru)[3][1])
    assert "about hamlet author" in _decode(tok, _runs(hamlet)[1][1])  # the retriever's passages
    assert [policy_answer(tok, t) for t in trajs] == ["Shakespeare", "Lima"]  # auto: the span, else the message
    from rexrag.rewards import build_reward, reward_trajectories, trajectory_format_ok

    assert [trajectory_format_ok(tok, t) for t in trajs] == [True, False]  # Peru's row made two bad calls
    assert reward_trajectories(build_reward("em_format"), "em_format", tok, trajs) == pytest.approx([0.1, 0.0])  # gold "x": the format bonus only
    # recorded log-probs equal the trainer's re-scoring forward of the record; inserted tokens are not trained
    batch = to_batch(trajs, pad_id=tok.pad_token_id)
    pol = batch["segments"] == Seg.POLICY
    with torch.no_grad():
        lp = sequence_logprobs(tiny_model, batch["input_ids"], batch["attention_mask"])
    assert (lp - batch["rollout_logprobs"]).abs()[pol].max().item() < 1e-4
    assert torch.equal(batch["loss_mask"].bool(), pol)


def test_qwen3_like_template_strips_thinking_and_the_sampled_ids_win(smol_tokenizer, tiny_model):
    tok = with_template(smol_tokenizer, QWEN3)
    script = {"Who wrote Hamlet?": [
        "<think>\nI should search.\n</think>\n\n" + CALL.format(name="search", args='{"query": "hamlet"}'),
        "<think>\nFound it.\n</think>\n\n<answer> Shakespeare </answer>",
    ]}
    agent = _agent(tok, script, tiny_model)
    (t,) = agent.rollout(_ex(*script))
    assert agent.last_metrics["rollout/template_drift_turns"] == 1  # re-rendering would have dropped the think
    text = _decode(tok, t.token_ids)
    assert "I should search." in text and "Found it." in text
    rerendered = agent.chat.render(t.meta["messages"] + [{"role": "assistant", "content": script["Who wrote Hamlet?"][1]}], False)
    assert "I should search." not in rerendered  # what a re-rendering trainer would train on
    assert policy_answer(tok, t) == "Shakespeare"
    batch = to_batch([t], pad_id=tok.pad_token_id)
    with torch.no_grad():
        lp = sequence_logprobs(tiny_model, batch["input_ids"], batch["attention_mask"])
    pol = batch["segments"] == Seg.POLICY
    assert (lp - batch["rollout_logprobs"]).abs()[pol].max().item() < 1e-4


def test_llama3_like_json_calls(smol_tokenizer):
    tok = with_template(smol_tokenizer, LLAMA3)
    script = {"Capital of Peru?": ['{"name": "search", "parameters": {"query": "peru capital"}}',
                                   '{"name": "search", "parameters": "peru"}', "Lima"]}
    agent = _agent(tok, script, tool_parser="llama3_json", final_answer="message")
    (t,) = agent.rollout(_ex(*script))
    assert [seg for seg, _ in _runs(t)] == [Seg.POLICY, Seg.INFO, Seg.POLICY, Seg.NOTICE, Seg.POLICY]
    assert t.answer == "Lima" and agent.last_metrics["rollout/template_drift_turns"] == 0
    messages = t.meta["messages"] + [{"role": "assistant", "content": "Lima"}]
    _same_as_rendered(tok, t, agent.chat.render(messages, False))
    assert '"search"' in _decode(tok, t.token_ids[: t.prompt_len])  # the tool is declared in the prompt


def test_tools_that_raise_unknown_tools_and_long_outputs(smol_tokenizer):
    def lookup_year(event: str) -> str:
        """The year an event happened.

        Args:
            event: The event.
        """
        if event == "boom":
            raise KeyError(event)
        return "year " * 100

    register_tool(lookup_year)
    try:
        tok = with_template(smol_tokenizer, HERMES)
        script = {"When?": [CALL.format(name="lookup_year", args='{"event": "boom"}'),
                            CALL.format(name="lookup_year", args='{"event": "x", "extra": 1}'),
                            CALL.format(name="lookup_year", args='{"event": "x"}'), "<answer> 1066 </answer>"]}
        agent = _agent(tok, script, tools=["search", "lookup_year"], max_turns=4, max_obs_tokens=8, final_answer="tag")
        (t,) = agent.rollout(_ex("When?"))
    finally:
        TOOLS.remove("lookup_year")
    runs = _runs(t)
    assert [seg for seg, _ in runs] == [Seg.POLICY, Seg.NOTICE, Seg.POLICY, Seg.NOTICE, Seg.POLICY, Seg.INFO, Seg.POLICY]
    assert "raised KeyError" in _decode(tok, runs[1][1]) and "TypeError" in _decode(tok, runs[3][1])
    info = _decode(tok, runs[5][1])
    assert info.count("year") <= 8 and agent.last_metrics["rollout/obs_truncated"] == 1  # capped like observations
    assert t.answer == "1066"


def test_a_call_in_the_last_turn_and_a_cut_message(smol_tokenizer):
    tok = with_template(smol_tokenizer, HERMES)
    script = {"Q?": [CALL.format(name="search", args='{"query": "a"}')] * 3, "R?": ["x " * 80, "Lima"]}
    agent = _agent(tok, script, max_turns=1, max_new_tokens_per_turn=32)
    q, r = agent.rollout(_ex("Q?", "R?"))
    assert q.stop_reason == "turns" and q.n_searches == 1
    assert r.stop_reason == "answer" and [s for s, _ in _runs(r)] == [Seg.POLICY, Seg.NOTICE, Seg.POLICY]


# --------------------------------------------------------------------------- probes


def test_probe_cuts_at_the_final_message_and_continues_token_exactly(smol_tokenizer, tiny_model):
    tok = with_template(smol_tokenizer, HERMES)
    q = "Who wrote Hamlet?"
    script = {q: [CALL.format(name="search", args='{"query": "hamlet"}'), "Marlowe", "Shakespeare"]}
    agent = _agent(tok, script, tiny_model)
    (t,) = agent.rollout(_ex(q))
    cut = answer_cut(t, tok)
    assert cut == t.answer_span[0] and t.segments[cut - 1] == Seg.INFO and t.segments[cut] == Seg.POLICY
    probe = t.truncated(cut)
    probe.is_probe = True
    hint = list(tok("<think>\nMaybe I was wrong.\n</think>\n\n", add_special_tokens=False)["input_ids"])
    probe.extend(hint, Seg.PROBE, t.turns[cut - 1] + 1)
    (p,) = agent.run([probe], [1])
    assert p.token_ids[: cut + len(hint)] == t.token_ids[:cut] + hint
    assert p.token_ids[cut + len(hint) :] == agent.backend.outputs[-1]  # the continuation, as sampled
    assert p.stop_reason == "answer" and policy_answer(tok, p) == "Shakespeare"
    batch = to_batch([p], pad_id=tok.pad_token_id)
    with torch.no_grad():
        lp = sequence_logprobs(tiny_model, batch["input_ids"], batch["attention_mask"])
    pol = batch["segments"] == Seg.POLICY
    assert (lp - batch["rollout_logprobs"]).abs()[pol].max().item() < 1e-4


# --------------------------------------------------------------------------- bad input


def _undocumented(x):
    return x


def test_bad_settings_name_the_setting():
    with pytest.raises(UserError, match="rollout.tool_parser"):
        RolloutConfig(format="tool_calls", tool_parser="nope")
    with pytest.raises(ConfigError, match="two tools are named 'search'"):
        RolloutConfig(format="tool_calls", tools=["search", "search"])
    with pytest.raises(ConfigError, match="rollout.tools.*cannot be described"):
        RolloutConfig(format="tool_calls", tools=["test_tool_calls._undocumented"])
    with pytest.raises(ConfigError, match="rollout.tools"):
        RolloutConfig(format="tool_calls", tools=["no_such_tool"])
    with pytest.raises(ConfigError, match="rollout.format"):
        RolloutConfig(format="json")
    RolloutConfig(tool_parser="nope")  # only read in the tool_calls format


def test_tokenizer_without_chat_template_is_refused(smol_tokenizer):
    tok = with_template(smol_tokenizer, None)
    with pytest.raises(ConfigError, match="rollout.format=tool_calls needs a tokenizer with a chat template"):
        _agent(tok, {})


# --------------------------------------------------------------------------- warm-up


@pytest.mark.parametrize("template,parser", [(HERMES, "hermes"), (LLAMA3, "llama3_json")])
def test_warmup_trajectory_is_what_the_agent_records(smol_tokenizer, template, parser):
    from rexrag.rollout.tool_calls import write_call
    from rexrag.warmup import WarmupConfig, build_warmup_trajectory

    tok = with_template(smol_tokenizer, template)
    (ex,) = _ex("Who wrote Hamlet?")
    ex.golden_answers = ["Shakespeare"]
    passages = FakeRetriever().search(["hamlet"], 3)[0]
    warm = build_warmup_trajectory(tok, ex, [("hamlet", passages)],
                                   WarmupConfig(format="tool_calls", tool_parser=parser, max_obs_tokens=12))
    script = {ex.question: [write_call(parser, "search", {"query": "hamlet"}), "<answer> Shakespeare </answer>"]}
    agent = _agent(tok, script, tool_parser=parser, max_obs_tokens=12)
    (t,) = agent.rollout([ex])
    assert warm.token_ids == t.token_ids and warm.segments == t.segments and warm.turns == t.turns
    assert warm.answer == t.answer == "Shakespeare" and warm.answer_span == t.answer_span


# --------------------------------------------------------------------------- evaluation


def test_eval_agent_in_tool_calls_format(smol_tokenizer, tmp_path):
    import rexrag.eval.evaluate as E

    tok = with_template(smol_tokenizer, HERMES)
    script = {"France": [CALL.format(name="search", args='{"query": "france capital"}'), "<answer> Paris </answer>"],
              "Peru": ["Lima"]}
    examples = [QAExample(id=f"q{i}", question=f"Capital of {c}?", golden_answers=[a], group_id=i)
                for i, (c, a) in enumerate([("France", "Paris"), ("Peru", "Lima")])]
    opts = E.EvalOptions(method="agent", batch_size=2, max_new_tokens=64, format="tool_calls")
    res = E.run_eval({"demo": (tmp_path / "x.jsonl", examples)}, None, tok, FakeRetriever(), opts, tmp_path / "out",
                     "tools", {"model": "scripted"}, quiet=True, backend=PlayedBackend(tok, script))
    assert [r["prediction"] for r in res["rows"]] == ["Paris", "Lima"] and [r["em"] for r in res["rows"]] == [1.0, 1.0]
    assert [r["n_searches"] for r in res["rows"]] == [1, 0]
    assert [r["format_ok"] for r in res["rows"]] == [True, True]  # clean calls and an answer
    with pytest.raises(UserError, match="--format"):
        E.EvalOptions(method="direct", format="tool_calls")


def test_template_that_ignores_tools_gets_them_in_a_system_message(smol_tokenizer):
    tok = smol_tokenizer  # SmolLM2's own ChatML template renders no tools
    assert tok.apply_chat_template([{"role": "user", "content": "q"}], tools=[{"type": "function", "function": {
        "name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}}], tokenize=False) == \
        tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False)
    script = {"Who wrote Hamlet?": [CALL.format(name="search", args='{"query": "hamlet"}'), "<answer> Shakespeare </answer>"]}
    agent = _agent(tok, script)
    (t,) = agent.rollout(_ex(*script))
    prompt = _decode(tok, t.token_ids[: t.prompt_len])
    assert prompt.startswith("<|im_start|>system\n") and '"name": "search"' in prompt and "<tool_call>" in prompt
    assert [s for s, _ in _runs(t)] == [Seg.POLICY, Seg.INFO, Seg.POLICY] and t.answer == "Shakespeare"
    assert agent.last_metrics["rollout/template_drift_turns"] == 0
    _same_as_rendered(tok, t, agent.chat.render(t.meta["messages"] + [{"role": "assistant", "content": script["Who wrote Hamlet?"][1]}], False))


def test_another_eos_stays_as_sampled_and_the_templates_closing_follows(smol_tokenizer):
    tok = with_template(smol_tokenizer, HERMES)
    script = {"Who wrote Hamlet?": [CALL.format(name="search", args='{"query": "hamlet"}'), "Shakespeare"]}
    agent = _agent(tok, script)
    agent.backend.eos = tok.convert_tokens_to_ids("<|endoftext|>")  # an EOS the template does not close turns with
    (t,) = agent.rollout(_ex(*script))
    runs = _runs(t)
    assert runs[0][1][-1] == agent.backend.eos and _decode(tok, runs[1][1]).startswith("<|im_end|>\n<|im_start|>user")
    assert t.answer == "Shakespeare"
