"""Fakes for the REX-RAG tests: the fake tokenizer with a few multi-character pieces merged the way
BPE does (``".<"`` joins a full stop to the next tag, as SmolLM2's tokenizer does), so cut-point
rules are exercised on token boundaries; and trajectory builders.
"""

from __future__ import annotations

from fake_tokenizer import FakeTokenizer

from rexrag.rollout.trajectory import Seg, Trajectory

PIECES = [".<", "<answer>", "</answer>", "<think>", "</think>", "think", "answer"]


def rex_tokenizer(lower: bool = False) -> FakeTokenizer:
    """The one fake tokenizer with BPE-like pieces (``lower``: a normalising tokenizer)."""
    return FakeTokenizer(pieces=PIECES, lower=lower)


def build_traj(tok: FakeTokenizer, parts: list[tuple[str, Seg]], group_id: int = 0, lp: float = -0.5) -> Trajectory:
    """A trajectory from (text, segment) parts; POLICY tokens get log-prob ``lp``; turns advance
    after each INFO/NOTICE block. Sets answer/answer_span like the agent when an answer is present."""
    t = Trajectory(group_id=group_id)
    turn = 0
    for text, seg in parts:
        ids = tok.encode(text)
        t.extend(ids, seg, turn, [lp] * len(ids) if seg == Seg.POLICY else None)
        if seg in (Seg.INFO, Seg.NOTICE):
            turn += 1
            t.n_searches += seg == Seg.INFO
    text = tok.decode(t.token_ids)
    if "</answer>" in text:
        t.stop_reason = "answer"
        a = text.rfind("<answer>")
        t.answer = text[a + len("<answer>") : text.rfind("</answer>")].strip()
        # the token holding the '<' of the final <answer>
        acc = 0
        for i, tid in enumerate(t.token_ids):
            piece = tok.decode([tid])
            if acc + len(piece) > a:
                t.answer_span = (i, len(t))
                break
            acc += len(piece)
    return t
