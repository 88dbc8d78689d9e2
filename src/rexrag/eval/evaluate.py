"""Evaluate a model or checkpoint on QA sets: ``direct``, ``rag``, ``retrieve_once`` or ``agent`` (multi-turn search).

All methods decode greedily (temperature 0) in batches, so a run is deterministic for a given model,
data and retriever. Scores follow Search-R1 / REX-RAG: the prediction is the last complete
``<answer>...</answer>`` span of the model's own response, scored by exact match after SQuAD
normalisation (plus F1 and cover-EM: a normalised gold answer contained in the normalised prediction).

The one-shot baselines (``direct``, ``rag``) are scored as FlashRAG scores its naive generation when
the model writes no answer span: the whole response is the prediction (rows carry
``answer_source = "response"``; ``"tags"`` when an answer span was found). A small base model rarely
writes tags, so without this rule a baseline row would be 0 whatever the model knew. The ``agent``
method keeps the strict rule (no answer span scores 0), as Search-R1 and REX-RAG evaluate agents; so
on the same model a baseline's EM counts an answer anywhere in its text and the agent's does not —
compare them on cover-EM too, which every table reports.

``retrieve_once`` is retrieval alone in the agent's own format, scored by the agent's strict rule: the
agent prompt, the warm-up's first search turn written for the model (the question as the query), the
observation exactly as the agent inserts it (top-k cut to ``max_obs_tokens``), then one answer turn.
Against ``agent`` on the same checkpoint it shows what the model's own searching adds over reading the
passages its first search would bring.

Benchmark files: ``--benchmarks nq,hotpotqa --data-dir DIR`` looks for FlashRAG-format files in
``DIR/<name>/`` (see ``resolve_benchmark``): ``test.jsonl`` / ``dev.jsonl`` / ``val.jsonl`` as
FlashRAG ships them, else ``*test*`` then ``*dev*`` then ``*val*`` files (``.jsonl`` or Search-R1
``.parquet``), preferring names containing ``flashrag`` and then the largest file.

Data parallel: under ``accelerate launch`` (several processes, one per GPU or CPU worker) each process
takes a strided shard of every dataset (questions ``rank, rank + W, ...``), and the main process
gathers the per-question rows and puts them back in the original order before scoring and writing,
so the report is the one a single process writes (greedy decoding; with ``--batch-size 1`` the rows
are bitwise the same, larger batches pad questions with different neighbours). With vLLM each process
starts its own engine inside the running torch.distributed world (``rexrag.rollout.colocate.start_engine``,
vLLM's ``external_launcher``), every phase of the start-up agreed by all processes; its ``max_num_seqs``
is ``--batch-size``.

A Search-R1 parquet whose rows carry several ``data_source`` values (Search-R1's merged
``test.parquet``) is scored per source, as Search-R1 and verl report validation scores: each source
becomes its own dataset (named by ``data_source``), and the report's average is the unweighted mean
over them. Any other file is one dataset under the name it was given.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rexrag.data import QAExample
from rexrag.errors import UserError
from rexrag.eval import report
from rexrag.prompts import PLACEHOLDER
from rexrag.protocol import ANSWER_CLOSE, ANSWER_OPEN, DEFAULT_TOPK, THINK_CLOSE, THINK_OPEN, stop_strings

BENCHMARKS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
BENCHMARK_ALIASES = {"2wiki": "2wikimultihopqa", "tqa": "triviaqa", "hotpot": "hotpotqa"}
METHODS = ("direct", "rag", "retrieve_once", "agent")
_SPLIT_TIERS = ("test", "dev", "val")

DIRECT_TEMPLATE = (
    f"Answer the given question. Think step by step inside {THINK_OPEN} and {THINK_CLOSE}, then give the final "
    f"answer inside {ANSWER_OPEN} and {ANSWER_CLOSE}, without detailed explanation. For example, "
    f"{ANSWER_OPEN} Beijing {ANSWER_CLOSE}. Question: {PLACEHOLDER}\n"
)
RAG_TEMPLATE = (
    f"Answer the given question using the documents below. Think step by step inside {THINK_OPEN} and "
    f"{THINK_CLOSE}, then give the final answer inside {ANSWER_OPEN} and {ANSWER_CLOSE}, without detailed "
    f"explanation. For example, {ANSWER_OPEN} Beijing {ANSWER_CLOSE}.\n\n{PLACEHOLDER}\n"
)


@dataclass
class EvalOptions:
    method: str = "agent"
    topk: int = DEFAULT_TOPK
    batch_size: int = 16
    max_turns: int = 4
    max_new_tokens: int = 256  # per turn (agent) or for the whole answer (direct, rag)
    max_obs_tokens: int = 500
    max_total_tokens: int = 4096  # prompt + response of one row (the engine's context; rollout.max_total_tokens)
    max_query_chars: int = 512  # a search query is cut to this many characters (rollout.max_query_chars)
    template: str = "rexrag"  # agent prompt template (rexrag.prompts); direct/rag use their own
    format: str = "tags"  # agent format: tags | tool_calls (rollout.format)
    tool_parser: str = "hermes"  # tool_calls: rollout.tool_parser
    final_answer: str = "auto"  # tool_calls: rollout.final_answer
    tools: tuple = ("search",)  # tool_calls: rollout.tools
    limit: int = 0
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"  # generation backend (rexrag.rollout.backends): auto | hf | vllm
    engine_dtype: str = "auto"  # vLLM engine dtype (auto: bf16 where the hardware has fast bf16 matmuls)
    kv_cache_gb: float = 1.0  # vLLM on CPU: KV cache per process (rollout.vllm_kv_cache_gb)
    extra: dict = field(default_factory=dict)  # free-form labels written to metrics.json

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r} is not allowed; choose one of {list(METHODS)}")
        if self.format not in ("tags", "tool_calls") or (self.format == "tool_calls" and self.method != "agent"):
            raise UserError(f"--format {self.format!r}: choose tags or tool_calls (tool_calls needs --method agent)")
        if self.format == "tool_calls":  # parser and tools: before any model loads
            from rexrag.rollout.tool_calls import check_setup

            check_setup(self.tool_parser, list(self.tools))
        if self.batch_size < 1 or self.topk < 1 or self.max_new_tokens < 1 or self.max_total_tokens < 1:
            raise UserError("--batch-size, --topk, --max-new-tokens and --max-total-tokens must be >= 1")
        if self.max_obs_tokens < 0 or self.max_query_chars < 1:
            raise UserError(f"--max-obs-tokens must be >= 0 (got {self.max_obs_tokens}) and the query cut >= 1 "
                            f"(got {self.max_query_chars})")


# --------------------------------------------------------------------------- datasets


def parse_dataset_spec(spec: str) -> tuple[str, Path]:
    """``"NAME=FILE"`` -> (name, path); a bare FILE is named after its stem."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).name.split(".")[0], spec
    name, path = name.strip(), Path(path.strip()).expanduser()
    if not name:
        raise UserError(f"--dataset {spec!r}: the name before '=' is empty")
    if not path.is_file():
        raise UserError(f"--dataset {spec!r}: file {path} does not exist")
    return name, path


