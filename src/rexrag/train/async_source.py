"""Asynchronous rollouts with bounded staleness: the trainer's side (``rollout.mode=one_step_off|async``).

Processes. N trainer processes (one, or DDP / FSDP2 as in the synchronous loop), each with ``rollout.workers`` = R
worker processes of its own (:mod:`rexrag.train.async_worker`), each worker with its own engine. A trainer and its
workers form a gloo process group of their own (``rexrag.sharding.Link`` over a ``TCPStore``; the trainer is its
rank 0, the workers 1..R): torch.distributed is what the trainer already uses, it crosses machines, and it needs no
new dependency (Ray is not installed here). On one machine each trainer starts its workers itself
(``python -m rexrag.train.async_worker`` on 127.0.0.1, a free port); with ``rollout.async_address=host:port`` trainer
process t listens on port + t, starts none and waits for workers launched on other machines. Each trainer process
generates its share of every batch (prompts ``rank, rank + N, ...``, as in the synchronous loop), so the trainers
need no traffic of their own beyond today's; a failure on one is agreed by all (``rexrag.sharding.on_all_ranks``).

The bound. Step s trains batch s. Batch j goes to worker ``1 + j % R``; the trainer sends each worker its
commands in one ordered stream, and a worker serves them in that order. At the start of step s (the weights
are then version s: s updates applied) the trainer, for every batch j <= s + k not yet dispatched, first
pushes version s to that batch's worker (unless it has it) and then dispatches batch j. So batch j is
generated with a version v >= j - k, and trained at step j: staleness s - v <= k, whatever the speed of
either side (a worker ahead waits for its next command; a trainer ahead waits for batch s, timed as
``timing/trainer_idle_s``). The trainer also checks it on arrival. k = 0 is the synchronous loop run by a
worker: same prompts, same seeds, same weights, so the same trajectories. ``one_step_off`` is k = 1: the
batch of step s+1 is generated while step s trains. Batches are trained in order (a batch finished early
waits in the queue: ``async/queue_len``): taking a later one first could exceed the bound.

Off-policy rule. Every trajectory carries the version that generated it (``meta["weight_version"]``) and
its engine log-probs; pi_old is recomputed by the trainer on arrival as in the synchronous loop, so the
PPO anchor is pi_old (the proximal policy) and ``algo.rollout_correction`` weights pi_old / pi_engine,
which now includes the staleness (AReaL's decoupled PPO: behaviour = the engine that sampled).

Prompts and resume. Prompts are drawn, at dispatch, from a copy of the trainer's sampler; the trainer's own
sampler advances only when a batch is trained, and that is what checkpoints store. Batches in flight at a
stop are discarded: their prompts were not consumed, so a resumed run draws them again (from the resumed
weights). Nothing is trained twice and no prompt is skipped.

Failure. A worker that dies is noticed at once (its connection closes) or, if it goes silent, after
``rollout.worker_timeout_s`` (a worker sends a heartbeat every min(30 s, timeout / 4) while it generates); the run
ends with one :class:`WorkerError` naming it.

REX-RAG (``rex.enabled``, one trainer process): the worker makes a batch's probes from its originals with the same
weights (candidates, the filter's scores by its own copy of the policy, the continuations), so every token of a
probe comes from the version its originals came from; rho is the trainer's at dispatch (up to k steps behind) and
the probe RNG is seeded per batch, so ``max_staleness=0`` equals the synchronous loop without REX-RAG only. The
trainer's explorer adopts the worker's statistics and recomputes alpha, e and the probes' accuracy on the batch
(``RexExplorer.adopt``) for the correction and rho's update.

Not built yet: REX-RAG across several trainer processes, dynamic sampling, partial rollouts, NCCL weight pushes (weights travel through host memory). Tested
with DDP and with FSDP2 over two CPU processes (FSDP2 gathers every tensor of a push on every process in the same
order; a failed send keeps the gathers running), never on GPUs.
"""

