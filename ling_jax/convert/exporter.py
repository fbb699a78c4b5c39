"""Orbax checkpoint -> HF safetensors folder in the release layout (spec 4.1), streamed.

Each HF tensor is assembled from its slice of the stored variable, block by block (a tensorstore
read of a few chunks, a transpose back to PyTorch's [out, in], a cast to the dtype the source
checkpoint had), and handed to the safetensors writer, which materialises one tensor at a time.
Main-model tensors fill `model-0000k-of-0000N.safetensors` in checkpoint order up to
`max_shard_bytes`; the MTP layer goes to `model-mtp-layer.safetensors`; the index lists both.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from flax import nnx

from ling_jax.hf_config import from_hf_config, to_hf_config
from ling_jax.hf_io import INDEX, MTP_FILE, abstract_model
from ling_jax.io.safetensors import DTYPES, write_safetensors
from ling_jax.weights import TensorMap, main_maps, mtp_maps
from ling_jax.convert import store
from ling_jax.convert.importer import MiB, block_rows
from ling_jax.convert.progress import Progress, Summary
from ling_jax.convert.source import transpose2d

_TORCH_DTYPE = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}


class _LazyTensor:
  """Shape and dtype now, the data when the safetensors writer asks for it (`np.asarray`)."""

  def __init__(self, shape, dtype, fill):
    self.shape, self.dtype, self._fill = tuple(shape), np.dtype(dtype), fill

  def __array__(self, dtype=None, copy=None):
    out = self._fill()
    return out if dtype is None else out.astype(dtype)


def export_hf(ckpt_dir: str | os.PathLike, hf_dir: str | os.PathLike, *, dtype=None,
              max_shard_bytes: int = 5 * 2**30, overwrite: bool = False, progress: bool = True,
              block_bytes: int = 64 * MiB, durable: bool = True) -> Summary:
  """Write `ckpt_dir` as an HF folder. Tensors get the dtype they had in the imported folder
  (bit-exact round trip), or `dtype` if given (the MoE expert bias stays fp32 either way)."""
  ckpt_dir, hf_dir = os.path.abspath(os.fspath(ckpt_dir)), os.path.abspath(os.fspath(hf_dir))
  marker = store.read_marker(ckpt_dir)
  cfg = from_hf_config(marker["config"])
  reader = store.StateReader(os.path.join(ckpt_dir, store.STATE))
  _, abstract = abstract_model(cfg, np.dtype(marker["dtype"]))
  expected = {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(abstract)}
  for path, shape in expected.items():
    got = tuple(reader.array(path).shape)
    if got != shape:
      raise store.CheckpointFormatError(f"{ckpt_dir}: array {store.param_name(path)!r} has shape "
                                        f"{list(got)}, its config implies {list(shape)}")

  codes = marker["hf_dtypes"]
  def out_dtype(m: TensorMap) -> np.dtype:
    if dtype is not None and not m.name.endswith("expert_bias"):
      return np.dtype(dtype)
    return DTYPES[codes["other"].get(m.name, codes["default"])]

  main, mtp = list(main_maps(cfg)), list(mtp_maps(cfg))
  sizes = {m.name: int(np.prod(expected[m.path][len(m.index):])) * out_dtype(m).itemsize
           for m in main + mtp}
  shards = _plan(main, sizes, max_shard_bytes)
  files = [(f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors", s) for k, s in enumerate(shards)]
  if mtp:
    files.append((MTP_FILE, mtp))

  partial = store.start_partial(hf_dir, overwrite)
  bar = Progress(f"export {os.path.basename(hf_dir)}", sum(sizes.values()), len(sizes), progress)
  try:
    weight_map = {}
    for fname, maps in files:
      tensors = {}
      for m in maps:
        shape = expected[m.path][len(m.index):]
        tensors[m.name] = _LazyTensor(
            m.hf_shape(shape), out_dtype(m),
            lambda m=m, shape=shape: _hf_tensor(reader, m, shape, out_dtype(m), block_bytes, bar))
        weight_map[m.name] = fname
      write_safetensors(os.path.join(partial, fname), tensors, metadata={"format": "pt"})
    with open(os.path.join(partial, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    hf = to_hf_config(cfg)
    hf["torch_dtype"] = _TORCH_DTYPE.get(codes["default"] if dtype is None
                                         else _code(np.dtype(dtype)), "bfloat16")
    with open(os.path.join(partial, "config.json"), "w") as f:
      json.dump(hf, f, indent=2, sort_keys=True)
      f.write("\n")
    bar.close()
    sync = time.perf_counter()
    store.commit_partial(partial, hf_dir, durable=durable)
    sync = time.perf_counter() - sync
  except BaseException:
    bar.close()
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return bar.summary("export", sync)


def _code(dtype: np.dtype) -> str:
  return next(c for c, d in DTYPES.items() if d == dtype)


def _plan(maps: list[TensorMap], sizes: dict, max_bytes: int) -> list[list[TensorMap]]:
  shards, cur, size = [], [], 0
  for m in maps:
    if cur and size + sizes[m.name] > max_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(m)
    size += sizes[m.name]
  return shards + [cur] if cur else shards


def _hf_tensor(reader: store.StateReader, m: TensorMap, slice_shape: tuple, dtype: np.dtype,
               block_bytes: int, bar: Progress) -> np.ndarray:
  """One HF tensor ([out, in] for a Linear), assembled from row blocks of its model slice."""
  out = np.empty(m.hf_shape(slice_shape), dtype)
  axis = m.n_in
  arr = reader.array(m.path)
  chunk = arr.chunk_layout.read_chunk.shape[len(m.index) + axis]
  rows = block_rows(slice_shape, axis, chunk, max(4, dtype.itemsize), block_bytes)
  inner = int(np.prod(slice_shape[axis + 1:]))
  lead = int(np.prod(slice_shape[:axis]))
  for o0 in range(0, slice_shape[axis], rows):
    o1 = min(slice_shape[axis], o0 + rows)
    region = m.index + (slice(None),) * axis + (slice(o0, o1),)
    block = reader.read(m.path, region)
    block = block if block.dtype == dtype else block.astype(dtype)
    if m.n_in == 0:
      out.reshape(-1)[o0 * inner:o1 * inner] = block.reshape(-1)
    else:
      out[o0 * inner:o1 * inner] = transpose2d(block.reshape(lead, -1))
    bar.update(block.nbytes)
  bar.update(0, tensors=1)
  return out

