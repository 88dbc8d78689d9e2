"""The multi-turn search agent: generate, retrieve, insert, repeat — token-exact and batched.

Each call of ``SearchAgent.run`` drives a batch of trajectories as a per-row state machine:

1. every live row generates one turn (one backend call for the whole batch), stopping on
   ``</search>`` or ``</answer>`` (the final turn stops only on ``</answer>``), EOS or a length cap;
2. rows whose turn ends in ``</search>`` get their query (text between the last ``<search>`` and
   that ``</search>``) and ONE retriever call serves all of them;
3. the passages are appended as INFO tokens, ``\\n\\n<information>...</information>\\n\\n``, the
   passage text truncated to ``max_obs_tokens`` tokens (the closing tag is kept);
4. a turn with neither a search nor an answer gets a short NOTICE and the row goes on.

Turn budget: a row may generate ``searches_left + 1`` more turns; invalid actions use up turns but
not searches. The last turn is the answer-only turn: ``</search>`` is not a stop string there, so a
search written in it is just text (Search-R1 likewise never executes a search in its final
rollout). Every trajectory stays within ``max_total_tokens`` (an inserted block that does not fit is
cut, and the row ends with ``"length"``).

Choices where the public code is silent or different:

* Inserted text (INFO, NOTICE) is tokenised on its own and appended; the sampled ids are never
  decoded and re-tokenised (Search-R1 re-tokenises the whole response).
* ``<answer>`` inside an unclosed ``<think>``: the row stops at the first ``</answer>`` like
  Search-R1 does; the answer is the text after the last ``<answer>`` before it.
* ``</answer>`` or ``</search>`` without its opening tag in the same turn is an invalid action.
* An empty or whitespace query gets a NOTICE and no retrieval (and costs no search); a query
  longer than ``cfg.max_query_chars`` is cut before retrieval.
* The model writing ``<information>`` itself is ordinary POLICY text: INFO tokens come only from
  the retriever's passages.
* Failure policy: the agent does not retry (the HTTP client is the one retry layer). A
  ``RetrievalError`` (network or server trouble) gives every searching row of that turn a NOTICE,
  is counted, and the rollout goes on; ``max_failed_turns`` such turns in a row (across calls)
  raise ``RetrievalUnavailableError`` naming the retriever and its last error. Any other exception
  from the retriever (a bug in user code, e.g. a ``TypeError``) propagates unchanged.
* EOS ends a row (no NOTICE): the model declared it is done.
* An empty ``<answer></answer>`` ends the row (stop reason ``answer``) but is no answer:
  ``traj.answer`` stays None.
* Rewards and evaluation read the answer from the model's own tokens by segment kind
  (``policy_answer``), never from decoded text with the retrieved blocks stripped by a pattern, so a
  passage that quotes ``</information><answer>X</answer>`` cannot answer for the model.

``rollout.format=tool_calls`` (native tool calls through the chat template, token-exact by rendered
deltas) is handled turn by turn in ``rexrag.rollout.tool_calls``; everything above is the tags format.

Stop reasons: ``answer``, ``eos``, ``length`` (``max_total_tokens``), ``turns`` (turn budget spent
without an answer).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from rexrag.errors import RetrievalError, RetrievalUnavailableError
from rexrag.prompts import build_prompt_ids, render_prompt, tool_template
from rexrag.protocol import (
    ANSWER,
    ANSWER_CLOSE,
    ANSWER_OPEN,
    DEFAULT_TOPK,
    INFO_CLOSE,
    INFO_OPEN,
    NOTICES,
    SEARCH,
    format_information,
    parse_action,
    stop_strings,
)
from rexrag.rollout.engine import FINISH_REASONS, GenerationBackend, GenOutput, SamplingParams
from rexrag.rollout.tool_calls import apply_tool_turn, finish_tool_turns
from rexrag.rollout.trajectory import Retrieval, Seg, Trajectory, passage_ids
# the trajectory's text views lived here: re-exported so that imports from the agent keep working
from rexrag.rollout.views import format_view, policy_answer, policy_text, response_text  # noqa: F401

if TYPE_CHECKING:  # annotation only
    from rexrag.config import RolloutConfig

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """Rollout state of one trajectory."""

    traj: Trajectory
    searches_left: int
    turns_left: int
    turn: int
    done: bool = False

    def finish(self, reason: str) -> None:
        self.traj.stop_reason = reason
        self.done = True


def char_to_token(tokenizer, ids: list[int], char_pos: int) -> int:
    """Index of the token in ``ids`` whose decoded text contains character ``char_pos`` of ``decode(ids)``.

    Binary search over prefix decodes (O(log n) decodes), so the result is on token boundaries.
    """
    lo, hi = 1, len(ids)
    while lo < hi:  # smallest k with len(decode(ids[:k])) > char_pos
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=False, clean_up_tokenization_spaces=False)) > char_pos:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def describe_retriever(retriever) -> str:
    """``HTTPRetriever(http://...)``-style name for errors: the class and, when it has one, its URL or path."""
    where = getattr(retriever, "url", None) or getattr(retriever, "path", None) or getattr(retriever, "index_dir", None)
    return f"{type(retriever).__name__}({where})" if where else type(retriever).__name__


class SearchAgent:
    """Batched, token-exact multi-turn search rollouts.

    ``backend`` generates (``GenerationBackend``), ``retriever`` answers ``search(queries, k)``,
    ``cfg`` sets turns, token caps and sampling. ``format_fn`` turns passages into the text inside
    ``<information>`` (default: ``rexrag.protocol.format_information``). ``max_failed_turns``: turns in
    a row whose retrieval raised ``RetrievalError`` before ``RetrievalUnavailableError`` stops the
    caller (0 = never).
    """

    def __init__(
        self,
        backend: GenerationBackend,
        tokenizer,
        retriever,
        cfg: RolloutConfig,
        topk: int = DEFAULT_TOPK,
        *,
        max_failed_turns: int = 3,
        format_fn: Callable | None = None,
    ):
        self.backend, self.tokenizer, self.retriever, self.cfg = backend, tokenizer, retriever, cfg
        self.topk, self.max_failed_turns = topk, max_failed_turns
        self.failed_turns = 0  # consecutive turns whose retrieval failed, across calls
        self.max_query_chars = cfg.max_query_chars
        self.format_fn = format_fn if format_fn is not None else format_information
        self._encode_cache: dict[str, list[int]] = {}
        self.last_metrics: dict[str, float] = {}
        self.chat = None  # rollout.format=tool_calls: the chat template with tools (rexrag.rollout.tool_calls)
        if getattr(cfg, "format", "tags") == "tool_calls":
            from rexrag.rollout.tool_calls import ChatFormat, resolve_tools

            self.chat = ChatFormat(tokenizer, resolve_tools(cfg.tools), cfg.tool_parser, cfg.final_answer)

    # ------------------------------------------------------------------ public API
    def rollout(self, examples: list, n: int = 1) -> list[Trajectory]:
        """``n`` trajectories per example (same ``group_id``), each run to completion."""
        trajs = []
        for ex in examples:
            messages = None
            if self.chat is not None:
                prompt, messages = self.chat.prompt(render_prompt(ex.question, tool_template(self.cfg.template)))
            else:
                prompt = build_prompt_ids(self.tokenizer, ex.question, self.cfg.template)
            for _ in range(n):
                t = Trajectory(group_id=ex.group_id, example=ex)
                t.extend(prompt, Seg.PROMPT, 0)
                if messages is not None:
                    t.meta["messages"] = [dict(m) for m in messages]
                trajs.append(t)
        return self.run(trajs, [self.cfg.max_turns] * len(trajs))

    def run(self, trajs: list[Trajectory], searches_left: list[int]) -> list[Trajectory]:
        """Continue in-progress trajectories (extended in place and returned) until each finishes.

        A row may search ``searches_left[i]`` more times and generate ``searches_left[i] + 1`` more
        turns. A trajectory whose last token is POLICY or PROBE continues the same turn.
        """
        if len(searches_left) != len(trajs):
            raise ValueError(f"got {len(trajs)} trajectories but {len(searches_left)} search budgets")
        rows = []
        for i, (t, s) in enumerate(zip(trajs, searches_left)):
            if not t.token_ids or t.stop_reason != "running" or s < 0:
                raise ValueError(f"trajectory {i} cannot be continued (len={len(t)}, stop_reason={t.stop_reason!r}, searches_left={s})")
            t.check()
            if self.chat is not None:
                t.meta["format"] = "tool_calls"
            same_turn = t.segments[-1] not in (Seg.INFO, Seg.NOTICE)
            rows.append(_Row(t, s, s + 1, t.turns[-1] if same_turn else t.turns[-1] + 1))
        counts: Counter = Counter()
        stats0 = dict(getattr(self.backend, "stats", {}))
        t0 = time.perf_counter()
        while live := [r for r in rows if not r.done]:
            self._turn(live, counts)
        counts["time_total_s"] = time.perf_counter() - t0
        self.last_metrics = {**self._metrics(rows, counts), **self._cache_metrics(stats0)}
        return trajs

    def _cache_metrics(self, before: dict) -> dict[str, float]:
        """Share of prompt tokens whose keys/values were reused (vLLM prefix cache, HF cross-turn reuse)."""
        after = getattr(self.backend, "stats", {})
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("reused_tokens", "shared_prefix_tokens", "prefill_tokens")}
        reused = delta["reused_tokens"] + delta["shared_prefix_tokens"]
        total = reused + delta["prefill_tokens"]
        return {"rollout/prefix_cache_hit_rate": reused / total} if total > 0 else {}

    # ------------------------------------------------------------------ one turn
    def _turn(self, live: list[_Row], counts: Counter) -> None:
        cap = self.cfg.max_total_tokens
        gen = []
        for r in live:
            if cap - len(r.traj) <= 0:
                r.finish("length")
            else:
                gen.append(r)
        if not gen:
            return
        limits = [min(self.cfg.max_new_tokens_per_turn, cap - len(r.traj)) for r in gen]
        params = SamplingParams(self.cfg.temperature, self.cfg.top_p, self.cfg.top_k, max(limits))
        stops = [[] if self.chat is not None else stop_strings(final_turn=r.turns_left == 1) for r in gen]
        t0 = time.perf_counter()
        outs = self.backend.generate([r.traj.token_ids for r in gen], stops, params)
        counts["time_gen_s"] += time.perf_counter() - t0
        counts["turns"] += len(gen)
        if len(outs) != len(gen):
            raise RuntimeError(f"backend returned {len(outs)} outputs for {len(gen)} prompts")
        searching: list[tuple[_Row, str]] = []
        for r, out, limit in zip(gen, outs, limits):
            query = self._apply_turn(r, out, limit, counts)
            if query is not None:
                searching.append((r, query))
        if searching and self.chat is not None:  # tool calls of every row, one retriever call for their searches
            finish_tool_turns(self, searching, counts)
        elif searching:
            self._retrieve(searching, counts)
        for r in gen:
            r.turn += 1

    def _apply_turn(self, r: _Row, out: GenOutput, limit: int, counts: Counter):
        """Record one generated turn; finish the row or insert a NOTICE; return a query to run (tool_calls
        format: the row's ``PendingTurn``)."""
        ids, lps, finish = list(out.token_ids), list(out.logprobs), out.finish
        if len(ids) != len(lps) or finish not in FINISH_REASONS:
            raise RuntimeError(f"backend output is inconsistent: {len(ids)} ids, {len(lps)} log-probs, finish={finish!r}")
        if len(ids) > limit:  # the batch shared one max_new_tokens; this row had less room
            ids, lps, finish = ids[:limit], lps[:limit], "length"
        start = len(r.traj)
        r.traj.extend(ids, Seg.POLICY, r.turn, lps)
        counts["gen_tokens"] += len(ids)
        r.turns_left -= 1
        if self.chat is not None:  # native tool calls: the message ends at the template's end-of-turn (EOS)
            return apply_tool_turn(self, r, ids, finish, start, counts)
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if finish == "eos":
            return r.finish("eos")
        action = parse_action(text, out.stop_str if finish == "stop" else None)
        if action is not None and action.kind == ANSWER:
            self._set_answer(r, ids, text, action.span, start)
            return r.finish("answer")
        if len(r.traj) >= self.cfg.max_total_tokens:
            return r.finish("length")
        if r.turns_left <= 0:
            return r.finish("turns")
        if action is not None and action.kind == SEARCH:
            query = action.content
            if not query:
                counts["empty_queries"] += 1
                self._insert(r, self._encode(NOTICES["empty_query"]), Seg.NOTICE)
                return None
            if len(query) > self.max_query_chars:
                counts["truncated_queries"] += 1
                query = query[: self.max_query_chars]
            return query
        counts["invalid_actions"] += 1
        r.traj.invalid_actions += 1
        self._insert(r, self._encode(NOTICES["invalid"]), Seg.NOTICE)
        return None

    def _set_answer(self, r: _Row, ids: list[int], text: str, span: tuple[int, int], start: int) -> None:
        """Answer text and its token span [first token of ``<answer>``, token completing ``</answer>``)."""
        open_char = span[0] - len(ANSWER_OPEN)
        close_end = span[1] + len(ANSWER_CLOSE)
        first = char_to_token(self.tokenizer, ids, open_char)
        last = char_to_token(self.tokenizer, ids, close_end - 1)
        r.traj.answer = text[span[0] : span[1]].strip() or None  # an empty <answer></answer> is no answer
        r.traj.answer_span = (start + first, start + last + 1)

    # ------------------------------------------------------------------ retrieval
    def _retrieve(self, searching: list[tuple[_Row, str]], counts: Counter) -> None:
        """One retriever call for every searching row; INFO on success, NOTICE on failure."""
        queries = [q for _, q in searching]
        t0 = time.perf_counter()
        results = self._search(queries)
        counts["time_retrieval_s"] += time.perf_counter() - t0
        counts["retrieval_calls"] += 1
        for i, (r, _) in enumerate(searching):
            if results is None:
                counts["retrieval_failures"] += 1
                r.traj.retrieval_failures += 1
                self._insert(r, self._encode(NOTICES["retrieval_failed"]), Seg.NOTICE)
                continue
            body = self.tokenizer(self.format_fn(results[i]), add_special_tokens=False)["input_ids"]
            if len(body) > self.cfg.max_obs_tokens:
                counts["obs_truncated"] += 1
                body = body[: self.cfg.max_obs_tokens]
            block = self._encode(INFO_OPEN) + list(body) + self._encode(INFO_CLOSE)
            r.traj.retrievals.append(Retrieval(len(r.traj), r.turn, searching[i][1], passage_ids(results[i])))
            counts["info_tokens"] += self._insert(r, block, Seg.INFO)
            r.searches_left -= 1
            r.traj.n_searches += 1
            counts["searches"] += 1

    def _search(self, queries: list[str]):
        """``retriever.search``; None on a ``RetrievalError`` (the rows get a NOTICE). Anything else the
        retriever raises propagates; ``max_failed_turns`` failures in a row raise."""
        try:
            results = self.retriever.search(queries, self.topk)
        except RetrievalError as exc:
            self.failed_turns += 1
            log.warning("retrieval failed (%d turn(s) in a row): %s", self.failed_turns, exc)
            if self.max_failed_turns and self.failed_turns >= self.max_failed_turns:
                raise RetrievalUnavailableError(
                    f"retrieval failed on {self.failed_turns} consecutive turns (retrieval.max_failed_turns="
                    f"{self.max_failed_turns}); retriever: {describe_retriever(self.retriever)}; last error: {exc}"
                ) from exc
            return None
        n = len(results) if hasattr(results, "__len__") else type(results).__name__
        if n != len(queries):
            raise TypeError(f"retriever {describe_retriever(self.retriever)} returned {n} result lists for "
                            f"{len(queries)} queries; search(queries, k) must return one list per query")
        self.failed_turns = 0
        return results

    # ------------------------------------------------------------------ helpers
    def _encode(self, text: str) -> list[int]:
        ids = self._encode_cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._encode_cache[text] = ids
        return ids

    def _insert(self, r: _Row, ids: list[int], seg: Seg) -> int:
        """Append a system block, cut to the room left under ``max_total_tokens``; returns tokens added."""
        room = self.cfg.max_total_tokens - len(r.traj)
        ids = ids[: max(room, 0)]
        r.traj.extend(ids, seg, r.turn)
        if len(r.traj) >= self.cfg.max_total_tokens:
            r.finish("length")
        return len(ids)

    def _metrics(self, rows: list[_Row], counts: Counter) -> dict[str, float]:
        n = max(len(rows), 1)
        m = {f"rollout/{k}": float(v) for k, v in counts.items()}
        for k in ("searches", "invalid_actions", "retrieval_failures", "empty_queries", "truncated_queries", "gen_tokens", "time_gen_s", "time_retrieval_s"):
            m.setdefault(f"rollout/{k}", 0.0)
        m["rollout/time_bookkeeping_s"] = max(m["rollout/time_total_s"] - m["rollout/time_gen_s"] - m["rollout/time_retrieval_s"], 0.0)
        m["rollout/searches_per_traj"] = m.pop("rollout/searches") / n
        lengths = [len(r.traj) - r.traj.prompt_len for r in rows]
        m["rollout/response_length_mean"] = sum(lengths) / n
        m["rollout/response_length_max"] = float(max(lengths, default=0))
        reasons = Counter(r.traj.stop_reason for r in rows)
        for reason in ("answer", "eos", "length", "turns"):
            m[f"rollout/stop_{reason}"] = reasons.get(reason, 0) / n
        m["rollout/n"] = float(len(rows))
        return m
