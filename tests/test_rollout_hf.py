"""The agent over the real HF backend: token-exact records with a BPE tokenizer, re-scoring, batching."""

from __future__ import annotations

import pytest
import torch

from _rollout_fakes import FakeRetriever, ForcedLM
from rexrag.config import RolloutConfig
from rexrag.data import QAExample
from rexrag.models import sequence_logprobs
from rexrag.prompts import build_prompt_ids
from rexrag.retrieval import format_information
from rexrag.protocol import INFO_CLOSE, INFO_OPEN
from rexrag.rollout.agent import SearchAgent
from rexrag.rollout.engine import HFBackend, SamplingParams
from rexrag.rollout.trajectory import Seg, to_batch


def _examples(*questions):
    return [QAExample(id=str(i), question=q, golden_answers=["x"], group_id=i) for i, q in enumerate(questions)]


def test_forced_model_full_record_is_token_exact(smol_tokenizer):
    """A forced BPE model: the record equals prompt + sampled ids (cut at '>.') + INFO ids + answer ids."""
    tok = smol_tokenizer
    search = tok.encode("<think>look it up</think><search> Eiffel tower height</search>.\nignored", add_special_tokens=False)
    answer = tok.encode("<answer> 330 m</answer>, done", add_special_tokens=False)
    info_open = tok.encode(INFO_OPEN, add_special_tokens=False)

    def policy(history):
        # after an <information> block answer, else search; position inside the stream from the tail
        n = len(history)
        for i in range(n - len(info_open), -1, -1):
            if history[i : i + len(info_open)] == info_open:
                close = tok.encode(INFO_CLOSE, add_special_tokens=False)
                j = max(k for k in range(n) if history[k : k + len(close)] == close) + len(close)
                return answer[n - j] if n - j < len(answer) else tok.eos_token_id
        k = n - prompt_len
        return search[k] if k < len(search) else tok.eos_token_id

    prompt = build_prompt_ids(tok, "How tall is the Eiffel tower?")
    prompt_len = len(prompt)
    cfg = RolloutConfig(max_turns=2, max_new_tokens_per_turn=40, temperature=0.0)
    retriever = FakeRetriever(text_len=30)
    agent = SearchAgent(HFBackend(ForcedLM(len(tok), policy), tok), tok, retriever, cfg, topk=2)
    (t,) = agent.rollout(_examples("How tall is the Eiffel tower?"))

    cut_search = search[: search.index(tok.encode(">.", add_special_tokens=False)[0]) + 1]
    cut_answer = answer[: answer.index(tok.encode(">,", add_special_tokens=False)[0]) + 1]
    body = tok(format_information(retriever.search(["Eiffel tower height"], 2)[0]), add_special_tokens=False)["input_ids"]
    info = info_open + body + tok.encode(INFO_CLOSE, add_special_tokens=False)
    assert t.token_ids == prompt + cut_search + info + cut_answer
    expected = [Seg.PROMPT] * len(prompt) + [Seg.POLICY] * len(cut_search) + [Seg.INFO] * len(info) + [Seg.POLICY] * len(cut_answer)
    assert t.segments == [int(s) for s in expected]
    assert retriever.calls[0] == ["Eiffel tower height"]
    assert t.answer == "330 m" and t.stop_reason == "answer" and t.n_searches == 1
    span_text = tok.decode(t.token_ids[t.answer_span[0] : t.answer_span[1]])
    assert span_text.startswith("<answer>") and span_text.endswith("</answer>,")


