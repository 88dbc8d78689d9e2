"""Native tool calls through the tokenizer's chat template (``rollout.format=tool_calls``), token-exact.

The tags format (Search-R1's ``<search>`` / ``<information>`` / ``<answer>`` in raw text) stays the
default. In this format the system/user turn is rendered by the tokenizer's chat template with the
tools declared (their JSON schemas come from each function's signature and Google-style docstring via
``transformers.utils.get_json_schema``), the model calls tools in its family's syntax, read by a parser
from ``TOOL_PARSERS`` (``hermes``: Hermes/Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
``llama3_json``: Llama 3.x's bare JSON ``{"name": ..., "parameters": {...}}``), and each tool result is
appended as the template's tool-role message.

Token-exact by construction: a turn appends the sampled ids (POLICY) and then the tokens the template
renders for the new messages only (the *delta*: the rendering of ``[user, assistant(DUMMY), *new]`` after
the dummy assistant content, less the end-of-turn token the model already sampled). History is never
re-rendered, so a template that rewrites earlier turns (Qwen3 drops earlier ``<think>`` blocks,
whitespace gets normalised) cannot change trained tokens: the sampled ids win. Each turn the agent also
renders the whole conversation once and compares it with the decoded trajectory; a mismatch is counted
in ``rollout/template_drift_turns`` (information only: nothing is re-tokenised).

Tools are plain Python functions: ``search`` is built in (the configured retriever; one call per turn serves every row);
register more with ``@rexrag.register_tool`` or name them by dotted path (``pkg.module.fn``) in
``rollout.tools``. An unknown tool, arguments that are not a JSON object, or a tool that raises becomes a
NOTICE (a tool message saying what went wrong) and the rollout goes on; a tool's output is INFO, cut to
``rollout.max_obs_tokens`` tokens like an observation.

The answer is the final assistant message (a message with no tool call), read from its sampled ids after
any ``</think>``: ``rollout.final_answer`` = ``tag`` (the last ``<answer>`` span, else no answer),
``message`` (the whole message) or ``auto`` (the span when there is one, else the message). REX-RAG
probes cut at the start of that final message (``answer_span[0]``).

Differences from peers: TRL re-renders with patched prefix-preserving templates; we never re-render.
When the model ends its turn with an EOS token other than the one the template closes turns with (Llama 3.1's
``<|eom_id|>`` after a call, Qwen's ``<|endoftext|>``), that token stays as sampled and the template's closing follows it.
A call in the last turn (no turn left to read its result) ends the row with stop reason ``turns``.
"""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from rexrag.errors import ConfigError
from rexrag.protocol import THINK_CLOSE, last_answer_span
from rexrag.registry import Registry
from rexrag.rollout.trajectory import Retrieval, Seg, passage_ids

DUMMY = "rexragDUMMYcontent"
NOTICE_TEXT = {
    "cut": "Your message was cut off before it ended. Call a tool or give the final answer, briefly.",
    "budget": "No searches are left: give the final answer now.",
    "empty_query": "The search query was empty.",
    "retrieval_failed": "The search engine failed; try again or answer.",
}


# --------------------------------------------------------------------------- tools


def search(query: str) -> str:
    """Search a Wikipedia-style passage collection and return the best matching passages.

    Args:
        query: What to look up, as a short search query.
    """
    raise RuntimeError("the built-in search tool runs through the agent's retriever")


TOOLS: Registry[Callable] = Registry("tool")
TOOLS.add("search", search)


def register_tool(fn: Callable | None = None, *, name: str | None = None):
    """Register a plain Python function as a tool: ``@register_tool`` or ``@register_tool(name="x")``.

    Its JSON schema (what the chat template declares) comes from its signature and Google-style
    docstring (``transformers.utils.get_json_schema``); it is called with the model's arguments as
    keywords and its return value, turned into text with ``str``, is the tool message.
    """
    if fn is None:
        return lambda f: register_tool(f, name=name)
    TOOLS.add(name or fn.__name__, fn)
    return fn


@dataclass
class ToolSpec:
    name: str
    fn: Callable
    schema: dict


def _lookup(ref: str) -> Callable:
    if ref in TOOLS:
        return TOOLS.get(ref)
    mod, _, attr = ref.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(mod), attr) if mod else TOOLS.get(ref)
    except Exception as exc:
        raise ConfigError(f"rollout.tools: {ref!r} is neither a registered tool {TOOLS.names()} nor an importable "
                          f"dotted path ({type(exc).__name__}: {exc})") from None