def resolve_benchmark(name: str, data_dir: str | Path) -> Path:
    """The question file of benchmark ``name`` under ``data_dir`` (layout in the module docstring)."""
    key = BENCHMARK_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose from {list(BENCHMARKS)} (or use --dataset NAME=FILE)")
    folder = Path(data_dir).expanduser() / key
    if not folder.is_dir():
        raise UserError(f"benchmark {key!r}: folder {folder} does not exist; expected {folder}/test.jsonl (FlashRAG layout)")
    for tier in _SPLIT_TIERS:
        for ext in (".jsonl", ".parquet"):
            if (folder / f"{tier}{ext}").is_file():
                return folder / f"{tier}{ext}"
    for tier in _SPLIT_TIERS:
        found = [p for p in folder.iterdir() if p.is_file() and tier in p.name.lower() and p.suffix in (".jsonl", ".parquet")]
        if found:
            found.sort(key=lambda p: ("flashrag" not in p.name, p.suffix != ".jsonl", -p.stat().st_size, p.name))
            return found[0]
    raise UserError(f"benchmark {key!r}: no test/dev/val .jsonl or .parquet file in {folder}")


def load_datasets(specs: list[str], benchmarks: list[str], data_dir: str | Path | None, limit: int = 0
                  ) -> dict[str, tuple[Path, list[QAExample]]]:
    """{dataset name: (file, examples)} with globally unique group ids; ``limit`` per dataset."""
    from rexrag.data import assign_group_ids

    files: dict[str, Path] = {}
    for spec in specs:
        name, path = parse_dataset_spec(spec)
        files[name] = path
    if benchmarks and not data_dir:
        raise UserError("--benchmarks needs --data-dir (a folder with one sub-folder per benchmark)")
    for bench in benchmarks:
        key = BENCHMARK_ALIASES.get(bench.strip().lower(), bench.strip().lower())
        files[key] = resolve_benchmark(bench, data_dir)
    if not files:
        raise UserError("nothing to evaluate: give --dataset NAME=FILE or --benchmarks NAMES --data-dir DIR")
    out, start = {}, 0
    for name, path in files.items():
        for ds, examples in _split_by_source(name, path, limit).items():
            if ds in out:
                raise UserError(f"dataset {ds!r} comes from both {out[ds][0]} and {path}; give the files other names "
                                "(a parquet with several data_source values is split into one dataset per source)")
            assign_group_ids(examples, start=start)
            start += len(examples)
            out[ds] = (path, examples)
    return out


