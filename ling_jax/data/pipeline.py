"""The grain input pipeline: documents -> tokens -> packed rows with segment ids and positions.

    source --shuffle(seed, new order every epoch)--> repeat --> tokenize --> drop empty
           --> ConcatThenSplit packing into rows of seq_len --> batch

Packing (grain's ConcatThenSplitIterDataset) fills every row completely: documents are laid end to
end, each gets its own segment id (1, 2, ... within a row) and positions 0, 1, ... A document
longer than the space left is split; its continuation starts the next row as a new segment with
positions from 0 again. The model masks MLA attention across segment ids and resets the Lightning
state at every segment start, so no token ever sees another document.

The iterator is grain's: `get_state()` is a small JSON-able dict saved with each checkpoint,
`set_state()` resumes exactly. grain is imported lazily, so the training code imports without it
(the synthetic source needs no grain).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ling_jax.data.sources import FORMATS, DataError, load_documents, split_documents
from ling_jax.data.synthetic import SyntheticIterator
from ling_jax.data.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the tokens come from and how they are packed."""

  source: str = "stdlib"        # "stdlib", "synthetic", or a file / directory / glob
  format: str = "auto"          # one of sources.FORMATS
  text_field: str = "text"      # the JSONL field holding the document
  tokenizer: str | None = None  # an HF tokenizer.json; None = UTF-8 bytes (ids < 256)
  seq_len: int = 128            # tokens a row (>= 3: MTP predicts token t+2)
  batch_size: int = 16          # rows a step
  seed: int = 0                 # document order and the eval split
  eval_docs: int = 16           # documents held out for the eval loss (0: evaluate on train docs)
  eval_batches: int = 8         # batches of the eval loss

  def __post_init__(self):
    errors = []
    if self.format not in FORMATS:
      errors.append(f"format={self.format!r}; choose one of {FORMATS}")
    if self.seq_len < 3:  # the MTP loss predicts token t+2
      errors.append(f"seq_len={self.seq_len} must be >= 3")
    for name in ("batch_size", "eval_batches"):
      if getattr(self, name) < 1:
        errors.append(f"{name}={getattr(self, name)} must be >= 1")
    if self.eval_docs < 0:
      errors.append(f"eval_docs={self.eval_docs} must be >= 0")
    if not self.text_field:
      errors.append("text_field must not be empty")
    if errors:
      raise ValueError("invalid DataConfig: " + "; ".join(errors))


def _packed_rows(docs, tokenizer, *, seq_len: int, seed: int):
  """One infinite stream of packed rows {tokens, segment_ids, positions} [T] int32."""
  import grain

  ds = grain.MapDataset.source(docs).shuffle(seed).repeat(None)  # new order every epoch
  ds = ds.map(lambda text: {"tokens": tokenizer.encode(text)})
  ds = ds.filter(lambda ex: len(ex["tokens"]) > 0)
  # No read-ahead threads: grain's default prefetches 500 whole documents per stream, and a row
  # needs a new document only every few hundred tokens.
  rows = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  ds = grain.experimental.ConcatThenSplitIterDataset(rows, length_struct={"tokens": seq_len})
  return ds.map(lambda ex: {"tokens": ex["tokens"], "segment_ids": ex["tokens_segment_ids"],
                            "positions": ex["tokens_positions"]})


def packed_dataset(docs, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                   rows: slice | None = None):
  """A grain IterDataset of batches {tokens, segment_ids, positions} [B, T] int32 (infinite).

  Row b of every batch comes from its own packed stream (its own document order): one stream cut
  into consecutive batches would fill a batch with neighbouring pieces of one long file.
  `rows` keeps only those rows of each batch: the streams a process feeds under a mesh of
  several processes, each the same whatever the number of processes (where grain's ShardOptions
  would split the documents, and so change every row, with the process count).
  """
  import grain

  seeds = np.random.SeedSequence(seed).generate_state(batch_size)  # uint32, distinct per row
  seeds = seeds[rows if rows is not None else slice(None)]
  streams = [_packed_rows(docs, tokenizer, seq_len=seq_len, seed=int(s)) for s in seeds]
  return grain.experimental.ZipIterDataset(streams).map(
      lambda rows: {k: np.stack([r[k] for r in rows]) for k in rows[0]})


