"""A safetensors file written in pieces, from several threads, bypassing the page cache
(docs/architecture.md §4.1).

`write_safetensors` writes a file front to back from whole tensors. `SafetensorsWriter` lays out
the same header first and then takes the raw bytes of any piece of any tensor, in any order, from
any thread (`pwrite`), so a converter can stream a tensor bigger than its memory budget and keep
several blocks in flight.

Pieces go to the disk with O_DIRECT where the filesystem allows it and the piece's memory is
"in phase" with its place in the file (address = file offset mod `ALIGN`; `phased` cuts such a
view from a buffer): the whole pages in the middle are written from that memory by the disk, and
only the partial pages at either end go through the page cache. On this project's VM a buffered
write costs a copy into a freshly allocated page-cache page, the single largest CPU cost of an
export (about 1 GB/s per core). Everything else is written normally; the bytes on disk are the same.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any, Mapping

import numpy as np

from ling_jax.io.safetensors import (ALIGN, SafetensorsError, TensorNotFoundError, fsync_dir,
                                     header_layout)


def phased(buf: np.ndarray, position: int, nbytes: int) -> np.ndarray:
  """`nbytes` of the flat uint8 `buf` (of at least nbytes + ALIGN) whose address is `position`
  modulo ALIGN, so that a piece written at file offset `position` can bypass the page cache."""
  k = (position - buf.ctypes.data) % ALIGN
  return buf[k:k + nbytes]


class SafetensorsWriter:
  """A safetensors file written in pieces, in any order and from any number of threads.

      with SafetensorsWriter(path, {"w": ((4, 8), np.float32)}) as w:
        w.write("w", 0, rows_0_to_1)        # bytes of the C-order tensor from byte offset 0
        w.write("w", 64, rows_2_to_3)

  The header goes first (the layout of `write_safetensors`); each `write` puts raw little-endian
  bytes at their place in the file, so nothing larger than one piece is ever in memory. On
  leaving the block without an error, every byte of every tensor must have been written exactly
  once (else `SafetensorsError` naming the tensor); then the file is fsynced (`durable`) and
  renamed from `path + ".tmp-<pid>"` over `path`. On an error the temporary file is removed.
  `direct`: write in-phase pieces with O_DIRECT where the filesystem allows it (module doc).
  """

  def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple],
               metadata: Mapping[str, str] | None = None, durable: bool = True,
               direct: bool = True):
    """`specs`: tensor name -> (shape, dtype)."""
    self.path, self.durable = os.fspath(path), durable
    blob, self.entries = header_layout(self.path, specs, metadata)
    self._data_start = 8 + len(blob)
    self._pieces: dict[str, list[tuple[int, int]]] = {n: [] for n in self.entries}
    self._tmp = f"{self.path}.tmp-{os.getpid()}"
    self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    self._direct_fd = None
    try:
      _pwrite_all(self._fd, struct.pack("<Q", len(blob)) + blob, 0, self._tmp)
      os.ftruncate(self._fd, self._data_start + self.nbytes)
      if direct and hasattr(os, "O_DIRECT"):
        try:
          self._direct_fd = os.open(self._tmp, os.O_WRONLY | os.O_DIRECT)
        except OSError as e:
          if e.errno != errno.EINVAL:
            raise
    except BaseException:
      self.abort()
      raise

  @property
  def nbytes(self) -> int:
    return sum(end - begin for _, _, begin, end in self.entries.values())

  def position(self, name: str, offset: int = 0) -> int:
    """File offset of byte `offset` of tensor `name`."""
    return self._data_start + self._entry(name)[2] + offset

  def _entry(self, name: str):
    try:
      return self.entries[name]
    except KeyError:
      raise TensorNotFoundError(f"tensor {name!r} is not in the header of {self.path}") from None

  def write(self, name: str, offset: int, data: Any) -> None:
    """Put `data` (an array's raw bytes, or any buffer) at byte `offset` of tensor `name`."""
    _, _, begin, end = self._entry(name)
    if isinstance(data, np.ndarray):
      data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    buf = memoryview(data).cast("B")
    if offset < 0 or begin + offset + len(buf) > end:
      raise SafetensorsError(f"{self.path}: tensor {name!r}: bytes {offset}..{offset + len(buf)} "
                             f"are outside its {end - begin} bytes")
    pos = self._data_start + begin + offset
    head = -pos % ALIGN
    body = (len(buf) - head) // ALIGN * ALIGN
    direct_fd = self._direct_fd
    if (direct_fd is not None and body > 0 and isinstance(data, np.ndarray)
        and (data.ctypes.data - pos) % ALIGN == 0):
      try:
        _pwrite_all(direct_fd, buf[head:head + body], pos + head, self._tmp)
      except OSError as e:
        if e.errno != errno.EINVAL:
          raise
        self._direct_fd = None  # the filesystem takes no O_DIRECT after all: write normally
        _pwrite_all(self._fd, buf[head:head + body], pos + head, self._tmp)
      _pwrite_all(self._fd, buf[:head], pos, self._tmp)
      _pwrite_all(self._fd, buf[head + body:], pos + head + body, self._tmp)
    else:
      _pwrite_all(self._fd, buf, pos, self._tmp)
    self._pieces[name].append((offset, offset + len(buf)))  # list.append is atomic

  def close(self) -> None:
    """Check that every byte was written once, then publish the file (see the class doc)."""
    try:
      for name, (_, _, begin, end) in self.entries.items():
        pos = 0
        for a, b in sorted(self._pieces[name]):
          if a != pos:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r}: " + (f"bytes {pos}..{a} were never written"
                                                     if a > pos else f"bytes {a}..{pos} were "
                                                     f"written twice"))
          pos = b
        if pos != end - begin:
          raise SafetensorsError(f"{self.path}: tensor {name!r}: bytes {pos}..{end - begin} "
                                 f"were never written")
      if self.durable:
        os.fsync(self._fd)  # the page-cache part; also flushes the disk's cache for the rest
      self._close_fds()
      os.replace(self._tmp, self.path)
    except BaseException:
      self.abort()
      raise
    if self.durable:
      fsync_dir(os.path.dirname(os.path.abspath(self.path)))

  def _close_fds(self) -> None:
    for attr in ("_direct_fd", "_fd"):
      fd = getattr(self, attr)
      if fd is not None:
        setattr(self, attr, None)
        os.close(fd)

  def abort(self) -> None:
    """Remove the temporary file (idempotent)."""
    self._close_fds()
    try:
      os.remove(self._tmp)
    except FileNotFoundError:
      pass

  def __enter__(self) -> "SafetensorsWriter":
    return self

  def __exit__(self, exc_type, *exc) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def _pwrite_all(fd: int, data, offset: int, path: str) -> None:
  buf = memoryview(data).cast("B")
  done = 0
  while done < len(buf):
    n = os.pwrite(fd, buf[done:], offset + done)
    if n <= 0:
      raise OSError(f"{path}: short write at byte {offset + done}")
    done += n


__all__ = ["ALIGN", "SafetensorsWriter", "phased"]
