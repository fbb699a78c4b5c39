"""The HF checkpoint folder as a conversion source: validated up front, read block by block.

`HFSource.open(folder)` reads config.json and every safetensors header (spec 4.1: the headers are
the truth, the index must agree with them), pairs every checkpoint tensor with its place in the
model (`ling_jax.weights`), and checks names, shapes, dtypes and FP8 scales before anything is
written, so bad input fails in seconds with an error naming the file and the tensor.

`blocks()` then yields one tensor in the model's layout as a few row blocks of bounded size, read
from its byte range of the memory-mapped file (`read_view`: pread, so nothing stays mapped and
resident memory does not grow with the file), dequantised (spec 4.4) and transposed on the way.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from ling_jax.config import LingConfig
from ling_jax.hf_config import from_hf_config, read_config_json
from ling_jax.hf_io import CheckpointError, few_names, scan_folder
from ling_jax.io.safetensors import SafetensorsFile
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
    scheme = quant_scheme(hf.get("quantization_config"))
    cfg = from_hf_config({k: v for k, v in hf.items() if k != "quantization_config"})
  except (ValueError, TypeError) as e:
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
      if dtype in FP8_DTYPES:
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
    if scheme is not None and not any(t.scale for t in tensors):
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
             ) -> Iterator[tuple[int, np.ndarray, Callable[[], np.ndarray]]]:
    """Yield (start, file view, compute) along the block axis, `rows` indices of it at a time.

    `compute()` reads the view (`read_view`) and returns the block in the model layout as a fresh
    array, never a view of the file, so it can run on a worker thread.
    """
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
        def compute(view=view, shape=shape):
          return _cast(read_view(view), dtype).reshape(shape)
      else:
        view = hf[o0 * inner:o1 * inner]  # [rows, in]
        def compute(view=view, shape=shape, row0=o0 * inner):
          x = read_view(view)
          x = dequantize_rows(scheme, x, scale, row0) if scale is not None else x
          return transpose2d(_cast(x, dtype)).reshape(shape)
      yield o0, view, compute


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
  return x if x.dtype == dtype else x.astype(dtype)



_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose2d(x: np.ndarray, tile: int = 256) -> np.ndarray:
  """x.T as a new C-contiguous array, by tiles (numpy's own strided transpose is ~5x slower).

  Works on the raw bits (an unsigned view of the same width), so bfloat16 / float8 take numpy's
  fast integer copy loops and the result is bit-exact. (XLA's CPU transpose was no faster inside
  the pipeline on this 2-core machine.)
  """
  R, C = x.shape
  u = _UINT[x.dtype.itemsize]
  # A plain-ndarray view: slicing an np.memmap 10^5 times costs more than the copy itself.
  src = (x if x.flags.c_contiguous else np.ascontiguousarray(x)).view(dtype=u, type=np.ndarray)
  out = np.empty((C, R), u)
  for i in range(0, R, tile):
    for j in range(0, C, tile):
      out[j:j + tile, i:i + tile] = src[i:i + tile, j:j + tile].T
  return out.view(x.dtype)


# ---------------------------------------------------------------------------- reading
def read_view(view: np.ndarray) -> np.ndarray:
  """A private copy of a view into a memory-mapped file, read with pread instead of page faults.

  The mapping gives names, shapes and byte ranges for free; copying the bytes out with one pread
  per block is ~2x faster than faulting the pages in (page faults are dear in a VM), can run on
  several threads at once, and leaves nothing mapped, so resident memory is only the blocks in
  flight however large the shard. Anything that is not a contiguous file view is simply copied.
  """
  root = view
  while isinstance(root.base, np.ndarray):
    root = root.base
  if not (isinstance(root.base, mmap.mmap) and isinstance(root, np.memmap)
          and view.flags.c_contiguous and hasattr(os, "preadv")):
    return np.array(view)
  offset = view.ctypes.data - root.ctypes.data + root.offset
  out = np.empty(view.shape, view.dtype)
  buf = memoryview(out.reshape(-1).view(np.uint8))
  fd = os.open(root.filename, os.O_RDONLY)
  try:
    done = 0
    while done < len(buf):
      n = os.preadv(fd, [buf[done:]], offset + done)
      if n <= 0:
        raise OSError(f"{root.filename}: unexpected end of file at byte {offset + done}")
      done += n
  finally:
    os.close(fd)
  return out


__all__ = ["HFSource", "SourceTensor", "read_config", "read_view", "transpose2d"]