def _tiny_agent(model, tok, **cfg):
    cfg = {"max_turns": 2, "max_new_tokens_per_turn": 10, "max_total_tokens": 512, "max_obs_tokens": 20, **cfg}
    return SearchAgent(HFBackend(model, tok, seed=0), tok, FakeRetriever(), RolloutConfig(**cfg))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_multi_turn_rescoring_reproduces_policy_logprobs(tiny_model, smol_tokenizer, temperature):
    tok = smol_tokenizer
    agent = _tiny_agent(tiny_model, tok, temperature=temperature)
    trajs = agent.rollout(_examples("Who wrote Hamlet?", "Capital of Peru?"))
    batch = to_batch(trajs, pad_id=tok.pad_token_id)
    policy = batch["segments"] == Seg.POLICY
    assert policy.sum() > 10 and (batch["segments"] == Seg.NOTICE).any()  # several turns with inserted text
    with torch.no_grad():
        # the trainer's one log-prob function at the sampling temperature (what pi_old / the reference use)
        lp = sequence_logprobs(tiny_model, batch["input_ids"], batch["attention_mask"], temperature=temperature)
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        ref = torch.log_softmax(logits / temperature, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        ref = torch.cat([torch.zeros_like(ref[:, :1]), ref], dim=1)
    assert (lp - batch["rollout_logprobs"]).abs()[policy].max().item() < 1e-4
    assert (ref - batch["rollout_logprobs"]).abs()[policy].max().item() < 1e-4
    assert agent.backend.stats["reused_tokens"] > 0  # later turns ran only their new tokens
    assert agent.backend.stats["shared_prefix_tokens"] > 0  # the common instruction ran once


def test_prefix_reuse_matches_full_prefill_and_drops_stale_entries(tiny_model, smol_tokenizer):
    tok = smol_tokenizer
    questions = ("Who wrote Hamlet?", "Which river flows through Vienna?")
    reuse = _tiny_agent(tiny_model, tok, temperature=0.0, max_new_tokens_per_turn=6)
    full = _tiny_agent(tiny_model, tok, temperature=0.0, max_new_tokens_per_turn=6)
    full.backend.reuse_cache = False
    a, b = reuse.rollout(_examples(*questions)), full.rollout(_examples(*questions))
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert reuse.backend.stats["reused_tokens"] > 0 and full.backend.stats["reused_tokens"] == 0
    # a prompt extending a kept sequence reuses it, unless the weights changed in between
    backend = reuse.backend
    params = SamplingParams(temperature=0, max_new_tokens=2)
    (o,) = backend.generate([a[0].token_ids[:-3]], [[]], params)
    ext = a[0].token_ids[:-3] + o.token_ids + [5]
    before = backend.stats["reused_tokens"]
    (o2,) = backend.generate([ext], [[]], params)
    assert backend.stats["reused_tokens"] - before == len(ext) - 2  # all but the last sampled token and [5]
    with torch.no_grad():
        next(tiny_model.parameters()).add_(0.01)
    before = backend.stats["reused_tokens"]
    backend.generate([ext + o2.token_ids + [6]], [[]], params)
    assert backend.stats["reused_tokens"] == before


def test_greedy_batched_agent_equals_one_at_a_time(tiny_model, smol_tokenizer):
    tok = smol_tokenizer
    questions = ("Who wrote Hamlet?", "Q?", "Which river flows through the city of Vienna in Austria?")
    batched = _tiny_agent(tiny_model, tok, temperature=0.0).rollout(_examples(*questions))
    for q, b in zip(questions, batched):
        (single,) = _tiny_agent(tiny_model, tok, temperature=0.0).rollout(_examples(q))
        assert single.token_ids == b.token_ids and single.segments == b.segments
        assert single.logprobs == pytest.approx(b.logprobs, abs=1e-4)


@pytest.mark.slow
def test_smollm2_real_rollout_against_bm25(shared_data, smol_tokenizer):
    from rexrag.config import ModelConfig
    from rexrag.data import load_corpus, load_qa
    from rexrag.models import load_model
    from rexrag.retrieval import BM25Retriever

    qa = load_qa(shared_data / "derived" / "hotpotqa_dev_ctx.flashrag.jsonl", limit=2)
    corpus = load_corpus(shared_data / "derived" / "multihop_dev_corpus.flashrag.jsonl")
    wanted = {pid for ex in qa for pid in ex.metadata.get("supporting_doc_ids", [])}
    passages = [p for p in corpus if p.id in wanted] + list(corpus[:400])
    retriever = BM25Retriever.from_passages(passages)
    model = load_model(ModelConfig())
    cfg = RolloutConfig(max_turns=2, max_new_tokens_per_turn=24, max_obs_tokens=200, max_total_tokens=1024, temperature=1.0)
    agent = SearchAgent(HFBackend(model, smol_tokenizer, seed=0), smol_tokenizer, retriever, cfg)
    trajs = agent.rollout(list(qa), n=2)
    assert len(trajs) == 4 and [t.group_id for t in trajs] == [qa[0].group_id] * 2 + [qa[1].group_id] * 2
    for t in trajs:
        assert t.stop_reason in ("answer", "eos", "length", "turns")
        assert len(t) <= cfg.max_total_tokens and t.count(Seg.POLICY) > 0
        assert all(lp <= 0.0 for lp, s in zip(t.logprobs, t.segments) if s == Seg.POLICY)
    m = agent.last_metrics
    assert m["rollout/gen_tokens"] == sum(t.count(Seg.POLICY) for t in trajs)
    # re-scoring the real model's record reproduces the rollout log-probs
    batch = to_batch(trajs, pad_id=smol_tokenizer.pad_token_id)
    with torch.no_grad():
        lp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"])
    policy = batch["segments"] == Seg.POLICY
    assert (lp - batch["rollout_logprobs"]).abs()[policy].max().item() < 1e-3


def test_compute_dtype_runs_fp32_weights_under_autocast(tiny_model, smol_tokenizer):
    """rollout.engine_dtype=bfloat16 on fp32 weights: every forward runs under bf16 autocast (the
    trainer's master weights stay fp32); float32 runs none under autocast."""
    from rexrag.config import RolloutConfig
    from rexrag.rollout.backends import build_backend

    seen: list[bool] = []
    hook = tiny_model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        prompt = [smol_tokenizer.encode("Question: who?")]
        for dtype, expected in (("bfloat16", True), ("float32", False)):
            seen.clear()
            backend = build_backend("hf", tiny_model, smol_tokenizer, RolloutConfig(engine_dtype=dtype), device="cpu", seed=0)
            backend.generate(prompt, [[]], SamplingParams(max_new_tokens=3, temperature=1.0))
            assert seen and all(s == expected for s in seen), (dtype, seen)
        assert next(tiny_model.parameters()).dtype == torch.float32
    finally:
        hook.remove()
