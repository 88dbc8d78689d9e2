"""Mixed sampling bookkeeping: source selection, the cut point, probe construction, the filter, rho."""

from __future__ import annotations

import math
import random

import pytest
import torch
from rex_fakes import build_traj, rex_tokenizer

from rexrag.rex import probe as P
from rexrag.rollout.trajectory import Seg

TOK = rex_tokenizer()


def _answered(answer: str = "Paris", group_id: int = 0, searched: bool = True):
    parts = [("Question: capital?", Seg.PROMPT), ("<think> I look it up </think><search> capital </search>", Seg.POLICY)]
    if searched:
        parts.append(("\n\n<information>Doc 1 France</information>\n\n", Seg.INFO))
    parts.append((f"<think> so it is {answer}.</think> So.<answer> {answer}</answer>", Seg.POLICY))
    return build_traj(TOK, parts, group_id=group_id)


def test_failed_mask_and_dead_end_fraction():
    failed = P.failed_mask([1.0, 0.0, 0.4, 1.0, 0.0, 0.0], success_reward=1.0)
    assert failed == [False, True, True, False, True, True]
    groups = [0, 0, 1, 1, 2, 2]
    assert P.dead_end_groups(groups, failed) == [2]
    assert P.dead_end_fraction(groups, failed) == pytest.approx(1 / 3)
    assert P.dead_end_fraction([], []) == 0.0


def test_per_trajectory_selects_only_failed_cuttable_with_probability_p():
    n = 20000
    failed = [i % 2 == 0 for i in range(n)]
    cuttable = [i % 4 != 2 for i in range(n)]
    rng = random.Random(0)
    src = P.select_sources([0] * n, failed, cuttable, "per_trajectory", rng, probe_prob=0.2)
    assert all(failed[i] and cuttable[i] for i in src)
    eligible = sum(f and c for f, c in zip(failed, cuttable))
    # binomial(eligible, 0.2): mean 1000, sd ~28
    assert abs(len(src) - 0.2 * eligible) < 5 * math.sqrt(eligible * 0.2 * 0.8)
    # seeded: the same seed gives the same sources
    again = P.select_sources([0] * n, failed, cuttable, "per_trajectory", random.Random(0), probe_prob=0.2)
    assert again == src


def test_dead_end_group_trigger():
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    failed = [True, True, True, True, False, True, True, True, True]
    cuttable = [True, True, False, True, True, True, False, False, True]
    src = P.select_sources(groups, failed, cuttable, "dead_end_group", random.Random(1), probes_per_dead_group=3)
    # group 1 has a success: not a dead end; group 0 has 2 cuttable members, group 2 has 1
    assert sorted(src[:3]) in ([0, 0, 1], [0, 1, 1])
    assert src[3:] == [8, 8, 8]
    with pytest.raises(ValueError, match="per_trajectory or dead_end_group"):
        P.select_sources(groups, failed, cuttable, "always", random.Random(0))


def test_answer_cut_uses_token_containing_the_tag():
    t = _answered()
    cut = P.answer_cut(t, TOK)
    # ".<" merges the full stop with the tag: the cut is before that token, the "." goes with it
    assert TOK.decode([t.token_ids[cut]]) == ".<"
    assert TOK.decode(t.token_ids[:cut]).endswith("</think> So")
    assert cut == t.answer_span[0]
    # without answer_span (or with a wrong one) the scan of the answering turn finds the same token
    t.answer_span = None
    assert P.answer_cut(t, TOK) == cut
    t.answer_span = (3, len(t))
    assert P.answer_cut(t, TOK) == cut


def test_answer_cut_none_without_answer_or_for_probes():
    t = build_traj(TOK, [("Q", Seg.PROMPT), ("<think> hmm, no idea", Seg.POLICY)])
    assert P.answer_cut(t, TOK) is None
    t2 = _answered()
    t2.is_probe = True
    assert P.answer_cut(t2, TOK) is None


