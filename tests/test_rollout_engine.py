"""HFBackend and the sampling math: exact log-probs, stop strings cut on token boundaries, batching."""

from __future__ import annotations

import math

import pytest
import torch

from _rollout_fakes import ForcedLM, forced_logprob
from rexrag.models import sequence_logprobs
from rexrag.rollout.engine import HFBackend, SamplingParams, first_stop, pick_tokens, sampling_logprobs

# --------------------------------------------------------------------------- pure math


def test_sampling_logprobs_closed_forms():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    greedy = sampling_logprobs(logits, SamplingParams(temperature=0))
    assert torch.allclose(greedy, torch.log_softmax(logits, -1))
    t = sampling_logprobs(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(t, torch.log_softmax(logits / 0.5, -1))
    # top-k 2: renormalised over {2, 1}
    k2 = sampling_logprobs(logits, SamplingParams(top_k=2))
    z = math.exp(2) + math.exp(1)
    assert k2[0, 0].item() == pytest.approx(2 - math.log(z), abs=1e-6)
    assert k2[0, 1].item() == pytest.approx(1 - math.log(z), abs=1e-6)
    assert torch.isinf(k2[0, 2:]).all()
    # top-p: softmax = [.644, .237, .087, .032]; p=0.7 keeps the two best (0.644 < 0.7 <= 0.881)
    p7 = sampling_logprobs(logits, SamplingParams(top_p=0.7))
    assert torch.allclose(p7[0, :2], k2[0, :2]) and torch.isinf(p7[0, 2:]).all()
    # p=0.5 keeps only the best token (its log-prob becomes 0)
    p5 = sampling_logprobs(logits, SamplingParams(top_p=0.5))
    assert p5[0, 0].item() == 0.0 and torch.isinf(p5[0, 1:]).all()


def test_pick_tokens_follows_distribution():
    lp = torch.log(torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([pick_tokens(lp, False, g) for _ in range(200)])
    assert (draws[:, 0] == 1).all()
    assert set(draws[:, 1].tolist()) == {0, 2}
    assert pick_tokens(lp, True).tolist() == [1, 0]


def test_first_stop_picks_earliest():
    assert first_stop("a</answer>b</search>", ["</search>", "</answer>"]) == "</answer>"
    assert first_stop("nothing here", ["</search>"]) is None
    assert first_stop("x</search>", []) is None


def test_sampling_params_reject_bad_values():
    for kw in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


# --------------------------------------------------------------------------- forced outputs


def _forced_backend(tok, prompts: list[list[int]], streams: list[list[int]], prune=True):
    """ForcedLM emitting ``streams[i]`` after ``prompts[i]`` (rows keyed by their first token), then EOS."""
    by_first = {p[0]: (len(p), s) for p, s in zip(prompts, streams)}

    def policy(history):
        n, stream = by_first[history[0]]
        k = len(history) - n
        return stream[k] if k < len(stream) else tok.eos_token_id

    return HFBackend(ForcedLM(len(tok), policy), tok, seed=0, prune=prune)


@pytest.mark.parametrize("prune", [True, False])
def test_stop_cut_on_token_boundary(smol_tokenizer, prune):
    tok = smol_tokenizer
    texts = [
        "<think>hm</think><search> capital of France</search>.\nMore text",  # '>.' completes the stop
        "<answer> Paris</answer>, then junk</search>",
        "no tags at all, just rambling on and on " * 4,
        "short",
    ]
    prompts = [[100 + i, 7, 8] for i in range(len(texts))]
    streams = [tok.encode(t, add_special_tokens=False) for t in texts]
    backend = _forced_backend(tok, prompts, streams, prune)
    stops = [["</search>", "</answer>"], ["</search>", "</answer>"], ["</search>"], []]
    outs = backend.generate(prompts, stops, SamplingParams(temperature=0, max_new_tokens=16))
    lp = forced_logprob(len(tok))

    cut = streams[0][: streams[0].index(tok.encode(">.", add_special_tokens=False)[0]) + 1]
    assert outs[0].token_ids == cut and outs[0].finish == "stop" and outs[0].stop_str == "</search>"
    assert tok.decode(cut).endswith("</search>.")
    assert "</search>" not in tok.decode(cut[:-1])
    assert outs[1].finish == "stop" and outs[1].stop_str == "</answer>"
    assert tok.decode(outs[1].token_ids).endswith("</answer>,")
    assert outs[2].finish == "length" and outs[2].token_ids == streams[2][:16]
    assert outs[3].finish == "eos" and outs[3].token_ids == streams[3] + [tok.eos_token_id]
    for o in outs:
        assert o.logprobs == pytest.approx([lp] * len(o.token_ids), abs=1e-4)


def test_more_prompts_than_max_batch_keep_order(smol_tokenizer):
    tok = smol_tokenizer
    prompts = [[200 + i] * (1 + i % 3) for i in range(7)]
    streams = [tok.encode(f"row {i} says hi", add_special_tokens=False) for i in range(len(prompts))]
    backend = _forced_backend(tok, prompts, streams)
    backend.max_batch = 3
    outs = backend.generate(prompts, [[]] * 7, SamplingParams(temperature=0, max_new_tokens=32))
    for s, o in zip(streams, outs):
        assert o.token_ids == s + [tok.eos_token_id]
    with pytest.raises(ValueError):
        backend.generate([[]], [[]], SamplingParams())
    with pytest.raises(ValueError):
        backend.generate([[1]], [], SamplingParams())


# --------------------------------------------------------------------------- tiny real model


def _rescore(model, ids: list[int], temperature: float) -> torch.Tensor:
    """[len-1] log p(ids[t] | ids[:t]) under log_softmax(logits / T), one forward pass."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0, :-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, x[0, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logprobs_match_rescoring(tiny_model, smol_tokenizer, temperature):
    tok = smol_tokenizer
    backend = HFBackend(tiny_model, tok, seed=1)
    prompts = [tok.encode(s, add_special_tokens=False) for s in ("Who wrote Hamlet?", "a b c d e f g h i j k l m", "x")]
    outs = backend.generate(prompts, [["</search>"]] * 3, SamplingParams(temperature=temperature, max_new_tokens=24))
    for p, o in zip(prompts, outs):
        assert len(o.token_ids) == len(o.logprobs) > 0
        ref = _rescore(tiny_model, p + o.token_ids, temperature)[len(p) - 1 :]
        assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-4), (o.logprobs, ref)
    if temperature == 1.0:  # the shared scorer agrees too (right-padded batch, one forward)
        seqs = [p + o.token_ids for p, o in zip(prompts, outs)]
        T = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
        with torch.no_grad():
            lp = sequence_logprobs(tiny_model, ids, mask)
        for i, (p, o) in enumerate(zip(prompts, outs)):
            assert torch.allclose(lp[i, len(p) : len(p) + len(o.token_ids)], torch.tensor(o.logprobs), atol=1e-4)


def test_top_k_top_p_logprobs_match_rescoring(tiny_model, smol_tokenizer):
    tok = smol_tokenizer
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=16)
    outs = HFBackend(tiny_model, tok, seed=3).generate([tok.encode("Hello there")], [[]], params)
    ids = tok.encode("Hello there") + outs[0].token_ids
    with torch.no_grad():
        logits = tiny_model(torch.tensor([ids])).logits[0, :-1]
    ref = sampling_logprobs(logits, params).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    n = len(outs[0].token_ids)
    assert torch.allclose(torch.tensor(outs[0].logprobs), ref[-n:], atol=1e-4)
    assert all(math.isfinite(x) for x in outs[0].logprobs)


def test_greedy_batched_equals_one_at_a_time(tiny_model, smol_tokenizer):
    tok = smol_tokenizer
    prompts = [tok.encode(s, add_special_tokens=False) for s in ("The capital of France is", "Q: who?", "1 2 3 4 5 6 7 8 9 10 11 12")]
    params = SamplingParams(temperature=0, max_new_tokens=20)
    backend = HFBackend(tiny_model, tok)
    batched = backend.generate(prompts, [["</search>"]] * 3, params)
    for p, b in zip(prompts, batched):
        single = backend.generate([p], [["</search>"]], params)[0]
        assert single.token_ids == b.token_ids
        assert single.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_sampling_is_reproducible_with_seed(tiny_model, smol_tokenizer):
    p = [smol_tokenizer.encode("Tell me")]
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    a = HFBackend(tiny_model, smol_tokenizer, seed=5).generate(p, [[]], params)[0]
    b = HFBackend(tiny_model, smol_tokenizer, seed=5).generate(p, [[]], params)[0]
    assert a.token_ids == b.token_ids
