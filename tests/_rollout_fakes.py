"""Fakes for the rollout tests: a scripted backend, a forced-output LM, retrievers (the tokenizer is
``fake_tokenizer.FakeTokenizer``: one token per character, so token counts are string lengths)."""

from __future__ import annotations

import torch
from fake_tokenizer import EOS_TEXT, FakeTokenizer

from rexrag.errors import RetrievalError
from rexrag.retrieval.base import Passage
from rexrag.rollout.engine import GenOutput, SamplingParams, first_stop


def scripted_logprob(token: int, index: int) -> float:
    """The log-prob the scripted backend reports for the ``index``-th token of an output."""
    return -((token * 31 + index) % 97 + 1) / 100.0


class ScriptedBackend:
    """A ``GenerationBackend`` that plays scripted turns.

    ``script`` maps a question (found in the decoded prompt) to the texts of its successive turns;
    ``EOS_TEXT`` inside a turn becomes the EOS token. The turn number of a row is the number of its
    earlier prompts (prefixes of the current one) this backend has seen. Stops are applied like a
    real backend: the output is cut right after the token that completes the first stop string, and
    at ``max_new_tokens``. Every call is logged in ``calls``.
    """

    def __init__(self, tokenizer: FakeTokenizer, script: dict[str, list[str]]):
        self.tok, self.script = tokenizer, script
        self.seen: set[tuple[int, ...]] = set()
        self.calls: list[dict] = []

    def _turn_text(self, prompt: list[int]) -> str:
        text = self.tok.decode(prompt)
        keys = [q for q in self.script if q in text]
        assert len(keys) == 1, f"prompt matches {keys} of the script"
        turn = sum(1 for s in self.seen if tuple(prompt[: len(s)]) == s)
        turns = self.script[keys[0]]
        return turns[turn] if turn < len(turns) else EOS_TEXT

    def _encode_turn(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(EOS_TEXT)):
            if i:
                ids.append(self.tok.eos_token_id)
            ids += self.tok.encode(part)
        return ids

    def generate(self, prompts: list[list[int]], stops: list[list[str]], params: SamplingParams) -> list[GenOutput]:
        self.calls.append({"n": len(prompts), "stops": [list(s) for s in stops], "max_new_tokens": params.max_new_tokens})
        outs = [self._one(p, s, params) for p, s in zip(prompts, stops)]
        self.seen.update(tuple(p) for p in prompts)
        return outs

    def _one(self, prompt: list[int], stops: list[str], params: SamplingParams) -> GenOutput:
        want = self._encode_turn(self._turn_text(prompt))
        ids: list[int] = []
        for t in want:
            ids.append(t)
            lps = [scripted_logprob(x, i) for i, x in enumerate(ids)]
            if t == self.tok.eos_token_id:
                return GenOutput(ids, lps, "eos")
            s = first_stop(self.tok.decode(ids[-max(map(len, stops), default=0) :]), stops) if stops else None
            if s is not None:
                return GenOutput(ids, lps, "stop", s)
            if len(ids) >= params.max_new_tokens:
                return GenOutput(ids, lps, "length")
        return GenOutput(ids, [scripted_logprob(x, i) for i, x in enumerate(ids)], "length")


class FakeRetriever:
    """Returns ``k`` passages per query whose text names the query; can fail the first N calls."""

    def __init__(self, fail_times: int = 0, text_len: int = 20):
        self.fail_times, self.text_len = fail_times, text_len
        self.calls: list[list[str]] = []

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.calls.append(list(queries))
        if len(self.calls) <= self.fail_times:
            raise RetrievalError("retriever is down")
        return [
            [Passage(id=f"{q}-{j}", title=f"T{j}", text=(f"about {q} " * 50)[: self.text_len]) for j in range(k)]
            for q in queries
        ]


class ForcedLM(torch.nn.Module):
    """A causal-LM stand-in whose next-token distribution is fixed by the context.

    ``policy(history) -> next token id`` chooses the favoured token; the logits are ``high`` for it
    and 0 for every other token, so its probability is known in closed form. The token history of
    each row is kept inside the ``DynamicCache`` (as a fake key tensor), so it survives the
    backend's pruning of finished rows exactly like real keys and values do.
    """

    def __init__(self, vocab_size: int, policy, high: float = 8.0):
        super().__init__()
        from transformers import LlamaConfig

        self.config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=1, hidden_size=8, num_attention_heads=1)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.policy, self.high = vocab_size, policy, high

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache=True, logits_to_keep=0):
        keys = input_ids.float()[:, None, :, None]  # [B, 1, T, 1]
        hist, _ = past_key_values.update(keys, keys.clone(), 0)
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab_size)
        for b in range(input_ids.shape[0]):
            row = [int(x) for x, m in zip(hist[b, 0, :, 0].tolist(), attention_mask[b].tolist()) if m]
            logits[b, 0, self.policy(row)] = self.high
        return type("Out", (), {"logits": logits})()


def forced_logprob(vocab_size: int, high: float = 8.0) -> float:
    """log p of the favoured token of ``ForcedLM`` at temperature 1."""
    import math

    return high - math.log(math.exp(high) + vocab_size - 1)