def _split_by_source(name: str, path: Path, limit: int = 0) -> dict[str, list[QAExample]]:
    """{dataset: examples} of one file: a parquet with several ``data_source`` values gives one
    dataset per source (first-seen order, ``limit`` per source); any other file is ``name``."""
    from rexrag.data import load_qa

    if path.suffix != ".parquet":
        return {name: list(load_qa(path, source=name, limit=limit))}
    by_source: dict[str, list[QAExample]] = {}
    for ex in load_qa(path):
        by_source.setdefault(ex.data_source, []).append(ex)
    if len(by_source) == 1:
        (examples,) = by_source.values()
        for ex in examples:
            ex.data_source = name
        by_source = {name: examples}
    return {ds: exs[:limit] if limit > 0 else exs for ds, exs in by_source.items()}


# --------------------------------------------------------------------------- methods


def _one_shot_prompt(tokenizer, ex: QAExample, passages: list | None) -> list[int]:
    """Prompt ids for ``direct`` (no passages) and ``rag`` (passages above the question)."""
    from rexrag.prompts import build_prompt_ids

    if passages is None:
        return build_prompt_ids(tokenizer, ex.question, DIRECT_TEMPLATE)
    from rexrag.protocol import format_information

    # The documents ride in the "question" slot so the template itself stays a plain literal.
    text = f"Documents:\n{format_information(passages)}\n\nQuestion: {ex.question}"
    return build_prompt_ids(tokenizer, text, RAG_TEMPLATE)


def one_shot_prediction(response: str) -> tuple[str | None, str | None]:
    """(prediction, source) of a ``direct`` / ``rag`` response: the last answer span (``"tags"``), else
    the whole stripped response (``"response"``, FlashRAG's naive-generation rule), else (None, None)."""
    from rexrag.rewards import extract_answer

    answer = extract_answer(response)
    if answer is not None:
        return answer, "tags"
    text = (response or "").strip()
    return (text, "response") if text else (None, None)


