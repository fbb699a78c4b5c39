"""HF safetensors folder -> Orbax checkpoint of the NNX state, streamed (docs/architecture.md §4).

Host memory is bounded by the bytes in flight, not by the model: each checkpoint tensor is read
from its memory-mapped shard in row blocks of at most `block_bytes`, dequantised / cast /
transposed into the model layout, and written straight into its slice of the stacked variable
(`experts[e]`, `groups.layers[j][g]`) through tensorstore, with at most `inflight_bytes` queued
(`pipeline.Pipeline`, whose recycled buffers the blocks are read and transposed into). The written
checkpoint is dropped from the page cache as it reaches the disk (`pagecache`): nothing reads it
back, and on a VM fresh page-cache pages cost more than the copy into them.
Nothing is written before the whole folder has been validated (`HFSource.open`); the checkpoint is
built in `CKPT_DIR.partial`, checked chunk by chunk, and only then renamed into place, under a
lock, replacing only what ling_jax wrote (`ling_jax.io.destination`).
"""

from __future__ import annotations

import collections
import os
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ling_jax.config import LingConfig
from ling_jax.hf_config import to_hf_config
from ling_jax.hf_io import (CheckpointError, abstract_model, check_coverage, param_dtype_for,
                            scan_folder)
from ling_jax.io.destination import Destination
from ling_jax.io.safetensors import dtype_code
from ling_jax.weights import TensorMap, all_maps
from ling_jax.convert import store
from ling_jax.convert.pagecache import PageCacheRecycler
from ling_jax.convert.pipeline import ConversionError, Pipeline  # noqa: F401 (re-exported)
from ling_jax.convert.progress import Progress, Summary
from ling_jax.convert.source import HFSource, SourceTensor, check_counts, read_config

MiB = 2**20


def state_layout(cfg: LingConfig, dtype) -> tuple[list[TensorMap], dict]:
  """(name map, {state path: (shape, stored dtype, leading index axes)}) of a model in `dtype`."""
  _, abstract, _ = abstract_model(cfg, dtype)
  shapes = {path: tuple(var.get_value().shape) for path, var in nnx.to_flat_state(abstract)}
  maps = all_maps(cfg)
  check_coverage(maps, shapes)
  lead = {m.path: len(m.index) for m in maps}
  return maps, {p: (s, param_dtype_for(p, dtype), lead[p]) for p, s in shapes.items()}


