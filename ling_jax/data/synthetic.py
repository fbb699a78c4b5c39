"""A grain-free synthetic stream for throughput runs (e.g. on a machine without grain).

Rows are packed with documents of random lengths; a document is an arithmetic progression
token_t = (start + stride * t) mod vocab with 10% of tokens replaced by noise, so the loss can fall
well below log(vocab) (the model must read the stride off the first tokens: attention is needed)
while the stream stays trivially cheap to make. Row r of batch n depends only on (seed, n, r),
so the iterator's state is one integer, and a process that feeds some rows of a global batch
(`rows`: several processes, ling_jax/parallel/distributed.py) makes only those, the same values
whatever the number of processes.
"""

from __future__ import annotations

import numpy as np


class SyntheticIterator:
  """Infinite batches {tokens, segment_ids, positions} [B, T] int32; checkpointable by step."""

  def __init__(self, *, batch_size: int, seq_len: int, vocab_size: int, seed: int,
               mean_doc_len: int = 256, noise: float = 0.1, rows: slice | None = None):
    """rows: the rows of each batch_size-row batch to yield (default all)."""
    self.B, self.T, self.V = batch_size, seq_len, vocab_size
    self.seed, self.mean_doc_len, self.noise = seed, mean_doc_len, noise
    self.rows = range(batch_size)[rows if rows is not None else slice(None)]
    self.step = 0

  def __iter__(self):
    return self

  def _row(self, r: int) -> tuple[np.ndarray, ...]:
    """Row r of the current batch: (tokens, segment ids, positions) [T]."""
    rng = np.random.default_rng([self.seed, self.step, r])
    T = self.T
    # Segment boundaries: each token starts a new document with probability 1 / mean_doc_len.
    starts = rng.random(T) < 1.0 / self.mean_doc_len
    starts[0] = True
    seg = np.cumsum(starts).astype(np.int32)  # [T], 1-based
    first = np.maximum.accumulate(np.where(starts, np.arange(T), 0))
    pos = (np.arange(T) - first).astype(np.int32)
    n_docs = int(seg[-1])
    start = rng.integers(0, self.V, n_docs + 1)
    stride = rng.integers(1, max(2, self.V // 4), n_docs + 1)
    tokens = (start[seg] + stride[seg] * pos) % self.V
    noisy = rng.random(T) < self.noise
    return np.where(noisy, rng.integers(0, self.V, T), tokens).astype(np.int32), seg, pos

  def __next__(self) -> dict[str, np.ndarray]:
    tokens, seg, pos = (np.stack(a) for a in zip(*map(self._row, self.rows)))
    self.step += 1
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])
