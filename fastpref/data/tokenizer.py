"""A character-level tokenizer for the tiny default model: no download, no vocabulary file to ship.

Vocabulary: ``<pad>`` (0), ``<eos>`` (1), ``<unk>`` (2), then the printable ASCII characters and newline, one id
each. It offers the subset of the Hugging Face tokenizer API the trainer and the on-line algorithms use
(``encode``, ``decode``, ``eos_token_id``, ``pad_token_id``, ``vocab_size``, ``chat_template``,
``save_pretrained`` / ``from_pretrained``).
"""

from __future__ import annotations

import json
import os

_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
_FILE = "fastpref_char_tokenizer.json"


class CharTokenizer:
    """One token per character (printable ASCII + newline); unknown characters map to ``<unk>``."""

    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = 2
    bos_token_id = None
    pad_token = "<pad>"
    eos_token = "<eos>"
    chat_template = None

    def __init__(self):
        self._ids = {c: i + 3 for i, c in enumerate(_CHARS)}

    @property
    def vocab_size(self) -> int:
        return len(_CHARS) + 3

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text`` (no special tokens are ever added)."""
        return [self._ids.get(c, self.unk_token_id) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped, or written as ``<pad>``/``<eos>``/``<unk>`` when
        ``skip_special_tokens=False``."""
        out = []
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            if i >= 3:
                out.append(_CHARS[i - 3])
            elif not skip_special_tokens:
                out.append(("<pad>", "<eos>", "<unk>")[i])
        return "".join(out)

    def batch_decode(self, seqs, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, _FILE), "w", encoding="utf-8") as fh:
            json.dump({"type": "fastpref-char", "chars": _CHARS}, fh)

    @classmethod
    def from_pretrained(cls, path: str) -> CharTokenizer:
        with open(os.path.join(path, _FILE), encoding="utf-8") as fh:
            meta = json.load(fh)
        if meta.get("chars") != _CHARS:
            raise ValueError(f"{path}: character tokenizer vocabulary differs from this version's")
        return cls()

    @staticmethod
    def is_saved_in(path: str) -> bool:
        """Whether ``path`` holds a saved :class:`CharTokenizer`."""
        return os.path.exists(os.path.join(path, _FILE))