def block_rows(slice_shape: tuple, axis: int, chunk: int, itemsize: int, block_bytes: int) -> int:
  """Indices of `axis` per block: a multiple of the chunk extent (whole-chunk writes), <= budget."""
  per_index = int(np.prod(slice_shape)) // max(1, slice_shape[axis]) * itemsize
  return max(chunk, block_bytes // max(1, per_index) // chunk * chunk)


def import_hf(hf_dir: str | os.PathLike, ckpt_dir: str | os.PathLike, dtype=None, *,
              overwrite: bool = False, progress: bool = True, block_bytes: int = 32 * MiB,
              chunk_bytes: int = 16 * MiB, inflight_bytes: int = 128 * MiB,
              workers: int | None = None,
              verify_data: bool = False, durable: bool = True) -> Summary:
  """Convert the HF folder `hf_dir` into the checkpoint `ckpt_dir` with parameters in `dtype`.

  `dtype=None` keeps the source's (`source_dtype`): an FP8 source dequantises to bfloat16; else the
  dtype of most of the tensors' bytes (config.json's `torch_dtype` names it when it agrees). The
  router weight and expert bias stay fp32 (docs/architecture.md §4.3); FP8 weights are dequantised
  (docs/architecture.md §4.4). Blocks of at most `block_bytes` are read and transposed on `workers`
  threads (default: one per core, at most 8), at most `inflight_bytes` of them queued; checkpoint
  chunks are at most `chunk_bytes`. `verify_data` reads every written block back and compares it
  before committing; `durable` fsyncs the checkpoint before the rename that publishes it.
  `overwrite` replaces an existing checkpoint, only if ling_jax wrote it or it is empty
  (`ling_jax.io.destination`).
  """
  hf_dir = os.path.abspath(os.fspath(hf_dir))
  dest = Destination(ckpt_dir, overwrite=overwrite, sources=[hf_dir])
  hf, cfg, scheme = read_config(hf_dir)
  check_counts(cfg, scan_folder(hf_dir), hf_dir)
  maps, variables = state_layout(cfg, np.float32 if dtype is None else dtype)
  slice_shapes = {m.name: variables[m.path][0][len(m.index):] for m in maps}
  src = HFSource.open(hf_dir, maps, slice_shapes)
  try:
    if dtype is None:
      dtype, dtype_from = source_dtype(hf, src)
    else:
      dtype, dtype_from = np.dtype(dtype), "asked for"
    variables = {p: (s, param_dtype_for(p, dtype), n) for p, (s, _, n) in variables.items()}
    with dest:
      summary = _convert(src, dest, variables, cfg, dtype, scheme, progress=progress,
                         block_bytes=block_bytes, chunk_bytes=chunk_bytes,
                         inflight_bytes=inflight_bytes, workers=workers,
                         verify_data=verify_data, durable=durable)
  finally:
    src.close()
  summary.dtype, summary.dtype_from = dtype.name, dtype_from
  return summary


def source_dtype(hf: dict, src: HFSource) -> tuple[np.dtype, str]:
  """(parameter dtype, why) of an import that asks for none: the source's own.

  The tensors are the truth: a `torch_dtype` in config.json that disagrees with them (an fp32
  folder whose config says bfloat16) would otherwise round every weight, silently. It names the
  dtype when it agrees, and is reported beside the tensors' dtype when it does not."""
  if any(t.scale for t in src.tensors):
    return np.dtype(jnp.bfloat16), "FP8 source, dequantised to bfloat16"
  nbytes = collections.Counter()
  for t in src.tensors:
    nbytes[t.dtype] += t.nbytes
  tensors = nbytes.most_common(1)[0][0]
  for key in ("torch_dtype", "dtype"):
    name = hf.get(key)
    if name is None:
      continue
    if not (isinstance(name, str) and name in _FLOATS):
      raise CheckpointError(f"{os.path.join(src.folder, 'config.json')}: {key} {name!r} is not "
                            f"one of {', '.join(_FLOATS)}; pass the dtype to import in")
    if np.dtype(_FLOATS[name]) == tensors:
      return tensors, f"config.json {key}"
    return tensors, f"the source tensors' dtype; config.json {key} says {name}"
  return tensors, "the source tensors' dtype"


_FLOATS = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


def _convert(src: HFSource, dest: Destination, variables: dict, cfg: LingConfig, dtype, scheme,
             *, progress, block_bytes, chunk_bytes, inflight_bytes, workers, verify_data,
             durable) -> Summary:
  partial = dest.partial
  bar = Progress(f"import {os.path.basename(src.folder)}", src.nbytes, len(src.tensors), progress)
  pipe = None
  recycler = PageCacheRecycler(partial)  # the checkpoint is not read back: keep it uncached
  try:
    writer = store.StateWriter(os.path.join(partial, store.STATE), variables,
                               chunk_bytes=chunk_bytes)
    if workers is None:
      workers = min(8, os.cpu_count() or 2)
    pipe = Pipeline(workers, inflight_bytes, bar)
    for t in src.tensors:
      where = f"{os.path.join(src.folder, t.file)}: tensor {t.map.name!r}"
      for region, block in _model_blocks(src, t, variables, writer.chunks, block_bytes):
        def job(*buffers, path=t.map.path, region=region, block=block):
          return writer.write(path, region, block.compute(*buffers))  # done when committed
        pipe.submit(job, block.view.nbytes, block.buffer_bytes, where)
      pipe.tensor_done(where)
    pipe.close()
    writer.finish()
    if verify_data:
      _verify_data(src, variables, writer.chunks, os.path.join(partial, store.STATE), block_bytes)
    bar.close()
    sync = time.perf_counter()
    dest.commit({
        "format": store.FORMAT, "config": to_hf_config(cfg), "dtype": dtype.name,
        "hf_dtypes": _hf_dtypes(src, dtype),
        "source": {"folder": src.folder,
                   "quantization": scheme.description if scheme else None,
                   "dropped": src.dropped}}, durable=durable)
    sync = time.perf_counter() - sync
  except BaseException:
    bar.close()
    if pipe is not None:
      pipe.abort()  # no job may still write into the folder that is about to be removed
    raise
  finally:
    recycler.close()
  return bar.summary("import", sync)


def _model_blocks(src: HFSource, t: SourceTensor, variables, chunks, block_bytes):
  """(region of the variable, `Block`) for each block of one tensor."""
  m = t.map
  shape, vdtype, lead = variables[m.path]
  slice_shape = shape[lead:]
  axis = src.block_axis(t)
  itemsize = max(vdtype.itemsize, 4 if t.scale else t.dtype.itemsize)
  rows = block_rows(slice_shape, axis, chunks[m.path][lead + axis], itemsize, block_bytes)
  for block in src.blocks(t, slice_shape, vdtype, rows):
    o0 = block.start
    region = m.index + (slice(None),) * axis + (slice(o0, min(o0 + rows, slice_shape[axis])),)
    yield region, block


def _verify_data(src, variables, chunks, state_dir, block_bytes) -> None:
  reader = store.StateReader(state_dir)
  for t in src.tensors:
    for region, block in _model_blocks(src, t, variables, chunks, block_bytes):
      if reader.read(t.map.path, region).tobytes() != block.compute().tobytes():
        raise CheckpointError(f"{os.path.join(src.folder, t.file)}: tensor {t.map.name!r}: "
                              f"the checkpoint reads back different bytes at {region}")


def _hf_dtypes(src: HFSource, dtype: np.dtype) -> dict:
  """The safetensors dtype of every source tensor, for a bit-exact export (dequantised -> dtype)."""
  codes = {t.map.name: dtype_code(dtype if t.scale else t.dtype) for t in src.tensors}
  default = max(set(codes.values()), key=list(codes.values()).count)
  return {"default": default, "other": {n: c for n, c in sorted(codes.items()) if c != default}}
