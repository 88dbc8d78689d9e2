"""Instruction templates and prompt token ids for the search agent.

The tags are the ones Search-R1 and REX-RAG use (``<think>``, ``<search>``, ``<information>``,
``<answer>``; written from ``rexrag.protocol``). ``"rexrag"`` is our own wording; ``"search-r1"`` reproduces the public Search-R1
instruction word for word so that its released checkpoints can be evaluated under the prompt they
were trained with. A template can also be a file path or a literal string containing ``{question}``.

The instruction goes into a single user turn of the tokenizer's chat template (with the generation
prompt appended) when the tokenizer has one, otherwise it is tokenised as plain text. Only the
``{question}`` placeholder is substituted (``str.replace``), so templates may contain other braces.
"""

from __future__ import annotations

from pathlib import Path

from rexrag.errors import UserError
from rexrag.protocol import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    INFORMATION_CLOSE,
    INFORMATION_OPEN,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
)

PLACEHOLDER = "{question}"

TEMPLATES: dict[str, str] = {
    "rexrag": (
        "You answer questions with the help of a search engine. Think step by step inside "
        f"{THINK_OPEN} {THINK_CLOSE}. Whenever a fact is missing, write a search query as "
        f"{SEARCH_OPEN} query {SEARCH_CLOSE}; "
        f"the system then shows the best matching passages inside {INFORMATION_OPEN} {INFORMATION_CLOSE}. "
        "Search again if the passages are not enough. When you know the answer, give only the short "
        f"answer inside {ANSWER_OPEN} {ANSWER_CLOSE}, for example {ANSWER_OPEN} Paris {ANSWER_CLOSE}.\n"
        f"Question: {PLACEHOLDER}\n"
    ),
    # Search-R1 (Jin et al., 2025) instruction, verbatim, for evaluating its checkpoints.
    "search-r1": (
        f"Answer the given question. You must conduct reasoning inside {THINK_OPEN} and {THINK_CLOSE} first "
        "every time you get new information. After reasoning, if you find you lack some knowledge, you can call "
        f"a search engine by {SEARCH_OPEN} query {SEARCH_CLOSE} and it will return the top searched results "
        f"between {INFORMATION_OPEN} and {INFORMATION_CLOSE}. You can search as many times as your want. If you "
        "find no further external knowledge needed, you can directly provide the answer inside "
        f"{ANSWER_OPEN} and {ANSWER_CLOSE}, without detailed illustrations. For example, "
        f"{ANSWER_OPEN} Beijing {ANSWER_CLOSE}. Question: {PLACEHOLDER}\n"
    ),
}

# rollout.format=tool_calls: the chat template declares the tools, so the instruction names no search tag.
TOOL_TEMPLATE = (
    "Answer the question. Call the search tool whenever a fact is missing, as often as you need. When you "
    f"know the answer, reply with only the short answer inside {ANSWER_OPEN} {ANSWER_CLOSE}, for example "
    f"{ANSWER_OPEN} Paris {ANSWER_CLOSE}.\nQuestion: {PLACEHOLDER}\n"
)


def tool_template(template: str) -> str:
    """The instruction for ``rollout.format=tool_calls``: the default ``rexrag`` (which teaches the tags) becomes
    ``TOOL_TEMPLATE``; any other template is kept."""
    return TOOL_TEMPLATE if template == "rexrag" else template


def resolve_template(template: str) -> str:
    """A template name, a file path, or a literal containing ``{question}`` -> the template text."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if PLACEHOLDER in template:
        return template
    path = Path(template).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if PLACEHOLDER not in text:
            raise UserError(f"template file {path} must contain the placeholder {PLACEHOLDER}")
        return text
    raise UserError(
        f"rollout.template={template!r} is neither a known template {sorted(TEMPLATES)}, "
        f"an existing file, nor a literal containing {PLACEHOLDER}"
    )


def render_prompt(question: str, template: str = "rexrag") -> str:
    """The instruction text for one question (before any chat template)."""
    return resolve_template(template).replace(PLACEHOLDER, question.strip())


def build_prompt_ids(tokenizer, question: str, template: str = "rexrag") -> list[int]:
    """Token ids of the full prompt: chat template (user turn + generation prompt) when available."""
    text = render_prompt(question, template)
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        # The chat text already carries its special tokens; adding them again would double the BOS.
        return list(tokenizer(chat, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