def merge_row_states(parts: list[tuple[slice, dict]]) -> dict:
  """One iterator state for the whole batch from the states of iterators over parts of its rows
  ((rows, state) per process): what a checkpoint stores, whatever the number of processes. The
  packed streams' state lists one entry per row (grain's ZipIterDataset: "parents"), so the
  parts join in row order; the synthetic stream's is the step, the same in every part."""
  parts = sorted(parts, key=lambda p: p[0].start or 0)
  if all("parents" in state for _, state in parts):
    return {"parents": [row for _, state in parts for row in state["parents"]]}
  if any(state != parts[0][1] for _, state in parts):
    raise ValueError(f"the processes' data iterators disagree: {[s for _, s in parts]}")
  return parts[0][1]


def row_state(state: dict, rows: slice | None, batch_size: int) -> dict:
  """The state of an iterator over `rows` from the whole batch's (`merge_row_states`)."""
  if "parents" not in state:
    return state
  if len(state["parents"]) != batch_size:
    raise ValueError(f"the data position holds {len(state['parents'])} rows; the batch has "
                     f"{batch_size}")
  return {"parents": state["parents"][rows if rows is not None else slice(None)]}


def json_state(state):
  """Undo JSON's tuple -> list: grain compares its (start, stop) slices against tuple sentinels."""
  if isinstance(state, dict):
    return {k: json_state(v) for k, v in state.items()}
  if isinstance(state, (list, tuple)):
    items = [json_state(v) for v in state]
    return tuple(items) if all(isinstance(v, int) for v in items) else items
  return state


class Data:
  """The tokenizer, a checkpointable train iterator, and a fixed list of eval batches; of every
  batch, the rows `rows` (default all: one process; under several, its own)."""

  def __init__(self, cfg: DataConfig, vocab_size: int, rows: slice | None = None):
    self.cfg, self.rows = cfg, rows
    self.tokenizer = load_tokenizer(cfg.tokenizer)
    if self.tokenizer.vocab_size > vocab_size:
      raise DataError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the model's "
                       f"vocab_size is {vocab_size}")
    self.vocab_size = vocab_size
    if cfg.source == "synthetic":
      self.train_docs = self.eval_docs = None
    else:
      try:
        import grain  # noqa: F401
      except ImportError:
        raise ImportError(f"data.source={cfg.source!r} needs grain (pip install grain); "
                          "data.source=synthetic runs without it") from None
      docs = load_documents(cfg.source, cfg.format, cfg.text_field)
      self.train_docs, held = split_documents(docs, cfg.eval_docs, cfg.seed)
      self.eval_docs = held if held is not None else self.train_docs

  def train_iterator(self, rows: slice | None = None):
    """A fresh iterator at the start of the stream (restore a position with `set_state`), of
    `rows` (default: this Data's)."""
    cfg, rows = self.cfg, (rows if rows is not None else self.rows)
    if cfg.source == "synthetic":
      return SyntheticIterator(batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                               vocab_size=self.vocab_size, seed=cfg.seed, rows=rows)
    return iter(packed_dataset(self.train_docs, self.tokenizer, seq_len=cfg.seq_len,
                               batch_size=cfg.batch_size, seed=cfg.seed, rows=rows))

  def eval_batches(self, rows: slice | None = None) -> list[dict[str, np.ndarray]]:
    """The same `eval_batches` batches every call (unshuffled held-out documents, cycled if
    short), of `rows` (default: this Data's)."""
    cfg, rows = self.cfg, (rows if rows is not None else self.rows)
    if cfg.source == "synthetic":
      it = SyntheticIterator(batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                             vocab_size=self.vocab_size, seed=cfg.seed + 1_000_003, rows=rows)
    else:
      it = iter(packed_dataset(self.eval_docs, self.tokenizer, seq_len=cfg.seq_len,
                               batch_size=cfg.batch_size, seed=cfg.seed + 1, rows=rows))
    return [next(it) for _ in range(cfg.eval_batches)]
