"""Sharded (FSDP) training: the accelerator, the reference model's sharding, and lockstep forwards.

**FSDP on a CPU (gloo).** torch's FSDP2 (``torch.distributed.fsdp.fully_shard``) runs on CPU tensors over
gloo in torch 2.13 (forward, backward, optimizer step, DCP sharded save/load). accelerate 1.15 however
only switches to FSDP when its distributed type is a GPU kind: launched with an FSDP config on a
CUDA-less machine it *silently* runs DDP (``MULTI_CPU``). :func:`make_accelerator` makes the launch
mean what it says: when ``accelerate launch`` asked for FSDP (``ACCELERATE_USE_FSDP=true``) and
accelerate fell back to ``MULTI_CPU``, it switches the (shared) accelerator state to FSDP with the
plugin read from the launch environment, which is what lets two CPU processes test the sharded path
(``configs/accelerate/cpu_fsdp.yaml``). Only FSDP2 is supported there.

**Lockstep.** Under FULL_SHARD every forward of the policy all-gathers parameters, so every process
must run the same number of forwards. Rollouts (and the trainer's no-grad passes) do not: a process
whose rows finished early would stop calling forward while the others wait in the all-gather. As in
transformers' ``synced_gpus``, every real forward is preceded by a :meth:`Lockstep.tick` (an all-reduce
of "still running"); a process with nothing left calls :meth:`Lockstep.drain`, which keeps running
one-token dummy forwards until every process is done.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch


def make_accelerator():
    """``Accelerator(cpu=not cuda)``; on a CUDA-less machine launched with an FSDP config, really FSDP2."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    acc = Accelerator(cpu=not torch.cuda.is_available())
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and acc.distributed_type == DistributedType.MULTI_CPU:
        _force_cpu_fsdp(acc)
    return acc


def _force_cpu_fsdp(acc) -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from rexrag.errors import UserError

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set
    if plugin.fsdp_version != 2:
        raise UserError("FSDP on CPU (gloo) needs fsdp_version: 2 in the accelerate config (FSDP1 needs CUDA)")
    # Both shared states: AcceleratorState() re-reads PartialState's distributed_type on every construction.
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin


def is_sharded(acc) -> bool:
    """True when the policy's parameters are sharded across processes (FSDP)."""
    from accelerate.utils import DistributedType

    return acc is not None and acc.num_processes > 1 and acc.distributed_type == DistributedType.FSDP


def is_fsdp_module(model) -> bool:
    """True for a module sharded with FSDP2 (its forward must go through the root module's hooks)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(model, FSDPModule)


def wrap_class_names(acc, model) -> set[str]:
    """Decoder-layer classes FSDP wraps: the accelerate plugin's list, else the model's ``_no_split_modules``."""
    plugin = getattr(acc.state, "fsdp_plugin", None)
    names = getattr(plugin, "transformer_cls_names_to_wrap", None) or getattr(model, "_no_split_modules", None) or []
    return set(names)


def shard_like_policy(module: torch.nn.Module, acc) -> torch.nn.Module:
    """Shard a frozen module (the reference model) as accelerate shards the policy: each decoder layer,
    then the root, over all processes, resharded after forward. It is not registered with the
    accelerator (so ``save_state`` does not save it) and has no optimizer."""
    from torch.distributed.fsdp import fully_shard

    names = wrap_class_names(acc, module)
    for sub in list(module.modules()):
        if sub is not module and type(sub).__name__ in names:
            fully_shard(sub, reshard_after_forward=True)
    fully_shard(module, reshard_after_forward=True)
    return module


class Lockstep:
    """Keeps sharded forwards in step across processes (see the module docstring).

    ``dummy`` runs one cheap forward of the sharded model (it only has to trigger the same
    all-gathers as a real one). A process calls ``tick()`` before each real forward and ``drain()``
    once it has none left in the current phase; every process must drain exactly once per phase.
    """

    def __init__(self, dummy: Callable[[], object], device: torch.device | str = "cpu"):
        self.dummy, self.device = dummy, torch.device(device)
        self.dummy_forwards = 0

    def _any(self, active: bool) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if active else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def tick(self) -> None:
        """Announce one real forward (the others run a dummy one if they are draining)."""
        self._any(True)

    @torch.no_grad()
    def drain(self) -> None:
        """Run dummy forwards while any process still has real ones; return when all are done."""
        while self._any(False):
            self.dummy()
            self.dummy_forwards += 1


def dummy_forward(model, device, pad_id: int = 0) -> Callable[[], object]:
    """A one-token no-grad forward of ``model`` (for :class:`Lockstep`)."""

    def run():
        ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

    return run


def drain(obj) -> None:
    """Drain ``obj``'s lockstep (a backend or anything with a ``lockstep``) when it has one; else no-op."""
    ls = getattr(obj, "lockstep", None)
    if ls is not None:
        ls.drain()


