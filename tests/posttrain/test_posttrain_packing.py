"""SFT packing: whole conversations per segment, truncation of long ones, the target mask, and the
resumable iterator."""

import warnings

import numpy as np
import pytest

from ling_jax.data import ByteTokenizer
from ling_jax.posttrain.chat import BUILTIN, ChatError, encode_chat
from ling_jax.posttrain.sft_data import RowPacker, SFTIterator, pack_sequences, target_mask
from ling_jax.posttrain.tasks import sft_conversations

TOK = ByteTokenizer()


def _segments(seg_row):
  return [(s, np.flatnonzero(seg_row == s)) for s in np.unique(seg_row) if s > 0]


def test_pack_sequences_next_fit_whole_examples():
  rng = np.random.default_rng(0)
  lengths = [5, 7, 3, 10, 1, 4, 9]
  examples = [{"tokens": rng.integers(1, 256, n).astype(np.int32),
               "loss_mask": rng.integers(0, 2, n).astype(np.int32),
               "logp": rng.normal(size=n).astype(np.float32),
               "experts": rng.integers(0, 8, (n, 3, 2)).astype(np.int32)} for n in lengths]
  batch, placements = pack_sequences(examples, 12, pads={"experts": -1})
  # next-fit: [5, 7] [3] (10 does not fit after 3) [10, 1] [4] (9 does not fit) [9]
  assert [(r, n) for r, _, n in placements] == [(0, 5), (0, 7), (1, 3), (2, 10), (2, 1), (3, 4), (4, 9)]
  assert batch["tokens"].shape == (5, 12) and batch["experts"].shape == (5, 12, 3, 2)
  for ex, (r, start, n) in zip(examples, placements):
    for k in ex:
      np.testing.assert_array_equal(batch[k][r, start: start + n], ex[k])
    assert np.array_equal(batch["positions"][r, start: start + n], np.arange(n))
    assert len(set(batch["segment_ids"][r, start: start + n])) == 1
  pad = batch["segment_ids"] == 0
  assert pad.sum() == 5 * 12 - sum(lengths)
  assert (batch["tokens"][pad] == 0).all() and (batch["loss_mask"][pad] == 0).all()
  assert (batch["experts"][pad] == -1).all()
  with pytest.raises(ValueError, match="example 0 has 13 tokens"):
    pack_sequences([{"tokens": np.zeros(13)}], 12)
  with pytest.raises(ValueError, match="differ in length"):
    RowPacker(8).add({"tokens": np.zeros(3), "loss_mask": np.zeros(2)})


def test_target_mask():
  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  loss = np.array([[0, 1, 1, 1, 1, 0], [0, 0, 1, 0, 1, 1]])
  # expected[t]: token t+1 is an assistant token of t's own, non-padding segment
  expected = np.array([[1, 1, 0, 1, 0], [0, 1, 0, 1, 1]], bool)
  np.testing.assert_array_equal(target_mask({"segment_ids": seg, "loss_mask": loss}), expected)


def test_sft_iterator_rows_hold_whole_conversations():
  convs = sft_conversations("arith", range(40), difficulty=2, verbosity=1)
  it = SFTIterator(convs, TOK, seq_len=256, batch_size=3, seed=1)
  masks = {BUILTIN.render(c): encode_chat(c, TOK)[1] for c in convs}
  seen = 0
  for _ in range(4):
    b = next(it)
    assert set(b) == {"tokens", "segment_ids", "positions", "loss_mask"}
    assert all(v.shape == (3, 256) and v.dtype == np.int32 for v in b.values())
    for r in range(3):
      for _, idx in _segments(b["segment_ids"][r]):
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
        text = TOK.decode(b["tokens"][r, idx])
        np.testing.assert_array_equal(b["loss_mask"][r, idx], masks[text])  # KeyError: not whole
        seen += 1
      assert (b["loss_mask"][r][b["segment_ids"][r] == 0] == 0).all()
  assert seen >= 12


def test_sft_iterator_resumes_exactly_and_crosses_epochs():
  convs = sft_conversations("list", range(7), difficulty=4, verbosity=2)
  a = SFTIterator(convs, TOK, seq_len=300, batch_size=2, seed=3)
  for _ in range(3):
    next(a)
  state = a.get_state()
  rest = [next(a) for _ in range(6)]
  assert a.get_state()["epoch"] >= 1  # the run wrapped around the 7 conversations
  b = SFTIterator(convs, TOK, seq_len=300, batch_size=2, seed=3)
  b.set_state(dict(state))
  for want in rest:
    got = next(b)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  first = lambda seed: next(SFTIterator(convs, TOK, seq_len=300, batch_size=2, seed=seed))
  assert np.array_equal(first(3)["tokens"], first(3)["tokens"])
  assert not np.array_equal(first(3)["tokens"], first(4)["tokens"])
  with pytest.raises(ValueError, match="does not fit 7 conversations"):
    b.set_state({"epoch": 0, "index": 7})


def test_long_conversations_are_truncated_and_empty_ones_skipped():
  long = [{"role": "user", "content": "x" * 10},
          {"role": "assistant", "content": "y" * 100}]
  no_assistant_left = [{"role": "user", "content": "z" * 200},
                       {"role": "assistant", "content": "w"}]
  it = SFTIterator([long, no_assistant_left], TOK, seq_len=64, batch_size=1, seed=0,
                   names=["long.jsonl:1", "long.jsonl:2"])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rows = [next(it) for _ in range(2)]
  msgs = [str(w.message) for w in caught]
  assert any("long.jsonl:1: 148 tokens > seq_len=64; truncated" in m for m in msgs)
  assert any("long.jsonl:2: no assistant token to train on; skipped" in m for m in msgs)
  for b in rows:  # only the truncated conversation is ever emitted, filling the row
    assert (b["segment_ids"] == 1).all()
    assert TOK.decode(b["tokens"][0]) == BUILTIN.render(long)[:64]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ChatError, match="no conversation has an assistant token"):
      next(SFTIterator([no_assistant_left], TOK, seq_len=64, batch_size=1))
  with pytest.raises(ChatError, match="at least one conversation"):
    SFTIterator([], TOK, seq_len=64, batch_size=1)
