"""The test suite's one fake tokenizer: deterministic, no files, no weights.

A character is one token, ``id = ord(c) + shift``, so expected token counts and spans in the tests
are plain string lengths. Options cover what the tests need:

- ``pieces``: multi-character tokens matched greedily, longest first, the way BPE merges them
  (SmolLM2's tokenizer joins a full stop to the next tag: ``".<"``), so rules that cut on token
  boundaries are exercised; piece ``i`` has id ``PIECE_BASE + i``;
- ``lower``: a normalising tokenizer (different texts, same ids);
- ``shift``, ``vocab_size`` and the special ids: a tiny vocabulary for a tiny model
  (``toy_rl``: letters a..o are ids 1..15, 0 is pad and eos).

Special ids decode as ``<pad>``, ``<bos>``, ``<EOS>`` unless ``skip_special_tokens``; ``__call__``
prepends ``bos`` when ``add_special_tokens`` (the default, as in ``transformers``), ``encode`` does
not unless asked. There is no chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

EOS_TEXT = "<EOS>"
PIECE_BASE = 1000


class FakeTokenizer:
    chat_template = None

    def __init__(self, *, pieces: tuple[str, ...] | list[str] = (), lower: bool = False, shift: int = 10,
                 vocab_size: int | None = None, pad_token_id: int | None = 0, bos_token_id: int | None = 1,
                 eos_token_id: int | None = 3):
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        self.shift, self.lower = shift, lower
        self.pieces = sorted(pieces, key=len, reverse=True)  # longest match first
        self.piece_id = {p: PIECE_BASE + i for i, p in enumerate(pieces)}
        self.id_piece = {v: k for k, v in self.piece_id.items()}
        names = ((pad_token_id, "<pad>"), (bos_token_id, "<bos>"), (eos_token_id, EOS_TEXT))
        self.special = {i: text for i, text in names if i is not None}
        self.vocab_size = vocab_size or (PIECE_BASE + 100 if pieces else 300)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self.lower:
            text = text.lower()
        ids = [self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []
        i = 0
        while i < len(text):
            piece = next((p for p in self.pieces if text.startswith(p, i)), None)
            if piece is not None:
                ids.append(self.piece_id[piece])
                i += len(piece)
            else:
                ids.append(ord(text[i]) + self.shift)
                i += 1
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        out = []
        for i in map(int, ids):
            if i in self.id_piece:
                out.append(self.id_piece[i])
            elif i in self.special:
                out.append("" if skip_special_tokens else self.special[i])
            elif i - self.shift >= 0:
                out.append(chr(i - self.shift))
            elif not skip_special_tokens:
                out.append("<unk>")
        return "".join(out)

    def save_pretrained(self, path) -> None:
        """What a checkpoint needs from a tokenizer: a file beside the weights."""
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "fake_tokenizer.json").write_text(json.dumps({"vocab_size": self.vocab_size, "shift": self.shift}))
