"""The converted checkpoint on disk: an Orbax checkpoint of the NNX state, plus a marker file.

    CKPT_DIR/
      state/          Orbax `StandardCheckpointer` layout of `nnx.to_pure_dict(state)`: an OCDBT
                      key-value store of zarr v2 arrays, one per variable, named by its state path
                      ("groups.layers.0.mlp.experts.gate_proj"), plus `_METADATA` (the tree).
      ling_jax.json   FORMAT, the model's config.json, the parameter dtype, the HF dtype of every
                      source tensor and the entries written; written last, so its presence means
                      "complete" (`ling_jax.io.destination`).

The streaming importer does not hold arrays for Orbax to save: `StateWriter` writes `state/` itself
through tensorstore, one slice at a time, in exactly the layout Orbax 0.12 writes (same kvstore
spec, zarr v2 metadata, `_METADATA` format), uncompressed, with chunks that are whole stacked /
per-expert slices so every write covers whole chunks. Why not Orbax's own save: its public API saves
whole arrays, and a stacked variable (the experts of a group of layers) is filled by many checkpoint
tensors from several shards; holding it whole would cost tens of GiB of host memory for the released
models. The price is a hand-kept layout, pinned three ways: the Orbax version is pinned in
pyproject.toml, FORMAT names this layout (a checkpoint of another FORMAT is refused with the
versions this code reads), and tests/convert/test_convert_format.py checks that Orbax's own
`StandardCheckpointer` restores what `StateWriter` writes bit-exactly and that our metadata matches
what Orbax writes for the same state. `ling_jax.convert.load` restores through Orbax, and
`StateReader` reads Orbax's own saves (`ling_jax.convert.save`). A checkpoint is built in
`CKPT_DIR.partial`, verified, and renamed into place (`ling_jax.io.destination`).
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from typing import Any

import numpy as np
import tensorstore as ts
from ling_jax.io.destination import MARKER, PARTIAL, read_json

STATE = "state"
# The layout above, as Orbax 0.12 writes it. A new layout gets a new version here, and
# `read_marker` keeps reading the versions listed in KNOWN_FORMATS.
FORMAT = "ling_jax.orbax/1"
KNOWN_FORMATS = (FORMAT,)

Path = tuple


class CheckpointFormatError(ValueError):
  """A converted checkpoint that is incomplete, corrupt or not one of ours."""


def param_name(path: Path) -> str:
  """Orbax's name for a leaf of a nested dict: its keys joined by dots."""
  return ".".join(map(str, path))


def chunk_shape(shape: tuple[int, ...], n_lead: int, itemsize: int, target_bytes: int) -> list[int]:
  """One chunk per leading (stack / expert) index, the rest halved, largest axis first, to fit.

  Leading axes get chunk 1 so each checkpoint tensor (one slice) is written as whole chunks; the
  trailing axes are split only when a slice is bigger than `target_bytes`, along the axes a mesh
  shards (they are the big ones), so a device restoring its shard reads little it does not need.
  """
  chunk = [1] * n_lead + [max(1, d) for d in shape[n_lead:]]
  while math.prod(chunk) * itemsize > target_bytes:
    axes = [i for i in range(n_lead, len(chunk)) if chunk[i] % 2 == 0]
    if not axes:
      break
    i = max(axes, key=lambda i: chunk[i])
    chunk[i] //= 2
  return chunk


def _kvstore_spec(state_dir: str) -> dict:
  # Orbax's own spec for a local OCDBT checkpoint (tensorstore_utils.build_kvstore_tspec and
  # add_ocdbt_write_options): data files written non-atomically, the manifest atomically. The
  # whole directory is published by a rename, so a torn data file is never visible.
  base = {"driver": "file", "path": state_dir}
  return {"driver": "ocdbt", "base": {**base, "file_io_locking": {"mode": "non_atomic"}},
          "manifest": base, "cache_pool": "cache_pool#ocdbt",
          "target_data_file_size": 2**31, "assume_config": True,
          "config": {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000,
                     "manifest_kind": "single"}}


