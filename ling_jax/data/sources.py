"""Document sources: random-access sequences of text documents for the grain pipeline.

Formats (chosen by `format`, or by extension when "auto"):
  text        - every matching file is one document (read lazily, UTF-8, bad bytes replaced),
  jsonl       - one JSON object per line, the document is its `text_field` string,
  arrayrecord - every record is one UTF-8 document (grain's ArrayRecordDataSource),
  stdlib      - the default corpus: the top-level Python standard library sources on this machine
                (~550 files, ~10 MB), so the main job needs no download.
An empty corpus is an error here, before any training state exists: an infinite packed stream
over zero tokens would otherwise spin forever. So is a directory that cannot be listed or a file
that cannot be opened (each named with the OS error): found now rather than when the pipeline
first reads it, steps into training.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from typing import Sequence

import numpy as np

FORMATS = ("auto", "text", "jsonl", "arrayrecord")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".array_record": "arrayrecord",
               ".arrayrecord": "arrayrecord"}


class DataError(ValueError):
  """Bad data input: no or empty corpus, unreadable records, unusable tokenizer."""


class FileDocuments:
  """One document per file, read when indexed (so the pipeline, not startup, pays for reading)."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> str:
    try:
      with open(self.paths[i], "rb") as f:
        return f.read().decode("utf-8", errors="replace")
    except OSError as e:  # e.g. deleted or made unreadable after the run started
      raise DataError(f"cannot read {self.paths[i]}: {e.strerror}") from None


class RecordDocuments:
  """ArrayRecord records decoded as UTF-8 text."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> str:
    return bytes(self.source[i]).decode("utf-8", errors="replace")


class Subset:
  """docs[indices], itself a random-access document source."""

  def __init__(self, docs, indices):
    self.docs, self.indices = docs, [int(i) for i in indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> str:
    return self.docs[self.indices[i]]


def stdlib_files() -> list[str]:
  """The standard library's top-level modules and packages, without tests and vendored tools."""
  root = sysconfig.get_paths()["stdlib"]
  # encodings/ and pydoc_data/ are mostly data tables, not code.
  skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__",
          "encodings", "pydoc_data")
  out = []
  for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
    parts = os.path.relpath(path, root).split(os.sep)
    if not any(p in skip or p.startswith("test_") for p in parts):
      out.append(path)
  return sorted(out)


def _walk(directory: str) -> list[str]:
  """The files under `directory`, recursively, without hidden ones (as glob's "**" does); a
  directory that cannot be listed is an error, where glob would silently skip it."""

  def fail(e: OSError):
    raise DataError(f"data.source: cannot list {e.filename}: {e.strerror}")

  paths = []
  for root, dirs, files in os.walk(directory, onerror=fail, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    paths += [os.path.join(root, f) for f in files if not f.startswith(".")]
  return [p for p in paths if os.path.isfile(p)]


def _unlistable_parent(pattern: str) -> str | None:
  """Why a glob that matched nothing may have: its deepest existing fixed directory cannot be
  listed (the OS error), or None."""
  parent = os.path.dirname(pattern.split("*")[0].split("?")[0].split("[")[0]) or "."
  while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
    parent = os.path.dirname(parent)
  try:
    with os.scandir(parent):
      pass
  except OSError as e:
    return f"cannot list {parent}: {e.strerror}"
  return None


def _match(source: str) -> list[str]:
  if os.path.isdir(source):
    paths = _walk(source)
  else:
    paths = [p for p in glob.glob(source, recursive=True) if os.path.isfile(p)]
  if not paths:
    why = None if os.path.isdir(source) else _unlistable_parent(source)
    raise DataError(f"data.source={source!r} matches no files" + (f" ({why})" if why else ""))
  return sorted(paths)


def _check_readable(paths: list[str]) -> None:
  """Open (and close) every file now: an unreadable one fails before training, not during it."""
  for path in paths:
    try:
      with open(path, "rb"):
        pass
    except OSError as e:
      raise DataError(f"data.source: cannot read {path}: {e.strerror}") from None


def _format_of(paths: list[str], fmt: str) -> str:
  if fmt not in FORMATS:
    raise DataError(f"data.format={fmt!r}; choose one of {FORMATS}")
  if fmt != "auto":
    return fmt
  kinds = {_EXTENSIONS.get(os.path.splitext(p)[1].lower(), "text") for p in paths}
  if len(kinds) > 1:
    raise DataError(f"data.source mixes formats {sorted(kinds)}; set data.format or narrow the glob")
  return kinds.pop()


def _jsonl(paths: list[str], field: str) -> list[str]:
  docs = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
          raise DataError(f"{path}:{n}: no string field {field!r} (set data.text_field)")
        if record[field]:
          docs.append(record[field])
  return docs


def _arrayrecord(paths: list[str]) -> RecordDocuments:
  import grain  # the ArrayRecord reader ships with grain

  docs = RecordDocuments(grain.sources.ArrayRecordDataSource(paths))
  # Stop at the first non-empty record: the usual case costs one read, an all-empty corpus is caught.
  if not any(len(docs.source[i]) for i in range(len(docs))):
    raise DataError(f"ArrayRecord corpus {paths} has no non-empty records")
  return docs


def load_documents(source: str, fmt: str = "auto", text_field: str = "text"):
  """The documents of `source` ("stdlib", a file, a directory or a glob) as a random-access sequence."""
  if source == "stdlib":
    paths, kind = stdlib_files(), "text"
  else:
    paths = _match(source)
    kind = _format_of(paths, fmt)
  _check_readable(paths)
  if kind == "text":
    docs = FileDocuments([p for p in paths if os.path.getsize(p) > 0])
  elif kind == "jsonl":
    docs = _jsonl(paths, text_field)
  else:
    docs = _arrayrecord(paths)
  if len(docs) == 0:
    raise DataError(f"data.source={source!r}: the corpus is empty ({len(paths)} files, no text)")
  return docs


def split_documents(docs, eval_docs: int, seed: int):
  """(train, eval) document sources: `eval_docs` documents held out by a seeded permutation."""
  n = len(docs)
  if eval_docs < 0 or eval_docs >= n:
    raise DataError(f"data.eval_docs={eval_docs} must be in [0, {n}) for a corpus of {n} documents")
  order = np.random.default_rng(seed).permutation(n)
  held = np.sort(order[:eval_docs])
  keep = np.sort(order[eval_docs:])
  return Subset(docs, keep), (Subset(docs, held) if eval_docs else None)
