"""The optimizer: torch's AdamW, or AdamW with its two moments stored in bf16 (half the state's memory).

fp32 AdamW keeps 8 bytes a trained parameter; for SmolLM2-135M that is 1.08 GB of the demo's ~4 GB
(BENCHMARKS.md, "Demo memory"). ``BF16StateAdamW`` stores the moments in bf16 (4 bytes a parameter)
and does the update in fp32. Stores round stochastically: a bf16 number has 8 significant bits, so an
average that moves by less than half a unit in the last place per step (the second moment with
beta2 = 0.999 moves 0.1 % a step, bf16 resolves 0.4 %) never moves under round-to-nearest; rounded
up or down with the probabilities that make the stored value unbiased, it follows the fp32 average
on expectation. Large parameters are processed in slices so that the fp32 temporaries stay small.
The rounding noise is drawn once a step and shared by every slice: each stored value is still unbiased,
and drawing 2 x 135M numbers a step took 0.8 s of a 1.4 s step.

Several processes: the noise comes from the optimizer's own generator (one per device, seeded with the
same ``seed`` on every process), never from the global RNG, which the trainer seeds per rank. Under DDP
every process holds the same weights and gradients, so it must round the same way, or the replicas
drift apart silently; under FSDP2 parameters, gradients and moments are DTensor shards, updated through
their local tensors (each shard's rounding is still unbiased).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rexrag.config import OPTIMIZER_STATE_DTYPES

_SLICE = 1 << 22  # elements per slice of a parameter (16 MiB of fp32 temporaries)


def rounding_noise(n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
    """[n] int32 uniform on [0, 2**16): what ``stochastic_bf16`` adds below the bits bf16 keeps."""
    return torch.randint(0, 1 << 16, (n,), dtype=torch.int32, device=device, generator=generator)


def stochastic_bf16(x: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """fp32 ``x`` rounded to bf16 stochastically: up or down to a neighbouring bf16 value with the
    probabilities that make the result's expectation ``x`` (same shape, dtype bfloat16). ``noise``:
    at least ``x.numel()`` values of ``rounding_noise`` to use (drawn here when None)."""
    bits = x.contiguous().view(torch.int32)
    noise = rounding_noise(x.numel(), x.device, generator) if noise is None else noise[: x.numel()]
    noise = noise.view(x.shape)
    # adding noise below the 16 bits bf16 drops, then dropping them, rounds the magnitude up with
    # probability (dropped bits) / 2**16; the sign bit is untouched
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class BF16StateAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction, as ``torch.optim.AdamW``) with bf16 moments.

    Parameters stay in their dtype (fp32 master weights); only ``exp_avg`` and ``exp_avg_sq`` are bf16.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}  # the rounding noise's, one per device

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        noise: dict[torch.device, Tensor] = {}  # one draw a step and device, for the moments' two roundings
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.device not in noise:
                        noise[p.device] = rounding_noise(2 * _SLICE, p.device, self._generator(p.device)).view(2, _SLICE)
                    self._update(p, group, noise[p.device])
        return loss

    def _update(self, p: Tensor, group: dict, noise: Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
        state["step"] += 1
        t = float(state["step"])
        (b1, b2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
        # p.detach(), not p.data: it shares p's version counter, so the update is seen as a change of the
        # weights (rexrag.rollout.engine.weights_version decides whether an engine needs a sync). FSDP2:
        # the local shards of the DTensors (a DTensor and a plain tensor cannot be mixed in one op).
        flat = [_local(x).view(-1) for x in (p.detach(), p.grad, state["exp_avg"], state["exp_avg_sq"])]
        for w, g, m16, v16 in zip(*(x.split(_SLICE) for x in flat)):
            g = g.float()
            m = m16.float().lerp_(g, 1 - b1)
            v = v16.float().mul_(b2).addcmul_(g, g, value=1 - b2)
            w.mul_(1 - lr * wd)
            w.addcdiv_(m, (v / (1 - b2**t)).sqrt_().add_(group["eps"]), value=-lr / (1 - b1**t))
            m16.copy_(stochastic_bf16(m, noise=noise[0]))
            v16.copy_(stochastic_bf16(v, noise=noise[1]))
        if _local(p) is not p:  # the shard changed in place: the DTensor's own version counter must say so
            torch.autograd.graph.increment_version(p)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # torch casts floating state to the parameter's dtype: undo that
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (the same storage, written in place), or ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def make_optimizer(groups, lr: float, weight_decay: float, state_dtype: str = "float32", seed: int = 0):
    """AdamW over ``groups`` with its moments in ``state_dtype`` (``rexrag.config.OPTIMIZER_STATE_DTYPES``)."""
    if state_dtype == "float32":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if state_dtype == "bfloat16":
        return BF16StateAdamW(groups, lr=lr, weight_decay=weight_decay, seed=seed)
    raise ValueError(f"optimizer state dtype {state_dtype!r}: choose one of {OPTIMIZER_STATE_DTYPES}")