def _run_one_shot(examples, backend, tokenizer, retriever, opts: EvalOptions) -> list[dict]:
    from rexrag.rewards import format_ok
    from rexrag.rollout.engine import SamplingParams

    passages = retriever.search([e.question for e in examples], opts.topk) if opts.method == "rag" else None
    prompts = [_one_shot_prompt(tokenizer, e, passages[i] if passages else None) for i, e in enumerate(examples)]
    params = SamplingParams(temperature=0.0, max_new_tokens=opts.max_new_tokens)
    outs = backend.generate(prompts, [stop_strings(final_turn=True)] * len(prompts), params)
    rows = []
    for i, out in enumerate(outs):
        text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
        answer, source = one_shot_prediction(text)
        rows.append({"prediction": answer, "answer_source": source, "response": text, "n_searches": 1 if passages else 0,
                     "format_ok": bool(format_ok(text)), "stop_reason": out.finish,
                     "retrieved": [p.id for p in passages[i]] if passages else []})
    return rows


def _run_retrieve_once(examples, backend, tokenizer, retriever, opts: EvalOptions) -> list[dict]:
    from rexrag.prompts import build_prompt_ids
    from rexrag.rewards import extract_answer, format_ok
    from rexrag.rollout.engine import SamplingParams
    from rexrag.warmup import info_ids, search_query, search_turn_text

    queries = [search_query(e.question) for e in examples]
    passages = retriever.search(queries, opts.topk)
    prompts = [build_prompt_ids(tokenizer, e.question, opts.template)
               + list(tokenizer(search_turn_text(q), add_special_tokens=False)["input_ids"])
               + info_ids(ps, tokenizer, opts.max_obs_tokens) for e, q, ps in zip(examples, queries, passages)]
    params = SamplingParams(temperature=0.0, max_new_tokens=opts.max_new_tokens)
    outs = backend.generate(prompts, [stop_strings(final_turn=True)] * len(prompts), params)
    rows = []
    for ps, out in zip(passages, outs):
        text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
        answer = extract_answer(text)  # the agent's strict rule: no answer span scores 0
        rows.append({"prediction": answer, "answer_source": "tags" if answer is not None else None, "response": text,
                     "n_searches": 1, "format_ok": bool(format_ok(text)), "stop_reason": out.finish,
                     "retrieved": [p.id for p in ps]})
    return rows


def rollout_config(opts: EvalOptions):
    """The greedy rollout settings evaluation uses (agent turns, token caps, backend)."""
    from rexrag.config import RolloutConfig

    return RolloutConfig(n=1, max_turns=opts.max_turns, max_new_tokens_per_turn=opts.max_new_tokens,
                         max_obs_tokens=opts.max_obs_tokens, max_total_tokens=opts.max_total_tokens,
                         max_query_chars=opts.max_query_chars, temperature=0.0, template=opts.template,
                         format=opts.format, tool_parser=opts.tool_parser, final_answer=opts.final_answer,
                         tools=list(opts.tools),
                         backend=opts.backend, engine_dtype=opts.engine_dtype, vllm_kv_cache_gb=opts.kv_cache_gb)


def make_backend(model, tokenizer, opts: EvalOptions):
    """The generation backend for ``model``; ``opts.batch_size`` rows generate together. Data parallel
    (several processes) with vLLM: one engine per process, started by all of them at once and agreed on
    (``rexrag.rollout.colocate.start_engine``, as training does)."""
    from rexrag.rollout.backends import build_backend, resolve_backend_name

    name, world = resolve_backend_name(opts.backend), data_parallel_rank()[1]
    if name == "vllm" and world > 1:
        from rexrag.rollout.colocate import start_engine

        return start_engine(name, model, tokenizer, rollout_config(opts), world=world, device=opts.device,
                            seed=opts.seed, max_batch=opts.batch_size)
    return build_backend(name, model, tokenizer, rollout_config(opts), device=opts.device, seed=opts.seed,
                         max_batch=opts.batch_size)


def make_agent(backend, tokenizer, retriever, opts: EvalOptions):
    """A greedy SearchAgent for evaluation."""
    from rexrag.rollout.agent import SearchAgent

    return SearchAgent(backend, tokenizer, retriever, rollout_config(opts), topk=opts.topk)


