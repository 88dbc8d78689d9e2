"""A rollout worker process of the async modes (``rollout.mode=one_step_off|async``) and the messages it
exchanges with the trainer (:mod:`rexrag.train.async_source` is the trainer's side).

A worker owns a copy of the policy and its own generation engine, agent and retriever, built from the
trainer's resolved config (sent to it when it joins, so the two never disagree). It serves commands in the
order the trainer sent them (that order is what bounds staleness, see ``async_source``):

- ``weights``: a new weight version, streamed tensor by tensor as the colocated sync streams them
  (``rexrag.rollout.weights.stream_weights`` on the trainer) and loaded into the engine (vLLM's
  ``load_weights``; the HF loop copies them into its model by name);
- ``batch``: examples, ``rollout.n`` and a seed; the worker reseeds (the same seed the synchronous trainer
  would use for that step: equal weights and seeds give equal trajectories) and rolls out; with REX-RAG it also
  makes the batch's probes from these originals with the same weights (:meth:`AgentRollout.explore`); it tags
  every trajectory with the weight version that generated all its segments (``meta["weight_version"]``; no
  partial rollouts, so one version per trajectory) and sends them back;
- ``stop``: exit.

A receiving thread takes every command off the wire as it arrives (a weight push completes while the
worker is still generating the previous batch, staged in host memory) and queues it for the serving loop.

Start by hand on another machine (the trainer runs with ``rollout.async_address=host:port``)::

    python -m rexrag.train.async_worker --address host:port --rank k      # k = 1 .. rollout.workers

A worker that cannot reach the trainer prints one line naming the address and exits with status 2 before
any model loads; one that fails later reports the failure to the trainer, whose run ends naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pickle
import queue
import sys
import threading
import time
from typing import Iterable, Protocol

import torch

TAG_CMD, TAG_RESULT = 1, 2  # trainer -> worker, worker -> trainer (each arrives in order)
FOREVER_S = 7 * 24 * 3600.0  # receives that wait for the peer's next message (death still ends them at once)
DEFAULT_FACTORY = "rexrag.train.async_worker:build_agent_rollout"
WORLD_KEY, JOINED_KEY = "rexrag/world", "rexrag/joined/"  # store keys: the group's size, who has connected


# --------------------------------------------------------------------------- messages


def send_msg(link, kind: str, body, dst: int, tag: int) -> None:
    """One message: ``(kind, body)`` pickled (plain Python: examples, trajectories, numbers)."""
    link.send_bytes(pickle.dumps((kind, body)), dst, tag)


def recv_msg(link, src: int, tag: int, timeout_s: float = FOREVER_S) -> tuple[str, object]:
    return pickle.loads(link.recv_bytes(src, tag, timeout_s))


def send_weights(link, pairs: Iterable[tuple[str, torch.Tensor]], version: int, dst: int) -> int:
    """Stream ``(name, tensor)`` pairs to worker ``dst`` as weight version ``version``; returns the bytes sent."""
    sent, failure = 0, None
    try:
        send_msg(link, "weights", version, dst, TAG_CMD)
    except RuntimeError as exc:
        failure = exc
    for name, t in pairs:  # a failed send still runs the whole stream: under FSDP each tensor is a collective
        if failure is not None:
            continue
        try:
            send_msg(link, "tensor", (name, tuple(t.shape), str(t.dtype).removeprefix("torch.")), dst, TAG_CMD)
            link.send_tensor(t, dst, TAG_CMD)
            sent += t.numel() * t.element_size()
        except RuntimeError as exc:
            failure = exc
    if failure is not None:
        raise failure
    send_msg(link, "end", None, dst, TAG_CMD)
    return sent


def _recv_weights(link) -> list[tuple[str, torch.Tensor]]:
    """The tensors after a ``weights`` header, up to its ``end``."""
    out = []
    while True:
        kind, body = recv_msg(link, 0, TAG_CMD)
        if kind == "end":
            return out
        name, shape, dtype = body
        out.append((name, link.recv_tensor(shape, getattr(torch, dtype), 0, TAG_CMD, FOREVER_S)))


# --------------------------------------------------------------------------- what a worker rolls out with


class WorkerRollout(Protocol):
    """What a worker generates with (built by a factory ``fn(cfg, rank, device) -> WorkerRollout``)."""

    last_metrics: dict
    dtype: str  # the dtype the trainer streams the weights in ("float32", "bfloat16", ...)

    def load_weights(self, pairs: list[tuple[str, torch.Tensor]]) -> None: ...
    def reseed(self, seed: int) -> None: ...
    def rollout(self, examples: list, n: int) -> list: ...
    def explore(self, trajs: list, rho: float, seed: int) -> tuple[list, dict]: ...  # REX-RAG's probes (rex.enabled)


def copy_weights(model, pairs: list[tuple[str, torch.Tensor]]) -> None:
    """Copy streamed ``(name, tensor)`` pairs into ``model``'s parameters and buffers by state-dict name."""
    state = model.state_dict()
    unknown = [name for name, _ in pairs if name not in state]
    if unknown:
        raise RuntimeError(f"weights the worker's model does not have: {unknown[:3]}")
    with torch.no_grad():
        for name, t in pairs:
            state[name].copy_(t)