from __future__ import annotations

import copy
import os
import queue
import subprocess
import sys
import threading
import time

from rexrag.errors import EngineError, UserError
from rexrag.train.async_worker import (DEFAULT_FACTORY, JOINED_KEY, TAG_CMD, TAG_RESULT, WORLD_KEY, recv_msg,
                                       send_msg, send_weights)


class WorkerError(EngineError):
    """A rollout worker died, failed or went silent (the message names it)."""


def check_async(cfg, world: int, given: list[str] = (), backend: str | None = None) -> None:
    """Refuse, before any model loads, what the async modes cannot run (one line naming the setting).
    ``given``: objects the caller built in this process (``backend``, ``retriever``), which a worker process
    cannot use (it builds its own from the config). ``backend``: the resolved ``rollout.backend``; one registered
    by the caller's own code rather than shipped with rexrag is unknown to a worker process (which imports rexrag)."""
    ro = cfg.rollout
    if ro.mode == "sync":
        return
    what = f"rollout.mode={ro.mode}"
    if backend is not None:
        from rexrag.rollout.backend_names import BACKENDS

        if not getattr(BACKENDS.get(backend), "__module__", "").startswith("rexrag."):
            raise UserError(f"{what}: rollout.backend={backend} is registered by this process's own code, which a "
                            "rollout worker process does not import; use a shipped backend (hf, vllm) or rollout.mode=sync")
    if given:
        raise UserError(f"{what}: the {' and '.join(given)} built in this process cannot run in a rollout worker "
                        "process, which builds its own from the config (rollout.backend, retrieval.*, trainer.reward); "
                        "use rollout.mode=sync")
    refused = {"data.dynamic_sampling": cfg.data.dynamic_sampling, "trainer.eval_every": cfg.trainer.eval_every > 0,
               f"rex.enabled with {world} trainer processes": cfg.rex.enabled and world > 1}
    for key, on in refused.items():
        if on:
            raise UserError(f"{what} does not run {key} yet (extra sampling rounds, and REX-RAG's batch-wide probe "
                            "filter across trainers, would have to be coordinated between the workers; evaluation needs "
                            "an engine in the trainer): turn it off or use rollout.mode=sync")
    if not ro.async_address:
        import torch

        slots, kind = (torch.cuda.device_count(), "GPUs") if torch.cuda.is_available() else (os.cpu_count() or 1, "CPU cores")
        if world * (1 + ro.workers) > slots:
            raise UserError(f"rollout.workers={ro.workers}: {world} trainer process(es) with {ro.workers} worker "
                            f"process(es) each need {world * (1 + ro.workers)} {kind} on this machine, which has {slots}")


def _lost_link(exc: BaseException) -> bool:
    """A gloo send or receive that failed because the peer's connection went away (not a bug of ours)."""
    text = str(exc)
    return "gloo" in text or "Connection" in text or "Socket" in text


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


class AsyncSource:
    """The trainer's rollout source in the async modes (see the module docstring).

    ``factory``: ``"pkg.module:fn"`` building each worker's ``WorkerRollout`` from the config (default: the
    config's agent, backend and retriever). ``threads``: torch threads per worker (0 = torch's default).
    """

    def __init__(self, cfg, *, factory: str = DEFAULT_FACTORY, threads: int = 0, rank: int = 0, world: int = 1):
        self.cfg, self.factory, self.threads, self.rank, self.world = cfg, factory, threads, rank, world
        self.k, self.R, self.timeout = cfg.rollout.staleness, cfg.rollout.workers, cfg.rollout.worker_timeout_s
        self.link, self.procs, self.pids = None, {}, {}
        self.inbox: queue.Queue = queue.Queue()
        self.results: dict[int, dict] = {}  # step -> a finished batch not trained yet
        self.ready: dict[int, dict] = {}
        self.pushed = dict.fromkeys(range(1, self.R + 1), -1)  # version each worker was last sent
        self.heard = dict.fromkeys(range(1, self.R + 1), time.monotonic())  # last message (or dispatch) per worker
        self.sampler = None  # the dispatch copy of the trainer's sampler (made at the first step)
        self.dispatched: dict[int, list[int]] = {}  # step -> group ids of the prompts sent for it
        self.next_batch, self.closing = 0, False
        self.failed: set[int] = set()  # workers reported dead, failed or silent: not waited for at close
        self.last: dict[str, float] = {}
        self.last_load_s = 0.0  # a worker's last weight load (reported after it)

    # ------------------------------------------------------------------ start and stop

    def start(self) -> AsyncSource:
        """Listen, start the local workers (none with ``rollout.async_address``), wait until all have joined,
        send each the resolved config. Call before the trainer's model loads (workers load theirs meanwhile)."""
        import datetime

        import torch
        import torch.distributed as dist

        from rexrag.config import config_to_dict
        from rexrag.sharding import Link

        address = self.cfg.rollout.async_address
        host, port = (address.rpartition(":")[0], int(address.rpartition(":")[2]) + self.rank) if address else ("127.0.0.1", 0)
        store = dist.TCPStore(host, port, None, True, timeout=datetime.timedelta(seconds=self.timeout),
                              wait_for_workers=False)
        address = f"{host}:{store.port}"
        store.set(WORLD_KEY, str(1 + self.R))
        if not self.cfg.rollout.async_address:
            for r in range(1, self.R + 1):
                self.procs[r] = subprocess.Popen([sys.executable, "-m", "rexrag.train.async_worker", "--address", address,
                                                  "--rank", str(r), "--timeout", str(self.timeout)])
        try:
            self._wait_joined(store, address)
            self.link = Link(store, 0, 1 + self.R, self.timeout)
        except BaseException:
            self.failed.update(self.procs)  # nobody to stop gracefully yet
            self.close()
            raise
        local_gpus = torch.cuda.is_available() and not self.cfg.rollout.async_address
        for r in range(1, self.R + 1):
            threading.Thread(target=self._receive, args=(r,), daemon=True, name=f"rexrag-recv-{r}").start()
            # local GPUs: the trainers hold 0..N-1, trainer t's workers the next R each
            device = (f"cuda:{self.world + self.rank * self.R + r - 1}" if local_gpus
                      else "cuda:0" if torch.cuda.is_available() else "cpu")
            send_msg(self.link, "init", {"config": config_to_dict(self.cfg), "factory": self.factory, "device": device,
                                         "threads": self.threads, "beat_s": min(30.0, self.timeout / 4)}, r, TAG_CMD)
        return self

    def _wait_joined(self, store, address: str) -> None:
        keys = [f"{JOINED_KEY}{r}" for r in range(1, self.R + 1)]
        deadline = time.monotonic() + self.timeout
        while not store.check(keys):
            for r, p in self.procs.items():
                if p.poll() is not None:
                    raise WorkerError(f"rollout worker {r} (pid {p.pid}) exited with status {p.returncode} before joining")
            if time.monotonic() > deadline:
                missing = [r for r, key in enumerate(keys, 1) if not store.check([key])]
                raise UserError(f"rollout workers {missing} did not join the trainer at {address} within "
                                f"rollout.worker_timeout_s={self.timeout:g} s (rollout.workers={self.R}, "
                                f"rollout.async_address={self.cfg.rollout.async_address!r})")
            time.sleep(0.05)
        self.pids = {r: int(store.get(k)) for r, k in enumerate(keys, 1)}

    def close(self) -> None:
        """Stop the workers (in-flight batches are discarded) and reap the local ones."""
        if self.closing:
            return
        self.closing = True
        for r in range(1, self.R + 1):
            try:
                if self.link is not None:
                    send_msg(self.link, "stop", None, r, TAG_CMD)
            except Exception:  # noqa: BLE001,S110 - a dead worker needs no stop
                pass
        for r, p in self.procs.items():
            if r in self.failed:
                p.kill()  # frozen or failing: no graceful stop to wait for
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=30)

    def _receive(self, r: int) -> None:
        """Thread: worker ``r``'s messages into the inbox; ``died`` when its connection ends."""
        try:
            while True:
                kind, body = recv_msg(self.link, r, TAG_RESULT)
                self.inbox.put((r, kind, body))
                if kind == "error":
                    return
        except Exception as exc:  # noqa: BLE001 - the worker ended: an error unless we stopped it
            self.inbox.put((r, "died", _one_line(exc)))

    def _name(self, r: int) -> str:
        return f"rollout worker {r} (pid {self.pids.get(r, '?')})"

    def _fail(self, r: int, message: str) -> WorkerError:
        """The error to raise about worker ``r`` (which ``close`` then kills rather than waits for)."""
        self.failed.add(r)
        return WorkerError(message)

    # ------------------------------------------------------------------ a step

    def sample(self, trainer, examples: list, t: dict) -> tuple[list, list[float], list, dict]:
        """``Trainer.sample`` in the async modes: push and dispatch ahead, take batch ``trainer.step_idx``,
        score it. Returns (trajectories, rewards, REX-RAG's kept probes, the worker's agent metrics). A failure on any
        trainer process is raised on all (naming the process and the worker), so none waits in a collective."""
        from rexrag.sharding import on_all_ranks

        return on_all_ranks(lambda: self._sample(trainer, examples, t), "the async rollouts", WorkerError)

    def _sample(self, trainer, examples: list, t: dict) -> tuple[list, list[float], list, dict]:
        s = trainer.step_idx
        if self.sampler is None:  # the first step (or the first after a resume): batch s was just drawn
            self.sampler = copy.deepcopy(trainer.sampler)
            self.sampler.consumed -= self.cfg.data.batch_size
            self.next_batch = s
        start = time.perf_counter()
        pushed = 0
        for j in range(self.next_batch, s + self.k + 1):
            try:
                pushed += self._dispatch(trainer, j)
            except RuntimeError as exc:
                if not _lost_link(exc):
                    raise
                r = 1 + j % self.R  # the connection is gone: the worker's own report first, if it sent one
                time.sleep(0.5)  # let its receiving thread deliver what the worker said last
                self._drain()
                raise self._fail(r, f"{self._name(r)} died (the trainer was sending it batch {j}): {_one_line(exc)}") from None
        t["weight_push"] = t.get("weight_push", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        res = self._wait(s)
        t["trainer_idle"] = t.get("trainer_idle", 0.0) + time.perf_counter() - start
        if self.dispatched.pop(s) != [ex.group_id for ex in examples]:
            raise RuntimeError(f"batch {s} came back for other prompts than the trainer drew for step {s}")
        probes = res.get("probes") or []
        staleness = [s - tr.meta["weight_version"] for tr in res["trajs"] + probes]
        if max(staleness, default=0) > self.k or min(staleness, default=0) < 0:
            raise RuntimeError(f"batch {s} was generated with weight version {res['version']}: staleness "
                               f"{max(staleness)} outside [0, rollout.max_staleness={self.k}]")
        self._drain()  # so that the queue length counts what finished during the last update
        start = time.perf_counter()
        rewards = trainer.compute_rewards(res["trajs"])
        if trainer.explorer is not None:  # the worker's exploration of this batch, adopted for correct / end_step
            if res.get("rex_metrics") is None:
                raise RuntimeError(f"batch {s} came back without REX-RAG's exploration (rex.enabled)")
            if probes:
                trainer.compute_rewards(probes)  # meta['reward'] by the trainer's own reward
            trainer.explorer.adopt(res["trajs"], rewards, probes, res["rex_metrics"])
        t["reward"] = t.get("reward", 0.0) + time.perf_counter() - start
        t["worker_gen"] = res["gen_s"]
        self.last = {"async/staleness_mean": sum(staleness) / max(len(staleness), 1),
                     "async/staleness_max": float(max(staleness, default=0)), "async/queue_len": float(len(self.results)),
                     "async/in_flight": float(self.next_batch - s - 1 - len(self.results)),
                     "async/weight_version": float(res["version"]), "async/worker_idle_s": res["idle_s"],
                     "async/weight_push_gib": pushed / 2**30, "async/worker_load_s": self.last_load_s}
        return res["trajs"], rewards, probes, res["metrics"]

    def _dispatch(self, trainer, j: int) -> int:
        """Batch ``j`` to its worker, after the current weights if it lacks them; returns the bytes pushed."""
        from rexrag.rollout.weights import stream_weights
        from rexrag.train.trainer import rollout_seed

        import torch

        r, s, sent = 1 + j % self.R, trainer.step_idx, 0
        if self.pushed[r] < s:
            self._wait_ready(r)
            dtype = getattr(torch, self.ready[r]["dtype"])
            sent = send_weights(self.link, stream_weights(trainer.acc.unwrap_model(trainer.model), dtype), s, r)
            self.pushed[r] = s
        examples = [trainer.examples[i] for i in self.sampler.next_batch()[self.rank :: self.world]]  # this process's share
        seed = rollout_seed(trainer.tc.seed, j, 0, trainer.rank)  # what the synchronous trainer would use at step j
        self.dispatched[j] = [ex.group_id for ex in examples]
        explorer = trainer.explorer  # REX-RAG: the worker makes the probes; rho as of now (the trainer's keeps it)
        send_msg(self.link, "batch", {"step": j, "examples": examples, "n": self.cfg.rollout.n, "seed": seed,
                                      "explore": explorer is not None,
                                      "rho": explorer.ratio.rho if explorer is not None else None}, r, TAG_CMD)
        self.heard[r] = max(self.heard[r], time.monotonic())
        self.next_batch = j + 1
        return sent

    def _wait_ready(self, r: int) -> None:
        while r not in self.ready:
            self._poll(r, "start-up")

    def _wait(self, s: int) -> dict:
        while s not in self.results:
            self._poll(1 + s % self.R, f"batch {s}")
        return self.results.pop(s)

    def _poll(self, r: int, what: str) -> None:
        """Take one message (or time out briefly); raise :class:`WorkerError` when worker ``r``, which the trainer
        is waiting for (``what``), or any other worker has died, failed or been silent too long."""
        try:
            src, kind, body = self.inbox.get(timeout=0.2)
        except queue.Empty:
            for q, p in self.procs.items():
                if p.poll() is not None:
                    raise self._fail(q, f"{self._name(q)} exited with status {p.returncode} (the trainer was waiting "
                                        f"for {what})") from None
            silent = time.monotonic() - self.heard[r]
            if silent > self.timeout:
                raise self._fail(r, f"{self._name(r)} sent nothing for {silent:.0f} s while the trainer waited for {what} "
                                    f"(rollout.worker_timeout_s={self.timeout:g})") from None
            return
        self._handle(src, kind, body, what)

    def _drain(self) -> None:
        """Handle every message already here (results that finished while the trainer was busy)."""
        while True:
            try:
                src, kind, body = self.inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(src, kind, body, "the next batch")

    def _handle(self, src: int, kind: str, body, what: str) -> None:
        self.heard[src] = time.monotonic()
        if kind == "result":
            self.results[body["step"]] = body
        elif kind == "ready":
            self.ready[src] = body
        elif kind == "beat":  # alive (``heard`` is all a heartbeat updates)
            pass
        elif kind == "loaded":
            self.last_load_s = body["load_s"]
        elif kind in ("error", "died"):
            raise self._fail(src, f"{self._name(src)} {'failed' if kind == 'error' else 'died'} (the trainer was "
                                  f"waiting for {what}): {body}")
