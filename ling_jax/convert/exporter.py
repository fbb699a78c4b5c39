"""Orbax checkpoint -> HF safetensors folder in the release layout (docs/architecture.md §4.1),
streamed.

Each HF tensor is written block by block: a tensorstore read of a few chunks of its slice of the
stored variable, a cast to the dtype the source checkpoint had, a transpose back to PyTorch's
[out, in] rows, and a pwrite of those rows at their place in the safetensors file
(`SafetensorsWriter`). Blocks run on worker threads with at most `inflight_bytes` in flight
(`pipeline.Pipeline`), so host memory is a few blocks, not a tensor (the 1.2 GiB embedding).
Main-model tensors fill `model-0000k-of-0000N.safetensors` in checkpoint order up to
`max_shard_bytes`; the MTP layer goes to `model-mtp-layer.safetensors`; the index lists both.
The folder is built in `HF_DIR.partial`, each file checked complete, then renamed into place with
a `ling_jax.json` that lists what it holds (`ling_jax.io.destination`: what --overwrite may delete).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import tensorstore as ts
from flax import nnx

from ling_jax.hf_config import from_hf_config, to_hf_config
from ling_jax.hf_io import HF_FORMAT, INDEX, MTP_FILE, abstract_model
from ling_jax.io.destination import Destination
from ling_jax.io.safetensors import ALIGN, DTYPES
from ling_jax.io.safetensors_writer import SafetensorsWriter, phased
from ling_jax.weights import TensorMap, main_maps, mtp_maps
from ling_jax.convert import store
from ling_jax.convert.importer import MiB, block_rows
from ling_jax.convert.pagecache import PageCacheRecycler
from ling_jax.convert.pipeline import Pipeline
from ling_jax.convert.progress import Progress, Summary
from ling_jax.convert.source import buffer_view, transpose2d
from ling_jax.train.checkpoint import find_run_checkpoint

_TORCH_DTYPE = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}


def export_hf(ckpt_dir: str | os.PathLike, hf_dir: str | os.PathLike, *, dtype=None,
              max_shard_bytes: int = 5 * 2**30, overwrite: bool = False, progress: bool = True,
              block_bytes: int = 32 * MiB, inflight_bytes: int = 128 * MiB,
              workers: int | None = None, durable: bool = True) -> Summary:
  """Write `ckpt_dir` as an HF folder. Tensors get the dtype they had in the imported folder
  (bit-exact round trip), or `dtype` if given (the MoE expert bias stays fp32 either way).
  `ckpt_dir` may also be a training run's checkpoint (its out_dir, `checkpoints/` or one step:
  `train.checkpoint.find_run_checkpoint`), whose fp32 parameters are written as fp32 unless
  `dtype` is given; its model config comes from the run's meta item.
  Blocks of at most `block_bytes` are read, transposed and written on `workers` threads (default:
  two per core, as writes that bypass the page cache wait for the disk), at most `inflight_bytes`
  of them at once; `durable` fsyncs the folder before the rename that publishes it."""
  ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
  dest = Destination(hf_dir, overwrite=overwrite, sources=[ckpt_dir])
  converted = os.path.exists(os.path.join(ckpt_dir, store.MARKER))
  run = None if converted else find_run_checkpoint(ckpt_dir)
  if run is None:
    marker = store.read_marker(ckpt_dir)
    if marker.get("expert_weights", {}).get("format", "dense") != "dense":
      raise store.CheckpointFormatError(
          f"{ckpt_dir} keeps its experts in FP8 (convert import --keep-fp8), which export does "
          "not write; import the HF folder again without --keep-fp8 to export it")
    cfg, name = from_hf_config(marker["config"]), store.param_name
    state_dir = os.path.join(ckpt_dir, store.STATE)
  else:  # a training run's checkpoint: fp32 master weights in its train state
    cfg, state_dir, name = run.config, run.state_dir, run.array_name
    marker = {"dtype": "float32", "hf_dtypes": {"default": "F32", "other": {}}}
  reader = store.StateReader(state_dir, name)
  _, abstract, _ = abstract_model(cfg, np.dtype(marker["dtype"]))
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

  with dest:
    return _write(reader, dest, cfg, files, expected, sizes, out_dtype, codes, dtype,
                  state_dir, block_bytes=block_bytes,
                  inflight_bytes=inflight_bytes, workers=workers, progress=progress,
                  durable=durable)


def _write(reader, dest: Destination, cfg, files, expected, sizes, out_dtype, codes, dtype,
           state_dir, *, block_bytes, inflight_bytes, workers, progress, durable) -> Summary:
  partial = dest.partial
  bar = Progress(f"export {os.path.basename(dest.path)}", sum(sizes.values()), len(sizes),
                 progress)
  workers = workers or 2 * (os.cpu_count() or 1)
  pipe = Pipeline(workers, inflight_bytes, bar)
  writers = []
  recycler = PageCacheRecycler(state_dir)  # each chunk is read once
  try:
    weight_map = {}
    streams = []
    for fname, maps in files:
      specs = {m.name: (m.hf_shape(expected[m.path][len(m.index):]), out_dtype(m)) for m in maps}
      # Not fsynced file by file: the commit syncs the whole folder before publishing it.
      w = SafetensorsWriter(os.path.join(partial, fname), specs, metadata={"format": "pt"},
                            durable=False)
      writers.append(w)
      streams.append(_file_jobs(reader, w, {m.name: m for m in maps}, expected, out_dtype,
                                block_bytes))
      weight_map.update({m.name: fname for m in maps})
    # A few files at a time: writes to one file take its inode lock, so parallel writes must go
    # to different files.
    for job, nbytes, buffer_bytes, where in _interleave(streams, workers):
      if job is None:
        pipe.tensor_done(where)
      else:
        pipe.submit(job, nbytes, buffer_bytes, where)
    pipe.drain()
    for w in writers:
      w.close()  # checks that every byte of every tensor was written
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
    dest.commit({"format": HF_FORMAT}, durable=durable)
    sync = time.perf_counter() - sync
  except BaseException:
    bar.close()
    pipe.abort()  # no job may still write to a file
    for w in writers:
      w.abort()
    raise
  finally:
    recycler.close()
  pipe.close()
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


def _file_jobs(reader, w: SafetensorsWriter, maps: dict, expected: dict, out_dtype, block_bytes):
  """(job, bytes, buffer sizes, where) for each block of the file `w`, in file order, and
  (None, 0, (), where) at the end of each tensor."""
  for name in w.entries:
    m = maps[name]
    where = f"{w.path}: tensor {name!r}"
    for job, nbytes, buffer_bytes in _hf_blocks(
        reader, m, expected[m.path][len(m.index):], out_dtype(m), block_bytes, w):
      yield job, nbytes, buffer_bytes, where
    yield None, 0, (), where


def _interleave(streams: list, k: int):
  """The items of `streams`, round-robin over at most `k` of them at a time, in list order."""
  active, rest = list(streams[:k]), list(streams[k:])
  while active:
    for s in list(active):
      item = next(s, None)
      if item is None:
        active.remove(s)
        if rest:
          active.append(rest.pop(0))
      else:
        yield item


def _hf_blocks(reader: store.StateReader, m: TensorMap, slice_shape: tuple, dtype: np.dtype,
              block_bytes: int, w: SafetensorsWriter):
  """(job, bytes, buffer sizes) for each row block of one HF tensor ([out, in] for a Linear):
  the job reads the block's region of the stored variable into a recycled buffer, casts and
  transposes it into a second one laid out in phase with its place in the file, and writes it."""
  axis = m.n_in
  arr = reader.array(m.path)
  stored = np.dtype(arr.dtype.numpy_dtype)
  chunk = arr.chunk_layout.read_chunk.shape[len(m.index) + axis]
  rows = block_rows(slice_shape, axis, chunk, max(4, dtype.itemsize), block_bytes)
  inner = int(np.prod(slice_shape[axis + 1:]))
  lead = int(np.prod(slice_shape[:axis]))
  def read_into(buf, region, shape, dtype):
    """The region as a view of `buf` (tensorstore reads straight into it), or a fresh array."""
    if buf is None:
      return arr[region].read().result()
    view = buffer_view(buf, shape, dtype)
    ts.array(view, copy=False, write=True).write(arr[region]).result()
    return view

  for o0 in range(0, slice_shape[axis], rows):
    o1 = min(slice_shape[axis], o0 + rows)
    region = m.index + (slice(None),) * axis + (slice(o0, o1),)
    shape = slice_shape[:axis] + (o1 - o0,) + slice_shape[axis + 1:]
    n = lead * (o1 - o0) * inner
    offset = o0 * inner * lead * dtype.itemsize
    piece_bytes = n * dtype.itemsize

    def piece(out, offset=offset, piece_bytes=piece_bytes):
      return (np.empty(piece_bytes, np.uint8) if out is None
              else phased(out, w.position(m.name, offset), piece_bytes))

    if m.n_in == 0 and stored == dtype:  # no transpose, no cast: read into the piece itself
      def job(out=None, region=region, shape=shape, offset=offset):
        p = piece(out)
        read_into(p, region, shape, dtype)
        w.write(m.name, offset, p)
      yield job, piece_bytes, (piece_bytes + ALIGN,)
      continue

    def job(read=None, out=None, region=region, shape=shape, offset=offset, hf_rows=n // lead):
      block = read_into(read, region, shape, stored)
      block = block if block.dtype == dtype else block.astype(dtype)
      p = piece(out)
      if m.n_in:  # [in..., rows, out...] -> HF rows [rows * out..., in]
        transpose2d(block.reshape(lead, -1), buffer_view(p, (hf_rows, lead), dtype))
      else:
        buffer_view(p, shape, dtype)[...] = block
      w.write(m.name, offset, p)
    yield job, piece_bytes, (n * stored.itemsize, piece_bytes + ALIGN)