def test_make_probe_keeps_the_source_tokens_exactly():
    src = _answered(group_id=7)
    cut = P.answer_cut(src, TOK)
    prompt_ids = TOK.encode("<think> Maybe I was wrong.")
    probe = P.make_probe(src, 3, cut, prompt_ids, pool_index=5)
    assert probe.token_ids[:cut] == src.token_ids[:cut]
    assert probe.segments[:cut] == src.segments[:cut]
    assert probe.logprobs[:cut] == src.logprobs[:cut]
    assert probe.turns[:cut] == src.turns[:cut]
    assert probe.token_ids[cut:] == prompt_ids
    assert probe.segments[cut:] == [Seg.PROBE] * len(prompt_ids)
    assert probe.logprobs[cut:] == [0.0] * len(prompt_ids)
    assert probe.turns[cut] == src.turns[cut]  # same (answering) turn continues
    assert (probe.is_probe, probe.source_index, probe.probe_start, probe.group_id) == (True, 3, cut, 7)
    assert probe.n_searches == 1 and probe.stop_reason == "running" and probe.answer_span is None
    assert probe.meta == {"pool_index": 5}
    assert P.probe_token_span(probe) == (cut, cut + len(prompt_ids))
    with pytest.raises(ValueError, match="never probed again"):
        P.make_probe(probe, 0, cut, prompt_ids, 0)


def test_probe_scores_are_means_over_probe_tokens():
    src = _answered()
    cut = P.answer_cut(src, TOK)
    a = P.make_probe(src, 0, cut, TOK.encode("<think> ab"), 0)
    b = P.make_probe(src, 0, cut, TOK.encode("<think> abc"), 1)
    lps = [torch.full((len(a),), -9.0), torch.full((len(b),), -9.0)]
    lps[0][cut : len(a)] = torch.linspace(-1, -3, len(a) - cut)  # mean -2
    lps[1][cut : len(b)] = -0.5
    assert P.probe_scores([a, b], lps) == pytest.approx([-2.0, -0.5])


def test_keep_count_and_top_k():
    assert P.keep_count(16, 0.08, 10) == 1  # floor(1.28)
    assert P.keep_count(2560, 0.08, 500) == 204
    assert P.keep_count(2560, 0.08, 500, cap=50) == 50
    assert P.keep_count(2560, 0.08, 30) == 30  # never more than the candidates
    assert P.keep_count(10, 0.05, 4) == 0
    assert P.keep_count(10, 0.05, 4, keep_min=1) == 1
    assert P.keep_count(10, 0.05, 0, keep_min=1) == 0
    assert P.keep_count(100, 0.07, 50) == 7  # float floor safety: 100 * 0.07 = 7.000000000000001
    assert P.top_k([-1.0, -0.5, -3.0, -0.5], 2) == [1, 3]
    assert P.top_k([-1.0, -0.5, -3.0, -0.5], 3) == [0, 1, 3]
    assert P.top_k([1.0], 0) == []


def test_adaptive_ratio_update_and_state():
    r = P.AdaptiveRatio(0.08, 0.9)
    assert r.update(1.0) == pytest.approx(0.9 * 0.08 + 0.1)
    assert r.update(None) == pytest.approx(0.172)  # no kept probes: rho unchanged
    assert r.update(0.0) == pytest.approx(0.9 * 0.172)
    r2 = P.AdaptiveRatio(0.5)
    r2.load_state_dict(r.state_dict())
    assert r2.rho == r.rho and r2.momentum == 0.9


def test_answer_cut_with_the_smollm2_tokenizer(smol_tokenizer):
    """SmolLM2 merges '.<' into one token: the cut drops the full stop with the tag, on a token boundary."""
    from rexrag.rollout.trajectory import Trajectory

    t = Trajectory()
    t.extend(smol_tokenizer.encode("Question?", add_special_tokens=False), Seg.PROMPT, 0)
    ids = smol_tokenizer.encode("<think> I think so.<answer> Paris</answer>", add_special_tokens=False)
    t.extend(ids, Seg.POLICY, 0, [-1.0] * len(ids))
    cut = P.answer_cut(t, smol_tokenizer)
    assert smol_tokenizer.decode([t.token_ids[cut]]) == ".<"
    assert smol_tokenizer.decode(t.token_ids[t.prompt_len : cut]) == "<think> I think so"