def _run_agent(examples, agent, tokenizer) -> list[dict]:
    """The prediction is read from the model's own tokens (``policy_answer``), and the format check
    sees retrieved blocks emptied (``format_view``): retrieved text can neither answer nor break it."""
    from rexrag.rewards import trajectory_format_ok
    from rexrag.rollout.views import policy_answer, response_text

    trajs = agent.rollout(list(examples), n=1)
    rows = []
    for t in trajs:
        text = response_text(tokenizer, t)
        answer = policy_answer(tokenizer, t)
        rows.append({"prediction": answer, "answer_source": "tags" if answer is not None else None, "response": text,
                     "n_searches": int(t.n_searches),
                     "format_ok": bool(trajectory_format_ok(tokenizer, t)), "stop_reason": t.stop_reason,
                     "trajectory": t})
    return rows


def score_row(prediction: str | None, golds: list[str]) -> dict[str, float]:
    """EM / F1 / cover-EM of one prediction (0 when there is no answer span)."""
    from rexrag.rewards import cover_em, exact_match, f1_score

    if prediction is None:
        return {"em": 0.0, "f1": 0.0, "cover_em": 0.0}
    return {"em": float(exact_match(prediction, golds)), "f1": float(f1_score(prediction, golds)),
            "cover_em": float(cover_em(prediction, golds))}


def evaluate_examples(examples: list[QAExample], model, tokenizer, retriever, opts: EvalOptions,
                      dataset: str = "", progress=None, task=None, backend=None) -> list[dict]:
    """Per-question result rows (see ``report``) for one dataset, in input order.

    ``backend`` (a ``GenerationBackend``) replaces the HF backend built from ``model`` when given.
    Agent rows also carry the ``Trajectory`` object under ``"trajectory"`` (dropped when written).
    """
    if opts.method != "direct" and retriever is None:
        raise UserError(f"--method {opts.method} needs a retriever: give --index DIR or --retriever-url URL")
    backend = backend or make_backend(model, tokenizer, opts)
    agent = make_agent(backend, tokenizer, retriever, opts) if opts.method == "agent" else None
    rows = []
    for s in range(0, len(examples), opts.batch_size):
        chunk = examples[s : s + opts.batch_size]
        with torch.no_grad():
            if agent:
                results = _run_agent(chunk, agent, tokenizer)
            elif opts.method == "retrieve_once":
                results = _run_retrieve_once(chunk, backend, tokenizer, retriever, opts)
            else:
                results = _run_one_shot(chunk, backend, tokenizer, retriever, opts)
        for ex, res in zip(chunk, results):
            rows.append({"dataset": dataset or ex.data_source, "id": ex.id, "question": ex.question,
                         "golden_answers": list(ex.golden_answers), **score_row(res["prediction"], ex.golden_answers),
                         **res})
        if progress is not None and task is not None:
            progress.advance(task, len(chunk))
    return rows


# --------------------------------------------------------------------------- trajectories as text


def trajectory_pieces(tokenizer, traj, include_prompt: bool = False) -> list[tuple[str, str]]:
    """Consecutive runs of one segment kind, decoded: ``[("POLICY", "<think>..."), ("INFO", ...), ...]``."""
    from rexrag.rollout.trajectory import Seg

    pieces: list[tuple[str, str]] = []
    start = 0
    n = len(traj.token_ids)
    for i in range(1, n + 1):
        if i == n or traj.segments[i] != traj.segments[start]:
            kind = Seg(traj.segments[start]).name
            if include_prompt or kind != "PROMPT":
                pieces.append((kind, tokenizer.decode(traj.token_ids[start:i], skip_special_tokens=False)))
            start = i
    return pieces


def _jsonable(row: dict, tokenizer) -> dict:
    out = {k: v for k, v in row.items() if k != "trajectory"}
    traj = row.get("trajectory")
    if traj is not None:
        out["segments"] = [list(p) for p in trajectory_pieces(tokenizer, traj)]
    return out


# --------------------------------------------------------------------------- the whole run