class AgentRollout:
    """The default: a ``SearchAgent`` over this process's backend, retriever and copy of the policy; with an
    ``explorer`` (``rex.enabled``) also REX-RAG's probes (:meth:`explore`), scored and rewarded here."""

    def __init__(self, agent, model, *, explorer=None, reward=None, tokenizer=None, temperature: float = 1.0,
                 score_rows: int = 4):
        from rexrag.rollout.colocate import Colocation

        self.agent, self.model, self.last_metrics = agent, model, {}
        self.explorer, self.reward, self.tokenizer = explorer, reward, tokenizer
        self.temperature, self.score_rows = temperature, max(1, score_rows)
        self.colocation = Colocation(agent.backend)  # reseeding as the trainer's colocated engine is reseeded
        # the dtype the trainer streams weights in: the engine's own (vLLM), else the model's
        self.dtype = agent.backend.dtype if self.colocation.holds_weights else str(next(model.parameters()).dtype)[6:]

    def load_weights(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        if self.colocation.holds_weights:  # vLLM: its in-place loader, as the colocated sync feeds it
            self.agent.backend.load_weights(iter(pairs))
            if self.explorer is not None:  # the probe filter scores with the policy itself, of the same version
                copy_weights(self.model, pairs)
            return
        copy_weights(self.model, pairs)  # the HF loop samples from self.model
        if hasattr(self.agent.backend, "reset_cache"):
            self.agent.backend.reset_cache()  # cached keys/values were computed with the old weights

    def reseed(self, seed: int) -> None:
        self.colocation.reseed(seed)

    def rollout(self, examples: list, n: int) -> list:
        trajs = self.agent.rollout(examples, n)
        self.last_metrics = dict(getattr(self.agent, "last_metrics", None) or {})  # before probes overwrite them
        return trajs

    def explore(self, trajs: list, rho: float, seed: int) -> tuple[list, dict]:
        """(kept probes, the explorer's ``rex/`` statistics) for this batch's originals, made by this worker's
        policy of the version that generated them. The worker keeps no exploration state: rho is the trainer's
        when it dispatched the batch (so it lags by up to max_staleness steps) and the probe RNG is seeded per
        batch; the trainer's explorer keeps rho and adopts the statistics (``RexExplorer.adopt``)."""
        from rexrag.rewards import reward_trajectories

        name = getattr(self.reward, "name", None) or getattr(self.reward, "__qualname__", repr(self.reward))

        def reward(ts: list) -> list[float]:
            return reward_trajectories(self.reward, name, self.tokenizer, ts)

        self.explorer.ratio.rho = float(rho)
        self.explorer.rng.seed(seed)
        probes = self.explorer.explore(trajs, reward(trajs), self.agent, self.score, reward)
        return probes, self.explorer.step_metrics

    @torch.no_grad()
    def score(self, trajs: list) -> list[torch.Tensor]:
        """Per-token log-probs of ``trajs`` under this worker's policy (eval mode, the sampling temperature),
        ``score_rows`` rows a forward: what the trainer's ``score_fn`` gives the filter in the synchronous loop."""
        from rexrag.models import sequence_logprobs
        from rexrag.rollout.trajectory import to_batch

        pad = getattr(self.tokenizer, "pad_token_id", None)
        b = to_batch(trajs, pad if pad is not None else 0)
        device = next(self.model.parameters()).device
        out: list[torch.Tensor] = []
        for i in range(0, len(trajs), self.score_rows):
            ids, am = b["input_ids"][i : i + self.score_rows].to(device), b["attention_mask"][i : i + self.score_rows].to(device)
            lp = sequence_logprobs(self.model, ids, am, temperature=self.temperature).float().cpu()
            out += [lp[j, : len(trajs[i + j])] for j in range(lp.shape[0])]
        return out


def build_agent_rollout(cfg, rank: int, device: str) -> AgentRollout:
    """The config's tokenizer, policy (LoRA merged: the trainer streams merged weights), retriever and
    backend on ``device``. The engine never sleeps here (no update shares this process's memory)."""
    from rexrag.models import load_model, load_tokenizer
    from rexrag.retrieval import load_retriever
    from rexrag.rollout.agent import SearchAgent
    from rexrag.rollout.backends import build_backend

    rollout = dataclasses.replace(cfg.rollout, vllm_sleep_level=0)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    model = load_model(dataclasses.replace(cfg.model, lora_rank=0, gradient_checkpointing=False), device=device)
    if hasattr(model, "merge_and_unload"):  # a LoRA checkpoint as the starting point
        model = model.merge_and_unload()
    model.eval()
    rows = max(1, cfg.data.batch_size) * cfg.rollout.n
    backend = build_backend(cfg.rollout.backend, model, tokenizer, rollout, device=device,
                            seed=cfg.trainer.seed + 7919 * rank, max_batch=rows, load=False)
    agent = SearchAgent(backend, tokenizer, load_retriever(cfg.retrieval), rollout, topk=cfg.retrieval.topk,
                        max_failed_turns=cfg.retrieval.max_failed_turns)
    if not cfg.rex.enabled:
        return AgentRollout(agent, model)
    from rexrag.rewards import build_reward
    from rexrag.rex.explorer import RexExplorer

    explorer = RexExplorer(cfg.rex, cfg.rollout, tokenizer, seed=cfg.trainer.seed, clip_range=(cfg.algo.clip_low, cfg.algo.clip_high))
    return AgentRollout(agent, model, explorer=explorer, reward=build_reward(cfg.trainer.reward), tokenizer=tokenizer,
                        temperature=cfg.rollout.temperature or 1.0,
                        score_rows=cfg.rex.score_micro_batch_size or cfg.trainer.micro_batch_size)


def load_factory(path: str):
    """``"pkg.module:fn"`` -> the function."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------- the worker process


def connect(address: str, rank: int, timeout_s: float):
    """Join the trainer's group at ``address`` as ``rank``; a ``UserError`` naming the address when the
    trainer cannot be reached within ``timeout_s``."""
    import datetime

    import torch.distributed as dist

    from rexrag.errors import UserError
    from rexrag.sharding import Link

    host, _, port = address.rpartition(":")
    try:
        store = dist.TCPStore(host, int(port), None, False, timeout=datetime.timedelta(seconds=timeout_s))
        world = int(store.get(WORLD_KEY))
        store.set(f"{JOINED_KEY}{rank}", str(os.getpid()))
    except (RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"rollout worker {rank}: cannot reach the trainer at {address} (rollout.async_address / "
                        f"--address) within {timeout_s:g} s: {str(exc).splitlines()[0][:200]}") from None
    if not 0 < rank < world:
        raise UserError(f"rollout worker --rank {rank}: the trainer at {address} expects ranks 1..{world - 1} "
                        "(rollout.workers)")
    return Link(store, rank, world, timeout_s)


def _receive(link, inbox: queue.Queue) -> None:
    """Thread: every command into ``inbox`` as it arrives (weights staged whole); ``lost`` if the trainer goes."""
    try:
        while True:
            kind, body = recv_msg(link, 0, TAG_CMD)
            inbox.put((kind, (body, _recv_weights(link)) if kind == "weights" else body))
            if kind == "stop":
                return
    except Exception as exc:  # noqa: BLE001 - the trainer ended or died: the serving loop stops
        inbox.put(("lost", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def _beat(link, every_s: float, stop: threading.Event) -> None:
    """Thread: a heartbeat to the trainer every ``every_s`` seconds, so a long batch is not taken for a lost worker
    (the trainer's ``rollout.worker_timeout_s`` then catches a machine or network gone silent)."""
    while not stop.wait(every_s):
        try:
            send_msg(link, "beat", None, 0, TAG_RESULT)
        except Exception:  # noqa: BLE001 - the trainer is gone: the serving loop hears it too
            return


def serve(link, rollout: WorkerRollout) -> None:
    """Serve the trainer's commands in order until ``stop`` (see the module docstring)."""
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_receive, args=(link, inbox), daemon=True, name="rexrag-worker-recv").start()
    version, idle = -1, 0.0
    while True:
        start = time.perf_counter()
        kind, body = inbox.get()
        idle += time.perf_counter() - start
        if kind in ("stop", "lost"):
            return
        if kind == "weights":
            start = time.perf_counter()
            version, pairs = body
            rollout.load_weights(pairs)
            send_msg(link, "loaded", {"version": version, "load_s": time.perf_counter() - start}, 0, TAG_RESULT)
        elif kind == "batch":
            start = time.perf_counter()
            rollout.reseed(body["seed"])
            trajs = rollout.rollout(body["examples"], body["n"])
            metrics = dict(rollout.last_metrics)
            probes, rex = rollout.explore(trajs, body["rho"], body["seed"]) if body.get("explore") else ([], None)
            for tr in trajs + probes:
                tr.meta["weight_version"] = version
            send_msg(link, "result", {"step": body["step"], "version": version, "trajs": trajs, "probes": probes,
                                      "rex_metrics": rex, "metrics": metrics, "gen_s": time.perf_counter() - start,
                                      "idle_s": idle}, 0, TAG_RESULT)
            idle = 0.0


def run_worker(address: str, rank: int, timeout_s: float) -> int:
    """Connect, build from the trainer's config, serve; a failure after connecting goes to the trainer."""
    from rexrag.config import config_from_dict

    link = connect(address, rank, timeout_s)
    stop = threading.Event()
    try:
        kind, init = recv_msg(link, 0, TAG_CMD, timeout_s)
        # beating from here on: building the engine and every batch may take longer than the trainer's timeout
        threading.Thread(target=_beat, args=(link, float(init.get("beat_s", 30.0)), stop), daemon=True,
                         name="rexrag-worker-beat").start()
        if init.get("threads"):
            torch.set_num_threads(int(init["threads"]))
        cfg = config_from_dict(init["config"])
        rollout = load_factory(init["factory"])(cfg, rank, init["device"])
        send_msg(link, "ready", {"pid": os.getpid(), "dtype": rollout.dtype}, 0, TAG_RESULT)
        serve(link, rollout)
    except Exception as exc:  # noqa: BLE001 - reported to the trainer as one line, then this process fails
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:1000]
        try:
            send_msg(link, "error", reason, 0, TAG_RESULT)
        finally:
            print(f"rollout worker {rank}: {reason}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop.set()
    return 0


def main(argv: list[str] | None = None) -> int:
    from rexrag.errors import UserError

    p = argparse.ArgumentParser(prog="python -m rexrag.train.async_worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="host:port of the trainer (its rollout.async_address)")
    p.add_argument("--rank", type=int, required=True, help="this worker's rank, 1 .. rollout.workers")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the trainer")
    args = p.parse_args(argv)
    try:
        return run_worker(args.address, args.rank, args.timeout)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # not sys.exit: the receiving thread is still blocked inside gloo, and tearing the process group down under it
    # aborts the process ("terminate called without an active exception") instead of exiting with ``code``
    os._exit(code)
