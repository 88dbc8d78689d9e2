"""A dense index on the GPUs for ``rexrag serve --gpu``, with faiss's GPU build.

What Search-R1's retrieval server does with ``--faiss_gpu``, read from its code: clone the CPU index to every
visible GPU with ``faiss.index_cpu_to_all_gpus``, options ``shard=True`` (each GPU holds 1/G of the vectors and
searches it; faiss merges the G top-k lists) and ``useFloat16=True`` (vectors in fp16 on the GPU: half the
memory; wiki-18's 65 GB Flat file becomes ~32 GB, 4 GB a GPU on 8). We do the same, and set the server's
``nprobe`` on the GPU copy of an IVF index explicitly rather than rely on the cloner carrying it over.

faiss's GPU build replaces ``faiss-cpu`` (``pip install faiss-gpu-cu12``, or conda's ``faiss-gpu``); the CPU
wheel has no ``StandardGpuResources``. Types faiss can put on a GPU: Flat and IVF (Flat / SQ / PQ); HNSW and a
flat scalar quantiser stay on the CPU (faiss raises, and we say which type and what to do). Nothing here has run
on a GPU in this project yet (2026-12-07): it is tested against a stand-in that records the calls.
"""

from __future__ import annotations

from types import ModuleType

from rexrag.errors import UserError

INSTALL = ("install faiss's GPU build in place of faiss-cpu (`pip uninstall faiss-cpu && pip install faiss-gpu-cu12`, "
           "or conda's faiss-gpu)")


def _faiss(module: ModuleType | None) -> ModuleType:
    if module is not None:
        return module
    import faiss

    return faiss


def require_gpus(module: ModuleType | None = None) -> int:
    """The number of GPUs faiss sees; a ``UserError`` (one line) when its build has no GPU support or sees none."""
    faiss = _faiss(module)
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "index_cpu_to_all_gpus"):
        raise UserError(f"rexrag serve --gpu: this faiss ({getattr(faiss, '__version__', '?')}) is the CPU build: "
                        f"{INSTALL}, or serve without --gpu")
    n = int(faiss.get_num_gpus())
    if n < 1:
        raise UserError("rexrag serve --gpu: faiss's GPU build sees no GPU (check CUDA_VISIBLE_DEVICES and the "
                        "driver), or serve without --gpu")
    return n


def index_to_gpus(index, *, nprobe: int = 0, fp16: bool = True, module: ModuleType | None = None):
    """``index`` cloned onto every visible GPU, its vectors sharded across them (fp16 when ``fp16``);
    ``nprobe`` > 0 is set on the GPU copy (IVF). A type faiss cannot clone is a ``UserError`` naming it."""
    faiss = _faiss(module)
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True  # 1/G of the vectors per GPU: wiki-18 does not fit one GPU beside a policy
    options.useFloat16 = fp16
    try:
        gpu_index = faiss.index_cpu_to_all_gpus(index, co=options)
    except (RuntimeError, AssertionError) as exc:  # faiss raises RuntimeError for a type without a GPU version
        name = type(faiss.downcast_index(index)).__name__ if hasattr(faiss, "downcast_index") else type(index).__name__
        raise UserError(f"rexrag serve --gpu: faiss cannot put a {name} on a GPU (Flat and IVF types only; HNSW and "
                        "flat SQ stay on the CPU): serve this index without --gpu, or build an IVF one "
                        f"(`rexrag index --kind dense --index-type ivf_flat`) [{str(exc).splitlines()[0][:160]}]") from None
    if nprobe > 0:
        faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", nprobe)
    return gpu_index
