"""A grain-free synthetic stream for throughput runs (e.g. on a machine without grain).

Rows are packed with documents of random lengths; a document is an arithmetic progression
token_t = (start + stride * t) mod vocab with 10% of tokens replaced by noise, so the loss can fall
well below log(vocab) (the model must read the stride off the first tokens: attention is needed)
while the stream stays trivially cheap to make. Batch n depends only on (seed, n), so the
iterator's state is one integer.
"""

from __future__ import annotations

import numpy as np


class SyntheticIterator:
  """Infinite batches {tokens, segment_ids, positions} [B, T] int32; checkpointable by step."""

  def __init__(self, *, batch_size: int, seq_len: int, vocab_size: int, seed: int,
               mean_doc_len: int = 256, noise: float = 0.1):
    self.B, self.T, self.V = batch_size, seq_len, vocab_size
    self.seed, self.mean_doc_len, self.noise = seed, mean_doc_len, noise
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1
    B, T = self.B, self.T
    # Segment boundaries: each token starts a new document with probability 1 / mean_doc_len.
    starts = rng.random((B, T)) < 1.0 / self.mean_doc_len
    starts[:, 0] = True
    seg = np.cumsum(starts, axis=1).astype(np.int32)  # [B, T], 1-based
    first = np.maximum.accumulate(np.where(starts, np.arange(T), 0), axis=1)
    pos = (np.arange(T)[None, :] - first).astype(np.int32)
    n_docs = int(seg.max())
    start = rng.integers(0, self.V, (B, n_docs + 1))
    stride = rng.integers(1, max(2, self.V // 4), (B, n_docs + 1))
    rows = np.arange(B)[:, None]
    tokens = (start[rows, seg] + stride[rows, seg] * pos) % self.V
    noisy = rng.random((B, T)) < self.noise
    tokens = np.where(noisy, rng.integers(0, self.V, (B, T)), tokens).astype(np.int32)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])
