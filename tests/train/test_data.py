"""The input pipeline: sources, tokenizers, packing into rows, resumable iterators, and the model's
isolation of packed documents."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ling_jax.config import ling_tiny
from ling_jax.data import (ByteTokenizer, Data, DataConfig, DataError, HFTokenizer,
                           SyntheticIterator, load_documents, packed_dataset, split_documents,
                           stdlib_files)
from ling_jax.data.pipeline import json_state
from testing import random_model

DOCS = ["alpha beta gamma", "x" * 70, "def f():\n    return 1\n", "é ü ß 漢字", "short", "z" * 5,
        "the quick brown fox jumps over the lazy dog " * 3]


def _write_texts(tmp_path, docs):
  d = tmp_path / "corpus"
  d.mkdir()
  for i, text in enumerate(docs):
    (d / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
  return str(d)


def _segments(row):
  """(start, stop) of each segment of a packed row."""
  seg = row["segment_ids"]
  edges = [0] + [t for t in range(1, len(seg)) if seg[t] != seg[t - 1]] + [len(seg)]
  return list(zip(edges[:-1], edges[1:]))


# ---------------------------------------------------------------------- tokenizers and sources
def test_byte_tokenizer_round_trips_and_fits_tiny_vocab():
  tok = ByteTokenizer()
  ids = tok.encode("héllo 漢")
  assert ids.dtype == np.int32 and ids.max() < 256 == tok.vocab_size == ling_tiny().vocab_size
  assert tok.decode(ids) == "héllo 漢"


def test_hf_tokenizer_from_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[UNK]": 0, "hello": 1, "world": 2}
  tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  path = str(tmp_path / "tokenizer.json")
  tk.save(path)
  tok = HFTokenizer(path)
  assert tok.vocab_size == 3
  assert tok.encode("hello world zzz").tolist() == [1, 2, 0]
  with pytest.raises(DataError, match="no such tokenizer"):
    HFTokenizer(str(tmp_path / "missing.json"))


def test_sources_text_jsonl_arrayrecord(tmp_path):
  docs = load_documents(_write_texts(tmp_path, DOCS))
  assert sorted(docs[i] for i in range(len(docs))) == sorted(DOCS)
  jl = tmp_path / "c.jsonl"
  jl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCS)) + "\n\n")
  assert [load_documents(str(jl))[i] for i in range(len(DOCS))] == DOCS
  with pytest.raises(ValueError, match="no string field 'body'"):
    load_documents(str(jl), text_field="body")
  array_record = pytest.importorskip("array_record.python.array_record_module")
  ar = str(tmp_path / "c.array_record")
  w = array_record.ArrayRecordWriter(ar, "group_size:1")
  for t in DOCS:
    w.write(t.encode("utf-8"))
  w.close()
  docs = load_documents(ar)
  assert [docs[i] for i in range(len(docs))] == DOCS


def test_default_corpus_is_the_stdlib_without_tests():
  files = stdlib_files()
  assert len(files) > 100 and all(f.endswith(".py") for f in files)
  assert not any(f"{os.sep}test{os.sep}" in f or f"{os.sep}encodings{os.sep}" in f for f in files)


@pytest.mark.parametrize("kind", ["no files", "empty files", "empty jsonl"])
def test_empty_corpus_is_a_clear_error(tmp_path, kind):
  if kind == "no files":
    source, match = str(tmp_path / "nothing*.txt"), "matches no files"
  elif kind == "empty files":
    source, match = _write_texts(tmp_path, ["", ""]), "corpus is empty"
  else:
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n')
    source, match = str(tmp_path / "e.jsonl"), "corpus is empty"
  with pytest.raises(DataError, match=match):
    Data(DataConfig(source=source, eval_docs=0), vocab_size=256)


def test_unreadable_directories_and_files_fail_when_the_data_is_set_up(tmp_path, monkeypatch):
  """A directory that cannot be listed, or a file that cannot be opened, is a DataError naming it
  and the OS error when `Data` is built (before any training), not "matches no files", a silently
  smaller corpus or a failure steps into training. Simulated with the OS call raising, as for a
  non-root user without permission (root may read everything)."""
  import errno
  from ling_jax.data import sources
  source = _write_texts(tmp_path, DOCS)
  sub = os.path.join(source, "sub")
  os.mkdir(sub)
  with open(os.path.join(sub, "more.txt"), "w") as f:
    f.write("more text")
  denied = lambda path: PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
  scandir = os.scandir

  def no_listing(path="."):
    if os.path.abspath(os.fspath(path)) == sub:
      raise denied(os.fspath(path))
    return scandir(path)

  with monkeypatch.context() as m:
    m.setattr(os, "scandir", no_listing)
    for src in (source, os.path.join(sub, "*.txt")):
      with pytest.raises(DataError, match=f"cannot list {re.escape(sub)}: Permission denied"):
        Data(DataConfig(source=src, eval_docs=0), vocab_size=256)
  victim = os.path.join(sub, "more.txt")

  def no_reading(path, *args, **kwargs):
    if os.fspath(path) == victim:
      raise denied(path)
    return open(path, *args, **kwargs)

  monkeypatch.setattr(sources, "open", no_reading, raising=False)
  for src in (source, victim):
    with pytest.raises(DataError, match=f"cannot read {re.escape(victim)}: Permission denied"):
      Data(DataConfig(source=src, eval_docs=0), vocab_size=256)


def test_tokenizer_larger_than_vocab_is_refused(tmp_path):
  with pytest.raises(DataError, match="vocab_size is 100"):
    Data(DataConfig(source=_write_texts(tmp_path, DOCS), eval_docs=0), vocab_size=100)


def test_eval_split_is_disjoint_and_seeded():
  train, held = split_documents(list(range(50)), 5, seed=3)
  assert len(held) == 5 and not set(held.indices) & set(train.indices)
  assert split_documents(list(range(50)), 5, seed=3)[1].indices == held.indices
  with pytest.raises(ValueError, match="eval_docs"):
    split_documents(list(range(3)), 3, seed=0)


# ---------------------------------------------------------------------- packing
def test_packing_fills_rows_with_restarting_positions_and_whole_documents(tmp_path):
  docs = load_documents(_write_texts(tmp_path, DOCS))
  tok = ByteTokenizer()
  T, B = 16, 3
  it = iter(packed_dataset(docs, tok, seq_len=T, batch_size=B, seed=0))
  streams = [[] for _ in range(B)]  # each row's stream of (segment tokens, positions)
  for _ in range(12):
    batch = next(it)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((B, T), np.int32) for k in ("tokens", "segment_ids", "positions")}
    for b in range(B):
      row = {k: v[b] for k, v in batch.items()}
      assert row["segment_ids"][0] == 1 and (np.diff(row["segment_ids"]) >= 0).all()
      assert (row["segment_ids"] > 0).all()  # an infinite stream never pads
      for s, e in _segments(row):
        assert row["positions"][s:e].tolist() == list(range(e - s))
        streams[b].append(row["tokens"][s:e])
  encoded = {d.encode("utf-8") for d in DOCS}
  for b in range(B):
    # Pieces of a split document follow each other; joined back they are whole documents.
    text = b"".join(p.astype(np.uint8).tobytes() for p in streams[b])
    # Greedily re-cut the stream into documents of the corpus (each fully present).
    pos, found = 0, 0
    while pos < len(text):
      match = [d for d in encoded if text.startswith(d, pos)]
      if not match:
        break  # the stream ends inside a document
      pos += len(max(match, key=len))
      found += 1
    assert found >= 3 and len(text) - pos < max(len(d) for d in encoded)


def test_rows_of_a_batch_come_from_different_streams(tmp_path):
  docs = load_documents(_write_texts(tmp_path, DOCS))
  batch = next(iter(packed_dataset(docs, ByteTokenizer(), seq_len=16, batch_size=4, seed=0)))
  assert len({r.tobytes() for r in batch["tokens"]}) > 1


def test_iterator_is_deterministic_and_resumes_exactly_from_json_state(tmp_path):
  source = _write_texts(tmp_path, DOCS * 3)
  data = Data(DataConfig(source=source, seq_len=32, batch_size=4, eval_docs=4), 256)
  a, b = data.train_iterator(), data.train_iterator()
  for _ in range(7):
    x, y = next(a), next(b)
    assert all(np.array_equal(x[k], y[k]) for k in x)
  state = json.loads(json.dumps(a.get_state()))  # what a checkpoint stores
  expected = [next(a) for _ in range(5)]
  c = data.train_iterator()
  c.set_state(json_state(state))
  for want in expected:
    got = next(c)
    assert all(np.array_equal(want[k], got[k]) for k in want)
  other = Data(DataConfig(source=source, seq_len=32, batch_size=4, eval_docs=4, seed=1), 256)
  assert not np.array_equal(next(other.train_iterator())["tokens"], expected[0]["tokens"])
  ev = data.eval_batches()
  assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(ev, data.eval_batches()))


def test_synthetic_iterator_packs_and_resumes():
  it = SyntheticIterator(batch_size=2, seq_len=64, vocab_size=256, seed=0, mean_doc_len=16)
  first = [next(it) for _ in range(3)]
  for row in (first[0], first[1]):
    r = {k: v[0] for k, v in row.items()}
    assert len(_segments(r)) > 1
    for s, e in _segments(r):
      assert r["positions"][s:e].tolist() == list(range(e - s))
  it2 = SyntheticIterator(batch_size=2, seq_len=64, vocab_size=256, seed=0, mean_doc_len=16)
  it2.set_state({"step": 2})
  assert np.array_equal(next(it2)["tokens"], first[2]["tokens"])


# ---------------------------------------------------------------------- isolation in the model
O0 = {"xla_backend_optimization_level": 0}  # compile time dominates these CPU tests


def _random_model(cfg):
  """model_utils.random_model (norms and expert biases perturbed too) as one compiled program."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: random_model(cfg)))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(random_model(cfg)), compiler_options=O0)())


