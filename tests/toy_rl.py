"""A tiny, fast RL setting for trainer tests: the fake tokenizer over 16 ids, a random tiny Llama, a single-turn
sampler that builds token-exact Trajectory records, and a learnable toy reward.

Used by tests/test_trainer.py in-process and by tests/train_worker.py under ``accelerate launch``.
"""

from __future__ import annotations

import torch
from fake_tokenizer import FakeTokenizer

from rexrag.config import Config, load_config
from rexrag.data import QAExample
from rexrag.models import tiny_llama
from rexrag.rollout.trajectory import Seg, Trajectory

VOCAB = 16
TARGET = "c"  # the toy reward pays for this letter early in the completion


def toy_tokenizer() -> FakeTokenizer:
    """The one fake tokenizer over the toy vocabulary: id 0 = pad/eos, ids 1..15 = letters a..o."""
    return FakeTokenizer(shift=1 - ord("a"), vocab_size=VOCAB, pad_token_id=0, bos_token_id=None, eos_token_id=0)


def toy_model(seed: int = 0):
    return tiny_llama(VOCAB, hidden=32, layers=2, heads=2, seed=seed, pad_token_id=0, eos_token_id=0, bos_token_id=0)


def toy_examples(n: int = 16) -> list[QAExample]:
    return [QAExample(id=f"toy_{i}", question=f"q{i}", golden_answers=[TARGET], group_id=100 + i) for i in range(n)]


def early_target_reward(completions: list[str], answers: list[list[str]], **kw) -> list[float]:
    """1 when the gold letter appears among the first 3 generated characters, else 0."""
    return [1.0 if a and a[0] in c[:3] else 0.0 for c, a in zip(completions, answers)]


def prompt_ids(ex: QAExample) -> list[int]:
    i = int(ex.id.split("_")[1])
    return [1 + (i * 7) % 15, 1 + (i * 3 + 5) % 15, 1 + (i + 11) % 15]


class ToyRollout:
    """Single-turn sampling of ``new_tokens`` tokens (no EOS stop), PROMPT + POLICY segments.

    With ``per_group_seed`` each group is sampled with its own generator seeded by (seed, trainer
    step, group id): the samples do not depend on which process or batch a prompt lands in. Otherwise
    the global torch RNG is used (restored by checkpoints).
    """

    def __init__(self, model, new_tokens: int = 6, seed: int = 0, per_group_seed: bool = False):
        self.model, self.new_tokens, self.seed, self.per_group_seed = model, new_tokens, seed, per_group_seed
        self.trainer = None  # set by the test so per-group seeds can include the step

    @torch.no_grad()
    def _sample(self, prompts: list[list[int]], n: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows = each prompt repeated n times (prompt-major); returns new tokens and their log-probs."""
        device = next(self.model.parameters()).device
        ids = torch.tensor([p for p in prompts for _ in range(n)], device=device)
        start = ids.shape[1]
        lps = []
        for _ in range(self.new_tokens):
            logits = self.model(input_ids=ids).logits[:, -1].float()
            logp = torch.log_softmax(logits, -1)
            tok = torch.multinomial(logp.exp().cpu(), 1, generator=gen).to(device)  # CPU generator: same draws on any device
            lps.append(logp.gather(-1, tok))
            ids = torch.cat([ids, tok], 1)
        return ids[:, start:].cpu(), torch.cat(lps, 1).cpu()

    def __call__(self, examples: list[QAExample], n: int) -> list[Trajectory]:
        step = self.trainer.step_idx if self.trainer is not None else 0
        prompts = [prompt_ids(ex) for ex in examples]
        if self.per_group_seed:
            parts = [self._sample([p], n, torch.Generator().manual_seed(self.seed * 1_000_003 + step * 10_007 + ex.group_id))
                     for p, ex in zip(prompts, examples)]
            toks, lps = torch.cat([t for t, _ in parts]), torch.cat([lp for _, lp in parts])
        else:  # all prompts have the same length: one batch
            toks, lps = self._sample(prompts, n, None)
        return toy_trajectories(examples, prompts, toks, lps, n)


def toy_trajectories(examples, prompts, toks, lps, n: int) -> list[Trajectory]:
    """n trajectories per example: its prompt, then sampled row ``i * n + k`` of ``toks`` with its log-probs ``lps``."""
    out = []
    for i, ex in enumerate(examples):
        for k in range(n):
            tr = Trajectory(group_id=ex.group_id, example=ex, stop_reason="length")
            tr.extend(prompts[i], Seg.PROMPT, 0)
            tr.extend(toks[i * n + k].tolist(), Seg.POLICY, 0, lps[i * n + k].tolist())
            out.append(tr)
    return out


def toy_config(out_dir, *overrides: str) -> Config:
    base = [
        f"trainer.out_dir={out_dir}", "trainer.lr=0.003", "trainer.steps=2", "trainer.mini_batch_size=16",
        "trainer.micro_batch_size=8", "trainer.log_tensorboard=false", "data.batch_size=8", "rollout.n=4",
        "algo.kl_coef=0.0", "rollout.max_total_tokens=16",
    ]
    return load_config(None, base + list(overrides))
