"""Chat templates written for the tool-call tests, each in the style of one model family, over the SmolLM2
tokenizer's special tokens (``<|im_start|>``, ``<|im_end|>`` = EOS), and a scripted backend that plays given
assistant messages and scores them under a real model (so recorded log-probs can be re-scored)."""

from __future__ import annotations

import copy

import torch

from rexrag.rollout.engine import GenOutput, SamplingParams, sampling_logprobs

# ChatML with Hermes/Qwen2.5 tool calls: tools in the system turn, consecutive tool results merged into one
# user turn of <tool_response> blocks.
HERMES = (
    "{%- if tools %}{{- '<|im_start|>system\\nYou may call functions. Signatures:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall one as <tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n"
    "</tool_call><|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3-like: as HERMES, but an assistant message that is not the last one loses its <think> block when the
# conversation is rendered again (what drifts when history is re-rendered).
QWEN3 = HERMES.replace(
    "{%- else %}{{- '<|im_start|>' + message.role",
    "{%- elif message.role == 'assistant' and not loop.last and '</think>' in message.content %}"
    "{{- '<|im_start|>assistant\\n' + message.content.split('</think>')[-1].lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role",
)

# Llama-3-like: tools listed in the first user message, calls as bare JSON {"name", "parameters"}, results in an
# "ipython" turn, message content trimmed, no newline after the end of a turn.
LLAMA3 = (
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}{{- '<|im_start|>ipython\\n\\n' + (message.content | tojson) + '<|im_end|>' }}"
    "{%- elif message.role == 'user' and loop.first and tools %}{{- '<|im_start|>user\\n\\nGiven the following "
    "functions, respond with a JSON function call {\"name\": function name, \"parameters\": dictionary of argument "
    "name and its value}.\\n\\n' }}"
    "{%- for tool in tools %}{{- (tool | tojson) + '\\n\\n' }}{%- endfor %}{{- (message.content | trim) + '<|im_end|>' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n\\n' + (message.content | trim) + '<|im_end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n\\n' }}{%- endif %}"
)


def with_template(tokenizer, template: str | None):
    """A copy of ``tokenizer`` whose chat template is ``template`` (None: no template)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


class PlayedBackend:
    """Plays scripted assistant messages (``script[question]`` = texts of successive turns, each ended with EOS
    unless it is cut by ``max_new_tokens``) and reports the log-prob ``model`` gives each played token in its
    context at ``params.temperature`` (one forward per row), as if the model had sampled it. Every output is
    kept in ``outputs``."""

    def __init__(self, tokenizer, script: dict[str, list[str]], model=None):
        self.tok, self.script, self.model = tokenizer, script, model
        self.turn: dict[str, int] = {}
        self.outputs: list[list[int]] = []
        self.eos = tokenizer.eos_token_id  # the end-of-turn token played

    def generate(self, prompts, stops, params: SamplingParams) -> list[GenOutput]:
        outs = []
        for p in prompts:
            text = self.tok.decode(p)
            (q,) = [q for q in self.script if q in text]
            k = self.turn.get(q, 0)
            self.turn[q] = k + 1
            msg = self.script[q][k] if k < len(self.script[q]) else "done"
            ids = list(self.tok(msg, add_special_tokens=False)["input_ids"]) + [self.eos]
            finish = "eos"
            if len(ids) > params.max_new_tokens:
                ids, finish = ids[: params.max_new_tokens], "length"
            outs.append(GenOutput(ids, self._score(p, ids, params), finish))
            self.outputs.append(ids)
        return outs

    def _score(self, prompt, ids, params) -> list[float]:
        if self.model is None:
            return [-0.5] * len(ids)
        seq = torch.tensor([list(prompt) + ids])
        with torch.no_grad():
            logits = self.model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, len(prompt) - 1 : -1].float()
        lp = sampling_logprobs(logits, SamplingParams(temperature=params.temperature or 1.0))
        return lp.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1).tolist()
