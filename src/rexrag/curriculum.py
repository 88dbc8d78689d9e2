"""A difficulty curriculum: prompts drawn by an online estimate of each question's pass rate (``data.curriculum``).

GRPO learns only from groups whose rollouts disagree. A question the policy always gets wrong (a dead end)
or always right gives its group no signal, so ``pass_rate`` (UR^2's difficulty-aware sampling) draws the
questions whose estimated pass rate p is in between more often:

    weight_i = p_i * (1 - p_i) + FLOOR                       (FLOOR keeps every question drawable)
    p_i      = (S_i + M * p_bar) / (N_i + M)                  M = PRIOR_STRENGTH
    S_i <- d * S_i + passes,  N_i <- d * N_i + rollouts       each time question i is rolled out, d = data.curriculum_decay

``passes`` counts the question's original rollouts whose reward reaches ``rex.success_reward`` (the
project's "right"; REX-RAG probes are conditioned on failing and are not counted). ``p_bar`` is the pass
rate over every question seen so far (0.5 before any), so an unseen question is expected to do as well as
the average one: with most groups dead ends, a question seen once with a right and a wrong rollout is
drawn again before unseen ones, and those before questions seen to fail. The decay forgets old results as
the policy changes. Each step draws ``data.batch_size`` distinct questions without replacement, from a
generator seeded by (``trainer.seed``, draw number), so a run is deterministic and, since the estimate is
saved with the sampler's state in checkpoints, a resumed run draws what an uninterrupted one would.

Differences from UR^2: it buckets questions by difficulty offline and mixes the buckets; here the estimate
is online, per question, from the training rollouts themselves, and costs no extra sampling.
"""

from __future__ import annotations

import hashlib

import torch

from rexrag.data import PromptSampler

FLOOR = 0.01
PRIOR_STRENGTH = 1.0
CURRICULA = ("none", "pass_rate")


class PassRateSampler(PromptSampler):
    """Weighted draws of ``batch_size`` distinct prompt indices by estimated pass rate. State (``state_dict``): the
    prompts consumed, the draws made and each seen question's decayed (passes, rollouts)."""

    def __init__(self, n: int, batch_size: int, seed: int, decay: float = 0.8):
        super().__init__(n, batch_size, seed, shuffle=True)
        self.decay, self.draws = float(decay), 0
        self.stats: dict[int, list[float]] = {}  # index -> [decayed passes, decayed rollouts]

    def prior(self) -> float:
        """p_bar: the pass rate over the seen questions' (decayed) rollouts; 0.5 before any."""
        s = sum(v[0] for v in self.stats.values())
        n = sum(v[1] for v in self.stats.values())
        return s / n if n > 0 else 0.5

    def pass_rates(self) -> torch.Tensor:
        """[n] float64: each question's estimated pass rate."""
        p_bar = self.prior()
        est = torch.full((self.n,), p_bar, dtype=torch.float64)
        for i, (s, n) in self.stats.items():
            est[i] = (s + PRIOR_STRENGTH * p_bar) / (n + PRIOR_STRENGTH)
        return est

    def weights(self) -> torch.Tensor:
        p = self.pass_rates()
        return p * (1 - p) + FLOOR

    def next_batch(self) -> list[int]:
        k = min(self.batch_size, self.n)
        digest = hashlib.sha256(f"rexrag/curriculum/{self.seed}/{self.draws}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        out = torch.multinomial(self.weights(), k, replacement=False, generator=gen).tolist()
        self.draws += 1
        self.consumed += len(out)
        return out

    def observe(self, results: list[tuple[int, int, int]]) -> None:
        """Fold in ``(index, passes, rollouts)`` per question rolled out (apply the same list on every process)."""
        for i, passes, rollouts in sorted(results):
            s, n = self.stats.get(int(i), (0.0, 0.0))
            self.stats[int(i)] = [self.decay * s + passes, self.decay * n + rollouts]

    def metrics(self) -> dict[str, float]:
        p = self.pass_rates()
        w = self.weights()
        seen = torch.tensor(sorted(self.stats), dtype=torch.long)
        return {"curriculum/seen_frac": len(self.stats) / self.n, "curriculum/prior_pass_rate": self.prior(),
                "curriculum/signal_weight_share": float(w[seen].sum() / w.sum()) if len(seen) else 0.0,
                "curriculum/pass_rate_spread": float(p.std()) if self.n > 1 else 0.0}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "draws": self.draws,
                "pass_rate": [[i, s, n] for i, (s, n) in sorted(self.stats.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])
        self.draws = int(state.get("draws", 0))
        self.stats = {int(i): [float(s), float(n)] for i, s, n in state.get("pass_rate", [])}


def make_sampler(n: int, data_cfg, seed: int) -> PromptSampler:
    """The prompt sampler ``data.curriculum`` names (``none``: the epoch-wise shuffle of ``PromptSampler``)."""
    if getattr(data_cfg, "curriculum", "none") == "pass_rate":
        return PassRateSampler(n, data_cfg.batch_size, seed, data_cfg.curriculum_decay)
    return PromptSampler(n, data_cfg.batch_size, seed, data_cfg.shuffle)


def group_results(trajs: list, rewards: list[float], success: float, index_of: dict[int, int]) -> list[tuple[int, int, int]]:
    """``(prompt index, passes, rollouts)`` per question of the original rollouts ``trajs`` (``index_of``: group id ->
    prompt index); a pass is a reward >= ``success``."""
    by: dict[int, list[int]] = {}
    for tr, r in zip(trajs, rewards, strict=True):
        entry = by.setdefault(index_of[tr.group_id], [0, 0])
        entry[0] += int(float(r) >= success)
        entry[1] += 1
    return [(i, p, n) for i, (p, n) in by.items()]
