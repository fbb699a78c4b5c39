"""Tokenizers for the data pipeline: raw UTF-8 bytes (the default) or an HF `tokenizer.json`.

The byte tokenizer needs no file and maps text to ids < 256, so it fits `ling_tiny`'s vocabulary
of 256 exactly; decoding replaces a cut multi-byte character instead of failing.
"""

from __future__ import annotations

import os

import numpy as np

from ling_jax.data.sources import DataError


class ByteTokenizer:
  """Text -> its UTF-8 bytes as int32 ids in [0, 256)."""

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json` (no special tokens added)."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise DataError(f"data.tokenizer={path!r}: no such tokenizer.json")
    from tokenizers import Tokenizer  # only needed when a tokenizer file is given

    self._tok = Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def load_tokenizer(path: str | None):
  """`None` -> ByteTokenizer; otherwise the HF tokenizer at `path`."""
  return ByteTokenizer() if path is None else HFTokenizer(path)