def _context() -> ts.Context:
  # No fsync per data file (tensorstore's default): `Destination.commit` fsyncs the finished tree
  # once before publishing it, which is what makes it durable; per-file syncs only slow the writes.
  return ts.Context({"file_io_concurrency": {"limit": 64}, "file_io_sync": False,
                     "cache_pool": {"total_bytes_limit": 0},  # no chunk cache: streaming
                     "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})


def _zarr_dtype(dtype: np.dtype) -> str:
  dtype = np.dtype(dtype)
  return dtype.name if dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2") else dtype.str


class StateWriter:
  """Creates every variable's zarr array up front, then takes slice writes."""

  def __init__(self, state_dir: str, variables: dict[Path, tuple[tuple, np.dtype, int]], *,
               chunk_bytes: int):
    """`variables`: state path -> (shape, dtype, number of leading index axes)."""
    self.state_dir = os.path.abspath(state_dir)
    os.makedirs(self.state_dir, exist_ok=True)
    self.variables = variables
    self._context = _context()
    self._kv = _kvstore_spec(self.state_dir)
    self.chunks = {p: chunk_shape(s, n, np.dtype(d).itemsize, chunk_bytes)
                   for p, (s, d, n) in variables.items()}
    opens = {p: ts.open(self._spec(p, create=True), context=self._context)
             for p in variables}
    self.arrays = {p: f.result() for p, f in opens.items()}

  def _spec(self, path: Path, create: bool) -> dict:
    shape, dtype, _ = self.variables[path]
    spec = {"driver": "zarr", "kvstore": {**self._kv, "path": param_name(path)},
            "recheck_cached_data": False, "recheck_cached_metadata": False}
    if create:
      spec.update(create=True, delete_existing=True, store_data_equal_to_fill_value=True,
                  metadata={"shape": list(shape), "chunks": self.chunks[path],
                            "dtype": _zarr_dtype(dtype), "compressor": None,
                            "fill_value": None, "order": "C", "dimension_separator": "."})
    return spec

  def write(self, path: Path, region: tuple, block: np.ndarray):
    """Start `array[path][region] = block` (thread-safe); returns tensorstore's write future.
    `block` is referenced, not copied, until the write completes: do not modify it."""
    return self.arrays[path][region].write(block, can_reference_source_data_indefinitely=True)

  def finish(self) -> None:
    """Write Orbax's tree metadata and check every chunk of every array is stored (call once all
    writes are complete)."""
    write_tree_metadata(self.state_dir, {p: self.chunks[p] for p in self.variables})
    verify_state(self.state_dir, {p: (s, d) for p, (s, d, _) in self.variables.items()})


def write_tree_metadata(state_dir: str, write_shapes: dict[Path, list[int]]) -> None:
  """Orbax 0.12's `_METADATA` (tree structure) and `_CHECKPOINT_METADATA` for a dict of arrays."""
  tree = {}
  for path, write_shape in write_shapes.items():
    keys = [str(k) for k in path]
    tree[str(tuple(keys))] = {
        # key_type 2 = dict key (every level of a pure dict, integer layer indices included).
        "key_metadata": [{"key": k, "key_type": 2} for k in keys],
        "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                           "write_shape": list(write_shape)}}
  meta = {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
          "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
  _write_json(os.path.join(state_dir, "_METADATA"), meta)
  now = time.time_ns()
  _write_json(os.path.join(state_dir, "_CHECKPOINT_METADATA"), {
      "item_handlers": "orbax.checkpoint._src.handlers.standard_checkpoint_handler."
                       "StandardCheckpointHandler",
      "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
      "commit_timestamp_nsecs": now, "custom_metadata": {}})


def verify_state(state_dir: str, variables: dict[Path, tuple[tuple, Any]]) -> None:
  """Every array exists with the expected shape and dtype, and every one of its chunks is stored."""
  kv = ts.KvStore.open(_kvstore_spec(os.path.abspath(state_dir)), context=_context()).result()
  stored = collections.Counter()
  for key in kv.list().result():
    name, _, leaf = key.decode().rpartition("/")
    if leaf != ".zarray":
      stored[name] += 1
  for path, (shape, dtype) in variables.items():
    name = param_name(path)
    try:
      arr = ts.open({"driver": "zarr", "kvstore": {**_kvstore_spec(os.path.abspath(state_dir)),
                                                   "path": name}, "open": True},
                    context=_context()).result()
    except ValueError as e:
      raise CheckpointFormatError(f"{state_dir}: array {name!r} is missing or unreadable: {e}")
    if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype.numpy_dtype) != np.dtype(dtype):
      raise CheckpointFormatError(
          f"{state_dir}: array {name!r} is {arr.dtype.name}{list(arr.shape)}, expected "
          f"{np.dtype(dtype).name}{list(shape)}")
    chunks = arr.chunk_layout.read_chunk.shape
    want = math.prod(-(-s // c) for s, c in zip(shape, chunks)) if shape else 1
    if stored[name] != want:
      raise CheckpointFormatError(f"{state_dir}: array {name!r} has {stored[name]} of its {want} "
                                  f"chunks: the conversion did not finish")


class StateReader:
  """Reads slices of the arrays of a checkpoint's `state/` (ours or one Orbax saved)."""

  def __init__(self, state_dir: str, name=param_name):
    """`name(path)`: the stored array of a model variable (a run's train state stores
    `params.<path>.value`: `RunCheckpoint.array_name`)."""
    self.state_dir = os.path.abspath(state_dir)
    self._context = _context()
    self._kv = _kvstore_spec(self.state_dir)
    self._arrays: dict[Path, Any] = {}
    self._name = name

  def array(self, path: Path):
    if path not in self._arrays:
      spec = {"driver": "zarr", "kvstore": {**self._kv, "path": self._name(path)}, "open": True,
              "recheck_cached_data": False, "recheck_cached_metadata": False}
      try:
        self._arrays[path] = ts.open(spec, context=self._context).result()
      except ValueError as e:
        raise CheckpointFormatError(f"{self.state_dir}: array {self._name(path)!r} is missing "
                                    f"or unreadable: {e}") from None
    return self._arrays[path]

  def read(self, path: Path, region: tuple) -> np.ndarray:
    return self.array(path)[region].read().result()


# ---------------------------------------------------------------------------- marker
def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())


def read_marker(ckpt_dir: str | os.PathLike) -> dict:
  """The marker of a complete converted checkpoint; `CheckpointFormatError` naming the file if
  it is missing, unreadable, or of a format this version does not read."""
  ckpt_dir = os.fspath(ckpt_dir)
  path = os.path.join(ckpt_dir, MARKER)
  if not os.path.exists(path):
    hint = (f" (an unfinished conversion is in {ckpt_dir}{PARTIAL})"
            if os.path.exists(ckpt_dir + PARTIAL) else "")
    raise CheckpointFormatError(f"{ckpt_dir} is not a complete ling_jax checkpoint: {MARKER} "
                                f"is missing{hint}")
  marker = read_json(path)
  if not isinstance(marker, dict):
    raise CheckpointFormatError(f"{path} is unreadable or not a JSON object")
  fmt = marker.get("format")
  if fmt not in KNOWN_FORMATS:
    hint = (": it marks an HF folder that ling_jax wrote; convert it with `python -m "
            "ling_jax.convert import`, or read it with `ling_jax.load_hf`"
            if isinstance(fmt, str) and fmt.startswith("ling_jax.hf/") else "")
    raise CheckpointFormatError(f"{path}: unknown checkpoint format {fmt!r}; this version of "
                                f"ling_jax reads {', '.join(map(repr, KNOWN_FORMATS))}{hint}")
  return marker