def run_eval(datasets: dict[str, tuple[Path, list[QAExample]]], model, tokenizer, retriever, opts: EvalOptions,
             out_dir: str | Path | None, label: str, info: dict[str, Any] | None = None, quiet: bool = False,
             backend=None) -> dict:
    """Evaluate every dataset; write metrics.json, metrics.md and predictions.jsonl into ``out_dir``.

    Returns ``{"summary": report.summarize(...), "rows": [...], "seconds": float}``. Data parallel
    (``torch.distributed`` running with W > 1 processes): each process evaluates ``examples[rank::W]``;
    the main process returns the merged rows (JSON-ready: trajectories as decoded ``segments``) and
    writes the files, the others return ``{"summary": None, "rows": [], "seconds": ...}``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    torch.manual_seed(opts.seed)
    rank, world = data_parallel_rank()
    if world > 1:
        datasets = {n: (p, list(ex)[rank::world]) for n, (p, ex) in datasets.items()}
        quiet = quiet or rank != 0
    total = sum(len(ex) for _, ex in datasets.values())
    start = time.perf_counter()  # engine start-up counts in the evaluation's time
    with contextlib.ExitStack() as stack:
        if backend is None:  # one engine for every dataset, closed when done
            backend = make_backend(model, tokenizer, opts)
            if hasattr(backend, "close"):
                stack.callback(backend.close)
        progress = stack.enter_context(Progress(TextColumn("[bold]eval {task.description}"), BarColumn(),
                                                MofNCompleteColumn(), TimeElapsedColumn(), disable=quiet, transient=False))
        task = progress.add_task(f"{label} ({opts.method}, {', '.join(datasets)})", total=total)
        # One stream of questions, dataset after dataset, so a batch may span datasets: small per-dataset
        # sets still fill the batches (a fast backend's throughput grows with the batch).
        names = [name for name, (_, examples) in datasets.items() for _ in examples]
        examples = [ex for _, (_, exs) in datasets.items() for ex in exs]
        rows = evaluate_examples(examples, model, tokenizer, retriever, opts, "", progress, task, backend)
        for row, name in zip(rows, names, strict=True):
            row["dataset"] = name
    seconds = time.perf_counter() - start
    if world > 1:
        from rexrag.sharding import drain

        drain(backend)  # an HF loop over a sharded policy: serve the others' forwards until every process is done
        rows = merge_shards(rows, tokenizer, rank, world, list(datasets))
        if rank != 0:
            return {"summary": None, "rows": [], "seconds": seconds}
    summary = report.summarize(rows)
    if out_dir is not None:
        out = Path(out_dir)
        meta = {"label": label, "method": opts.method, **(info or {}), "seconds": round(seconds, 2),
                "files": {n: str(p) for n, (p, _) in datasets.items()}, "options": asdict(opts)}
        report.write_metrics_json(out / "metrics.json", {"meta": meta, "datasets": summary})
        report.atomic_write_text(out / "metrics.md", report.metrics_markdown(label, summary, info))
        report.write_predictions_jsonl(out / "predictions.jsonl", (_jsonable(r, tokenizer) for r in rows))
    return {"summary": summary, "rows": rows, "seconds": seconds}


# --------------------------------------------------------------------------- data parallel


def data_parallel_rank() -> tuple[int, int]:
    """(rank, world size) of the running ``torch.distributed`` group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def merge_shards(rows: list[dict], tokenizer, rank: int, world: int, names: list[str]) -> list[dict]:
    """Gather every process's rows on all processes and restore the single-process order.

    Process ``r`` evaluated questions ``r, r + W, ...`` of each dataset (``names``, in report order),
    so its ``i``-th row of a dataset is question ``r + i * W``. Rows are made JSON-ready
    (``_jsonable``) before they travel. Deterministic: the order depends only on the positions."""
    from rexrag.sharding import gather_objects

    local, seen = [], {}
    for row in rows:
        i = seen.get(row["dataset"], 0)
        seen[row["dataset"]] = i + 1
        local.append((row["dataset"], rank + i * world, _jsonable(row, tokenizer)))
    parts = gather_objects(local)
    order = {name: k for k, name in enumerate(names)}
    merged = sorted((item for part in parts for item in part), key=lambda t: (order[t[0]], t[1]))
    return [row for _, _, row in merged]
