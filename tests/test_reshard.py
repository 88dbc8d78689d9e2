"""Resuming on another number of processes (rexrag.train.checkpoint: model and optimizer in torch DCP,
resharded on load; per-process RNG reseeded from (seed, step, rank)), the one-line refusals, and a
resumed run continuing its wandb run.

The launches (``slow``) train the toy RL setting of tests/fsdp_worker.py, whose rollouts seed each
prompt group by (seed, step, group id): what a step samples does not depend on the process count, and
the trainer's global batch and mini-batches are the same for any count (``rexrag.train.trainer``), so
a resumed run on other processes follows the uninterrupted one up to floating-point summation order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from rexrag.train import checkpoint as ckpt

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
COMMON = ("trainer.warmup_steps=2", "trainer.save_every=1", "trainer.keep_last=0")
# Weights after one step taken on one process instead of two (or back): the gradient is the same sum
# in another order (fp32), and Adam divides by sqrt(v) of ~1e-3 gradients; the same bound as
# tests/test_fsdp.py's FSDP2-vs-one-process comparison.
ATOL, RTOL = 2e-5, 1e-4


def _run(launch: list[str], *args: str, timeout: int = 300) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launch, str(HERE / "fsdp_worker.py"), "reshard", *map(str, args)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, res.stderr[-4000:]


def _fsdp(*args):
    _run(["-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu_fsdp.yaml")], *args)


def _ddp(*args):
    _run(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"], *args)


def _one(*args):
    _run([], *args)


def _stopped_after(src: Path, dst: Path, step: int) -> Path:
    """``dst``: run ``src`` as if it had stopped after checkpoint ``step`` (its later checkpoints gone)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("info_rank*", "params_rank*", "loaded.pt", "rng_rank*"))
    for p in ckpt.checkpoint_root(dst).iterdir():
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    return dst


def _saved(out: Path, step: int, tmp: Path) -> dict:
    """The DCP model + optimizer state of checkpoint ``step``, read whole in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"saved_{out.name}_{step}.pt"
    dcp_to_torch_save(ckpt.checkpoint_root(out) / f"step_{step:06d}" / "state" / ckpt.DCP_DIR, target)
    return torch.load(target, weights_only=False)


def _assert_loaded_exactly(loaded: dict, saved: dict) -> None:
    """Weights, Adam's step counts and moments, and the param groups as saved, bit for bit."""
    assert loaded["model"].keys() == saved["model"].keys()
    for k, v in saved["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    state, want = loaded["optim"]["state"], saved["optim"]["state"]
    assert state.keys() == want.keys() and len(want) == len(saved["model"])
    for fqn, s in want.items():
        assert set(state[fqn]) == {"step", "exp_avg", "exp_avg_sq"}, fqn
        for key, v in s.items():
            assert torch.equal(state[fqn][key], v), (fqn, key)
    assert [{k: v for k, v in g.items()} for g in loaded["optim"]["param_groups"]] == saved["optim"]["param_groups"]


def _info(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"info_rank{rank}.json").read_text())


def _export(out: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt.checkpoint_root(out) / f"step_{step:06d}" / "model" / "model.safetensors"))


def _assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=ATOL, rtol=RTOL), (n, float((a[n] - b[n]).abs().max()))


