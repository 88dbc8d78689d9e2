"""rexrag: train LLM search agents with REX-RAG (probe exploration + policy correction).

The classes and functions a user needs import from here (``from rexrag import Trainer``); each is
loaded on first use, so ``import rexrag`` stays cheap (no torch, no transformers). A custom run in a
few lines (docs/guides/extending.md, "The whole thing in one run")::

    import rexrag

    @rexrag.register_reward("gold_in_text")
    def gold_in_text(completions, answers, **kw):  # completions: the model's own text only
        return [float(any(a in c for a in golds)) for c, golds in zip(completions, answers)]

    trainer = rexrag.build_trainer(cfg, retriever=my_retriever, examples=my_examples)
    trainer.train()

Where things live: ``rexrag.config`` (typed config), ``rexrag.data`` (QA sets, corpora),
``rexrag.retrieval`` (retrievers, indexes), ``rexrag.rollout`` (agent, generation backends),
``rexrag.rewards`` (metrics, reward registry), ``rexrag.train`` (trainer), ``rexrag.eval``.
"""

from __future__ import annotations

from rexrag.registry import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # training
    "Trainer": "rexrag.train.trainer",
    "build_trainer": "rexrag.train.build",
    # rollouts and generation backends
    "SearchAgent": "rexrag.rollout.agent",
    "Trajectory": "rexrag.rollout.trajectory",
    "Seg": "rexrag.rollout.trajectory",
    "GenerationBackend": "rexrag.rollout.engine",
    "HFBackend": "rexrag.rollout.engine",
    "VLLMBackend": "rexrag.rollout.vllm_backend",
    "build_backend": "rexrag.rollout.backends",
    # retrieval
    "Retriever": "rexrag.retrieval",
    "Passage": "rexrag.retrieval",
    "BM25Retriever": "rexrag.retrieval",
    "DenseRetriever": "rexrag.retrieval",
    "HTTPRetriever": "rexrag.retrieval",
    "build_index": "rexrag.retrieval",
    "load_index": "rexrag.retrieval",
    "load_retriever": "rexrag.retrieval",
    # configuration
    "Config": "rexrag.config",
    "ModelConfig": "rexrag.config",
    "RetrievalConfig": "rexrag.config",
    "RolloutConfig": "rexrag.config",
    "AlgoConfig": "rexrag.config",
    "RexConfig": "rexrag.config",
    "DataConfig": "rexrag.config",
    "TrainerConfig": "rexrag.config",
    "load_config": "rexrag.config",
    # data
    "QAExample": "rexrag.data",
    "load_qa": "rexrag.data",
    "load_qa_files": "rexrag.data",
    "assign_group_ids": "rexrag.data",
    "load_corpus": "rexrag.data",
    # models
    "load_model": "rexrag.models",
    "load_tokenizer": "rexrag.models",
    # rewards
    "register_reward": "rexrag.rewards",
    "get_reward": "rexrag.rewards",
    "available_rewards": "rexrag.rewards",
    "build_reward": "rexrag.rewards",
    # tools (rollout.format=tool_calls)
    "register_tool": "rexrag.rollout.tool_calls",
    "exact_match": "rexrag.rewards",
    "f1_score": "rexrag.rewards",
    "cover_em": "rexrag.rewards",
    # errors
    "UserError": "rexrag.errors",
    "ConfigError": "rexrag.errors",
    "DataError": "rexrag.errors",
    "RetrievalError": "rexrag.errors",
    "RetrievalUnavailableError": "rexrag.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]  # noqa: PLE0604 (the lazy names above)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
