"""rexrag.train.optim: bf16 AdamW moments that round stochastically and train like fp32 AdamW."""

from __future__ import annotations

import pytest
import torch

from rexrag.models import sequence_logprobs, tiny_llama
from rexrag.train.optim import BF16StateAdamW, make_optimizer, stochastic_bf16

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbouring_bf16_values():
    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16 value (1 + 2**-7)
    r = stochastic_bf16(torch.cat([x, -x]), torch.Generator().manual_seed(0)).float()
    pos, neg = r[: len(x)], r[len(x):]
    assert set(pos.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert pos.mean().item() == pytest.approx(x[0].item(), abs=2e-5) and neg.mean().item() == pytest.approx(-x[0].item(), abs=2e-5)
    exact = torch.tensor([0.5, -3.0, 0.0])
    assert torch.equal(stochastic_bf16(exact).float(), exact)


def test_second_moment_follows_fp32_where_round_to_nearest_stalls():
    """beta2 = 0.999 moves v by 0.1 % a step, below bf16's resolution: round-to-nearest stops near 0.4 g**2."""
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = BF16StateAdamW([p], lr=0.0)
    for _ in range(2000):
        p.grad = torch.full_like(p, 1e-3)
        opt.step()
    v = opt.state[p]["exp_avg_sq"].float().mean().item()
    expected = 1e-6 * (1 - 0.999**2000)
    assert opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    assert v == pytest.approx(expected, rel=0.02)


def _lm_losses(state_dtype: str, steps: int = 25) -> list[float]:
    model = tiny_llama(300, hidden=64, layers=2, heads=2, seed=0)
    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(1))
    opt = make_optimizer([p for p in model.parameters()], 3e-3, 0.01, state_dtype)
    losses = []
    for _ in range(steps):
        loss = -sequence_logprobs(model, ids, torch.ones_like(ids))[:, 1:].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_bf16_moments_train_a_model_like_fp32_adamw():
    ref, half = _lm_losses("float32"), _lm_losses("bfloat16")
    assert half[0] == pytest.approx(ref[0], rel=1e-6)
    assert half[1] == pytest.approx(ref[1], rel=1e-4)  # step 1's update does not read stored moments
    assert ref[-1] < 0.5 * ref[0] and half[-1] == pytest.approx(ref[-1], rel=0.05)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_a_step_is_seen_as_a_change_of_the_weights(state_dtype):
    """An engine is synced only when ``weights_version`` moved: an update that bypassed the parameters' version
    counters (``p.data``) left the demo's engine serving the untrained weights to the warm-up's evaluation."""
    from rexrag.rollout.engine import weights_version

    model = tiny_llama(64, hidden=32, heads=2)
    opt = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.0, state_dtype=state_dtype)
    before = weights_version(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert weights_version(model) > before


def test_state_is_half_the_bytes_and_stays_bf16_through_a_checkpoint():
    model = tiny_llama(300, hidden=64, layers=2, heads=2)
    opts = {d: make_optimizer(list(model.parameters()), 1e-3, 0.0, d) for d in ("float32", "bfloat16")}
    for opt in opts.values():
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    nbytes = {d: sum(t.numel() * t.element_size() for s in o.state.values() for k, t in s.items() if k != "step")
              for d, o in opts.items()}
    assert nbytes["bfloat16"] * 2 == nbytes["float32"]
    fresh = make_optimizer(list(model.parameters()), 1e-3, 0.0, "bfloat16")
    fresh.load_state_dict(opts["bfloat16"].state_dict())
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in fresh.state.values())
    with pytest.raises(ValueError, match="bfloat16"):
        make_optimizer(list(model.parameters()), 1e-3, 0.0, "int8")


def test_a_bad_state_dtype_is_a_clear_error_in_config_and_warmup():
    from rexrag.config import ConfigError, TrainerConfig
    from rexrag.errors import UserError
    from rexrag.warmup import WarmupConfig

    with pytest.raises(ConfigError, match="optimizer_state_dtype"):
        TrainerConfig(optimizer_state_dtype="fp8")
    with pytest.raises(UserError, match="optimizer_state_dtype='fp8'"):
        WarmupConfig(optimizer_state_dtype="fp8")