@pytest.mark.slow
def test_fsdp2_two_processes_then_one_then_two_match_an_uninterrupted_run(tmp_path):
    """5 FSDP2 steps straight; the same run stopped after step 2, resumed on ONE process for step 3
    (DCP shards -> whole tensors), then on two FSDP2 processes for step 4 (whole -> shards), then on two
    DDP processes for step 5 (shards -> replicas). Each load reproduces the saved weights and Adam state
    exactly; on a new process count the RNGs are reseeded from (seed, step, rank), on the same count
    restored; the weights after steps 4 and 5 equal the uninterrupted run's within (ATOL, RTOL)."""
    full = tmp_path / "full"
    _fsdp(full, *COMMON, "trainer.steps=5")
    part = _stopped_after(full, tmp_path / "part", 2)

    _one(part, *COMMON, "trainer.steps=3", "trainer.resume=true")  # 2 FSDP2 processes -> 1
    info = _info(part)
    assert (info["steps"], info["step_idx"], info["sharded"]) == (1, 3, False)
    saved2 = _saved(part, 2, tmp_path)
    assert all(s["step"].item() == 4.0 for s in saved2["optim"]["state"].values())  # 2 steps x 2 mini-batches
    _assert_loaded_exactly(torch.load(part / "loaded.pt", weights_only=False), saved2)
    ckpt.reseed_global(0, 2, 0)
    assert torch.equal(torch.load(part / "rng_rank0.pt"), torch.get_rng_state())
    assert json.loads((ckpt.checkpoint_root(part) / "step_000003" / "trainer_state.json").read_text())["checkpoint"] == {
        "format": ckpt.FORMAT, "world_size": 1, "sharded": False, "seed": 0}

    _fsdp(part, *COMMON, "trainer.steps=4", "trainer.resume=true")  # 1 process -> 2 FSDP2 processes
    infos = [_info(part, r) for r in (0, 1)]
    assert [(i["steps"], i["step_idx"], i["sharded"], i["param_type"]) for i in infos] == [(1, 4, True, "DTensor")] * 2
    _assert_loaded_exactly(torch.load(part / "loaded.pt", weights_only=False), _saved(part, 3, tmp_path))
    for r in (0, 1):
        ckpt.reseed_global(0, 3, r)
        assert torch.equal(torch.load(part / f"rng_rank{r}.pt"), torch.get_rng_state()), r
    shards = sorted(p.name for p in (ckpt.checkpoint_root(part) / "step_000004" / "state" / ckpt.DCP_DIR).glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]

    _assert_close_weights(_export(full, 4), _export(part, 4))
    want, got = _info(full)["history"][3], infos[0]["history"][-1]
    assert want["reward/mean"] == got["reward/mean"]  # the same samples at step 4
    for k in ("actor/pg_loss", "actor/kl_loss", "actor/lr"):
        assert math.isclose(want[k], got[k], rel_tol=1e-4, abs_tol=1e-6), k

    _ddp(part, *COMMON, "trainer.steps=5", "trainer.resume=true")  # 2 FSDP2 processes -> 2 DDP processes
    info = _info(part)
    assert (info["steps"], info["step_idx"], info["sharded"]) == (1, 5, False) and "MULTI_CPU" in info["distributed_type"]
    _assert_loaded_exactly(torch.load(part / "loaded.pt", weights_only=False), _saved(part, 4, tmp_path))
    state = ckpt.checkpoint_root(part) / "step_000004" / "state"
    for r in (0, 1):  # the same process count: each process's RNG as it saved it
        saved_rng = torch.load(state / f"random_states_{r}.pkl", weights_only=False)["torch"]
        assert torch.equal(torch.load(part / f"rng_rank{r}.pt"), saved_rng), r
    _assert_close_weights(_export(full, 5), _export(part, 5))


@pytest.mark.slow
def test_ddp_two_processes_resume_on_one(tmp_path):
    """3 DDP steps straight; the run stopped after step 2 and resumed on one process: the whole
    replicas' state loads exactly, and step 3 equals the uninterrupted run's within (ATOL, RTOL)."""
    full = tmp_path / "full"
    _ddp(full, *COMMON, "trainer.steps=3")
    assert "MULTI_CPU" in _info(full)["distributed_type"]
    part = _stopped_after(full, tmp_path / "part", 2)
    _one(part, *COMMON, "trainer.steps=3", "trainer.resume=true")
    assert (_info(part)["steps"], _info(part)["step_idx"]) == (1, 3)
    _assert_loaded_exactly(torch.load(part / "loaded.pt", weights_only=False), _saved(part, 2, tmp_path))
    _assert_close_weights(_export(full, 3), _export(part, 3))


# --------------------------------------------------------------------------- fast: one process, refusals, explorer, wandb


def _train_state(tr) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(*ckpt._stateful(tr.acc))
    return {"model": {k: v.detach().clone() for k, v in model_sd.items()}, "optim": optim_sd}


def test_critic_and_bf16_moments_round_trip_exactly(tmp_path, one_thread):
    """gae (policy + critic under one optimizer, two param groups) with bf16 AdamW moments: a resume
    loads both models' weights and every moment bit for bit, and keeps the moments in bf16."""
    from test_trainer import make_trainer

    common = ("algo.adv_estimator=gae", "trainer.optimizer_state_dtype=bfloat16", "trainer.steps=1")
    first = make_trainer(tmp_path, *common)
    first.train()
    want = _train_state(first)
    resumed = make_trainer(tmp_path, *common, "trainer.resume=true")
    assert resumed.resume() and resumed.step_idx == 1
    got = _train_state(resumed)
    assert any(k.startswith("critic.") for k in want["model"]) and len(want["optim"]["param_groups"]) == 2
    _assert_loaded_exactly(got, want)
    assert {s["exp_avg"].dtype for s in got["optim"]["state"].values()} == {torch.bfloat16}


def _fake_run(out: Path, *, world: int, sharded: bool, old_format: bool = False, batch_size: int = 8) -> Path:
    """A run directory with a config and one intact checkpoint written by ``world`` processes."""
    from rexrag.config import load_config
    from rexrag.train import rundir

    rundir.save_config(out, load_config(None, [f"trainer.out_dir={out}", f"data.batch_size={batch_size}"]))
    d = ckpt.checkpoint_root(out) / "step_000002"
    (d / "state").mkdir(parents=True)
    state = {"step": 2, "data": {"consumed": 16}, "nan_skips": 0}
    if old_format:
        for r in range(world):
            (d / "state" / f"random_states_{r}.pkl").write_bytes(b"x")
        (d / "state" / ("pytorch_model_fsdp_0" if sharded else "pytorch_model.bin")).mkdir()
    else:
        state["checkpoint"] = {"format": ckpt.FORMAT, "world_size": world, "sharded": sharded, "seed": 0}
    (d / "trainer_state.json").write_text(json.dumps(state))
    ckpt.write_manifest(d, 2)
    return out


