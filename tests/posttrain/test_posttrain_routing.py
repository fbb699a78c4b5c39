"""Routing replay, data side: recording the sampler's expert ids and laying them out for the
learner's packed batch."""

import numpy as np
import pytest

from ling_jax.posttrain.routing import RoutingRecord, RoutingRecorder, align_routing
from ling_jax.posttrain.sft_data import pack_sequences

M, X, E = 3, 2, 8


def _sample(rng, B=3, prompt=4, steps=5):
  """A fake sampler: prefill `prompt` tokens, then `steps` decode steps feeding the last sampled
  token; returns the recorder, the full sequences (prompt + sampled) and their lengths."""
  rec = RoutingRecorder()
  seqs = rng.integers(0, 256, (B, prompt + steps + 1))
  rec.add(seqs[:, :prompt], rng.integers(0, E, (B, prompt, M, X)))
  for s in range(steps):
    fed = seqs[:, prompt + s: prompt + s + 1]
    rec.add(fed, rng.integers(0, E, (B, 1, M, X)))
  lengths = [prompt + steps + 1, prompt + 2, prompt + 4]  # rows 1 and 2 stopped early
  return rec, seqs, lengths


def test_records_align_with_a_packed_learner_batch():
  rng = np.random.default_rng(0)
  rec, seqs, lengths = _sample(rng)
  records = rec.records(lengths)
  assert [len(r.tokens) for r in records] == [n - 1 for n in lengths]
  examples = [{"tokens": seqs[b, :n]} for b, n in enumerate(lengths)]
  batch, placements = pack_sequences(examples, 16)
  ids = align_routing(records, placements, batch["tokens"], num_experts=E)
  assert ids.shape == batch["tokens"].shape + (M, X)
  covered = np.zeros(batch["tokens"].shape, bool)
  for r, (row, start, n) in zip(records, placements):
    np.testing.assert_array_equal(ids[row, start: start + n - 1], r.expert_ids)
    assert (ids[row, start + n - 1] == -1).all()  # the last token was never fed
    covered[row, start: start + n - 1] = True
  assert (ids[~covered] == -1).all() and (ids[covered] >= 0).all()


def test_misaligned_or_inconsistent_routing_is_refused():
  rng = np.random.default_rng(1)
  rec, seqs, lengths = _sample(rng)
  records = rec.records(lengths)
  tokens = np.stack([np.pad(seqs[b, :n], (0, 12 - n)) for b, n in enumerate(lengths)])
  placements = [(b, 0, n) for b, n in enumerate(lengths)]
  align_routing(records, placements, tokens)
  shifted = [(b, 1, n) for b, n in enumerate(lengths)]
  with pytest.raises(ValueError, match="sequence 0: the batch's token 0 .* misaligned"):
    align_routing(records, shifted, tokens)
  with pytest.raises(ValueError, match="sequence 1: 5 routed tokens but only 3 placed"):
    align_routing(records, [(0, 0, 10), (1, 0, 3), (2, 0, 8)], tokens)
  with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
    align_routing(records, placements, tokens, num_experts=4)
  odd = records[:2] + [RoutingRecord(records[2].tokens, records[2].expert_ids[:, :2])]
  with pytest.raises(ValueError, match="sequence 2: routing \\(2, 2\\)"):
    align_routing(odd, placements, tokens)
  with pytest.raises(ValueError, match="must be \\[B, t, M, X\\]"):
    RoutingRecorder().add(np.zeros((2, 3)), np.zeros((2, 3, M)))
  with pytest.raises(ValueError, match="does not match the first chunk"):
    rec.add(np.zeros((3, 1)), np.zeros((3, 1, M + 1, X)))
  with pytest.raises(ValueError, match="row 0: length 12 but 9 tokens were fed"):
    rec.records([12, 3, 3])
