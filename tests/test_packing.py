"""Padding-free forwards (``rexrag.packing``, ``models.sequence_logprobs(pack=True)``, ``trainer.pack_sequences``).

Tolerance: packed and padded forwards compute the same sums in a different order (matmuls over [1, N]
instead of [b, w], attention over each row alone instead of a masked row), so they agree to float32
rounding, not bitwise: log-probs and entropies within 1e-5 absolute, gradients within 1e-5 absolute /
1e-4 relative (observed: ~5e-7 on log-probs).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import _ragged_trainer, _step_grads

from rexrag.config import ConfigError, ModelConfig, load_config
from rexrag.models import ValueModel, sequence_logprobs, tiny_llama
from rexrag.packing import FLASH, VARLEN_SDPA, pack, resolve_attn_implementation
from rexrag.sharding import fsdp_param_dtype
from rexrag.train.batch import micro_batches, padding_fraction, padding_ratio

REPO = Path(__file__).resolve().parents[1]
LP_ATOL = 1e-5
GRAD_TOL = {"atol": 1e-5, "rtol": 1e-4}
LENGTHS = [11, 5, 1, 0, 8]


def _batch(vocab: int = 64, seed: int = 0):
    """[5, 12] ids and mask: right padding, a 1-token row, an empty row, and a row padded on both sides."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(LENGTHS), 12), generator=g)
    am = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS[:-1]):
        am[i, :n] = 1
    am[-1, 2:10] = 1
    return ids, am


def test_pack_lays_rows_end_to_end_with_positions_restarting():
    ids, am = _batch()
    p = pack(ids, am)
    assert p.tokens == int(am.sum()) == 25 and p.input_ids.shape == (1, 25)
    assert p.position_ids[0].tolist() == list(range(11)) + list(range(5)) + [0] + list(range(8))
    assert p.cu_seqlens.tolist() == [0, 11, 16, 17, 25] and p.cu_seqlens.dtype == torch.int32 and p.max_len == 11
    assert torch.equal(p.input_ids[0], ids[am.bool()])
    # every token after the first of its row is predicted, from the token before it
    assert p.dest.numel() == sum(max(n - 1, 0) for n in (11, 5, 1, 0, 8))
    flat = ids.reshape(-1)
    assert torch.equal(p.input_ids[0][p.src], flat[p.dest - 1])
    assert sorted((p.dest % 12).tolist()) == sorted(list(range(1, 11)) + list(range(1, 5)) + list(range(3, 10)))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logprobs_entropy_and_gradients_equal_padded(attn):
    """fp32 tiny Llama: sdpa is switched to the per-row varlen kernel, eager packs through transformers'
    block-diagonal mask; both give the padded log-probs, entropies and gradients (chunked head, 7-token slices)."""
    ids, am = _batch()
    out = {}
    for packed in (False, True):
        model = tiny_llama(64, seed=1, attn_implementation=attn)
        model.train()
        lp, ent = sequence_logprobs(model, ids, am, with_entropy=True, chunk_tokens=7, temperature=0.7, pack=packed)
        weights = torch.linspace(-1.0, 2.0, lp.numel()).view_as(lp)
        ((lp * weights).sum() + ent.sum()).backward()
        out[packed] = (lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                       model.config._attn_implementation)
    (lp0, ent0, g0, _), (lp1, ent1, g1, impl) = out[False], out[True]
    assert impl == (VARLEN_SDPA if attn == "sdpa" else "eager")
    assert torch.all(lp1[am == 0] == 0) and torch.all(lp1[:, 0] == 0) and torch.all(lp1[2] == 0)
    torch.testing.assert_close(lp1, lp0, atol=LP_ATOL, rtol=0)
    torch.testing.assert_close(ent1, ent0, atol=LP_ATOL, rtol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **GRAD_TOL)
    # bitwise: the returned log-probs do not depend on whether entropy was asked for
    model = tiny_llama(64, seed=1, attn_implementation=attn)
    assert torch.equal(sequence_logprobs(model, ids, am, chunk_tokens=7, temperature=0.7, pack=True), lp1)