@pytest.mark.parametrize(("world", "old_format", "match"), [
    (3, False, r"cannot resume .*step_000002 \(written by 2 processes \(FSDP\)\) on 3 processes: data.batch_size=8 is not "
               r"divisible by 3 .*\(e.g. 2\)"),
    (1, True, r"cannot resume .*step_000002 on 1 process: it was written by 2 processes \(FSDP\) through accelerate's "
              r"save_state .*resume it on that launch"),
])
def test_resume_that_cannot_reshard_stops_with_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys, world,
                                                                               old_format, match):
    import rexrag.commands.train as train_cmd
    from rexrag.cli import main

    out = _fake_run(tmp_path / "run", world=2, sharded=True, old_format=old_format)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(train_cmd, "build_trainer", lambda *a, **k: pytest.fail("a model was about to load"))
    assert main(["train", "--resume", f"trainer.out_dir={out}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rexrag train: error: cannot resume"), err
    import re

    assert re.search(match, err[0]), err[0]


def test_new_format_reshards_to_any_count_and_old_format_only_to_its_own(tmp_path):
    new = _fake_run(tmp_path / "new", world=2, sharded=True) / "checkpoints" / "step_000002"
    old = _fake_run(tmp_path / "old", world=2, sharded=True, old_format=True) / "checkpoints" / "step_000002"
    for world, sharded in ((1, False), (2, False), (2, True), (4, True)):
        assert ckpt.reshard_problem(new, world=world, sharded=sharded, batch_size=8) is None
    assert ckpt.reshard_problem(old, world=2, sharded=True, batch_size=8) is None
    assert "written by 2 processes (FSDP) through accelerate" in ckpt.reshard_problem(old, world=2, sharded=False, batch_size=8)
    assert ckpt.saved_layout(old) == {"format": 1, "world_size": 2, "sharded": True}


def test_explorer_state_on_another_process_count_takes_rho_and_reseeds_by_rank_and_step():
    from test_rex_explorer import _explorer

    class Acc:
        def __init__(self, n, r):
            self.num_processes, self.process_index = n, r

    saved = []
    for rank in (0, 1):  # what two processes saved: the same rho, their own RNG
        ex = _explorer()
        ex.ratio.rho = 0.31
        ex.rng.seed(100 + rank)
        saved.append(ex.state_dict())
    draws = {}
    for n, r, step in ((1, 0, 2), (1, 0, 2), (1, 0, 3), (3, 2, 2)):
        ex = _explorer()
        ckpt.PerProcessState(ex, Acc(n, r)).load_resharded({"per_process": saved}, ckpt.derived_seed(0, step, r, "explorer"))
        assert ex.ratio.rho == 0.31
        draws.setdefault((r, step), []).append([ex.rng.random() for _ in range(3)])
    assert draws[(0, 2)][0] == draws[(0, 2)][1]  # deterministic
    assert len({tuple(v[0]) for v in draws.values()}) == 3  # another step or rank: another stream
    ex = _explorer()
    ckpt.PerProcessState(ex, Acc(2, 1)).load_resharded({"per_process": saved}, 0)  # same count: its own state back
    want = _explorer()
    want.rng.seed(101)
    assert ex.rng.getstate() == want.rng.getstate()


class _FakeWandb:
    """Records ``wandb.init``'s arguments; runs get ids run-1, run-2, ... unless one is given."""

    def __init__(self):
        self.inits: list[dict] = []
        self.logged: list[tuple[dict, int]] = []

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            id = kw.get("id") or f"run-{len(fake.inits)}"

            def log(self, metrics, step=None):
                fake.logged.append((metrics, step))

            def finish(self):
                pass

        return Run()


def test_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    from rexrag.train.logging import MetricsLogger

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=fake.init))
    kw = dict(tensorboard=False, wandb_project="proj", progress=False, config={"a": 1})
    log = MetricsLogger(tmp_path, **kw)
    log.log(1, {"reward/mean": 0.5})
    log.close()
    assert fake.inits[0]["project"] == "proj" and "id" not in fake.inits[0]
    assert json.loads((tmp_path / "wandb.json").read_text())["id"] == "run-1"
    MetricsLogger(tmp_path, resume_step=1, **kw).close()  # resume: the same run
    assert fake.inits[1]["id"] == "run-1" and fake.inits[1]["resume"] == "allow" and fake.inits[1]["project"] == "proj"
    assert fake.inits[1]["allow_val_change"]  # trainer.resume (and maybe trainer.steps) differ from the first launch
    MetricsLogger(tmp_path, **kw).close()  # a fresh run (after --overwrite): a new wandb run
    assert "id" not in fake.inits[2]
    assert json.loads((tmp_path / "wandb.json").read_text())["id"] == "run-3"
    MetricsLogger(tmp_path, resume_step=1, **{**kw, "wandb_project": "other"}).close()  # project changed on resume
    assert fake.inits[3]["project"] == "other" and "id" not in fake.inits[3]
    assert fake.logged == [({"reward/mean": 0.5}, 1)]
