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
import dataclasses
import os
from collections.abc import Callable

import torch


def make_accelerator():
    """``Accelerator(cpu=not cuda)``; on a CUDA-less machine launched with an FSDP config, really FSDP2."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    acc = Accelerator(cpu=not torch.cuda.is_available())
    install_strict_mode()  # REXRAG_STRICT_COLLECTIVES=1: NCCL's rules checked at every collective
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


def check_supported(acc) -> None:
    """Refuse a DeepSpeed launch with one line: its engine steps the optimizer inside every
    micro-batch's ``backward`` (the trainer accumulates micro-batches itself and skips non-finite
    updates before ``optimizer.step()``), and accelerate cannot prepare it without a dataloader."""
    from accelerate.utils import DistributedType

    from rexrag.errors import UserError

    if getattr(acc, "distributed_type", None) == DistributedType.DEEPSPEED:
        raise UserError("accelerate launched DeepSpeed, which rexrag does not support (its engine steps the optimizer "
                        "on every micro-batch); launch with FSDP2 (configs/accelerate/fsdp.yaml) or DDP instead")


def is_sharded(acc) -> bool:
    """True when the policy's parameters are sharded across processes (FSDP)."""
    from accelerate.utils import DistributedType

    return acc is not None and acc.num_processes > 1 and acc.distributed_type == DistributedType.FSDP


def is_ddp_module(model) -> bool:
    """True for a DDP-wrapped module (a forward that bypasses its ``__call__`` would skip the reducer's
    preparation for backward)."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


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
    then the root, over all processes, resharded after forward, with the policy's mixed precision
    (:func:`set_fsdp_mixed_precision`). It is not registered with the accelerator (so ``save_state``
    does not save it) and has no optimizer."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = wrap_class_names(acc, module)
    mp = getattr(getattr(acc.state, "fsdp_plugin", None), "mixed_precision_policy", None) or MixedPrecisionPolicy()
    for sub in list(module.modules()):
        if sub is not module and type(sub).__name__ in names:
            fully_shard(sub, reshard_after_forward=True, mp_policy=mp)
    fully_shard(module, reshard_after_forward=True, mp_policy=mp)
    return module


def fsdp_param_dtype(setting: str, autocast_bf16: bool, device) -> torch.dtype | None:
    """``model.fsdp_mixed_precision`` -> the dtype FSDP2 gathers and computes in; None = the weights' own.
    ``auto``: bf16 where the run computes in bf16 (``model.autocast_bf16``) and the hardware does so fast
    (``rexrag.hardware.has_fast_bf16``: emulated bf16 is several times slower than fp32)."""
    from rexrag.hardware import has_fast_bf16

    if setting == "bfloat16" or (setting == "auto" and autocast_bf16 and has_fast_bf16(device)):
        return torch.bfloat16
    return None


def set_fsdp_mixed_precision(acc, model_cfg) -> torch.dtype | None:
    """Before ``acc.prepare`` under FSDP2: every unit all-gathers its parameters in the dtype of
    :func:`fsdp_param_dtype` and computes in it, and reduce-scatters gradients in float32 onto the sharded
    master weights (``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)``, which accelerate passes to
    ``fully_shard``). Returns that dtype (None: no mixed precision; also when not sharded)."""
    if not is_sharded(acc):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = fsdp_param_dtype(model_cfg.fsdp_mixed_precision, model_cfg.autocast_bf16, acc.device)
    acc.state.fsdp_plugin.mixed_precision_policy = (
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype is not None else None)
    return dtype


class Lockstep:
    """Keeps sharded forwards in step across processes (see the module docstring).

    ``dummy`` runs one cheap forward of the sharded model (it only has to trigger the same
    all-gathers as a real one). A process calls ``tick()`` before each real forward and ``drain()``
    once it has none left in the current phase; every process must drain exactly once per phase.
    """

    def __init__(self, dummy: Callable[[], object]):
        self.dummy = dummy
        self.dummy_forwards = 0

    @staticmethod
    def _any(active: bool) -> bool:
        return reduce_values([1.0 if active else 0.0], "max")[0] > 0

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
    return x if acc.num_processes == 1 else reduce_values([x], "sum", torch.float64)[0]


def global_max(acc, x: float) -> float:
    return x if acc.num_processes == 1 else reduce_values([float(x)], "max", torch.float64)[0]


def global_min(acc, x: int) -> int:
    return x if acc.num_processes == 1 else int(reduce_values([float(x)], "min", torch.float64)[0])


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
        reasons = gather_objects(reason)
        bad = [(r, why) for r, why in enumerate(reasons) if why]
        if bad:
            detail = "; ".join(f"rank {r}: {why}" for r, why in bad)
            raise error(f"{what} failed on {len(bad)} of {world} processes ({detail})")
    return result


# --------------------------------------------------------------------------- collectives: their only home
#
# Every collective rexrag runs is one of the functions below (tests/test_architecture.py fails on a
# ``torch.distributed`` or accelerate collective called anywhere else). They are written against NCCL's
# rules, which gloo does not enforce: a tensor a collective sends lives on the process's communication
# device (``cuda:<current device>`` under NCCL; a CPU tensor is refused there), so every such tensor is
# created here, by :func:`comm_tensor`; object collectives pickle through a CUDA tensor under NCCL and
# are for small plain-Python payloads only (:func:`gather_objects`).
#
# **Strict mode** (``REXRAG_STRICT_COLLECTIVES=1``; the test suite sets it, so every multi-process test
# runs in it) checks those rules at every collective on the CPU too: ``torch.distributed``'s collectives
# are wrapped (:func:`install_strict_mode`) so that one called from rexrag code outside this module,
# a tensor that :func:`comm_tensor` did not make (the CPU analogue of "not on cuda:N"), a tensor on
# another device than :func:`comm_device`, or a tensor inside an object collective's payload raises
# :class:`CollectiveError` instead of working on gloo and crashing on the first GPU run.

STRICT_ENV = "REXRAG_STRICT_COLLECTIVES"
_MARK = "_rexrag_comm_tensor"  # set on the tensors comm_tensor made
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
# torch.distributed functions the strict mode wraps -> position of the tensor they send (None: none)
_WRAPPED = {"all_reduce": 0, "broadcast": 0, "all_gather": 1, "reduce": 0, "barrier": None, "all_gather_object": None,
            "gather_object": None, "broadcast_object_list": None, "scatter_object_list": None, "send": 0, "recv": 0}


class CollectiveError(RuntimeError):
    """A collective broke a rule of the GPU backend (NCCL) that the CPU backend (gloo) would let pass."""


def strict() -> bool:
    """True when collectives check NCCL's rules on every backend (``REXRAG_STRICT_COLLECTIVES=1``)."""
    return os.environ.get(STRICT_ENV, "0").lower() not in ("", "0", "false")


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _is_nccl() -> bool:
    import torch.distributed as dist

    return "nccl" in str(dist.get_backend()).lower()