def global_sum(acc, x: float) -> float:
    """``x`` summed over the processes (float64; ``x`` itself in one process)."""
    if acc.num_processes == 1:
        return x
    return float(acc.reduce(torch.tensor([x], dtype=torch.float64, device=acc.device), "sum")[0])


def global_max(acc, x: float) -> float:
    if acc.num_processes == 1:
        return x
    return float(acc.reduce(torch.tensor([float(x)], device=acc.device), "max")[0])


def global_min(acc, x: int) -> int:
    # accelerate's reduce knows sum / mean / max only (any other name sums): min(x) = -max(-x)
    return int(-global_max(acc, -float(x))) if acc.num_processes > 1 else x


def module_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of ``module``'s parameters and buffers held by this process (a shard's local part under FSDP)."""
    if module is None:
        return 0
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


@contextlib.contextmanager
def gathered(model):
    """Every FSDP2 unit of ``model`` unsharded for the block (one all-gather per unit, in module order,
    the same on every process) and resharded after it, with ``reshard_after_forward`` off meanwhile:
    forwards inside run no collective. Outside FSDP a no-op."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    saved = [_reshard_setting(m) for m in units]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m, setting in zip(units, saved):
            m.reshard()
            _restore_reshard_setting(m, setting)


def _reshard_setting(unit) -> tuple:
    """An FSDP2 unit's reshard-after-forward setting as torch 2.13 keeps it (the param groups'
    post-forward mesh and the root's "decide at lazy init" flag), which the public setter cannot
    restore exactly (it always clears the flag)."""
    state = unit._get_fsdp_state()
    return state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups]


def _restore_reshard_setting(unit, setting: tuple) -> None:
    """Put a unit's setting back; a root whose lazy init ran inside the block (the run's first forward
    was a rollout's) gets what lazy init gives a root left on "auto": no reshard after forward."""
    state = unit._get_fsdp_state()
    auto, infos = setting
    state._auto_reshard_after_forward = auto
    root_auto = auto and bool(getattr(state, "_is_root", False))
    for group, info in zip(state._fsdp_param_groups, infos):
        group.post_forward_mesh_info = None if root_auto else info


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def on_all_ranks(fn: Callable[[], object], what: str, error: type[Exception] | None = None):
    """Run ``fn()`` on this process, then agree with every other process: when it raised on any of
    them, raise ``error`` on all, naming each failing rank and its one-line reason. ``fn`` must keep its
    own collectives matched when it fails part-way (``rexrag.rollout.colocate.Colocation.sync`` drains its weight stream)."""
    from rexrag.errors import UserError

    error = error or UserError
    world, _ = _world()
    reason, result = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - every failure is reported, on every rank
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:1000]
        if world == 1:
            raise
    if world > 1:
        import torch.distributed as dist

        reasons: list[str | None] = [None] * world
        dist.all_gather_object(reasons, reason)
        bad = [(r, why) for r, why in enumerate(reasons) if why]
        if bad:
            detail = "; ".join(f"rank {r}: {why}" for r, why in bad)
            raise error(f"{what} failed on {len(bad)} of {world} processes ({detail})")
    return result
