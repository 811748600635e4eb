"""A self-contained instruction tokenizer: lower-cased words hashed into a fixed vocabulary.

No vocabulary file and no download: the same words map to the same ids on every machine
(crc32 is stable across processes, unlike Python's salted ``hash``).
"""

from __future__ import annotations

import re
import zlib

import torch

PAD_ID = 0
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str, vocab_size: int, max_tokens: int) -> list[int]:
    words = _WORD.findall(text.lower())[:max_tokens]
    return [1 + zlib.crc32(word.encode()) % (vocab_size - 1) for word in words]


def tokenize_batch(texts: list[str], vocab_size: int, max_tokens: int) -> torch.Tensor:
    """(B, max_tokens) int64 ids, right-padded with PAD_ID."""
    ids = torch.full((len(texts), max_tokens), PAD_ID, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = tokenize(text, vocab_size, max_tokens)
        if tokens:
            ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids
