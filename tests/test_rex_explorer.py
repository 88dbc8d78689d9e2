"""RexExplorer (the trainer hook) with a scripted fake agent: explore / correct / end_step."""

from __future__ import annotations

import math

import pytest
import torch
from rex_fakes import build_traj, rex_tokenizer

from rexrag.config import RexConfig, RolloutConfig
from rexrag.data import QAExample
from rexrag.rex.correction import behaviour_logprobs
from rexrag.rex.explorer import RexExplorer
from rexrag.rex.pool import Pool
from rexrag.rollout.trajectory import Seg, to_batch

TOK = rex_tokenizer()


class FakeAgent:
    """Continues each probe in the same turn with a scripted answer: the gold answer when the probe's
    pool prompt index is even, a wrong one otherwise."""

    def __init__(self):
        self.calls = []

    def run(self, trajs, searches_left):
        self.calls.append((len(trajs), list(searches_left)))
        for t in trajs:
            k = t.meta["pool_index"]
            ans = t.example.golden_answers[0] if k % 2 == 0 else "nope"
            ids = TOK.encode(f" I check again.</think><answer> {ans}</answer>")
            start = len(t)
            t.extend(ids, Seg.POLICY, t.turns[-1], [-0.25] * len(ids))
            t.answer, t.stop_reason = ans, "answer"
            t.answer_span = (start + len(TOK.encode(" I check again.</think>")), len(t))
        return trajs


def score_fn(trajs):
    """Old-policy log-probs: PROBE tokens score -(0.1 + 0.01 * pool index), others -1."""
    out = []
    for t in trajs:
        lp = torch.full((len(t),), -1.0)
        lp[0] = 0.0
        probe = torch.tensor(t.segments) == Seg.PROBE
        lp[probe] = -(0.1 + 0.01 * t.meta["pool_index"])
        out.append(lp)
    return out


def reward_fn(trajs):
    return [1.0 if t.answer == t.example.golden_answers[0] else 0.0 for t in trajs]


def _originals(pattern):
    """pattern[g] = list of booleans (correct?) for the originals of group g; one search each."""
    trajs = []
    for g, outcomes in enumerate(pattern):
        ex = QAExample(id=f"q{g}", question="Q?", golden_answers=[f"gold{g}"], group_id=g, data_source="t", metadata={})
        for ok in outcomes:
            ans = f"gold{g}" if ok else "bad"
            t = build_traj(TOK, [("Q?", Seg.PROMPT), ("<think> search </think><search> q </search>", Seg.POLICY),
                                 ("\n\n<information>doc</information>\n\n", Seg.INFO),
                                 (f"<think> it is {ans}.</think> So.<answer> {ans}</answer>", Seg.POLICY)], group_id=g)
            t.example = ex
            trajs.append(t)
    return trajs


PATTERN = [[False] * 4, [False] * 4, [True, False, True, False], [True] * 4]


def _explorer(**kw):
    cfg = RexConfig(enabled=True, **{"probe_prob": 1.0, "keep_ratio": 0.25, **kw})
    return RexExplorer(cfg, RolloutConfig(max_turns=3), TOK, Pool.load(None, TOK), seed=0)


def test_explore_builds_filters_and_continues_probes():
    ex, agent = _explorer(), FakeAgent()
    originals = _originals(PATTERN)
    rewards = reward_fn(originals)
    probes = ex.explore(originals, rewards, agent, score_fn, reward_fn)
    assert len(probes) == 4  # K = floor(16 * 0.25); 10 wrong originals were candidates
    assert agent.calls == [(4, [2, 2, 2, 2])]  # max_turns 3 - 1 search already made
    idx = [p.meta["pool_index"] for p in probes]
    # the kept probes are the best-scoring candidates (lowest pool index = highest score)
    ex2 = _explorer()
    cands = ex2._candidates(originals, [r < 1 for r in rewards])
    best = sorted(c.meta["pool_index"] for c in cands)[:4]
    assert sorted(idx) == best
    for p in probes:
        src = originals[p.source_index]
        assert not src.is_probe and rewards[p.source_index] == 0.0
        assert p.is_probe and p.group_id == src.group_id
        assert p.token_ids[: p.probe_start] == src.token_ids[: p.probe_start]
        k = p.meta["pool_index"]
        n_probe = len(ex.pool.token_ids[k])
        assert p.token_ids[p.probe_start : p.probe_start + n_probe] == ex.pool.token_ids[k]
        assert p.meta["reward"] == (1.0 if k % 2 == 0 else 0.0)
    m = ex.end_step()
    acc = sum(k % 2 == 0 for k in idx) / 4
    assert m["rex/dead_end_frac"] == 0.5
    assert m["rex/probes_made"] == 10 and m["rex/probes_kept"] == 4
    assert m["rex/failure_rate"] == pytest.approx(10 / 16)
    assert m["rex/alpha"] == pytest.approx(4 / 20)
    assert m["rex/probe_acc"] == pytest.approx(acc)
    assert m["rex/rho"] == pytest.approx(0.9 * 0.25 + 0.1 * acc)
    assert ex.end_step()["rex/rho"] == m["rex/rho"]  # a second call does not update again


def test_correct_uses_step_alpha_and_failure_rate():
    ex = _explorer()
    originals = _originals(PATTERN)
    probes = ex.explore(originals, reward_fn(originals), FakeAgent(), score_fn, reward_fn)
    trajs = originals + probes
    batch = to_batch(trajs, TOK.pad_token_id)
    old = -torch.rand(batch["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    is_probe = torch.tensor([t.is_probe for t in trajs])
    start = torch.tensor([t.probe_start for t in trajs])
    beh, w, m = ex.correct(batch, old, is_probe, start)
    ref, _ = behaviour_logprobs("rex_token", batch["input_ids"], batch["segments"], old, is_probe, start,
                                ex.pool.trie, 4 / 20, 10 / 16)
    assert w is None and torch.equal(beh, ref)
    # originals' loss tokens: pi_old / q = 1 / (1 - alpha)
    orig_mask = batch["loss_mask"].bool() & ~is_probe[:, None]
    torch.testing.assert_close((old - beh)[orig_mask].exp(), torch.full((int(orig_mask.sum()),), 1 / 0.8))
    assert m["rex/ratio_max"] >= 1.25 - 1e-6 and m["rex/ratio_min"] <= m["rex/ratio_mean"]
    assert m["rex/ratio_clipfrac"] > 0  # 1.25 lies outside [0.8, 1.2]
    assert m["rex/tokens_probe"] == sum(t.count(Seg.PROBE) for t in probes)
    assert m["rex/tokens_info"] == float((batch["segments"] == Seg.INFO).sum())
    # a mini-batch slice gets the same alpha (stored by explore), not its own probe share
    beh_slice, _, _ = ex.correct({k: v[:16] for k, v in batch.items()}, old[:16], is_probe[:16], start[:16])
    torch.testing.assert_close(beh_slice, beh[:16])


def test_rex_sequence_mode_returns_weights():
    ex = _explorer(correction="rex_sequence")
    originals = _originals(PATTERN)
    probes = ex.explore(originals, reward_fn(originals), FakeAgent(), score_fn, reward_fn)
    trajs = originals + probes
    batch = to_batch(trajs, TOK.pad_token_id)
    old = torch.full(batch["input_ids"].shape, -0.7)
    beh, w, m = ex.correct(batch, old, torch.tensor([t.is_probe for t in trajs]), torch.tensor([t.probe_start for t in trajs]))
    assert beh is old and w.shape == (20,)
    torch.testing.assert_close(w[:16], torch.full((16,), 1.25, dtype=w.dtype))
    assert (w[16:] < 1.25).all() and m["rex/ratio_max"] == pytest.approx(1.25)


def test_no_failures_means_no_probes_and_exact_reduction():
    ex, agent = _explorer(), FakeAgent()
    originals = _originals([[True] * 4, [True] * 4])
    assert ex.explore(originals, reward_fn(originals), agent, score_fn, reward_fn) == []
    assert agent.calls == []
    batch = to_batch(originals, 0)
    old = -torch.rand(batch["input_ids"].shape)
    beh, w, _ = ex.correct(batch, old, torch.zeros(8, dtype=torch.bool), torch.full((8,), -1))
    assert beh is old and w is None
    m = ex.end_step()
    assert m["rex/probes_kept"] == 0 and m["rex/rho"] == 0.25 and math.isnan(m["rex/probe_acc"])


def test_dead_end_group_trigger_and_keep_cap():
    ex = _explorer(trigger="dead_end_group", probes_per_dead_group=3, keep_ratio=1.0, keep_cap=5)
    originals = _originals(PATTERN)
    probes = ex.explore(originals, reward_fn(originals), FakeAgent(), score_fn, reward_fn)
    m = ex.end_step()
    assert m["rex/probes_made"] == 6  # 2 dead groups x 3
    assert len(probes) == 5  # capped
    assert {p.group_id for p in probes} <= {0, 1}


def test_correct_without_explore_refuses_probes_and_state_round_trip():
    ex = _explorer()
    originals = _originals(PATTERN)
    batch = to_batch(originals, 0)
    is_probe = torch.zeros(16, dtype=torch.bool)
    is_probe[3] = True
    with pytest.raises(RuntimeError, match="explore"):
        ex.correct(batch, torch.zeros(batch["input_ids"].shape), is_probe, torch.full((16,), 5))
    ex.ratio.rho = 0.5
    state = ex.state_dict()
    a = [c.meta["pool_index"] for c in ex._candidates(originals, [True] * 16)]
    ex2 = _explorer()
    ex2.load_state_dict(state)
    assert ex2.ratio.rho == 0.5
    assert [c.meta["pool_index"] for c in ex2._candidates(originals, [True] * 16)] == a
