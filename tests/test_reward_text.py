"""Rewards read the model's response, never the notices we insert (which quote the tags)."""

from rexrag.rewards import extract_answer, get_reward
from rexrag.rollout.agent import NOTICES, response_text
from rexrag.rollout.trajectory import Seg, Trajectory

from _rollout_fakes import CharTokenizer


def _traj(tok, parts):
    t = Trajectory()
    for text, seg in parts:
        ids = tok.encode(text)
        t.extend(ids, seg, 0, [-0.1] * len(ids) if seg == Seg.POLICY else None)
    return t


def test_notice_tags_never_score():
    tok = CharTokenizer()
    assert extract_answer(NOTICES["invalid"]) is not None  # the notice itself quotes a complete pair
    t = _traj(tok, [("Q: who?", Seg.PROMPT), ("I ramble", Seg.POLICY), (NOTICES["invalid"], Seg.NOTICE), ("still nothing", Seg.POLICY)])
    text = response_text(tok, t)
    assert "ramble" in text and "still nothing" in text and "<answer>" not in text
    assert get_reward("em")([text], [["answer"]]) == [0.0]
    assert "<answer>" in response_text(tok, t, include_notices=True)


def test_model_answer_after_notice_still_counts():
    tok = CharTokenizer()
    t = _traj(tok, [("Q", Seg.PROMPT), ("x", Seg.POLICY), (NOTICES["invalid"], Seg.NOTICE), ("<answer> Paris </answer>", Seg.POLICY)])
    assert get_reward("em")([response_text(tok, t)], [["paris"]]) == [1.0]
