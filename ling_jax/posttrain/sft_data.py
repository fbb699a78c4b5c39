"""Packing whole conversations into rows, and the resumable SFT iterator.

Rows hold {tokens, segment_ids, positions, loss_mask} [T] (and any other per-token arrays an
example carries, e.g. sampler logprobs or recorded expert ids for RL). Each conversation is one
segment (ids 1, 2, ... within a row; 0 is padding) with positions from 0, so the model isolates it
exactly as it isolates pretraining documents. Packing is next-fit in order: a conversation goes
into the current row if it fits, else the row is closed (padded) and the conversation starts the
next one. A conversation is never split across rows.

A conversation longer than a row is truncated to its first `seq_len` tokens, with a warning: the
turns it keeps still see their whole context. (Splitting at turn boundaries instead would put later
assistant turns in a new segment without the prompt they answer, and train the model to answer
questions it cannot see.) One whose kept tokens hold no assistant token is skipped, with a warning.

`loss_mask[t] = 1` marks token t as a training target; the next-token loss at position t - 1
therefore uses `target_mask(batch)[t - 1]`, which also drops targets across segment boundaries.

`SFTIterator` is deterministic in (conversations, seed): epoch e visits the conversations in the
permutation drawn from (seed, e). Its state is {"epoch", "index"}: the next conversation not yet
in any emitted row (next-fit never looks further ahead), so `set_state` resumes exactly.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from ling_jax.posttrain.chat import BUILTIN, ChatError, encode_chat


class RowPacker:
  """Builds rows of `seq_len` from examples, dicts of per-token arrays with time on axis 0."""

  def __init__(self, seq_len: int, pads: dict | None = None):
    if seq_len < 2:
      raise ValueError(f"seq_len={seq_len} must be >= 2")
    self.seq_len, self.pads = seq_len, dict(pads or {})
    self._parts, self._used = [], 0

  @property
  def space(self) -> int:
    return self.seq_len - self._used

  def add(self, example: dict) -> bool:
    """Append `example` as the next segment if it fits (True), else leave the row as it is."""
    n = len(example["tokens"])
    if not 0 < n <= self.space:
      return False
    lengths = {k: len(v) for k, v in example.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"an example's per-token arrays differ in length: {lengths}")
    if self._parts and set(example) != set(self._parts[0]):
      raise ValueError(f"examples carry different fields: {sorted(example)} vs "
                       f"{sorted(self._parts[0])}")
    self._parts.append(example)
    self._used += n
    return True

  def finish(self) -> tuple[dict, list[tuple[int, int]]]:
    """(the row {field: [T, ...]} plus segment_ids and positions [T] int32, the (start, length)
    of each segment), and start an empty row."""
    T, parts = self.seq_len, self._parts
    if not parts:
      raise ValueError("no example in the row")
    row, spans, start = {}, [], 0
    for k, v0 in parts[0].items():
      v0 = np.asarray(v0)
      out = np.full((T, *v0.shape[1:]), self.pads.get(k, 0), v0.dtype)
      at = 0
      for p in parts:
        v = np.asarray(p[k])
        out[at: at + len(v)] = v
        at += len(v)
      row[k] = out
    seg = np.zeros(T, np.int32)
    pos = np.zeros(T, np.int32)
    for s, p in enumerate(parts, 1):
      n = len(p["tokens"])
      seg[start: start + n] = s
      pos[start: start + n] = np.arange(n)
      spans.append((start, n))
      start += n
    row["segment_ids"], row["positions"] = seg, pos
    self._parts, self._used = [], 0
    return row, spans


def pack_sequences(examples: Sequence[dict], seq_len: int, pads: dict | None = None):
  """Next-fit packing of `examples` (each no longer than seq_len) in order ->
  (batch {field: [R, T, ...]}, placements [(row, start, length)] per example)."""
  packer, rows, placements = RowPacker(seq_len, pads), [], []
  pending = []  # example indices in the open row
  for i, ex in enumerate(examples):
    n = len(ex["tokens"])
    if not 0 < n <= seq_len:
      raise ValueError(f"example {i} has {n} tokens; pack_sequences needs 1..{seq_len}")
    if not packer.add(ex):
      rows.append(packer.finish())
      pending = []
      packer.add(ex)
    pending.append(i)
  if pending:
    rows.append(packer.finish())
  for r, (_, spans) in enumerate(rows):
    placements += [(r, start, n) for start, n in spans]
  batch = {k: np.stack([row[k] for row, _ in rows]) for k in rows[0][0]}
  return batch, placements


def target_mask(batch: dict) -> np.ndarray:
  """[B, T - 1] bool: position t predicts token t + 1, which is an assistant token of the same
  (non-padding) segment."""
  seg = np.asarray(batch["segment_ids"])
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  return same & (np.asarray(batch["loss_mask"])[:, 1:] > 0)


def fit_conversation(tokens, mask, seq_len: int, where: str):
  """The (tokens, mask) to train on, truncated to seq_len with a warning; None (with a warning)
  when no assistant token is left."""
  if len(tokens) > seq_len:
    kept = int(mask[:seq_len].sum())
    warnings.warn(f"{where}: {len(tokens)} tokens > seq_len={seq_len}; truncated to the first "
                  f"{seq_len} ({kept} of {int(mask.sum())} assistant tokens kept)", stacklevel=3)
    tokens, mask = tokens[:seq_len], mask[:seq_len]
  if not mask.any():
    warnings.warn(f"{where}: no assistant token to train on; skipped", stacklevel=3)
    return None
  return tokens, mask


class SFTIterator:
  """Infinite batches {tokens, segment_ids, positions, loss_mask} [B, T] int32 of packed
  conversations; checkpointable with get_state() / set_state()."""

  def __init__(self, conversations: Sequence[list], tokenizer, template=BUILTIN, *, seq_len: int,
               batch_size: int, seed: int = 0, names: Sequence[str] | None = None):
    if not conversations:
      raise ChatError("SFT needs at least one conversation")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    self.convs, self.tokenizer, self.template = list(conversations), tokenizer, template
    self.names = list(names) if names is not None else [f"conversation {i}"
                                                         for i in range(len(self.convs))]
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self.epoch, self.index = 0, 0
    self._order = self._order_of(0)
    self._cache: dict[int, tuple | None] = {}  # the look-ahead conversation, encoded once

  def _order_of(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.convs))

  def _example(self, i: int):
    if i not in self._cache:
      self._cache.clear()
      tokens, mask = encode_chat(self.convs[i], self.tokenizer, self.template)
      self._cache[i] = fit_conversation(tokens, mask, self.seq_len, self.names[i])
    return self._cache[i]

  def _advance(self):
    self.index += 1
    if self.index == len(self.convs):
      self.epoch, self.index = self.epoch + 1, 0
      self._order = self._order_of(self.epoch)

  def _row(self) -> dict:
    packer = RowPacker(self.seq_len)
    skipped = 0
    while True:
      fitted = self._example(int(self._order[self.index]))
      if fitted is None:
        skipped += 1
        if skipped > len(self.convs):
          raise ChatError("no conversation has an assistant token to train on")
        self._advance()
        continue
      if not packer.add({"tokens": fitted[0], "loss_mask": fitted[1]}):
        return packer.finish()[0]  # the conversation that did not fit starts the next row
      skipped = 0
      self._advance()
      if packer.space == 0:
        return packer.finish()[0]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [self._row() for _ in range(self.batch_size)]
    return {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in rows[0]}

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, state: dict) -> None:
    epoch, index = int(state["epoch"]), int(state["index"])
    if not 0 <= index < len(self.convs) or epoch < 0:
      raise ValueError(f"SFT iterator state {state} does not fit {len(self.convs)} conversations")
    self.epoch, self.index = epoch, index
    self._order = self._order_of(epoch)
