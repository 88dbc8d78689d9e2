"""Async rollouts with bounded staleness (rexrag.train.async_source / async_worker): bad input, the k = 0 path
equal to the synchronous loop, the bound under a slow trainer and slow workers, a dying worker, resume with
batches in flight, and the off-policy weights of a stale batch in closed form.

Each multi-process test starts real worker processes (``python -m rexrag.train.async_worker`` on 127.0.0.1,
tests/async_fakes.py building their rollouts) and bounds them: every run is timed, ``AsyncSource.close`` reaps
the workers (killing one that does not stop within 30 s), and the fixture below closes any source a test left open.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rexrag.algos.rollout_correction import rollout_correction
from rexrag.config import load_config
from rexrag.data import PromptSampler
from rexrag.errors import ConfigError, UserError
from rexrag.train.async_source import AsyncSource, WorkerError, check_async
from rexrag.train.trainer import Trainer
from toy_rl import ToyRollout, early_target_reward, toy_config, toy_examples, toy_model, toy_tokenizer

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def worker_env(monkeypatch):
    """Worker processes import tests/async_fakes.py; no fault unless a test sets one. Yields a list the test
    appends its sources to: they are closed (workers reaped) whatever happens."""
    monkeypatch.setenv("PYTHONPATH", str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.delenv("REXRAG_TEST_WORKER_DELAY", raising=False)
    monkeypatch.delenv("REXRAG_TEST_WORKER_DIE", raising=False)
    monkeypatch.delenv("REXRAG_TEST_WORKER_HANG", raising=False)
    sources: list[AsyncSource] = []
    yield sources
    for s in sources:
        s.close()
        assert all(p.poll() is not None for p in s.procs.values()), "a worker process outlived its source"


def _toy_trainer(tmp_path, sources, *overrides, model=None):
    cfg = toy_config(tmp_path, "rollout.worker_timeout_s=60", *overrides)
    model = model if model is not None else toy_model()
    tr = Trainer(cfg, model, toy_tokenizer(), toy_examples(), rollout_fn=ToyRollout(model), reward_fn=early_target_reward,
                 progress=False)
    source = AsyncSource(cfg, factory="async_fakes:build_toy", threads=1)
    sources.append(source)
    tr.rollout_source = source.start()
    return tr


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, match", [
    (["rollout.max_staleness=-1"], "rollout.max_staleness must be >= 0"),
    (["rollout.mode=fast"], "rollout.mode='fast' is not allowed"),
    (["rollout.max_staleness=2"], "needs rollout.mode=async"),
    (["rollout.mode=one_step_off", "rollout.max_staleness=2"], "one_step_off is at most 1 step off"),
    (["rollout.mode=async", "rollout.workers=0"], "rollout.workers must be >= 1"),
    (["rollout.mode=async", "rollout.workers=4"], r"rollout.workers=4 exceeds rollout.max_staleness \+ 1 = 3"),
    (["rollout.workers=2"], "need rollout.mode=one_step_off or async"),
    (["rollout.mode=async", "rollout.async_address=nohost"], "must be host:port"),
])
def test_bad_async_settings_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_cli_refuses_bad_async_input_with_exit_2_before_any_model_loads(tmp_path, capsys):
    from rexrag.cli import main

    code = main(["train", f"trainer.out_dir={tmp_path}", "rollout.mode=async", "rollout.max_staleness=-3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "rollout.max_staleness must be >= 0" in err[0]


@pytest.mark.parametrize("overrides, world, given, match", [
    (["rex.enabled=true"], 2, [], "does not run rex.enabled with 2 trainer processes"),
    (["rex.enabled=true"], 1, ["reward_fn"], "the reward_fn built in this process cannot run in a rollout worker"),
    (["data.dynamic_sampling=true"], 1, [], "does not run data.dynamic_sampling"),
    ([], 2, [], r"2 trainer process\(es\) with 1 worker process\(es\) each need 4 CPU cores"),
    ([], 1, ["backend"], "the backend built in this process cannot run in a rollout worker"),
    (["rollout.mode=async", "rollout.workers=3", "rollout.max_staleness=4"], 1, [], r"rollout.workers=3: 1 trainer process\(es\) with 3 worker process\(es\) each need 4 CPU cores"),
])
def test_async_refuses_what_it_cannot_run(overrides, world, given, match, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8 if "rex" in str(overrides) else 2)
    cfg = load_config(None, ["rollout.mode=one_step_off", *overrides])
    with pytest.raises(UserError, match=match):
        check_async(cfg, world, given)


def test_async_refuses_a_backend_registered_by_the_callers_code():
    from rexrag.rollout.backend_names import BACKENDS

    BACKENDS.add("mine_for_async_test", lambda *a, **kw: None)
    try:
        cfg = load_config(None, ["rollout.mode=one_step_off", "rollout.backend=mine_for_async_test"])
        with pytest.raises(UserError, match="rollout.backend=mine_for_async_test is registered by this process"):
            check_async(cfg, 1, [], "mine_for_async_test")
        check_async(cfg, 1, [], "hf")  # a shipped one is fine
    finally:
        BACKENDS.remove("mine_for_async_test")


def test_async_runs_rex_with_one_trainer_process():
    check_async(load_config(None, ["rollout.mode=one_step_off", "rex.enabled=true"]), 1, [])  # no error


def _free_port() -> int:
    import socket

    with socket.socket() as s:  # free now; nobody listens on it
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workers_that_never_join_end_the_start_naming_the_settings(tmp_path):
    cfg = toy_config(tmp_path, "rollout.mode=one_step_off", f"rollout.async_address=127.0.0.1:{_free_port()}",
                     "rollout.worker_timeout_s=0.5")
    start = time.monotonic()
    with pytest.raises(UserError, match=r"rollout workers \[1\] did not join .* rollout.worker_timeout_s=0.5"):
        AsyncSource(cfg).start()
    assert time.monotonic() - start < 10


def test_a_worker_started_by_hand_joins_a_trainer_at_its_address(tmp_path, worker_env):
    """Across machines, simulated on localhost: the trainer (``rollout.async_address``) starts no worker; one
    launched by hand with only the address and its rank gets the config from the trainer, generates every batch
    within the bound, and exits 0 when the trainer stops it."""
    port = _free_port()
    worker = subprocess.Popen([sys.executable, "-m", "rexrag.train.async_worker", "--address", f"127.0.0.1:{port}",
                               "--rank", "1", "--timeout", "60"])
    try:
        tr = _toy_trainer(tmp_path, worker_env, "rollout.mode=one_step_off", f"rollout.async_address=127.0.0.1:{port}",
                          "trainer.steps=3")
        assert tr.rollout_source.procs == {}  # nothing started by the trainer
        hist = tr.train()
        assert len(hist) == 3 and _staleness(hist) == [0.0, 1.0, 1.0]
        tr.rollout_source.close()
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_a_worker_that_cannot_reach_the_trainer_says_so_in_one_line_exit_2():
    port = _free_port()
    res = subprocess.run([sys.executable, "-m", "rexrag.train.async_worker", "--address", f"127.0.0.1:{port}", "--rank",
                          "1", "--timeout", "1"], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and f"cannot reach the trainer at 127.0.0.1:{port}" in lines[0]


# --------------------------------------------------------------------------- the off-policy weights of a stale batch


def test_stale_batch_importance_weights_equal_the_closed_form():
    """Tokens sampled by version v, trained after one update (version v+1): token_tis weights are
    min(pi_{v+1}(y) / pi_v(y), C) computed straight from the two models' softmaxes; seq_tis the product."""
    from rexrag.models import sequence_logprobs

    torch.manual_seed(0)
    stale, fresh = toy_model(seed=0), toy_model(seed=0)
    with torch.no_grad():  # one "update": a small perturbation of every weight
        for p in fresh.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(1, 16, (3, 7))
    ids[:, 0] = 5
    am = torch.ones_like(ids)
    sampled = torch.zeros_like(ids, dtype=torch.bool)
    sampled[:, 2:] = True  # the first two tokens are the prompt

    def by_hand(model):  # log softmax of the logits at t-1, read at y_t; 0 at position 0
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        out = torch.zeros(ids.shape)
        out[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        return out

    engine, old = by_hand(stale), by_hand(fresh)
    assert torch.allclose(sequence_logprobs(fresh, ids, am), old, atol=1e-5)  # the trainer's pi_old is this
    for mode, cap in (("token_tis", 1.05), ("seq_tis", 3.0)):
        cfg = load_config(None, [f"algo.rollout_correction={mode}", f"algo.rollout_correction_cap={cap}"]).algo
        w, keep, _ = rollout_correction(old, engine, sampled, sampled.float(), torch.zeros(3, dtype=torch.bool), cfg)
        ratio = torch.where(sampled, (old - engine).exp(), torch.ones_like(old))
        want = ratio.clamp(max=cap) if mode == "token_tis" else ratio.prod(-1, keepdim=True).clamp(max=cap).expand_as(old)
        assert torch.allclose(w, want, rtol=1e-5) and bool((keep == 1).all())
        assert not torch.allclose(ratio, torch.ones_like(ratio))  # the batch really is stale


# --------------------------------------------------------------------------- processes


def _record(trainer) -> list[list[tuple[int, ...]]]:
    """Every step's trajectories (token ids), as the reward sees them."""
    seen, compute = [], trainer.compute_rewards

    def recording(trajs):
        seen.append([tuple(t.token_ids) for t in trajs])
        return compute(trajs)

    trainer.compute_rewards = recording
    return seen


@pytest.mark.slow
def test_one_step_off_with_bound_zero_equals_sync_on_a_tiny_hf_model(tmp_path, worker_env, smol_tokenizer):
    """Same seeds, same prompts, same weights: the worker's trajectories are the synchronous trainer's, token
    for token, and so are the trained weights."""
    from _rollout_fakes import FakeRetriever

    from rexrag.models import tiny_llama
    from rexrag.rollout.agent import SearchAgent
    from rexrag.rollout.backends import build_backend
    from colocate_worker import examples

    base = [f"trainer.out_dir={tmp_path}", "rollout.backend=hf", "rollout.engine_dtype=float32", "rollout.n=2",
            "rollout.max_turns=1", "rollout.max_new_tokens_per_turn=8", "rollout.max_total_tokens=384", "data.batch_size=2",
            "trainer.steps=3", "trainer.lr=0.05", "trainer.mini_batch_size=4", "trainer.micro_batch_size=4",
            "algo.kl_coef=0.0", "trainer.log_tensorboard=false", "retrieval.index=unused", "rollout.worker_timeout_s=120"]
    runs = {}
    for mode in ("sync", "one_step_off"):
        cfg = load_config(None, base + [f"trainer.out_dir={tmp_path / mode}"]
                          + (["rollout.mode=one_step_off", "rollout.max_staleness=0"] if mode != "sync" else []))
        tok = smol_tokenizer
        model = tiny_llama(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        agent = SearchAgent(build_backend("hf", model, tok, cfg.rollout, device="cpu", seed=0), tok, FakeRetriever(),
                            cfg.rollout, topk=2)
        tr = Trainer(cfg, model, tok, examples(), agent=agent, reward_fn=lambda c, a, **kw: [len(set(x)) / 10 for x in c],
                     progress=False)
        if mode != "sync":
            source = AsyncSource(cfg, factory="async_fakes:build_tiny_hf", threads=1)
            worker_env.append(source)
            tr.rollout_source = source.start()
        seen = _record(tr)
        hist = tr.train()
        runs[mode] = (seen, {n: p.detach().clone() for n, p in model.named_parameters()}, hist)
    (sync_seen, sync_w, _), (off_seen, off_w, off_hist) = runs["sync"], runs["one_step_off"]
    assert len(sync_seen) == 3 and off_seen == sync_seen
    assert len({s for step in sync_seen for s in step}) > 4  # really sampled, not one repeated answer
    for n in sync_w:
        assert torch.equal(sync_w[n], off_w[n]), n
    assert [m["async/staleness_max"] for m in off_hist] == [0.0, 0.0, 0.0]


def _staleness(hist) -> list[float]:
    return [m["async/staleness_max"] for m in hist]


@pytest.mark.slow
def test_bound_holds_under_a_slow_trainer(tmp_path, worker_env):
    """The trainer is slower than the worker: the pipeline fills and every batch is exactly k versions old
    once it can be, never more."""
    tr = _toy_trainer(tmp_path, worker_env, "rollout.mode=async", "rollout.max_staleness=2", "trainer.steps=6")
    update = tr.update

    def slow_update(*a, **kw):
        time.sleep(0.4)
        return update(*a, **kw)

    tr.update = slow_update
    hist = tr.train()
    assert _staleness(hist) == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert all(m["async/staleness_mean"] <= 2 for m in hist)
    assert max(m["async/queue_len"] for m in hist) >= 1  # finished batches waited for the trainer


@pytest.mark.slow
def test_bound_holds_under_slow_workers(tmp_path, worker_env, monkeypatch):
    """Two slow workers: the trainer waits (idle) and the bound still holds."""
    monkeypatch.setenv("REXRAG_TEST_WORKER_DELAY", "0.6")
    tr = _toy_trainer(tmp_path, worker_env, "rollout.mode=async", "rollout.max_staleness=2", "rollout.workers=2",
                      "trainer.steps=5")
    hist = tr.train()
    assert max(_staleness(hist)) <= 2 and len(hist) == 5
    assert sum(m["timing/trainer_idle_s"] for m in hist[1:]) > 0.5  # it waited for generation
    versions = [m["async/weight_version"] for m in hist]
    assert versions == sorted(versions)  # batches trained in order, each from weights no older than the last's


@pytest.mark.slow
def test_a_dying_worker_ends_the_run_with_one_error_naming_it(tmp_path, worker_env, monkeypatch):
    monkeypatch.setenv("REXRAG_TEST_WORKER_DIE", "3")  # exits abruptly when handed its 3rd batch
    tr = _toy_trainer(tmp_path, worker_env, "rollout.mode=one_step_off", "trainer.steps=6")
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"rollout worker 1 \(pid \d+\) (died|exited)") as info:
        tr.train()
    assert time.monotonic() - start < 60
    assert "batch" in str(info.value) and tr.step_idx == 2  # two steps trained, then the error


@pytest.mark.slow
def test_a_silent_worker_times_out_but_a_slow_one_does_not(tmp_path, worker_env, monkeypatch):
    """A frozen worker (connection open, no heartbeat) ends the run within about rollout.worker_timeout_s;
    generating for longer than the timeout is fine while the heartbeat runs."""
    monkeypatch.setenv("REXRAG_TEST_WORKER_DELAY", "4")  # each batch takes longer than the 3 s timeout
    slow = _toy_trainer(tmp_path / "slow", worker_env, "rollout.mode=one_step_off", "rollout.max_staleness=0",
                        "trainer.steps=1", "rollout.worker_timeout_s=3")
    assert len(slow.train()) == 1
    monkeypatch.setenv("REXRAG_TEST_WORKER_DELAY", "0")
    monkeypatch.setenv("REXRAG_TEST_WORKER_HANG", "2")
    tr = _toy_trainer(tmp_path / "hang", worker_env, "rollout.mode=one_step_off", "trainer.steps=4",
                      "rollout.worker_timeout_s=3")
    start = time.monotonic()
    # either the heartbeat's absence, or the trainer's send timing out (gloo then closes the connection)
    with pytest.raises(WorkerError, match=r"rollout worker 1 \(pid \d+\) (sent nothing for \d+ s|died)"):
        tr.train()
    assert time.monotonic() - start < 25  # closing killed the frozen worker instead of waiting for it


@pytest.mark.slow
def test_resume_with_batches_in_flight_trains_every_prompt_once(tmp_path, worker_env):
    """Stopped after 2 steps with batches 2 and 3 in flight (k = 2): they are discarded, their prompts are not
    consumed, and the resumed run trains them: over both runs the trained prompts are exactly the sampler's
    first 4 batches, in order."""
    trained = []

    def run(*overrides):
        tr = _toy_trainer(tmp_path, worker_env, "rollout.mode=async", "rollout.max_staleness=2", "trainer.save_every=1",
                          *overrides)
        sample = tr.rollout_source.sample

        def recording(trainer, examples, t):
            trained.append([ex.group_id for ex in examples])
            return sample(trainer, examples, t)

        tr.rollout_source.sample = recording
        tr.train()
        return tr

    first = run("trainer.steps=2")
    assert first.rollout_source.next_batch == 4  # batches 2 and 3 were dispatched, never trained
    resumed = run("trainer.steps=4", "trainer.resume=true")
    assert resumed.step_idx == 4 and resumed.sampler.consumed == 4 * 8
    fresh = PromptSampler(16, 8, 0, True)
    want = [[toy_examples()[i].group_id for i in fresh.next_batch()] for _ in range(4)]
    assert trained == want


# --------------------------------------------------------------------------- the benchmark's arithmetic


def test_bench_summarises_steps_and_bounds_the_speedup():
    from conftest import load_bench

    bench = load_bench("async_rollout")
    sync = [{"timing/step_s": 10.0, "rollout/trajectories": 8, "reward/mean": 0.5, "timing/gen_s": 6.0,
             "timing/weight_sync_s": 1.0, "timing/reward_s": 0.0, "timing/update_s": 3.0}] * 3
    off = [{"timing/step_s": s, "rollout/trajectories": 8, "reward/mean": 0.5, "timing/trainer_idle_s": idle,
            "async/worker_idle_s": 1.0, "timing/worker_gen_s": 4.0, "async/staleness_max": k}
           for s, idle, k in ((9.0, 5.0, 0), (6.0, 1.0, 1), (6.0, 1.0, 1))]
    a, b = bench.summarize("sync", sync, 40.0), bench.summarize("one_step_off", off, 30.0)
    assert a["traj_per_hour"] == pytest.approx(3600 * 24 / 30) and a["gen_share"] == pytest.approx(0.7)
    assert b["traj_per_hour_steady"] == pytest.approx(3600 * 16 / 12) and b["staleness_steps"] == {"0": 1, "1": 2}
    assert b["trainer_idle_share"] == pytest.approx(7 / 21) and b["worker_idle_share"] == pytest.approx(3 / 15)
    m = bench.speedup_model(a, 0.85)
    assert m["cpu_overlap_bound"] == pytest.approx(1 / 0.7)
    assert m["gpu_overlap_bound"] <= 1.0  # a split of linearly scaling phases never beats time-sharing
    text = bench.markdown({"date": "d", "cpu": "c", "machine": "m", "argv": "", "load_before": 0, "load_after": 0,
                           "runs": [a, b], "model": m})
    assert text.startswith(bench.HEADING) and "| one_step_off | 3 | 24 |" in text and "0: 1, 1: 2" in text


def test_bench_reuses_only_a_run_that_finished_every_step(tmp_path):
    """--reuse keeps a mode's run when its metrics hold every step; an interrupted run is trained again."""
    from conftest import load_bench

    bench = load_bench("async_rollout")
    run = tmp_path / "sync"
    assert not bench.finished(run, 2)  # nothing there
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "timing/step_s": 4.0}) + "\n"
                                       + json.dumps({"step": 1, "eval/em": 0.1}) + "\n")
    assert not bench.finished(run, 2)  # one step of two (an eval line is not a step)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "timing/step_s": 4.0}) + "\n")
    assert bench.finished(run, 2) and bench.steps_for(bench.parse_args(["--trajectories", "16"])) == 2


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_two_trainer_processes_each_with_a_worker(tmp_path, worker_env, layout):
    """DDP or FSDP2 over two gloo processes, a rollout worker each: every process trains its share of every batch
    (the synchronous loop's split), within the bound; DDP's replicas stay equal; FSDP2's weight pushes gather every
    tensor on both processes in step (no hang)."""
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    launch = (["--multi_gpu"] if layout == "ddp"
              else ["--config_file", str(HERE.parent / "configs" / "accelerate" / "cpu_fsdp.yaml")])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(HERE / "async_train_worker.py"), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    sampler = PromptSampler(16, 8, 0, True)
    for step in range(3):
        batch = [toy_examples()[i].group_id for i in sampler.next_batch()]
        assert [r["trained"][step] for r in ranks] == [batch[0::2], batch[1::2]]
    assert all(r["staleness"] == [0.0, 1.0, 1.0] for r in ranks)
    assert all(r["sharded"] == (layout == "fsdp") for r in ranks)  # the launch really was what it says
    assert ranks[0]["params"] == ranks[1]["params"]


