"""Evaluation during training (``trainer.eval_every``): ``data.eval_files`` scored as ``rexrag eval`` scores them.

Every ``eval_every`` steps, and after the last step, the trainer calls :meth:`PeriodicEval.__call__`
after its update: the questions go through the run's own agent settings (template, turns, token limits,
top-k, retriever) greedily, on the trainer's generation backend (the colocated vLLM engine, woken and
given the just-updated weights, then put back to sleep; or the HF loop over the policy itself), data
parallel over the processes as ``rexrag eval`` is (``rexrag.eval.evaluate.run_eval``). The returned
metrics join the step's: ``eval/em``, ``eval/f1``, ``eval/cover_em`` (the unweighted mean over the
datasets), ``eval/n``, per dataset ``eval/<name>/{em,f1,cover_em}`` when there are several, and
``timing/eval_s``; every process gets the same values. The global RNG states (and so the training that
follows) are what they were before the evaluation.

How it compares: verl's ``trainer.test_freq`` (validation every N steps and at the end, greedy, scores
logged under ``val-core/``); here the evaluation is the same code path as ``rexrag eval``, so its
numbers equal a separate ``rexrag eval`` of that step's checkpoint with the run's settings.
"""

from __future__ import annotations

import time

from rexrag.errors import UserError
from rexrag.eval.evaluate import EvalOptions, load_datasets, run_eval
from rexrag.eval.report import AVERAGE, SCORE_KEYS
from rexrag.sharding import gather_objects
from rexrag.train import checkpoint as ckpt


def eval_options(cfg, world: int) -> EvalOptions:
    """The run's rollout settings as greedy ``EvalOptions``: batches of the rows one rollout of a process
    generates (``data.batch_size`` / processes x ``rollout.n``), what the engine is sized for."""
    ro = cfg.rollout
    return EvalOptions(method="agent", topk=cfg.retrieval.topk, batch_size=max(1, cfg.data.batch_size // world) * ro.n,
                       max_turns=ro.max_turns, max_new_tokens=ro.max_new_tokens_per_turn, max_obs_tokens=ro.max_obs_tokens,
                       max_total_tokens=ro.max_total_tokens, max_query_chars=ro.max_query_chars, template=ro.template,
                       seed=cfg.trainer.seed, backend=ro.backend, engine_dtype=ro.engine_dtype, kv_cache_gb=ro.vllm_kv_cache_gb)


class PeriodicEval:
    """``trainer.eval_every`` for one trainer: the eval files are read (and bad ones refused) when it is built."""

    def __init__(self, cfg, world: int = 1, agent=None):
        self.every, self.steps = int(cfg.trainer.eval_every), int(cfg.trainer.steps)
        self.datasets: dict = {}
        if self.every < 0:
            raise UserError(f"trainer.eval_every must be >= 0 (0 = off), got {self.every}")
        if not self.every:
            return
        if not cfg.data.eval_files:
            raise UserError(f"trainer.eval_every={self.every} needs data.eval_files (QA files to evaluate), "
                            "e.g. data.eval_files=[data/hotpotqa/dev.jsonl]; or set trainer.eval_every=0")
        if agent is None:
            raise UserError(f"trainer.eval_every={self.every} needs the trainer's SearchAgent (it evaluates with the "
                            "run's agent, retriever and generation backend); build the trainer with agent=...")
        self.datasets = load_datasets(list(cfg.data.eval_files), [], None, limit=cfg.data.eval_limit)
        self.opts = eval_options(cfg, world)

    def due(self, step: int) -> bool:
        """After step ``step`` (1-based, as logged): every ``eval_every`` steps and after the last."""
        return self.every > 0 and (step % self.every == 0 or step == self.steps)

    def __call__(self, trainer) -> dict[str, float]:
        """The ``eval/`` metrics after the trainer's current step (``{}`` when not due)."""
        if not self.due(trainer.step_idx):
            return {}
        t0 = time.perf_counter()
        rng = ckpt.rng_state()  # run_eval seeds torch; the training that follows must not notice
        try:
            summary = self._run(trainer)
        finally:
            ckpt.set_rng_state(rng)
        return {**self.metrics(summary), "timing/eval_s": time.perf_counter() - t0}

    def _run(self, trainer) -> dict | None:
        """Wake and sync the engine as a rollout would, evaluate, put it back to sleep; the main process's summary."""
        agent, col = trainer.agent, trainer.colocation
        col.before_rollout(trainer.acc.unwrap_model(trainer.model), trainer.step_idx)
        with col.rollout(trainer.model):  # HF under FSDP: the policy gathered once for the evaluation
            trainer.model.eval()
            try:
                result = run_eval(self.datasets, trainer.acc.unwrap_model(trainer.model), trainer.tokenizer,
                                  agent.retriever, self.opts, None, f"step {trainer.step_idx}", quiet=True,
                                  backend=agent.backend)
            finally:
                trainer.model.train()
        col.after_rollout()
        return gather_objects(result["summary"])[0]  # the main process merged and scored the rows

    @staticmethod
    def metrics(summary: dict | None) -> dict[str, float]:
        """``report.summarize`` output -> flat ``eval/`` metrics (per dataset only when there are several)."""
        if not summary:
            return {}
        avg = summary.get(AVERAGE, {})
        out = {f"eval/{k}": float(avg[k]) for k in SCORE_KEYS if k in avg}
        out["eval/n"] = float(avg.get("n", 0))
        per = {name: v for name, v in summary.items() if name != AVERAGE}
        if len(per) > 1:
            out.update({f"eval/{name}/{k}": float(v[k]) for name, v in per.items() for k in SCORE_KEYS if k in v})
        return out