def test_packed_documents_do_not_see_each_other():
  """Each document of a packed row gets the logits it gets alone, through Lightning (its state
  resets, also inside a 64-token chunk), MLA (masked), MoE and the MTP layer; without segment
  ids the later documents' logits change (so the check can fail)."""
  cfg = ling_tiny()
  model = _random_model(cfg)
  rng = np.random.default_rng(0)
  lens = (13, 77, 38)  # b crosses the chunk boundary at 64, c starts inside the second chunk
  docs = [rng.integers(0, 256, n) for n in lens]
  starts = np.cumsum((0,) + lens)[:-1]
  packed = np.concatenate(docs)
  seg = np.repeat(np.arange(1, 4), lens)
  pos = np.concatenate([np.arange(n) for n in lens])
  # A document at the start of a row is "alone": causality hides whatever follows it.
  alone = [np.concatenate([d, rng.integers(0, 256, 128 - len(d))]) for d in docs[1:]]
  tokens = np.stack([packed, *alone, packed]).astype(np.int32)
  segs = np.stack([seg, seg * 0 + 1, seg * 0 + 1, seg * 0 + 1]).astype(np.int32)
  poss = np.stack([pos, np.arange(128), np.arange(128), pos]).astype(np.int32)
  out = jax.jit(lambda t, p, s: model.forward(t, positions=p, segment_ids=s, mtp=True),
                compiler_options=O0)(tokens, poss, segs)
  logits, mtp = np.asarray(out.logits), np.asarray(out.mtp_logits)
  for k, (start, n) in enumerate(zip(starts[1:], lens[1:]), 1):
    np.testing.assert_allclose(logits[0, start:start + n], logits[k, :n], rtol=1e-5, atol=1e-5)
    # MTP at t reads token t+1: the last position of a document is no valid prediction.
    np.testing.assert_allclose(mtp[0, start:start + n - 1], mtp[k, :n - 1], rtol=1e-5, atol=1e-5)
  leak = np.abs(logits[3, starts[1]:] - logits[0, starts[1]:]).max()
  assert leak > 1e-2, "without segment ids the documents should interact"


def test_training_runs_without_grain():
  """The GPU image has no grain: the synthetic source and the whole training stack import
  without it, and a text source says what is missing."""
  code = """
import sys
sys.modules["grain"] = None
import ling_jax.train, experiments.small_pretrain
from ling_jax.data import Data, DataConfig
batch = next(Data(DataConfig(source="synthetic", seq_len=16, batch_size=2), 256).train_iterator())
assert batch["tokens"].shape == (2, 16)
try:
  Data(DataConfig(source="stdlib"), 256)
except ImportError as e:
  assert "needs grain" in str(e), e
else:
  raise AssertionError("no error")
"""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