def comm_device() -> torch.device:
    """Where a collective's tensors must live: ``cuda:<current device>`` when the process group is NCCL
    (accelerate sets the current device to the local rank), the CPU for gloo."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and _is_nccl():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_tensor(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[len(values)] tensor of ``values`` on the communication device: the only way rexrag makes a
    tensor that a collective sends."""
    t = torch.tensor(values, dtype=dtype, device=comm_device())
    setattr(t, _MARK, True)
    return t


def check_sendable(t: torch.Tensor, what: str) -> None:
    """Raise :class:`CollectiveError` for a tensor NCCL would refuse (or, in strict mode, one that
    :func:`comm_tensor` did not make, which on a GPU machine would be a CPU tensor)."""
    dev = comm_device()
    if t.device != dev:
        raise CollectiveError(f"{what}: a tensor on {t.device} sent to a collective whose device is {dev} "
                              "(NCCL takes tensors on the process's CUDA device only); make it with rexrag.sharding.comm_tensor")
    if strict() and not getattr(t, _MARK, False):
        raise CollectiveError(f"{what}: a tensor not made by rexrag.sharding.comm_tensor was sent to a collective "
                              f"(here a {t.device} tensor works; under NCCL a CPU tensor crashes the run)")


def reduce_values(values: list[float], op: str = "sum", dtype: torch.dtype = torch.float32) -> list[float]:
    """``values`` reduced elementwise over every process (``op``: sum, max or min). Runs the collective
    even in a one-process group (so a test can force the distributed path)."""
    import torch.distributed as dist

    t = comm_tensor([float(v) for v in values], dtype)
    check_sendable(t, f"reduce_values({op})")
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]))
    return t.tolist()