@pytest.mark.slow
def test_rex_probes_are_made_by_the_worker_from_originals_of_the_same_version(tmp_path, worker_env):
    """tests/test_rex_integration.py's scripted step (a dead-end group rescued by its probes), generated and
    explored by a worker: the same REX-RAG statistics as the synchronous step, probes of the originals' version,
    and the trainer's correction and rho update run on them."""
    from test_rex_integration import _setup

    trainer, model, explorer = _setup(tmp_path, "rollout.mode=one_step_off", "rollout.max_staleness=0",
                                      "rollout.worker_timeout_s=120")
    source = AsyncSource(trainer.cfg, factory="async_fakes:build_rex_scripted", threads=1)
    worker_env.append(source)
    trainer.rollout_source = source.start()
    seen, correct = [], explorer.correct

    def spy(batch, old, is_probe, probe_start):
        seen.append(is_probe.tolist())
        return correct(batch, old, is_probe, probe_start)

    explorer.correct = spy
    (m,) = trainer.train()
    assert m["rex/probes_made"] == 4 and m["rex/probes_kept"] == 4
    assert m["rex/dead_end_frac"] == 0.5 and m["rex/probe_acc"] == 1.0 and abs(m["rex/alpha"] - 4 / 12) < 1e-9
    assert seen[-1] == [False] * 8 + [True] * 4 and m["async/staleness_max"] == 0.0  # (last: the whole batch)
    assert m["rex/rho"] == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)  # the trainer's rho moved by the probes' accuracy