def test_packed_critic_values_and_gradients_equal_padded():
    """The value model (gae) packs like the policy: the same values wherever a token and the one before it are
    real, 0 elsewhere, and the same gradients of a loss on those values."""
    ids, am = _batch()
    valid = torch.zeros_like(am, dtype=torch.bool)
    valid[:, 1:] = (am[:, 1:] * am[:, :-1]).bool()
    out = {}
    for packed in (False, True):
        critic = ValueModel(tiny_llama(64, seed=2))
        with torch.no_grad():  # zero-initialised head: give the values some signal, the same in both runs
            critic.head.weight.copy_(torch.linspace(-0.5, 0.5, critic.head.weight.numel()).view_as(critic.head.weight))
        values = critic(ids, am, pack=packed)
        weights = torch.linspace(-1.0, 2.0, values.numel()).view_as(values)
        (torch.where(valid, values, torch.zeros_like(values)) * weights).sum().backward()
        out[packed] = (values.detach(), {n: p.grad.clone() for n, p in critic.named_parameters()})
    (v0, g0), (v1, g1) = out[False], out[True]
    assert torch.all(v1[~valid] == 0) and v1[valid].abs().sum() > 0
    torch.testing.assert_close(v1[valid], v0[valid], atol=LP_ATOL, rtol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **GRAD_TOL)


def test_packed_gradients_with_gradient_checkpointing():
    """Recomputed layers get the same per-row attention (the row bounds travel with each layer's arguments)."""
    from rexrag.models import enable_gradient_checkpointing

    ids, am = _batch()
    grads = []
    for packed, gc in ((False, False), (True, True)):
        model = tiny_llama(64, seed=4)
        if gc:
            enable_gradient_checkpointing(model)
        model.train()
        sequence_logprobs(model, ids, am, chunk_tokens=7, pack=packed).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], **GRAD_TOL)


class _Wrapped(torch.nn.Module):
    """A wrapper with no config and no decoder (as DDP): the full-logits path."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, **kw):
        return self.module(**kw)


def test_full_logits_path_packs_too():
    ids, am = _batch()
    model = tiny_llama(64, seed=2)
    ref = sequence_logprobs(model, ids, am)
    torch.testing.assert_close(sequence_logprobs(_Wrapped(model), ids, am, pack=True), ref, atol=LP_ATOL, rtol=0)


def test_varlen_switch_leaves_padded_forwards_unchanged():
    """Switching an sdpa model to the varlen kernel changes nothing for padded forwards (generation, the critic)."""
    ids, am = _batch()
    model = tiny_llama(64, seed=3)
    before = model(input_ids=ids, attention_mask=am).logits
    sequence_logprobs(model, ids, am, pack=True)
    assert model.config._attn_implementation == VARLEN_SDPA
    assert torch.equal(model(input_ids=ids, attention_mask=am).logits, before)


def test_packed_micro_batches_budget_real_tokens():
    lengths = torch.tensor([3, 9, 5, 9, 2, 7, 4, 1])
    rows = torch.arange(8)
    by_rows = micro_batches(rows, lengths, 9, max_rows=3, packed=True)
    assert [m.rows.tolist() for m in by_rows] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [m.width for m in by_rows] == [9, 9, 4]
    budget = micro_batches(rows, lengths, 9, max_rows=3, max_tokens=16, packed=True)
    assert [m.rows.tolist() for m in budget] == [[0, 1], [2, 3, 4], [5, 6, 7]]  # consecutive, sums 12, 16, 12
    assert micro_batches(rows, lengths, 9, max_rows=3, max_tokens=4, packed=True)[1].rows.tolist() == [1]  # alone
    assert padding_ratio(by_rows, lengths, packed=True) == 1.0 and padding_fraction(by_rows, lengths, packed=True) == 0.0
    padded = micro_batches(rows, lengths, 9, max_rows=3)
    assert padding_ratio(padded, lengths) == 72 / 40 and math.isclose(padding_fraction(padded, lengths), 1 - 40 / 72)


@pytest.mark.parametrize("budget", [0, 20])
def test_trainer_with_packing_gives_the_losses_and_gradients_of_padding(tmp_path, budget):
    """Rows of 4..9 tokens, two mini-batches, KL and entropy on: packed micro-batches (rows or a real-token
    budget) give the padded run's gradients at every optimizer update and its loss terms; no padding computed."""
    common = ("trainer.mini_batch_size=16", "trainer.micro_batch_size=4", f"trainer.micro_batch_tokens={budget}",
              "algo.kl_coef=0.01", "algo.entropy_coef=0.01", "trainer.reuse_update_forward=false")
    padded, m_padded = _step_grads(_ragged_trainer(tmp_path / "padded", *common))
    packed, m_packed = _step_grads(_ragged_trainer(tmp_path / "packed", *common, "trainer.pack_sequences=true"))
    assert len(padded) == len(packed) == 2
    for g_pad, g_pack in zip(padded, packed, strict=True):
        assert g_pad.keys() == g_pack.keys() and len(g_pad) > 0
        for n in g_pad:
            torch.testing.assert_close(g_pack[n], g_pad[n], **GRAD_TOL)
    # the loss terms add up over micro-batches; other metrics are means of micro-batch means, equal when the
    # split is (by rows), not when a budget groups rows differently (sorted rows x longest vs summed lengths)
    means = ("actor/entropy", "actor/ratio_mean", "actor/clip_frac") if budget == 0 else ()
    for k in ("actor/pg_loss", "actor/kl_loss", "actor/loss", *means):
        assert math.isclose(m_packed[k], m_padded[k], rel_tol=1e-4, abs_tol=1e-6), k
    assert m_packed["update/padding_ratio"] == 1.0 and m_packed["train/padding_fraction"] == 0.0
    assert m_padded["update/padding_ratio"] > (1.2 if budget == 0 else 1.0)  # sorted rows x longest pad less


