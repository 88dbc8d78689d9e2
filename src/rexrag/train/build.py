"""Build a ``Trainer`` from a ``Config``: model, tokenizer, retriever, data, agent and explorer.

``rexrag train`` and the demo build their trainer here. Unset ``retrieval.index`` / ``url`` means a
BM25 index over the bundled demo corpus (built once into ``<trainer.out_dir>/index``); unset
``data.train_files`` means the bundled demo questions.
"""

from __future__ import annotations

from pathlib import Path


def _demo_retriever_index(out_dir: str) -> str:
    """Build (once) a BM25 index over the bundled demo corpus; return its directory."""
    from rexrag.data import demo_file
    from rexrag.retrieval import build_index

    target = Path(out_dir) / "index"
    if not (target / "manifest.json").is_file():
        print(f"retrieval.index/url not set: building a BM25 index over the bundled demo corpus in {target}")
        build_index(demo_file("corpus.jsonl"), "bm25", target, overwrite=target.exists())
    return str(target)


def _examples(cfg):
    from rexrag.data import demo_file, load_qa_files

    files = list(cfg.data.train_files)
    if not files:
        files = [demo_file("train.jsonl")]
        print(f"data.train_files not set: using the bundled demo questions ({files[0].name})")
    return list(load_qa_files(files, skip_bad=cfg.data.skip_bad, limit=cfg.data.limit))


def _data_files(cfg, given: bool) -> str:
    """Where the training examples came from, for error messages."""
    if given:
        return "the examples given to build_trainer"
    return ", ".join(map(str, cfg.data.train_files)) or "the bundled demo questions"


def build_trainer(cfg, *, progress: bool = True, backend=None, retriever=None, examples=None, reward_fn=None):
    """Model, tokenizer, retriever, data, SearchAgent and (if enabled) RexExplorer -> Trainer.

    ``backend``: an existing generation backend to reuse (the demo keeps one vLLM engine for all its
    phases); its weights are replaced by the policy's before the first rollout. ``retriever`` (any
    object with ``search(queries, k) -> list[list[Passage]]``), ``examples`` (``QAExample`` records
    with unique ``group_id``) and ``reward_fn`` replace what ``cfg.retrieval`` / ``cfg.data`` /
    ``cfg.trainer.reward`` would give."""
    from rexrag.data import check_examples
    from rexrag.rollout.backends import resolve_backend_name
    from rexrag.rollout.colocate import check_layout
    from rexrag.sharding import make_accelerator
    from rexrag.train.async_source import AsyncSource, check_async
    from rexrag.train.credit import check_setup as check_credit

    acc = make_accelerator()  # an FSDP launch on a CUDA-less machine is really FSDP (rexrag.sharding)
    if retriever is None and not (cfg.retrieval.index or cfg.retrieval.url):
        if acc.is_main_process:
            cfg.retrieval.index = _demo_retriever_index(cfg.trainer.out_dir)
        acc.wait_for_everyone()
        cfg.retrieval.index = str(Path(cfg.trainer.out_dir) / "index")
    # an unknown or not-installed backend fails here, before any model loads
    backend_name = None if backend is not None else resolve_backend_name(cfg.rollout.backend)
    if backend_name == "vllm":
        check_layout(cfg.rollout, acc.num_processes)
    given = [name for name, obj in (("backend", backend), ("retriever", retriever),
                                    ("reward_fn", reward_fn if cfg.rex.enabled else None)) if obj is not None]
    check_async(cfg, acc.num_processes, given, backend_name)  # what the async modes cannot run: before any model loads
    where = _data_files(cfg, examples is not None)
    examples = _examples(cfg) if examples is None else list(examples)
    check_examples(examples, cfg.data)  # bad data or too few prompts: before any model loads
    check_credit(cfg, examples, where)  # trainer.process_reward: estimator, data fields
    # rollout.mode=one_step_off|async: the workers start (and load their models) while this process loads its own
    source = AsyncSource(cfg, rank=acc.process_index, world=acc.num_processes).start() if cfg.rollout.mode != "sync" else None
    try:
        trainer = _build(cfg, acc, backend, backend_name, examples, retriever, reward_fn, progress, source is None)
    except BaseException:
        if source is not None:
            source.close()
        raise
    trainer.rollout_source = source
    return trainer


def _build(cfg, acc, backend, backend_name, examples, retriever, reward_fn, progress, start_engine_here: bool):
    """The trainer (model, tokenizer, retriever, agent, explorer); a vLLM engine only when ``start_engine_here``
    (the async modes generate in their workers)."""
    from rexrag.models import load_model, load_tokenizer
    from rexrag.retrieval import load_retriever
    from rexrag.rollout.agent import SearchAgent
    from rexrag.rollout.backends import build_backend
    from rexrag.rollout.colocate import start_engine
    from rexrag.train.trainer import Trainer, seed_everything

    seed_everything(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    if cfg.rollout.format == "tool_calls":  # a tokenizer without a chat template: before the model loads
        from rexrag.rollout.tool_calls import require_chat_template

        require_chat_template(tokenizer)
    model = load_model(cfg.model, device=acc.device)
    model.train()
    if retriever is None:
        retriever = load_retriever(cfg.retrieval)
    seed = cfg.trainer.seed + 7919 * acc.process_index
    if backend is None and backend_name == "hf":  # the HF loop samples from the policy itself: no engine to size
        backend = build_backend(backend_name, model, tokenizer, cfg.rollout, device=acc.device, seed=seed)
    elif backend is not None and hasattr(backend, "generator"):
        backend.generator.manual_seed(seed)
    agent = SearchAgent(backend, tokenizer, retriever, cfg.rollout, topk=cfg.retrieval.topk,
                        max_failed_turns=cfg.retrieval.max_failed_turns)
    explorer = None
    if cfg.rex.enabled:
        from rexrag.rex.explorer import RexExplorer

        explorer = RexExplorer(
            cfg.rex,
            cfg.rollout,
            tokenizer,
            seed=cfg.trainer.seed + acc.process_index,
            clip_range=(cfg.algo.clip_low, cfg.algo.clip_high),
        )
    trainer = Trainer(cfg, model, tokenizer, examples, agent=agent, explorer=explorer, reward_fn=reward_fn,
                      accelerator=acc, progress=progress)
    if agent.backend is None and start_engine_here:  # vLLM: one engine per process, started once the policy is prepared (sharded),
        # the reference placed and the trainer's memory known, on this process's device
        # max_num_seqs: the rows one rollout of this process generates (probes continue in a later call)
        rows = max(1, cfg.data.batch_size // acc.num_processes) * cfg.rollout.n
        engine = start_engine(backend_name, trainer.acc.unwrap_model(trainer.model), tokenizer, cfg.rollout,
                              world=acc.num_processes, device=acc.device, seed=seed, max_batch=rows)
        trainer.attach_backend(engine, synced_step=trainer.step_idx)  # start_engine loaded the current weights
    return trainer