def all_agree(ok: bool) -> bool:
    """True only when ``ok`` holds on every process (a decision that must not diverge across ranks:
    skipping an optimizer step, say). ``ok`` itself in one process."""
    if _world()[0] == 1:
        return bool(ok)
    return reduce_values([1.0 if ok else 0.0], "min")[0] > 0


def _holds_tensor(obj, depth: int = 0) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if depth > 8:
        return False
    if isinstance(obj, dict):
        return any(_holds_tensor(k, depth + 1) or _holds_tensor(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return any(_holds_tensor(v, depth + 1) for v in obj)
    return False


def gather_objects(obj) -> list:
    """``obj`` of every process, in rank order (``[obj]`` in one process): the one object collective.
    For small plain-Python payloads (metrics, failure reasons, per-process state); a tensor inside is
    refused in strict mode (it would be pickled with its device)."""
    import torch.distributed as dist

    world, _ = _world()
    if world == 1:
        return [obj]
    if strict() and _holds_tensor(obj):
        raise CollectiveError("gather_objects: a tensor inside an object collective's payload; send plain numbers "
                              "(convert with .tolist()) or use reduce_values")
    if _is_nccl() and torch.cuda.current_device() != int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())):
        raise CollectiveError("gather_objects under NCCL needs torch.cuda.set_device(LOCAL_RANK) first")
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every process (no-op in one). Under NCCL the barrier names this process's device, as
    torch asks (else it guesses one from the rank and may hang on a machine with several ranks)."""
    import torch.distributed as dist

    if _world()[0] == 1:
        return
    if _is_nccl():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def install_strict_mode() -> bool:
    """Wrap ``torch.distributed``'s collectives with the strict checks (once; see the section comment).
    Returns whether strict mode is on."""
    import torch.distributed as dist

    if not strict():
        return False
    for name, arg in _WRAPPED.items():
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "_rexrag_strict", False):
            setattr(dist, name, _strict_wrapper(fn, name, arg))
    return True


def _rexrag_caller() -> str | None:
    """The module of the nearest caller outside torch and this module's wrappers, when it is rexrag's."""
    import sys

    frame = sys._getframe(2)
    while frame is not None:
        mod = frame.f_globals.get("__name__", "")
        if not (mod == "torch" or mod.startswith("torch.")):
            return mod if mod == "rexrag" or mod.startswith("rexrag.") else None
        frame = frame.f_back
    return None


def _strict_wrapper(fn, name: str, arg: int | None):
    import functools

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        caller = _rexrag_caller()
        if caller is not None:
            if caller != __name__:
                raise CollectiveError(f"torch.distributed.{name} called from {caller}: rexrag's collectives live in "
                                      "rexrag.sharding, which makes their tensors on the communication device")
            if arg is not None and len(args) > arg and isinstance(args[arg], torch.Tensor):
                check_sendable(args[arg], f"torch.distributed.{name}")
        return fn(*args, **kwargs)

    checked._rexrag_strict = True
    return checked


# --------------------------------------------------------------------------- whole tensors from FSDP shards
#
# The weight stream (rexrag.rollout.weights) gathers the policy tensor by tensor. Gathering is split in
# two so that a process that fails (out of memory, most likely) fails *before* the collective, where
# every process can still agree to skip it (:func:`all_agree`), and never inside it, where the others
# would wait for ever: :func:`gather_plan` does all the local work and allocates the output,
# :func:`gather_run` is the collective alone.


@dataclasses.dataclass
class GatherPlan:
    """One tensor made ready for :func:`gather_run`: ``whole`` is the tensor itself when nothing needs
    gathering; else ``local`` (this process's rows, padded to the chunk size) and ``out`` (the
    [world * chunk, ...] buffer) of a dim-0 shard, or ``dtensor`` for a layout gathered by ``full_tensor``."""

    rows: int = 0
    whole: torch.Tensor | None = None
    local: torch.Tensor | None = None
    out: torch.Tensor | None = None
    group: object = None
    dtensor: torch.Tensor | None = None

    @property
    def collective(self) -> bool:
        return self.whole is None


def gather_plan(t: torch.Tensor, dtype: torch.dtype | None = None) -> GatherPlan:
    """The local half of gathering ``t`` whole, cast to ``dtype`` first (half the bytes on the wire for
    bf16). An FSDP2 shard (a DTensor sharded on dim 0 over a 1-D mesh: ``torch.chunk``'s rows, the last
    processes' possibly short or empty) gets its padded rows and the output buffer allocated here; a
    plain tensor needs no collective; any other DTensor layout is left to ``full_tensor`` (which
    allocates inside the collective: no guarantee there)."""
    from torch.distributed.tensor import DTensor, Shard

    cast = (lambda x: x.to(dtype)) if dtype is not None else (lambda x: x)
    if not isinstance(t, DTensor):
        return GatherPlan(whole=cast(t))
    mesh = t.device_mesh
    if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        return GatherPlan(dtensor=t.to(dtype) if dtype is not None else t)
    local, rows, world = cast(t.to_local()), t.shape[0], mesh.size()
    chunk = -(-rows // world) if rows else 0
    if local.shape[0] != chunk:  # gloo and NCCL gather equal sizes: pad the short shards
        padded = local.new_zeros((chunk, *local.shape[1:]))
        padded[: local.shape[0]] = local
        local = padded
    out = local.new_empty((world * chunk, *local.shape[1:]))
    return GatherPlan(rows=rows, local=local.contiguous(), out=out, group=mesh.get_group())


def gather_run(plan: GatherPlan) -> torch.Tensor:
    """The whole tensor of a :func:`gather_plan`: an all-gather (every process calls it for the same
    tensors in the same order) unless the plan needed none."""
    import torch.distributed as dist

    if plan.whole is not None:
        return plan.whole
    if plan.dtensor is not None:
        return plan.dtensor.full_tensor()
    if plan.local.device != comm_device():  # what NCCL would refuse (e.g. shards offloaded to the CPU)
        raise CollectiveError(f"gather_run: a shard on {plan.local.device} gathered over a group whose device is "
                              f"{comm_device()}")
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (renamed in torch 2.13)
    gather(plan.out, plan.local, group=plan.group)
    return plan.out[: plan.rows]


# --------------------------------------------------------------------------- point to point: trainers and rollout workers
#
# The async rollout modes (rexrag.train.async_source) connect the trainer with its rollout worker processes
# through a process group of their own: a gloo ``ProcessGroupGloo`` over a ``TCPStore`` at ``host:port``, made
# beside (never instead of) the trainers' default group, so it works across machines and needs no new
# dependency. Only :class:`Link` sends and receives on it; its tensors are CPU tensors made here (gloo's
# device), and a GPU tensor is copied to the host first (an NCCL group for the weights is not built).


class Link:
    """This process's end of the trainer/worker group (rank 0 = the trainer, 1..R = workers).

    ``send_bytes`` / ``recv_bytes`` frame a payload as its length then its bytes; ``send_tensor`` /
    ``recv_tensor`` move one tensor. Messages between two ranks on one ``tag`` arrive in the order sent;
    sends are serialised by a lock (a frame's two parts never interleave with another thread's). A peer
    that dies makes the pending receive raise within seconds ("Connection closed by peer"); a silent one
    makes it raise after ``timeout_s``."""

    def __init__(self, store, rank: int, world: int, timeout_s: float):
        """``store``: a ``torch.distributed.TCPStore`` (the trainer's server, a worker's client); returns
        once every rank has joined."""
        import datetime
        import threading

        import torch.distributed as dist

        self.group = dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=timeout_s))
        self.store, self.rank, self.world, self._lock = store, rank, world, threading.Lock()

    @staticmethod
    def _marked(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu().contiguous()
        setattr(t, _MARK, True)
        return t

    def send_tensor(self, t: torch.Tensor, dst: int, tag: int) -> None:
        with self._lock:
            self.group.send([self._marked(t)], dst, tag).wait()

    def recv_tensor(self, shape, dtype: torch.dtype, src: int, tag: int, timeout_s: float) -> torch.Tensor:
        import datetime

        out = self._marked(torch.empty(shape, dtype=dtype))
        self.group.recv([out], src, tag).wait(datetime.timedelta(seconds=timeout_s))
        return out

    def send_bytes(self, payload: bytes, dst: int, tag: int) -> None:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
        with self._lock:
            self.group.send([self._marked(torch.tensor([len(payload)], dtype=torch.int64))], dst, tag).wait()
            if payload:
                self.group.send([self._marked(data)], dst, tag).wait()

    def recv_bytes(self, src: int, tag: int, timeout_s: float) -> bytes:
        n = int(self.recv_tensor((1,), torch.int64, src, tag, timeout_s)[0])
        return self.recv_tensor((n,), torch.uint8, src, tag, timeout_s).numpy().tobytes() if n else b""
