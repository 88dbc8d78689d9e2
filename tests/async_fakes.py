"""Worker factories for tests/test_async_rollout.py (``rexrag.train.async_worker`` imports them by dotted path in
the worker process; tests/ is on its PYTHONPATH). Faults are injected through the environment the worker
inherits: ``REXRAG_TEST_WORKER_DELAY`` (seconds slept before each batch) and ``REXRAG_TEST_WORKER_DIE`` (the
worker process exits abruptly when it is handed its N-th batch, 1-based) and ``REXRAG_TEST_WORKER_HANG`` (it stops
itself with SIGSTOP there: alive, connected, silent)."""

from __future__ import annotations

import os
import signal
import time

import torch

from rexrag.train.async_worker import AgentRollout, copy_weights


class _Faults:
    """Wraps a ``WorkerRollout`` with the injected delay and death."""

    def __init__(self, inner):
        self.inner, self.batches = inner, 0
        self.delay = float(os.environ.get("REXRAG_TEST_WORKER_DELAY", "0"))
        self.die = int(os.environ.get("REXRAG_TEST_WORKER_DIE", "0"))
        self.hang = int(os.environ.get("REXRAG_TEST_WORKER_HANG", "0"))

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def rollout(self, examples, n):
        self.batches += 1
        if self.die and self.batches >= self.die:
            os._exit(3)  # no goodbye: as a killed process
        if self.hang and self.batches >= self.hang:
            os.kill(os.getpid(), signal.SIGSTOP)  # frozen, connection open: as a machine gone silent
        time.sleep(self.delay)
        return self.inner.rollout(examples, n)


class ToyWorkerRollout:
    """tests/toy_rl.py's single-turn sampler on the worker's own toy model, seeded per batch."""

    dtype = "float32"

    def __init__(self):
        from toy_rl import ToyRollout, toy_model

        self.model = toy_model()
        self.sampler, self.gen, self.last_metrics = ToyRollout(self.model), torch.Generator(), {}

    def load_weights(self, pairs):
        copy_weights(self.model, pairs)

    def reseed(self, seed):
        self.gen.manual_seed(seed)

    def rollout(self, examples, n):
        from toy_rl import prompt_ids, toy_trajectories

        prompts = [prompt_ids(ex) for ex in examples]
        toks, lps = self.sampler._sample(prompts, n, self.gen)
        return toy_trajectories(examples, prompts, toks, lps, n)


def build_toy(cfg, rank, device):
    return _Faults(ToyWorkerRollout())


def build_tiny_hf(cfg, rank, device):
    """The shipped ``AgentRollout`` over the HF loop on the conftest's tiny Llama and a fake retriever."""
    from _rollout_fakes import FakeRetriever

    from rexrag.models import load_tokenizer, tiny_llama
    from rexrag.rollout.agent import SearchAgent
    from rexrag.rollout.backends import build_backend

    tok = load_tokenizer("smollm2-135m")
    model = tiny_llama(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       seed=123)  # a different init: the first weight push must overwrite it
    backend = build_backend("hf", model, tok, cfg.rollout, device="cpu", seed=0)
    return _Faults(AgentRollout(SearchAgent(backend, tok, FakeRetriever(), cfg.rollout, topk=2), model))


def build_rex_scripted(cfg, rank, device):
    """tests/test_rex_integration.py's scripted agent, tiny scorer and reward, with REX-RAG's explorer."""
    from _rollout_fakes import FakeRetriever, ScriptedBackend
    from fake_tokenizer import FakeTokenizer
    from test_rex_integration import SCRIPT, em_reward

    from rexrag.models import tiny_llama
    from rexrag.rex.explorer import RexExplorer
    from rexrag.rollout.agent import SearchAgent

    tok = FakeTokenizer()
    agent = SearchAgent(ScriptedBackend(tok, SCRIPT), tok, FakeRetriever(), cfg.rollout,
                        format_fn=lambda ps: " ".join(p.text for p in ps))
    model = tiny_llama(len(tok), hidden=32, layers=2, heads=2, seed=5, pad_token_id=0, eos_token_id=3, bos_token_id=1)
    return AgentRollout(agent, model, explorer=RexExplorer(cfg.rex, cfg.rollout, tok, None, seed=0), reward=em_reward,
                        tokenizer=tok)
