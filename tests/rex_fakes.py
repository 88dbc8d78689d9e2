"""Fakes for the REX-RAG tests: a tiny greedy-longest-match tokenizer and trajectory builders.

The tokenizer merges a few multi-character pieces the way BPE does (``".<"`` joins a full stop to the
next tag, as SmolLM2's tokenizer does), so cut-point rules are exercised on token boundaries.
"""

from __future__ import annotations

from rexrag.rollout.trajectory import Seg, Trajectory

PIECES = [".<", "<answer>", "</answer>", "<think>", "</think>", "think", "answer"]


class FakeTokenizer:
    pad_token_id = 0
    eos_token_id = 1

    def __init__(self, pieces=PIECES, lower: bool = False):
        self.pieces = sorted(pieces, key=len, reverse=True)
        self.piece_id = {p: 1000 + i for i, p in enumerate(pieces)}
        self.id_piece = {v: k for k, v in self.piece_id.items()}
        self.lower = lower  # a normalising tokenizer: different texts, same ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self.lower:
            text = text.lower()
        ids, i = [], 0
        while i < len(text):
            for p in self.pieces:
                if text.startswith(p, i):
                    ids.append(self.piece_id[p])
                    i += len(p)
                    break
            else:
                ids.append(ord(text[i]) + 2)  # keep 0/1 for pad/eos
                i += 1
        return ids

    def __call__(self, text, add_special_tokens: bool = False):
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        return "".join(self.id_piece.get(int(i), chr(int(i) - 2) if int(i) >= 2 else "") for i in ids)

    def __len__(self) -> int:
        return 1100


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