def test_trainer_with_packing_and_a_critic_gives_the_padded_value_loss_and_gradients(tmp_path):
    """gae: the value model's forwards pack too; its loss and gradients equal the padded run's."""
    common = ("algo.adv_estimator=gae", "trainer.mini_batch_size=16", "trainer.micro_batch_size=4")
    runs = {}
    for name, extra in (("padded", ()), ("packed", ("trainer.pack_sequences=true",))):
        tr = _ragged_trainer(tmp_path / name, *common, *extra)
        seen, real_step = [], tr.optimizer.step

        def step(*a, _tr=tr, _seen=seen, _real=real_step, **k):
            _seen.append({n: p.grad.detach().clone() for n, p in _tr.critic.named_parameters() if p.grad is not None})
            return _real(*a, **k)

        tr.optimizer.step = step
        shapes: list[tuple] = []
        tr.critic.backbone.register_forward_pre_hook(lambda m, a, kw, _s=shapes: _s.append(tuple(kw["input_ids"].shape)),
                                                     with_kwargs=True)
        runs[name] = (seen, tr.step())
        if extra:  # every value forward (old values and the update's) saw one packed row, no padding
            assert shapes and all(s[0] == 1 for s in shapes), shapes
    (g_pad, m_pad), (g_pack, m_pack) = runs["padded"], runs["packed"]
    assert len(g_pad) == len(g_pack) > 0 and any(g.abs().sum() > 0 for g in g_pad[0].values())
    for a, b in zip(g_pad, g_pack, strict=True):
        for n in a:
            torch.testing.assert_close(b[n], a[n], **GRAD_TOL)
    assert math.isclose(m_pack["critic/vf_loss"], m_pad["critic/vf_loss"], rel_tol=1e-4, abs_tol=1e-7)
    assert m_pack["update/padding_ratio"] == 1.0


def test_flash_attention_requested_without_flash_attn_is_one_line_before_loading(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model.attn_implementation=flash_attention_2 needs the flash-attn package"):
        ModelConfig(attn_implementation=FLASH)
    with pytest.raises(ConfigError, match="model.attn_implementation='flash' is not allowed"):
        ModelConfig(attn_implementation="flash")
    assert resolve_attn_implementation("auto", "cpu", torch.bfloat16) is None  # never FA2 off CUDA
    assert resolve_attn_implementation("eager", "cpu", torch.float32) == "eager"


@pytest.mark.skipif(__import__("importlib").util.find_spec("flash_attn") is not None, reason="flash-attn installed")
def test_cli_refuses_flash_attention_without_flash_attn_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "rexrag.cli", "train", "--config", str(REPO / "configs" / "demo_cpu.yaml"),
                          "model.attn_implementation=flash_attention_2", f"trainer.out_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "model.attn_implementation=flash_attention_2" in lines[0], res.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_fsdp_mixed_precision_follows_the_hardware_and_the_switch(monkeypatch):
    import rexrag.hardware

    for fast in (True, False):
        monkeypatch.setattr(rexrag.hardware, "has_fast_bf16", lambda device, fast=fast: fast)
        assert fsdp_param_dtype("auto", True, "cpu") == (torch.bfloat16 if fast else None)
        assert fsdp_param_dtype("auto", False, "cpu") is None  # the run computes in fp32
        assert fsdp_param_dtype("bfloat16", False, "cpu") == torch.bfloat16
        assert fsdp_param_dtype("float32", True, "cpu") is None
    assert load_config(None, []).model.fsdp_mixed_precision == "auto"
    with pytest.raises(ConfigError, match="model.fsdp_mixed_precision"):
        load_config(None, ["model.fsdp_mixed_precision=fp8"])
