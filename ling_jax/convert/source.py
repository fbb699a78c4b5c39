"""The HF checkpoint folder as a conversion source: validated up front, read block by block.

`HFSource.open(folder)` reads config.json and every safetensors header (docs/architecture.md §4.1:
the headers are the truth, the index must agree with them), pairs every checkpoint tensor with its
place in the model (`ling_jax.weights`), and checks names, shapes, dtypes and FP8 scales before
anything is written, so bad input fails in seconds with an error naming the file and the tensor.

`blocks()` then yields one tensor in the model's layout as a few row blocks of bounded size, read
from its byte range of the memory-mapped file (`read_view`: pread, with O_DIRECT where allowed, so
nothing stays mapped or cached and resident memory does not grow with the file), dequantised
(docs/architecture.md §4.4) and transposed (`transpose2d`, tiled) on the way, into buffers the
caller may recycle.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import mmap
import os
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from ling_jax.config import LingConfig
from ling_jax.hf_config import ConfigError, from_hf_config, read_config_json
from ling_jax.hf_io import CheckpointError, few_names, scan_folder
from ling_jax.io.safetensors import ALIGN, SafetensorsFile
from ling_jax.weights import TensorMap
from ling_jax.convert.fp8 import FP8_DTYPES, QuantScheme, dequantize_rows, quant_scheme

FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float32, np.float16, ml_dtypes.bfloat16))


@dataclasses.dataclass(frozen=True)
class SourceTensor:
  """One checkpoint tensor: where it is, what it is, and which model slice it fills."""

  map: TensorMap
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  nbytes: int
  scale: str | None = None       # name of its FP8 scale tensor (weight_scale / weight_scale_inv)
  scale_file: str | None = None


def read_config(folder: str) -> tuple[dict, LingConfig, QuantScheme | None]:
  """(raw config.json, LingConfig, FP8 scheme or None); `quantization_config` is taken out first."""
  path = os.path.join(folder, "config.json")
  try:
    hf = read_config_json(folder)
    cfg = from_hf_config({k: v for k, v in hf.items() if k != "quantization_config"}, source=path)
  except ConfigError as e:  # names the file already
    raise CheckpointError(str(e)) from None
  try:
    scheme = quant_scheme(hf.get("quantization_config"))
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None
  return hf, cfg, scheme


class HFSource:
  """A validated HF folder: `tensors` in file order, with the model slice each one fills."""

  def __init__(self, folder: str, hf: dict, cfg: LingConfig, scheme: QuantScheme | None,
               tensors: list[SourceTensor], dropped: list[str]):
    self.folder, self.hf_config, self.config, self.scheme = folder, hf, cfg, scheme
    self.tensors, self.dropped = tensors, dropped
    self._files: dict[str, SafetensorsFile] = {}

  @property
  def nbytes(self) -> int:
    return sum(t.nbytes for t in self.tensors)

  @classmethod
  def open(cls, folder: str | os.PathLike, maps: list[TensorMap],
           slice_shapes: dict[str, tuple[int, ...]]) -> "HFSource":
    """Validate `folder` against the name map of its config (`maps`, built from `read_config`);
    `slice_shapes`: HF name -> shape of the model slice it fills."""
    folder = os.path.abspath(os.fspath(folder))
    hf, cfg, scheme = read_config(folder)
    where = scan_folder(folder)  # every header; missing shards, index disagreements
    info, order = {}, {}
    for fname in sorted(set(where.values())):
      with SafetensorsFile(os.path.join(folder, fname)) as st:
        for k, name in enumerate(st.keys()):  # data-offset order
          dtype, shape = st.info(name)
          info[name] = (np.dtype(dtype), tuple(shape), st.nbytes(name))
          order[name] = (fname, k)

    wanted = {m.name: m for m in maps}
    scale_suffix = scheme.scale_suffix if scheme else None
    # Weights whose scale tensor is a model variable of its own (FP8 weights kept as they are).
    kept = {n[:-len(scale_suffix)] + "weight" for n in wanted
            if scale_suffix and n.endswith("." + scale_suffix)}
    scales, dropped, unknown = {}, [], []
    for name in where:
      if name in wanted:
        continue
      base, _, leaf = name.rpartition(".")
      if scheme and leaf == scale_suffix and f"{base}.weight" in wanted:
        scales[f"{base}.weight"] = name
      elif scheme and leaf == "input_scale" and f"{base}.weight" in wanted:
        dropped.append(name)  # static activation scales: we compute activations in bf16/fp32
      else:
        unknown.append(name)
    missing = sorted(set(wanted) - set(where))
    if missing or unknown:
      msgs = []
      if missing:
        msgs.append(f"{len(missing)} missing tensor(s): {few_names(missing)}")
      if unknown:
        unknown.sort()
        hint = (" (FP8 scales, but config.json has no quantization_config)"
                if any(n.endswith(("weight_scale", "weight_scale_inv")) for n in unknown)
                and scheme is None else "")
        msgs.append(f"{len(unknown)} unexpected tensor(s): "
                    + ", ".join(f"{n!r} in {where[n]}" for n in unknown[:5])
                    + (", ..." if len(unknown) > 5 else "") + hint)
      raise CheckpointError(f"{folder} does not match its config.json: " + "; ".join(msgs))

    tensors = []
    for m in maps:
      dtype, shape, nbytes = info[m.name]
      file = where[m.name]
      want = m.hf_shape(slice_shapes[m.name])
      if shape != want:
        raise CheckpointError(f"{os.path.join(folder, file)}: tensor {m.name!r} has shape "
                              f"{list(shape)}, config.json implies {list(want)}")
      scale = scales.get(m.name)
      if dtype in FP8_DTYPES and m.name in kept:
        pass  # copied as stored; its scale is a tensor of `maps`, checked like any other
      elif dtype in FP8_DTYPES:
        if scale is None:
          raise CheckpointError(
              f"{os.path.join(folder, file)}: tensor {m.name!r} is {dtype.name} but has no "
              f"{scale_suffix or 'weight_scale / weight_scale_inv'} tensor"
              + ("" if scheme else " and config.json has no quantization_config"))
        sdtype, sshape, _ = info[scale]
        try:
          scheme.check_scale(shape, sshape, sdtype, f"{os.path.join(folder, where[scale])}: "
                             f"tensor {scale!r}")
        except ValueError as e:
          raise CheckpointError(str(e)) from None
      elif dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{os.path.join(folder, file)}: tensor {m.name!r} has dtype "
                              f"{dtype.name}; expected one of float32, float16, bfloat16"
                              + (", float8_e4m3fn" if scheme else ""))
      elif scale is not None:
        raise CheckpointError(f"{os.path.join(folder, where[scale])}: tensor {scale!r} scales "
                              f"{m.name!r}, which is {dtype.name}, not float8")
      tensors.append(SourceTensor(m, file, dtype, shape, nbytes, scale,
                                  where[scale] if scale else None))
    if scheme is not None and not any(t.scale or t.dtype in FP8_DTYPES for t in tensors):
      raise CheckpointError(f"{folder}/config.json has a quantization_config "
                            f"({scheme.description}) but no tensor is float8")
    # Shard by shard, in offset order: sequential reads of each file.
    tensors.sort(key=lambda t: order[t.map.name])
    return cls(folder, hf, cfg, scheme, tensors, dropped)

  # -------------------------------------------------------------------------- reading
  def _file(self, fname: str) -> SafetensorsFile:
    if fname not in self._files:
      if len(self._files) >= 4:  # shards are read in order; keep a few mappings open
        self._files.pop(next(iter(self._files))).close()
      self._files[fname] = SafetensorsFile(os.path.join(self.folder, fname))
    return self._files[fname]

  def close(self) -> None:
    for st in self._files.values():
      st.close()
    self._files.clear()

  def raw(self, t: SourceTensor) -> np.ndarray:
    """The tensor as stored (a read-only view of the mapped file)."""
    return self._file(t.file).get(t.map.name)

  def block_axis(self, t: SourceTensor) -> int:
    """Model-slice axis along which blocks are cut: the first output axis (HF rows)."""
    return t.map.n_in

  def blocks(self, t: SourceTensor, slice_shape: tuple[int, ...], dtype: np.dtype, rows: int
             ) -> Iterator[Block]:
    """The tensor in the model layout as `Block`s along the block axis, `rows` indices at a time."""
    m, a = t.map, self.block_axis(t)
    hf = self.raw(t)
    size = slice_shape[a]
    inner = math.prod(slice_shape[a + 1:])  # HF rows (or flat elements) per block-axis index
    scale = self._file(t.scale_file).get(t.scale) if t.scale else None
    scheme = self.scheme
    for o0 in range(0, size, rows):
      o1 = min(size, o0 + rows)
      shape = slice_shape[:a] + (o1 - o0,) + slice_shape[a + 1:]
      if m.n_in == 0:
        view = hf.reshape(-1)[o0 * inner:o1 * inner]
        def compute(read=None, view=view, shape=shape):
          return _cast(read_view(view, read), dtype).reshape(shape)
        yield Block(o0, view, (read_buffer_bytes(view.nbytes),), compute)
      else:
        view = hf[o0 * inner:o1 * inner]  # [rows, in]
        out_shape = view.shape[::-1]
        def compute(read=None, out=None, view=view, shape=shape, out_shape=out_shape,
                    row0=o0 * inner):
          x = read_view(view, read)
          x = dequantize_rows(scheme, x, scale, row0) if scale is not None else x
          return transpose2d(_cast(x, dtype), buffer_view(out, out_shape, dtype)).reshape(shape)
        yield Block(o0, view, (read_buffer_bytes(view.nbytes),
                               math.prod(out_shape) * dtype.itemsize), compute)


def check_counts(cfg: LingConfig, names, folder: str) -> None:
  """Refuse a config.json that asks for more layers or experts than the folder's tensors name,
  before anything is built from it: the model and the name map enumerate layers and experts, so
  a corrupt `num_hidden_layers: 10**12` would otherwise run for ever instead of failing."""
  layers, experts = set(), set()
  for name in names:
    parts = name.split(".")
    if name.startswith("model.layers.") and parts[2].isdigit():
      layers.add(int(parts[2]))
      if parts[3:5] == ["mlp", "experts"] and len(parts) > 5 and parts[5].isdigit():
        experts.add(int(parts[5]))
  path = os.path.join(folder, "config.json")
  want = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
  if want > len(layers):
    raise CheckpointError(
        f"{path}: num_hidden_layers={cfg.num_hidden_layers} and num_nextn_predict_layers="
        f"{cfg.num_nextn_predict_layers} ask for {want} layers, but the safetensors files hold "
        f"tensors of {len(layers)}")
  moe = cfg.num_nextn_predict_layers > 0 or cfg.first_k_dense_replace < cfg.num_hidden_layers
  if moe and cfg.num_experts > len(experts):
    raise CheckpointError(f"{path}: num_experts={cfg.num_experts}, but the safetensors files hold "
                          f"tensors of {len(experts)} experts")


@dataclasses.dataclass(frozen=True)
class Block:
  """One block of a source tensor: its bytes in the mapped file, and how to get the model layout.

  `compute(*buffers)` reads `view` (`read_view`) and returns the block in the model layout, never
  a view of the file, so it can run on a worker thread. It allocates what it needs, or uses the
  given flat uint8 buffers of `buffer_bytes` (the read, then the transpose) so that a pipeline can
  recycle them; the result may then be a view of the last one.
  """

  start: int                        # first index along the block axis
  view: np.ndarray                  # [rows, in] (a Linear) or flat, in the mapped file
  buffer_bytes: tuple[int, ...]
  compute: Callable[..., np.ndarray]


def buffer_view(buf: np.ndarray | None, shape: tuple, dtype: np.dtype) -> np.ndarray | None:
  """The first bytes of a flat uint8 buffer as a C-contiguous array of `shape` and `dtype`."""
  if buf is None:
    return None
  return buf[:math.prod(shape) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
  return x if x.dtype == dtype else x.astype(dtype)



_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose2d(x: np.ndarray, out: np.ndarray | None = None, tile: int = 128) -> np.ndarray:
  """x.T as a C-contiguous array (into `out` if given), bit-exact, ~4x faster than numpy's own.

  numpy copies a transposed view element by element with the source stride of a whole row; rows
  of a few KiB are a power of two apart, so every element is a cache-set conflict and a TLB miss
  (0.6 GB/s here). Instead each `tile` x `tile` block is first copied into a small contiguous
  buffer (whole row segments: a memcpy) and transposed from there, where the source stride is one
  tile row (2-2.5 GB/s for 1-, 2- and 4-byte elements). The copies work on the raw bits (an
  unsigned view of the same width), so bfloat16 / float8 take numpy's integer loops. (XLA's CPU
  transpose and tensorstore's transposed writes were both slower on this 2-core machine.)
  """
  R, C = x.shape
  u = _UINT[x.dtype.itemsize]
  # A plain-ndarray view: slicing an np.memmap 10^5 times costs more than the copy itself.
  src = x.view(dtype=u, type=np.ndarray)
  if out is None:
    out = np.empty((C, R), x.dtype)
  if out.shape != (C, R) or out.dtype.itemsize != x.dtype.itemsize or not out.flags.c_contiguous:
    raise ValueError(f"transpose2d: out is {out.dtype}{list(out.shape)}, expected a C-contiguous "
                     f"{x.dtype}{[C, R]}")
  dst = out.view(dtype=u, type=np.ndarray)
  buf = np.empty((tile, tile), u)
  for i in range(0, R, tile):
    for j in range(0, C, tile):
      block = src[i:i + tile, j:j + tile]
      if block.shape == buf.shape:
        buf[...] = block
        block = buf
      dst[j:j + tile, i:i + tile] = block.T
  return out


# ---------------------------------------------------------------------------- reading
DIRECT_IO = hasattr(os, "O_DIRECT")  # read_view's default


def read_buffer_bytes(nbytes: int) -> int:
  """Size of a buffer `read_view` can read a view of `nbytes` into, direct I/O included."""
  return nbytes + 3 * ALIGN


def read_view(view: np.ndarray, out: np.ndarray | None = None, direct: bool | None = None
              ) -> np.ndarray:
  """A private copy of a view into a memory-mapped file, read with pread instead of page faults
  (into the flat uint8 buffer `out`, of `read_buffer_bytes`, if given).

  The mapping gives names, shapes and byte ranges for free; copying the bytes out with one pread
  per block is ~2x faster than faulting the pages in (page faults are dear in a VM), can run on
  several threads at once, and leaves nothing mapped, so resident memory is only the blocks in
  flight however large the shard. Anything that is not a contiguous file view is simply copied.

  `direct` (default `DIRECT_IO`) reads with O_DIRECT where the filesystem allows it: the disk
  writes straight into `out`, with no page-cache copy. Measured here on a cold 8.9 GB source:
  0.8 s of system CPU instead of 5.5-16 s for buffered preads (each fresh page-cache page costs a
  first touch in this VM), at the same or better speed; and a 200 GiB source does not push
  everything else out of the page cache. A file with dirty cached pages is flushed by the kernel
  first, so the bytes are the same either way.
  """
  root = view
  while isinstance(root.base, np.ndarray):
    root = root.base
  if not (isinstance(root.base, mmap.mmap) and isinstance(root, np.memmap)
          and view.flags.c_contiguous and hasattr(os, "preadv")):
    if out is None:
      return np.array(view)
    out = buffer_view(out, view.shape, view.dtype)
    out[...] = view
    return out
  offset = view.ctypes.data - root.ctypes.data + root.offset
  if DIRECT_IO if direct is None else direct:
    got = _read_direct(root.filename, offset, view.nbytes, out)
    if got is not None:
      return got.view(view.dtype).reshape(view.shape)
  out = (np.empty(view.shape, view.dtype) if out is None
         else buffer_view(out, view.shape, view.dtype))
  fd = os.open(root.filename, os.O_RDONLY)
  try:
    _pread_all(fd, memoryview(out.reshape(-1).view(np.uint8)), offset, root.filename)
  finally:
    os.close(fd)
  return out


def _read_direct(path: str, offset: int, nbytes: int, out: np.ndarray | None
                 ) -> np.ndarray | None:
  """`nbytes` at `offset` of `path` read with O_DIRECT (the aligned pages around them, into an
  aligned part of `out`), as flat uint8; None where the filesystem refuses O_DIRECT."""
  a0 = offset - offset % ALIGN
  a1 = -(-(offset + nbytes) // ALIGN) * ALIGN
  if out is None or out.nbytes < a1 - a0 + ALIGN:
    out = np.empty(a1 - a0 + ALIGN, np.uint8)
  p = -out.ctypes.data % ALIGN
  pages = out[p:p + a1 - a0]
  try:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
  except OSError as e:
    if e.errno == errno.EINVAL:
      return None
    raise
  try:
    _pread_all(fd, memoryview(pages)[:offset + nbytes - a0], a0, path, whole=memoryview(pages))
  except OSError as e:
    if e.errno == errno.EINVAL:  # e.g. a block size above ALIGN: buffered reads always work
      return None
    raise
  finally:
    os.close(fd)
  return pages[offset - a0:offset - a0 + nbytes]


def _pread_all(fd: int, buf: memoryview, offset: int, path: str, whole: memoryview | None = None
               ) -> None:
  """Fill `buf` from `offset` (reading into `whole`, a longer buffer starting at the same place,
  when given: O_DIRECT reads whole aligned pages; only the end of the file may cut them short)."""
  target = whole if whole is not None else buf
  done = 0
  while done < len(buf):
    n = os.preadv(fd, [target[done:]], offset + done)
    if n <= 0:
      raise OSError(f"{path}: unexpected end of file at byte {offset + done}")
    done += n


__all__ = ["Block", "HFSource", "SourceTensor", "buffer_view", "check_counts", "read_buffer_bytes",
           "read_config", "read_view", "transpose2d"]