@pytest.mark.slow
def test_workers_exit_when_their_trainer_is_killed(tmp_path, worker_env):
    """No orphans: a trainer killed outright (no close) leaves workers that notice the lost connection and exit."""
    import signal

    script = (f"import sys, time; sys.path.insert(0, {str(HERE)!r})\n"
              "from toy_rl import toy_config\nfrom rexrag.train.async_source import AsyncSource\n"
              f"cfg = toy_config({str(tmp_path)!r}, 'rollout.mode=async', 'rollout.workers=2', 'rollout.worker_timeout_s=60')\n"
              "s = AsyncSource(cfg, factory='async_fakes:build_toy', threads=1).start()\n"
              "print(' '.join(str(p.pid) for p in s.procs.values()), flush=True)\ntime.sleep(300)\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in trainer.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=30)
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if _running(p)]
    assert not alive, f"workers {alive} outlived their trainer"


def _running(pid: int) -> bool:
    """Alive and not a zombie (the killed trainer's children are reaped by init, maybe later)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_rexrag_train_one_step_off_end_to_end(tmp_path, smol_tokenizer):
    """`rexrag train ... rollout.mode=one_step_off` starts its worker itself: the shipped worker factory builds the
    config's model, BM25 index, HF loop and REX-RAG explorer in the worker; two steps train and checkpoint."""
    from rexrag.cli import main
    from rexrag.models import tiny_llama
    from rexrag.train.logging import read_metrics

    model = tmp_path / "model"
    tok = smol_tokenizer
    tiny_llama(len(tok), hidden=64, seed=3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id).save_pretrained(model)
    tok.save_pretrained(model)
    out = tmp_path / "run"
    rc = main(["train", "--config", str(HERE.parent / "configs" / "demo_cpu.yaml"), "--no-progress", f"trainer.out_dir={out}",
               f"model.name_or_path={model}", "rollout.backend=hf", "rollout.mode=one_step_off", "trainer.steps=2",
               "data.batch_size=2", "rollout.n=2", "rollout.max_turns=1", "rollout.max_new_tokens_per_turn=8",
               "trainer.mini_batch_size=4", "trainer.micro_batch_size=2", "rollout.worker_timeout_s=120"])
    assert rc == 0
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["async/staleness_max"] for r in recs] == [0.0, 1.0] and all("rex/rho" in r for r in recs)
    assert (out / "checkpoints" / "step_000002" / "model" / "config.json").is_file()
