"""How REX-RAG's batch-level quantities become global under several processes.

The official code runs one controller over the whole batch, so the failure rate e, the number of
kept probes K (from all originals and all candidates), the probe ranking, alpha and the adaptive
ratio's accuracy are batch-wide. With data parallelism each process holds only its own groups;
these two reductions make every process compute exactly what one process would over the union.
"""

from __future__ import annotations

import torch

from rexrag.sharding import gather_objects, install_strict_mode, reduce_values


class LocalComm:
    """One process: the batch is local, reductions are identities."""

    rank = 0

    def sum(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def gather(self, values: list[float]) -> list[list[float]]:
        return [list(values)]


class DistComm:
    """Every process of the running ``torch.distributed`` group (the one accelerate started): sums and
    gathers in rank order through ``rexrag.sharding``'s collectives (tensors on the group's device: a
    CPU tensor would crash NCCL)."""

    def __init__(self):
        import torch.distributed as dist

        self.rank = dist.get_rank()

    def sum(self, values: list[float]) -> list[float]:
        return reduce_values(values, "sum", torch.float64)

    def gather(self, values: list[float]) -> list[list[float]]:
        return [list(v) for v in gather_objects([float(v) for v in values])]


def default_comm():
    """DistComm when a multi-process group is running, else LocalComm."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        install_strict_mode()
        return DistComm()
    return LocalComm()
