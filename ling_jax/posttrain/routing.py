"""MoE routing replay, data side: the experts chosen while sampling, recorded per token and laid
out for the learner's batch (docs/posttrain.md, "Routing replay").

Why: the learner recomputes log-probabilities of sampled tokens, and a small numerical difference
between the sampler's and the learner's forward can flip a top-k choice, so the learner would
score a token through experts that never produced it; the ratio pi_theta / mu then carries
routing noise as well as policy change. Replaying the sampler's choices in the learner's forward
removes that source.

The sampler feeds tokens 0 .. L-2 of a sequence of L tokens (the prompt in the prefill, then each
generated token but the last); every fed token gets, per MoE layer, its top-k expert ids. The
learner's forward sees tokens 0 .. L-1 but uses only positions 0 .. L-2 for the next-token
log-probabilities, so position L-1 (and padding) has no record: -1, "route as usual".

Shapes: a record is [L_fed, M, X] (M MoE layers in model order, X experts per token); the
learner's array is [B, T, M, X] int32, -1 where nothing is replayed.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class RoutingRecord:
  """One sequence's routing while it was sampled: the tokens fed, and their expert ids."""

  tokens: np.ndarray      # [L] int32: the tokens the sampler fed, in order
  expert_ids: np.ndarray  # [L, M, X] int: expert ids per fed token, MoE layer and choice

  def __post_init__(self):
    self.tokens = np.asarray(self.tokens, np.int32)
    self.expert_ids = np.asarray(self.expert_ids, np.int32)
    if self.expert_ids.ndim != 3 or len(self.expert_ids) != len(self.tokens):
      raise ValueError(f"expert_ids {self.expert_ids.shape} must be [L, M, X] with L = "
                       f"{len(self.tokens)} fed tokens")


class RoutingRecorder:
  """Collects the sampler's expert ids for a batch of rows, chunk by chunk (the prefill, then
  each decode step), and cuts them into per-sequence records."""

  def __init__(self):
    self._tokens, self._ids = [], []

  def add(self, tokens, expert_ids) -> None:
    """tokens [B, t] fed in this call and their expert_ids [B, t, M, X] (from the model's router
    outputs, stacked over MoE layers)."""
    tokens, ids = np.asarray(tokens), np.asarray(expert_ids)
    if ids.ndim != 4 or ids.shape[:2] != tokens.shape:
      raise ValueError(f"expert_ids {ids.shape} must be [B, t, M, X] for tokens {tokens.shape}")
    first = self._ids[0].shape if self._ids else ids.shape
    if (ids.shape[0],) + ids.shape[2:] != (first[0],) + first[2:]:
      raise ValueError(f"chunk {ids.shape} does not match the first chunk {first} "
                       "in batch, layers or experts per token")
    self._tokens.append(tokens)
    self._ids.append(ids)

  def records(self, lengths: Sequence[int]) -> list[RoutingRecord]:
    """Per row b, the record of its first lengths[b] - 1 fed tokens (a sequence of lengths[b]
    tokens, whose last token was sampled but never fed)."""
    if not self._ids:
      raise ValueError("nothing recorded")
    tokens = np.concatenate(self._tokens, axis=1)
    ids = np.concatenate(self._ids, axis=1)
    if len(lengths) != tokens.shape[0]:
      raise ValueError(f"{len(lengths)} lengths for {tokens.shape[0]} rows")
    out = []
    for b, n in enumerate(lengths):
      if not 1 <= n <= tokens.shape[1] + 1:
        raise ValueError(f"row {b}: length {n} but {tokens.shape[1]} tokens were fed")
      out.append(RoutingRecord(tokens[b, : n - 1], ids[b, : n - 1]))
    return out


def align_routing(records: Sequence[RoutingRecord], placements: Sequence[tuple[int, int, int]],
                  batch_tokens, *, num_experts: int | None = None) -> np.ndarray:
  """The learner's replay array [B, T, M, X] int32 (-1: route as usual) for sequences placed at
  placements[i] = (row, start, length) of `batch_tokens` [B, T] (as `sft_data.pack_sequences`
  returns them; one sequence per row is [(b, 0, length_b)]).

  Each record must cover the sequence's first length - 1 tokens (or fewer: the rest routes as
  usual) and its tokens must equal the batch's there: a mismatch means the learner's batch and
  the sampler's sequence are not the same tokens, an error naming the sequence."""
  batch_tokens = np.asarray(batch_tokens)
  if len(records) != len(placements):
    raise ValueError(f"{len(records)} routing records for {len(placements)} placed sequences")
  if not records:
    raise ValueError("no routing records")
  M, X = records[0].expert_ids.shape[1:]
  B, T = batch_tokens.shape
  out = np.full((B, T, M, X), -1, np.int32)
  for i, (rec, (row, start, length)) in enumerate(zip(records, placements)):
    n = len(rec.tokens)
    if rec.expert_ids.shape[1:] != (M, X):
      raise ValueError(f"sequence {i}: routing {rec.expert_ids.shape[1:]} (layers, experts per "
                       f"token) differs from sequence 0's {(M, X)}")
    if n > length:
      raise ValueError(f"sequence {i}: {n} routed tokens but only {length} placed")
    if not np.array_equal(batch_tokens[row, start: start + n], rec.tokens):
      diff = int(np.flatnonzero(batch_tokens[row, start: start + n] != rec.tokens)[0])
      raise ValueError(f"sequence {i}: the batch's token {diff} (row {row}, column {start + diff}) "
                       f"is {int(batch_tokens[row, start + diff])} but the sampler fed "
                       f"{int(rec.tokens[diff])}: routing and batch are misaligned")
    if num_experts is not None and n and not (0 <= rec.expert_ids.min() and
                                              rec.expert_ids.max() < num_experts):
      raise ValueError(f"sequence {i}: expert ids outside [0, {num_experts})")
    out[row, start: start + n] = rec.expert_ids
  return out
