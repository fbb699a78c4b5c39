"""A small memory-mapped safetensors reader and an atomic, streaming writer (docs/architecture.md
§4.1).

The released checkpoint (docs/architecture.md §4.1) is a folder of safetensors shards in bf16, and
the fp8 variant (docs/architecture.md §4.4) stores float8_e4m3fn weights. The `safetensors`
package's numpy backend knows neither bfloat16 nor float8, and its `load_file` reads whole files, so
this module implements the format itself with `ml_dtypes` for the extra dtypes.

File layout: an 8-byte little-endian u64 header length N, then N bytes of UTF-8 JSON
`{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the data buffer. Offsets are relative to the start of the buffer (byte 8 + N); tensors are
C-order, little-endian.

    with SafetensorsFile(path) as st:
      for name in st.keys():
        dtype, shape = st.info(name)
        array = st.get(name)          # read-only np.memmap view, no copy
    write_safetensors(path, {"w": array}, metadata={"format": "pt"})

`safetensors_writer.SafetensorsWriter` writes one file in pieces, from several threads.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

# safetensors dtype code -> numpy dtype. All little-endian (the format is; so is every host we run).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_CODES: dict[np.dtype, str] = {dt: code for code, dt in DTYPES.items()}

# The reference implementation refuses headers above 100 MB; a larger N means a corrupt length.
MAX_HEADER_BYTES = 100 * 2**20
_MAX_BYTES = 2**63 - 1
# O_DIRECT alignment of file offsets, lengths and memory, whatever the disk's logical block size
# (the converter reads and writes these files bypassing the page cache where it can).
ALIGN = 4096
# Non-contiguous arrays are written in row blocks of about this size, to bound the extra memory.
_WRITE_BLOCK_BYTES = 64 * 2**20

if sys.byteorder != "little":  # ml_dtypes types have no byte-swapped variant to view the data as.
  raise ImportError("ling_jax.io.safetensors assumes a little-endian host")


class SafetensorsError(ValueError):
  """A safetensors file whose header or size is invalid; the message names the file (and tensor)."""


class TensorNotFoundError(KeyError):
  """A tensor name that the file does not contain; the message names the tensor and the file."""

  def __str__(self) -> str:  # KeyError would print the repr of the message, quotes and all.
    return str(self.args[0]) if self.args else ""


class SafetensorsFile:
  """One safetensors file, header parsed and validated on open, data memory-mapped
  (docs/architecture.md §4.1).

  `get` returns read-only views into the mapping: nothing is read from disk until it is touched,
  so iterating over a 4 GiB shard to check names and shapes costs only the header.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._mm: np.memmap | None = None
    size = os.path.getsize(self.path)
    if size < 8:
      raise SafetensorsError(f"{self.path} has {size} bytes, too short for a safetensors header")
    with open(self.path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n > MAX_HEADER_BYTES or 8 + n > size:
        raise SafetensorsError(
            f"{self.path} is corrupt or truncated: header length {n} does not fit in the file "
            f"({size} bytes)")
      raw = f.read(n)
    self._data_start = 8 + n
    self.file_size = size
    self.metadata, self._entries = _parse_header(raw, self.path, self._data_start, size)
    # One mapping of the whole file; a file holding only an (empty) header cannot be mapped.
    if size > self._data_start:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")

  @classmethod
  def open(cls, path: str | os.PathLike) -> "SafetensorsFile":
    """Same as the constructor; reads for the `with SafetensorsFile.open(p) as st` idiom."""
    return cls(path)

  def __enter__(self) -> "SafetensorsFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Drop this object's mapping; arrays already returned by `get` keep theirs alive."""
    self._mm = None

  def keys(self) -> list[str]:
    """Tensor names in file (data offset) order; `__metadata__` is not a tensor."""
    return list(self._entries)

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    """(numpy dtype, shape) of a tensor, from the header alone."""
    dtype, shape, _, _ = self._entry(name)
    return dtype, shape

  def nbytes(self, name: str) -> int:
    _, _, begin, end = self._entry(name)
    return end - begin

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only, zero-copy view into the memory-mapped file."""
    dtype, shape, begin, end = self._entry(name)
    if begin == end:  # Zero-size tensor: nothing to map (the file may hold no data at all).
      empty = np.zeros(shape, dtype)
      empty.flags.writeable = False
      return empty
    if self._mm is None:
      raise SafetensorsError(f"{self.path} is closed; cannot read tensor {name!r}")
    start = self._data_start + begin
    return self._mm[start:self._data_start + end].view(dtype).reshape(shape)

  def _entry(self, name: str):
    try:
      return self._entries[name]
    except KeyError:
      raise TensorNotFoundError(f"tensor {name!r} is not in {self.path} "
                                f"({len(self._entries)} tensors)") from None

  def __repr__(self) -> str:
    return f"SafetensorsFile({self.path!r}, {len(self._entries)} tensors)"


def _parse_header(raw: bytes, path: str, data_start: int, file_size: int):
  """Validate the JSON header -> (metadata, {name: (dtype, shape, begin, end)} in offset order)."""
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SafetensorsError(f"{path} has a corrupt header (not UTF-8 JSON): {e}") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path} has a corrupt header: expected a JSON object, "
                           f"got {type(header).__name__}")
  metadata = header.pop("__metadata__", None)
  metadata = {} if metadata is None else metadata
  if not isinstance(metadata, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
    raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")

  entries = {}
  for name, e in header.items():
    where = f"{path}: tensor {name!r}"
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
      raise SafetensorsError(f"{where} needs dtype, shape and data_offsets, got {e!r}")
    if not isinstance(e["dtype"], str) or e["dtype"] not in DTYPES:
      raise SafetensorsError(f"{where} has unsupported dtype {e['dtype']!r} "
                             f"(known: {', '.join(DTYPES)})")
    shape, offsets = e["shape"], e["data_offsets"]
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
      raise SafetensorsError(f"{where} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
      raise SafetensorsError(f"{where} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if end < begin:
      raise SafetensorsError(f"{where} has data_offsets out of order: {offsets}")
    dtype = DTYPES[e["dtype"]]
    # Exact integers: numpy's int64 product wraps, so [2**32, 2**32] would pass as 0 bytes. Like
    # the reference library, a size past int64 is refused even when a zero dimension follows.
    want, size = 1, dtype.itemsize
    for d in shape:
      size *= max(d, 1)
      want *= d
    if size > _MAX_BYTES:
      raise SafetensorsError(f"{where}: {e['dtype']}{shape} overflows a 64-bit byte count")
    want *= dtype.itemsize
    if end - begin != want:
      raise SafetensorsError(f"{where} spans {end - begin} bytes but {e['dtype']}{shape} "
                             f"needs {want}")
    entries[name] = (dtype, tuple(shape), begin, end)

  # The tensors must tile the data buffer exactly, in offset order, as the reference library
  # requires: no overlap, no gap (before the first tensor, between two, or after the last).
  ordered = dict(sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])))
  prev_name, prev_end = None, 0
  for name, (_, _, begin, end) in ordered.items():
    if begin < prev_end:
      raise SafetensorsError(f"{path}: tensor {name!r} (bytes {begin}..{end} of the data) "
                             f"overlaps tensor {prev_name!r} (ends at {prev_end})")
    if data_start + end > file_size:
      # Absolute positions: that is what a user compares with `ls -l`.
      raise SafetensorsError(
          f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file "
          f"has {file_size} bytes")
    if begin > prev_end:
      after = f"after tensor {prev_name!r}" if prev_name is not None else "before it"
      raise SafetensorsError(f"{path}: tensor {name!r} starts at byte {begin} of the data, "
                             f"leaving a gap of {begin - prev_end} bytes {after}")
    if end > begin or prev_name is None:
      prev_name, prev_end = name, end
  if data_start + prev_end != file_size:
    last = f"the last tensor ({prev_name!r})" if prev_name is not None else "the header"
    raise SafetensorsError(f"{path} is corrupt: its last {file_size - data_start - prev_end} "
                           f"bytes, after {last}, belong to no tensor")
  return dict(metadata), ordered


def _is_count(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def dtype_code(dtype: Any) -> str:
  """safetensors dtype code of a numpy (or ml_dtypes) dtype, e.g. bfloat16 -> 'BF16'."""
  dt = np.dtype(dtype)
  if dt.byteorder == ">":
    dt = dt.newbyteorder("<")
  try:
    return _CODES[dt]
  except KeyError:
    raise SafetensorsError(f"dtype {dt} has no safetensors code") from None


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> int:
  """Write `tensors` to `path` atomically; returns the number of data bytes written.

  Tensors are laid out in sorted name order, C-contiguous, little-endian, after a header padded
  with spaces to a multiple of 8 bytes. Values may be numpy arrays or anything with `.shape`,
  `.dtype` and `__array__` (e.g. a jax.Array): the header is built from shape and dtype, and each
  value is converted and streamed to disk one at a time, so at most one tensor (not the whole file)
  is materialised on the host. The file is written to `path + ".tmp-<pid>"`, fsynced and renamed
  over `path`, so `path` never holds a partial file; on any error the temporary file is removed.
  (`safetensors_writer.SafetensorsWriter` writes a file in pieces, from several threads.)
  """
  path = os.fspath(path)
  values = {}
  for name in tensors:
    value = tensors[name]
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
      value = np.asarray(value)  # Python scalars and lists: small, convert now.
    values[name] = value
  specs = {n: (v.shape, v.dtype) for n, v in values.items()}
  blob, entries = header_layout(path, specs, metadata)

  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for name, (code, shape, begin, end) in entries.items():
        _write_array(f, _as_array(values[name], name, code, shape, path), end - begin)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except FileNotFoundError:
      pass
    raise
  fsync_dir(os.path.dirname(os.path.abspath(path)))
  return sum(end - begin for _, _, begin, end in entries.values())


def header_layout(path: str, specs: Mapping[str, tuple], metadata: Mapping[str, str] | None
                  ) -> tuple[bytes, dict[str, tuple[str, tuple, int, int]]]:
  """(padded header JSON, {name: (dtype code, shape, begin, end)} in file order) for
  `specs`: name -> (shape, dtype); tensors are laid out in sorted name order."""
  metadata = dict(metadata or {})
  for k, v in metadata.items():
    if not (isinstance(k, str) and isinstance(v, str)):
      raise TypeError(f"{path}: metadata must map str to str, got {k!r}: {v!r}")
  header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
  entries = {}
  offset = 0
  for name in sorted(specs):
    if not isinstance(name, str) or name == "__metadata__":
      raise ValueError(f"{path}: invalid tensor name {name!r}")
    shape, dtype = specs[name]
    shape = tuple(int(d) for d in shape)
    try:
      code = dtype_code(dtype)
    except (SafetensorsError, TypeError) as e:
      raise SafetensorsError(f"{path}: tensor {name!r}: {e}") from None
    nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize
    header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    entries[name] = (code, shape, offset, offset + nbytes)
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  return blob + b" " * (-len(blob) % 8), entries


def _as_array(value: Any, name: str, code: str, shape: tuple, path: str) -> np.ndarray:
  """Host numpy array of `value`, checked against what the header already promised."""
  arr = np.asarray(value)
  if arr.shape != shape or dtype_code(arr.dtype) != code:
    raise SafetensorsError(f"{path}: tensor {name!r} converted to {arr.dtype}{list(arr.shape)}, "
                           f"but its .dtype/.shape said {code}{list(shape)}")
  if arr.dtype.byteorder == ">":
    arr = arr.astype(arr.dtype.newbyteorder("<"))
  return arr


def _write_array(f, arr: np.ndarray, nbytes: int) -> None:
  if nbytes == 0:
    return
  if arr.flags.c_contiguous:
    f.write(arr.reshape(-1).view(np.uint8))
    return
  # Copy row blocks of the leading axis: their concatenation is the C-order byte stream.
  rows = max(1, _WRITE_BLOCK_BYTES // max(1, nbytes // arr.shape[0]))
  for i in range(0, arr.shape[0], rows):
    f.write(np.ascontiguousarray(arr[i:i + rows]).reshape(-1).view(np.uint8))


def fsync_dir(folder: str) -> None:
  # Makes the rename itself durable; not every platform / filesystem allows opening a directory.
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
