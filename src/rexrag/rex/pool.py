"""The exploratory prompt pool and its prefix trie (the probe policy's inserted-prompt distribution).

A pool is a UTF-8 text file with one prompt per line; every prompt opens with ``<think>``; lines
starting with ``#`` are comments. The bundled pool (``resources/probe_prompts.txt``) holds 30 short
first-person doubts written for this project; a user passes their own with ``rex.pool=path``.

Token ids. Each prompt is tokenised **once, on its own** (``add_special_tokens=False``) and those
ids are what a probe inserts as its PROBE tokens. Tokenising the same text after arbitrary context
could give other ids (BPE merges across the boundary, e.g. ``".<"``), but we never re-tokenise: the
PROBE ids of a probe are exactly the ids of one pool entry, so the trie below always finds them.

Probabilities. The probe policy picks one prompt uniformly and inserts all of its tokens. The
trie gives, for each token ``t_k`` of a prompt, the conditional probability under that choice:

    P(t_k | t_<k) = count(t_<=k) / count(t_<k),    count(x) = #prompts whose ids start with x

and, because inserting stops after the last token, the last token also carries the end event
``P(end | t_<=K) = exact(t_<=K) / count(t_<=K)`` (an explicit end marker; without it a prompt that is
a prefix of another would get too much mass). The product over a prompt's tokens is then
``exact(ids) / N`` -- ``1/N`` for a pool whose prompts tokenise to distinct id sequences.

How this relates to the public code. Its prefix index has no entry for the empty prefix, so the
first PROBE token gets probability 1, and it has no end marker. We do not special-case the first
token: its probability is ``count(t_1) / N``, which equals 1 whenever every prompt starts with the
same token -- true for any pool where all prompts open with ``<think>`` and the tokenizer starts
``<think>`` with the same id (checked by ``Pool.first_token_shared``; it holds for SmolLM2 and for
tokenizers with ``<think>`` as one added token). So for the bundled pool both rules agree on the
first token, and ours also stays normalised for pools that share longer prefixes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from rexrag.errors import UserError
from rexrag.protocol import THINK_OPEN


class PoolError(UserError):
    """A prompt pool file is malformed; the message names file and line."""


def bundled_pool_path() -> Path:
    return Path(str(resources.files("rexrag") / "resources" / "probe_prompts.txt"))


def read_pool(path: str | Path | None = None) -> list[str]:
    """Read and validate a pool file (``None``/'' = bundled). Errors name file and line."""
    path = Path(path) if path else bundled_pool_path()
    if not path.is_file():
        raise PoolError(f"{path}: prompt pool file does not exist")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise PoolError(f"{path}: not UTF-8 text ({exc})") from None
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    prompts: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        text = raw.rstrip("\r")
        if text.startswith("#"):
            continue
        if not text.strip():
            raise PoolError(f"{path}:{lineno}: empty line; every line must hold one prompt (or a # comment)")
        if not text.startswith(THINK_OPEN):
            raise PoolError(f"{path}:{lineno}: prompt must start with {THINK_OPEN!r}, got {text[:30]!r}")
        if text in seen:
            raise PoolError(f"{path}:{lineno}: duplicate of the prompt on line {seen[text]}")
        seen[text] = lineno
        prompts.append(text)
    if not prompts:
        raise PoolError(f"{path}: the pool holds no prompts")
    return prompts


@dataclass
class _Node:
    count: int = 0  # prompts passing through this node (having this prefix)
    exact: int = 0  # prompts ending exactly here (the end marker's count)
    children: dict[int, "_Node"] = field(default_factory=dict)


class PromptTrie:
    """Prefix trie over tokenised prompts under a uniform choice of prompt."""

    def __init__(self, sequences: list[list[int]]):
        if not sequences:
            raise ValueError("PromptTrie needs at least one sequence")
        self.root = _Node()
        for seq in sequences:
            if not seq:
                raise ValueError("a pool prompt tokenised to zero tokens")
            node = self.root
            node.count += 1
            for tok in seq:
                node = node.children.setdefault(int(tok), _Node())
                node.count += 1
            node.exact += 1

    @property
    def size(self) -> int:
        return self.root.count

    def conditional_logprobs(self, ids: list[int]) -> list[float]:
        """[K] log P(t_k | t_<k) for a complete pool entry; the last one includes the end event.

        Raises ``KeyError`` when ``ids`` is not exactly one of the pool's token sequences.
        """
        node = self.root
        out = []
        for tok in ids:
            child = node.children.get(int(tok))
            if child is None:
                raise KeyError(f"token {tok} after {len(out)} PROBE tokens is not in the prompt pool")
            out.append(math.log(child.count) - math.log(node.count))
            node = child
        if node.exact == 0 or not out:
            raise KeyError("PROBE tokens are a strict prefix of pool prompts, not a complete prompt")
        out[-1] += math.log(node.exact) - math.log(node.count)
        return out


class Pool:
    """The prompt texts, their token ids (tokenised alone) and the trie over them."""

    def __init__(self, prompts: list[str], tokenizer, source: str = "<memory>"):
        if not prompts:
            raise PoolError(f"{source}: the pool holds no prompts")
        self.prompts = list(prompts)
        self.source = source
        self.token_ids = [list(tokenizer.encode(p, add_special_tokens=False)) for p in self.prompts]
        self.trie = PromptTrie(self.token_ids)
        self.logprobs = [self.trie.conditional_logprobs(ids) for ids in self.token_ids]

    @classmethod
    def load(cls, path: str | Path | None, tokenizer) -> "Pool":
        """Load a pool file ('' or None = bundled) and tokenise it with the policy tokenizer."""
        return cls(read_pool(path), tokenizer, source=str(path or bundled_pool_path()))

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def first_token_shared(self) -> bool:
        """True when every prompt starts with the same token (then P(first PROBE token) = 1, as in
        the public code)."""
        return len({ids[0] for ids in self.token_ids}) == 1
