"""rexrag's distributed code paths on a real NCCL group: one GPU, world size 1, distributed paths forced.

The CPU test suite runs every collective over gloo in strict mode (``REXRAG_STRICT_COLLECTIVES=1``,
``rexrag.sharding``), which checks NCCL's rules without NCCL. This script checks the strict mode
against the real backend on a lent GPU machine (no vLLM, no model hub needed):

- NCCL itself refuses a CPU tensor (the rule strict mode enforces), and strict mode refuses it first;
- REX-RAG's batch-wide reductions (``rex.comm.DistComm``), ``reduce_values`` / ``all_agree`` /
  ``gather_objects`` / ``barrier``, ``Lockstep``, ``on_all_ranks``;
- the weight stream of an FSDP2-sharded tiny Llama on CUDA (``rollout.weights.stream_weights``, bf16),
  equal to the unsharded weights.

    python scripts/gpu_nccl_check.py OUT.json          # needs one CUDA GPU; ~1 min
    python scripts/gpu_nccl_check.py OUT.json --cpu    # the same checks over gloo (the script's own test)

Writes one JSON record per check to OUT.json and exits non-zero when any check failed.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _checks(device: str):
    import torch
    import torch.distributed as dist

    from rexrag import sharding
    from rexrag.models import tiny_llama
    from rexrag.rex.comm import DistComm
    from rexrag.rollout.weights import stream_weights

    def nccl_refuses_cpu_tensors():
        try:
            dist.all_reduce(torch.ones(1))  # from this script: not policed by strict mode, reaches NCCL
        except Exception as exc:  # noqa: BLE001 - the point is that it fails
            return f"refused: {type(exc).__name__}"
        raise AssertionError("NCCL all-reduced a CPU tensor: the strict mode's rule would be wrong")

    def strict_refuses_cpu_tensors():
        try:
            sharding.check_sendable(torch.ones(1), "check")
        except sharding.CollectiveError:
            return "refused"
        raise AssertionError("strict mode let a CPU tensor through")

    def reductions():
        comm = DistComm()
        assert comm.sum([1, 2.5]) == [1.0, 2.5] and comm.gather([0.5]) == [[0.5]]
        assert sharding.reduce_values([3.0], "max") == [3.0] and sharding.reduce_values([3.0], "min") == [3.0]
        assert sharding.comm_device().type == device
        sharding.barrier()
        return "ok"

    def lockstep_and_agreement():
        ls = sharding.Lockstep(lambda: None)
        ls.tick()
        ls.drain()
        assert sharding.on_all_ranks(lambda: 7, "seven") == 7
        return f"dummy forwards {ls.dummy_forwards}"

    def weight_stream():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = tiny_llama(512, hidden=64, layers=2, heads=4, seed=0).to(device)
        want = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
        mesh = init_device_mesh(device, (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        got = dict(stream_weights(model, torch.bfloat16))
        missing = set(want) - set(got) - {"lm_head.weight"}
        assert not missing, f"not streamed: {sorted(missing)[:3]}"
        bad = [k for k, v in got.items() if not torch.equal(v.cpu(), want[k].cpu())]
        assert not bad, f"differ: {bad[:3]}"
        return f"{len(got)} tensors"

    gpu_only = [nccl_refuses_cpu_tensors] if device == "cuda" else []
    return gpu_only + [strict_refuses_cpu_tensors, reductions, lockstep_and_agreement, weight_stream]


def main(out_path: str, cpu: bool = False) -> int:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ["REXRAG_STRICT_COLLECTIVES"] = "1"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch
    import torch.distributed as dist

    from rexrag.sharding import install_strict_mode

    if cpu:
        dist.init_process_group("gloo", rank=0, world_size=1)
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --cpu)", file=sys.stderr)
        return 2
    else:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    install_strict_mode()
    results = []
    try:
        for check in _checks("cpu" if cpu else "cuda"):
            try:
                results.append({"check": check.__name__, "ok": True, "detail": check()})
            except Exception as exc:  # noqa: BLE001 - every check reports
                results.append({"check": check.__name__, "ok": False, "detail": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc()[-2000:]})
    finally:
        dist.destroy_process_group()
    with open(out_path, "w") as fh:
        device = "cpu (gloo)" if cpu else torch.cuda.get_device_name(0)
        json.dump({"device": device, "torch": torch.__version__, "results": results}, fh, indent=1)
    for r in results:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}: {r['detail']}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--cpu"]
    sys.exit(main(args[0] if args else "gpu_nccl_check.json", cpu="--cpu" in sys.argv[1:]))
