"""Under several processes REX-RAG's batch-level quantities are global, as in the official
single-controller code: two gloo processes, each holding half of the groups, compute the same
K, kept probes, failure rate e, alpha and adaptive ratio rho as one process over the whole batch."""

from __future__ import annotations

import json

import torch
import torch.multiprocessing as mp

from rexrag.config import RexConfig, RolloutConfig
from rexrag.rex.explorer import RexExplorer
from rexrag.rex.pool import Pool
from rexrag.rollout.trajectory import Seg
from test_rex_explorer import TOK, FakeAgent, _originals, reward_fn

PATTERN = [[False] * 4, [False] * 4, [True, False, True, False], [True] * 4]
GROUP_RANK = [1, 0, 2, 3]  # group 1's probes score best, then group 0's: the top-K spans both processes


def score_fn(trajs):
    out = []
    for t in trajs:
        lp = torch.full((len(t),), -1.0)
        lp[torch.tensor(t.segments) == Seg.PROBE] = -(0.1 + 0.01 * GROUP_RANK[t.group_id])
        out.append(lp)
    return out


def _run(groups: list[int]) -> dict:
    """One explore + end_step over ``groups`` of PATTERN; the kept probes named by (group, source position)."""
    cfg = RexConfig(enabled=True, probe_prob=1.0, keep_ratio=0.4)
    ex = RexExplorer(cfg, RolloutConfig(max_turns=3), TOK, Pool(["<think> maybe I missed something."], TOK), seed=0)
    originals = [t for t in _originals(PATTERN) if t.group_id in groups]
    probes = ex.explore(originals, reward_fn(originals), FakeAgent(), score_fn, reward_fn)
    firsts = {g: min(i for i, t in enumerate(originals) if t.group_id == g) for g in groups}
    kept = sorted((p.group_id, p.source_index - firsts[p.group_id]) for p in probes)
    m = ex.end_step()
    return {"kept": kept, "alpha": ex.alpha, "e": ex.failure_rate, "K": m["rex/probes_kept"],
            "made": m["rex/probes_made"], "rho": m["rex/rho"]}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        res = _run([g for g in range(len(PATTERN)) if g % 2 == rank])
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(res, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_compute_the_global_k_alpha_e_and_rho(tmp_path):
    one = _run(list(range(len(PATTERN))))
    assert one["K"] == 6 and len(one["kept"]) == 6  # floor(16 * 0.4) of 10 candidates
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    kept = sorted(tuple(k) for r in ranks for k in r["kept"])
    assert kept == [tuple(k) for k in one["kept"]]  # the same probes survive the batch-wide ranking
    assert {len(r["kept"]) for r in ranks} == {2, 4}  # ... and they live on both processes
    for r in ranks:
        for key in ("alpha", "e", "K", "made", "rho"):
            assert r[key] == one[key], (key, r[key], one[key])