def resolve_tools(refs: list[str]) -> list[ToolSpec]:
    """Tool names or dotted paths -> specs with their JSON schemas; ``ConfigError`` when a tool cannot be
    described or two tools share a name."""
    from transformers.utils import get_json_schema

    specs: list[ToolSpec] = []
    for ref in refs:
        fn = _lookup(ref)
        try:
            schema = get_json_schema(fn)
        except Exception as exc:
            raise ConfigError(f"rollout.tools: tool {ref!r} cannot be described as a JSON schema: {exc}") from None
        name = schema["function"]["name"] if ref not in TOOLS else ref
        schema["function"]["name"] = name
        if any(s.name == name for s in specs):
            raise ConfigError(f"rollout.tools: two tools are named {name!r}; give each a unique name")
        specs.append(ToolSpec(name, fn, schema))
    return specs


# --------------------------------------------------------------------------- parsers


@dataclass
class ToolCall:
    """One parsed call: ``arguments`` is None and ``error`` says why when the call is malformed."""

    name: str
    arguments: dict | None = None
    error: str | None = None


TOOL_PARSERS: Registry[Callable[[str], list[ToolCall]]] = Registry("tool parser")


def _call_from_json(body: str, arg_keys: tuple[str, ...]) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        return ToolCall("", None, f"the tool call is not valid JSON ({exc.msg})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall("", None, 'a tool call must be a JSON object with a "name" string')
    args = next((obj[k] for k in arg_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        return ToolCall(obj["name"], None, f'the arguments of {obj["name"]!r} must be a JSON object')
    return ToolCall(obj["name"], args)


@TOOL_PARSERS.register("hermes")
def parse_hermes(text: str) -> list[ToolCall]:
    """Hermes / Qwen2.5 / Qwen3: every ``<tool_call>{json}</tool_call>``; an unclosed one is malformed."""
    calls = [_call_from_json(m.group(1).strip(), ("arguments", "parameters"))
             for m in re.finditer(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)]
    tail = text[text.rfind("</tool_call>") + 1 :] if "</tool_call>" in text else text
    if "<tool_call>" in tail:
        calls.append(ToolCall("", None, "a <tool_call> is not closed with </tool_call>"))
    return calls


@TOOL_PARSERS.register("llama3_json")
def parse_llama3_json(text: str) -> list[ToolCall]:
    """Llama 3.x JSON calls: the message (after an optional ``<|python_tag|>``) is one JSON object, or several
    separated by ``;``, each ``{"name": ..., "parameters": {...}}``. A message that does not open with ``{``
    is a plain message (no call)."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return []
    try:
        json.loads(body)
        parts = [body]
    except json.JSONDecodeError:
        parts = [p for p in body.split(";") if p.strip()]
    return [_call_from_json(p.strip(), ("parameters", "arguments")) for p in parts]


# How each shipped family writes a call (the warm-up's automatically built trajectories use it).
CALL_WRITERS: dict[str, Callable[[str, dict], str]] = {
    "hermes": lambda name, args: "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>",
    "llama3_json": lambda name, args: json.dumps({"name": name, "parameters": args}),
}


def write_call(parser: str, name: str, arguments: dict) -> str:
    """A call to ``name`` as the ``parser`` family writes it (parsed back by that parser)."""
    if parser not in CALL_WRITERS:
        raise ConfigError(f"no call writer for tool parser {parser!r} (have {sorted(CALL_WRITERS)}); add one to "
                          "rexrag.rollout.tool_calls.CALL_WRITERS")
    return CALL_WRITERS[parser](name, arguments)


# A template that ignores ``tools`` (SmolLM2's plain ChatML) gets them declared in a system message in the
# parser family's syntax, our wording.
TOOL_SYSTEM: dict[str, str] = {
    "hermes": ("You can call functions to help answer. Their signatures, one JSON schema a line:\n<tools>\n{tools}\n"
               "</tools>\nTo call one, write <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
               "</tool_call> and end your message; the result comes back in the next message."),
    "llama3_json": ("You can call functions to help answer. Their signatures, one JSON schema a line:\n{tools}\n"
                    "To call one, reply with only {{\"name\": function name, \"parameters\": dictionary of arguments}}; "
                    "the result comes back in the next message."),
}


# --------------------------------------------------------------------------- rendering


def split_think(text: str) -> str:
    """The text after the last ``</think>`` (the message proper)."""
    return text.rsplit(THINK_CLOSE, 1)[-1]


def require_chat_template(tokenizer, setting: str = "rollout.format=tool_calls") -> None:
    """``ConfigError`` naming ``setting`` when ``tokenizer`` has no chat template (checked before the model loads)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(f"{setting} needs a tokenizer with a chat template ({name} has none); use the tags format")


class ChatFormat:
    """The tokenizer's chat template with tools declared: the prompt, rendered deltas, the drift check."""

    def __init__(self, tokenizer, tools: list[ToolSpec], parser: str, final_answer: str = "auto"):
        require_chat_template(tokenizer)
        self.tok, self.tools, self.final_answer = tokenizer, {t.name: t for t in tools}, final_answer
        self.parse = TOOL_PARSERS.get(parser, " (rollout.tool_parser)")
        self.schemas = [t.schema for t in tools]
        self.system = None  # the tools' declaration when the template itself ignores ``tools``
        probe = [{"role": "user", "content": "q"}]
        if self.schemas and self.render(probe, True) == self.tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True):
            if parser not in TOOL_SYSTEM:
                raise ConfigError(f"the chat template ignores tools and rollout.tool_parser={parser!r} has no declaration "
                                  "text (rexrag.rollout.tool_calls.TOOL_SYSTEM); use a template that declares tools")
            self.system = TOOL_SYSTEM[parser].format(tools="\n".join(json.dumps(s) for s in self.schemas))

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tools=self.schemas or None, tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def prompt(self, text: str) -> tuple[list[int], list[dict]]:
        """Prompt ids (user turn, tools declared, generation prompt) and the messages so far."""
        messages = [{"role": "user", "content": text}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        return self.encode(self.render(messages, True)), messages

    def delta_ids(self, new: list[dict], sampled_tail: str) -> list[int]:
        """Ids the template renders after an assistant turn for ``new`` messages plus the next generation
        prompt. ``sampled_tail`` is the end-of-turn text the model already sampled (its EOS), left out."""
        full = self.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": DUMMY}, *new], True)
        after = full[full.rindex(DUMMY) + len(DUMMY) :]
        if sampled_tail and after.startswith(sampled_tail):
            after = after[len(sampled_tail) :]
        return self.encode(after)

    def answer(self, message: str) -> str | None:
        """The answer in a final message (think stripped, special tokens removed), per ``final_answer``."""
        text = split_think(message)
        span = last_answer_span(text) if self.final_answer != "message" else None
        if span is not None:
            return text[span[0] : span[1]].strip() or None
        return None if self.final_answer == "tag" else (text.strip() or None)


def check_setup(tool_parser: str, tools: list[str]) -> None:
    """Config-time checks (before any model loads): the parser exists, every tool is describable and unique."""
    TOOL_PARSERS.get(tool_parser, " (rollout.tool_parser)")
    resolve_tools(tools)


# --------------------------------------------------------------------------- the turn


@dataclass
class PendingTurn:
    """A message that asked for tools (``calls``), or was cut before it ended (``calls`` None)."""

    body: str  # the message text without its end-of-turn token
    tail: str  # the end-of-turn text the model sampled ("" when cut)
    calls: list[ToolCall] | None


def apply_tool_turn(agent, r, ids: list[int], finish: str, start: int, counts: Counter) -> PendingTurn | None:
    """Read one sampled assistant message (already appended as POLICY at ``start``): finish the row (answer /
    length / turns) and return None, or return what it asks for; ``finish_tool_turns`` then runs every row's
    tools of this turn (one retriever call for all searches) and appends the tool messages."""
    chat: ChatFormat = agent.chat
    tok, cfg = agent.tokenizer, agent.cfg
    text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    tail = tok.decode(ids[-1:], skip_special_tokens=False) if finish == "eos" and ids else ""
    body = text[: len(text) - len(tail)] if tail and text.endswith(tail) else text
    counts["template_drift_turns"] += 0
    if len(r.traj) >= cfg.max_total_tokens:
        return r.finish("length")
    calls = chat.parse(split_think(body)) if finish == "eos" else []
    if finish == "eos" and not calls:  # the final message
        first = start
        while first > 0 and r.traj.segments[first - 1] in (Seg.POLICY, Seg.PROBE) and r.traj.turns[first - 1] == r.turn:
            first -= 1
        r.traj.answer = chat.answer(tok.decode(ids, skip_special_tokens=True))
        r.traj.answer_span = (first, len(r.traj))
        return r.finish("answer")
    if r.turns_left <= 0:
        return r.finish("turns")
    return PendingTurn(body, tail, calls if finish == "eos" else None)


def finish_tool_turns(agent, pending: list[tuple], counts: Counter) -> None:
    """Run the tools of ``pending`` = ``[(row, PendingTurn), ...]`` and append each row's tool messages as the
    template's delta (INFO when a call succeeded, else NOTICE). Searches of all rows go to the retriever in one
    call, as in the tags format."""
    results: dict[tuple[int, int], tuple[str, bool]] = {}
    jobs: list[tuple[int, int, str]] = []  # (row, call, query)
    for i, (r, turn) in enumerate(pending):
        budget = r.searches_left
        for j, call in enumerate(turn.calls or []):
            if call.error is None and call.name == "search" and "search" in agent.chat.tools:
                query = _search_query(agent, call.arguments, counts)
                if isinstance(query, tuple):
                    results[i, j] = query
                elif budget <= 0:
                    results[i, j] = (NOTICE_TEXT["budget"], False)
                else:
                    budget -= 1
                    jobs.append((i, j, query))
            else:
                results[i, j] = _run_one(agent, call, counts)
    if jobs:
        found = agent._search([q for _, _, q in jobs])
        counts["retrieval_calls"] += 1
        for k, (i, j, _) in enumerate(jobs):
            r = pending[i][0]
            if found is None:
                counts["retrieval_failures"] += 1
                r.traj.retrieval_failures += 1
                results[i, j] = (NOTICE_TEXT["retrieval_failed"], False)
                continue
            r.searches_left -= 1
            r.traj.n_searches += 1
            counts["searches"] += 1
            r.traj.retrievals.append(Retrieval(len(r.traj), r.turn, jobs[k][2], passage_ids(found[k])))  # results follow
            results[i, j] = (agent.format_fn(found[k]), True)
    for i, (r, turn) in enumerate(pending):
        _append_messages(agent, r, turn, [results[i, j] for j in range(len(turn.calls or []))], counts)


def _append_messages(agent, r, turn: PendingTurn, outcomes: list[tuple[str, bool]], counts: Counter) -> None:
    chat, tok = agent.chat, agent.tokenizer
    if turn.calls is None:  # cut by the per-turn cap: no complete message to act on
        counts["invalid_actions"] += 1
        r.traj.invalid_actions += 1
        new, seg = [{"role": "user", "content": NOTICE_TEXT["cut"]}], Seg.NOTICE
    else:
        new = []
        for call, (content, good) in zip(turn.calls, outcomes):
            if good:
                content = _cap(agent, content, counts)
            else:
                counts["invalid_actions"] += 1
                r.traj.invalid_actions += 1
            new.append({"role": "tool", "name": call.name or "error", "content": content})
        seg = Seg.INFO if any(good for _, good in outcomes) else Seg.NOTICE
    counts["info_tokens" if seg == Seg.INFO else "notice_tokens"] += agent._insert(r, chat.delta_ids(new, turn.tail), seg)
    messages = r.traj.meta.get("messages")
    if messages is not None and not r.done:
        messages += [{"role": "assistant", "content": turn.body}, *new]
        seen = tok.decode(r.traj.token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        counts["template_drift_turns"] += int(chat.render(messages, True) != seen)


def _cap(agent, content: str, counts: Counter) -> str:
    capped = cap_text(agent.tokenizer, content, agent.cfg.max_obs_tokens)
    counts["obs_truncated"] += int(capped != content)
    return capped


def cap_text(tokenizer, text: str, max_tokens: int) -> str:
    """A tool's output cut to ``max_tokens`` tokens (the text of the first ones), like an observation."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def _run_one(agent, call: ToolCall, counts: Counter) -> tuple[str, bool]:
    """A user tool's output (or why there is none) and whether it ran."""
    tools = agent.chat.tools
    if call.error is not None:
        counts["tool_errors"] += 1
        return f"Error: {call.error}.", False
    if call.name not in tools:
        counts["tool_errors"] += 1
        return f"Error: unknown tool {call.name!r}; the tools are {sorted(tools)}.", False
    try:
        result = tools[call.name].fn(**call.arguments)
    except Exception as exc:  # a tool's own failure is the model's information, never a crash
        counts["tool_errors"] += 1
        return f"Error: {call.name} raised {type(exc).__name__}: {exc}", False
    counts["tool_calls"] += 1
    return str(result), True


def _search_query(agent, args: dict, counts: Counter) -> str | tuple[str, bool]:
    """The query of a search call, cut to ``max_query_chars``; or the notice for a bad or empty one."""
    query = args.get("query") if set(args) == {"query"} else None
    if not isinstance(query, str):
        counts["tool_errors"] += 1
        return 'Error: search takes one argument, "query" (a string).', False
    query = query.strip()[: agent.max_query_chars]
    if not query:
        counts["empty_queries"] += 1
        return NOTICE_TEXT["empty_query"], False
    return query
