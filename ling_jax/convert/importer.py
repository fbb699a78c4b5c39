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
import dataclasses
import os
import shutil
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ling_jax.config import LingConfig
from ling_jax.hf_config import to_hf_config
from ling_jax.hf_io import (CheckpointError, abstract_model, check_coverage, few_names,
                            param_dtype_for, scan_folder)
from ling_jax.io.destination import Destination
from ling_jax.io.safetensors import SafetensorsFile, dtype_code
from ling_jax.model.settings import ExpertWeights
from ling_jax.weights import TensorMap, all_maps, fp8_scale_maps, is_dense_linear
from ling_jax.convert import store
from ling_jax.convert.pagecache import PageCacheRecycler
from ling_jax.convert.fp8 import FP8_DTYPES
from ling_jax.convert.pipeline import ConversionError, Pipeline  # noqa: F401 (re-exported)
from ling_jax.convert.progress import Progress, Summary
from ling_jax.convert.source import HFSource, SourceTensor, check_counts, read_config

MiB = 2**20
# The HF folder's tokenizer and chat template, copied into the checkpoint as they are, so that
# `python -m ling_jax.generate CKPT` finds them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def state_layout(cfg: LingConfig, dtype, expert_weights: ExpertWeights = ExpertWeights(),
                 scale_suffix: str | None = None) -> tuple[list[TensorMap], dict]:
  """(name map, {state path: (shape, stored dtype, leading index axes)}) of a model in `dtype`;
  with FP8 weights (the experts', and the dense Linears' with `linears`) their values and scales
  keep the dtypes the model gives them (float8_e4m3fn, fp32), the scales read from
  `<weight>.<scale_suffix>`."""
  _, abstract, _ = abstract_model(cfg, dtype, expert_weights=expert_weights)
  flat = dict(nnx.to_flat_state(abstract))
  shapes = {path: tuple(var.get_value().shape) for path, var in flat.items()}
  maps = all_maps(cfg)
  if expert_weights.fp8:
    maps += fp8_scale_maps(maps, scale_suffix, expert_weights.linears)
  check_coverage(maps, shapes)
  lead = {m.path: len(m.index) for m in maps}
  return maps, {p: (s, _stored_dtype(p, flat[p], dtype), lead[p]) for p, s in shapes.items()}


def _stored_dtype(path: tuple, var, dtype) -> np.dtype:
  """A variable's checkpoint dtype: the import's, but fp32 router / bias and FP8 weights and
  scales as built."""
  own = np.dtype(var.get_value().dtype)
  if own == np.dtype(jnp.float8_e4m3fn) or str(path[-1]).endswith("_scale"):
    return own
  return param_dtype_for(path, dtype)


def block_rows(slice_shape: tuple, axis: int, chunk: int, itemsize: int, block_bytes: int) -> int:
  """Indices of `axis` per block: a multiple of the chunk extent (whole-chunk writes), <= budget."""
  per_index = int(np.prod(slice_shape)) // max(1, slice_shape[axis]) * itemsize
  return max(chunk, block_bytes // max(1, per_index) // chunk * chunk)


def import_hf(hf_dir: str | os.PathLike, ckpt_dir: str | os.PathLike, dtype=None, *,
              overwrite: bool = False, progress: bool = True, block_bytes: int = 32 * MiB,
              chunk_bytes: int = 16 * MiB, inflight_bytes: int = 128 * MiB,
              workers: int | None = None, verify_data: bool = False, durable: bool = True,
              keep_fp8: bool = False, fp8_linears: bool = True) -> Summary:
  """Convert the HF folder `hf_dir` into the checkpoint `ckpt_dir` with parameters in `dtype`.

  `dtype=None` keeps the source's (`source_dtype`): an FP8 source dequantises to bfloat16; else the
  dtype of most of the tensors' bytes (config.json's `torch_dtype` names it when it agrees). The
  router weight and expert bias stay fp32 (docs/architecture.md §4.3); FP8 weights are dequantised
  (docs/architecture.md §4.4), except, with `keep_fp8`, those the source stores in FP8, which keep
  their e4m3 values and scales (`ExpertWeights`, recorded in the marker for `load`): the routed
  experts' (main layers and MTP), and with `fp8_linears` the dense Linears' (attention, dense and
  shared-expert MLPs, eh_proj) where the source stores them all in FP8 (`kept_linears`;
  `fp8_linears=False` dequantises them to `dtype`). The HF folder's tokenizer files
  (`TOKENIZER_FILES`) are copied along.
  Blocks of at most `block_bytes` are read and transposed on `workers` threads (default: one per
  core, at most 8), at most `inflight_bytes` of them queued; checkpoint chunks are at most
  `chunk_bytes`. `verify_data` reads every written block back and compares it before committing;
  `durable` fsyncs the checkpoint before the rename that publishes it. `overwrite` replaces an
  existing checkpoint, only if ling_jax wrote it or it is empty
  (`ling_jax.io.destination`).
  """
  hf_dir = os.path.abspath(os.fspath(hf_dir))
  dest = Destination(ckpt_dir, overwrite=overwrite, sources=[hf_dir])
  hf, cfg, scheme = read_config(hf_dir)
  where = scan_folder(hf_dir)
  check_counts(cfg, where, hf_dir)
  weights = kept_weights(scheme, hf_dir) if keep_fp8 else ExpertWeights()
  if weights.fp8 and fp8_linears:
    weights = kept_linears(weights, cfg, hf_dir, where)
  suffix = scheme.scale_suffix if scheme else None
  maps, variables = state_layout(cfg, np.float32 if dtype is None else dtype, weights, suffix)
  slice_shapes = {m.name: variables[m.path][0][len(m.index):] for m in maps}
  src = HFSource.open(hf_dir, maps, slice_shapes)
  try:
    if weights.fp8:
      _check_kept(src, variables)
    if dtype is None:
      dtype, dtype_from = source_dtype(hf, src)
    else:
      dtype, dtype_from = np.dtype(dtype), "asked for"
    _, abstract, _ = abstract_model(cfg, dtype, expert_weights=weights)
    flat = dict(nnx.to_flat_state(abstract))
    variables = {p: (s, _stored_dtype(p, flat[p], dtype), n) for p, (s, _, n) in variables.items()}
    with dest:
      summary = _convert(src, dest, variables, cfg, dtype, scheme, weights, progress=progress,
                         block_bytes=block_bytes, chunk_bytes=chunk_bytes,
                         inflight_bytes=inflight_bytes, workers=workers,
                         verify_data=verify_data, durable=durable)
  finally:
    src.close()
  summary.dtype, summary.dtype_from = dtype.name, dtype_from
  if weights.fp8:
    summary.fp8 = (f"{weights.format}: routed experts"
                   + (" and dense Linears" if weights.linears else "; dense Linears dequantised"))
  return summary


def kept_weights(scheme, hf_dir: str) -> ExpertWeights:
  """The `ExpertWeights` that keep an FP8 source's expert weights as they are stored."""
  if scheme is None:
    raise CheckpointError(f"{os.path.join(hf_dir, 'config.json')} has no quantization_config: "
                          "keeping FP8 experts needs an FP8 source")
  if scheme.kind == "block":  # the release's [out, in] block, in the model's [in, out] layout
    return ExpertWeights("fp8-block", (scheme.block[1], scheme.block[0]))
  return ExpertWeights("fp8-channel")


def kept_linears(experts: ExpertWeights, cfg: LingConfig, hf_dir: str, where: dict
                 ) -> ExpertWeights:
  """`experts` with the dense Linears kept in FP8 as well where the source stores every one of
  them in FP8 (flash-fp8's size says it quantises every Linear but the router and the head);
  as it is where it stores none in FP8 (nothing to keep). A source that quantised only some
  (e.g. all but the MTP layer's) is refused by name, as a model holds all of them in one form:
  keep the experts alone (`fp8_linears=False`, `--keep-fp8 experts`) to dequantise them."""
  names = [m.name for m in all_maps(cfg) if is_dense_linear(m) and m.name in where]
  fp8 = set()
  for fname in sorted({where[n] for n in names}):
    with SafetensorsFile(os.path.join(hf_dir, fname)) as st:
      fp8 |= {n for n in names if where[n] == fname and np.dtype(st.info(n)[0]) in FP8_DTYPES}
  if not fp8:
    return experts
  if len(fp8) < len(names):
    rest = [n for n in names if n not in fp8]
    raise CheckpointError(
        f"{hf_dir}: {len(fp8)} of the {len(names)} dense Linear weights are float8 (e.g. "
        f"{sorted(fp8)[0]!r}), {len(rest)} not ({few_names(rest, 3)}): keeping them in "
        "FP8 needs all of them float8; keep only the routed experts in FP8 (fp8_linears=False, "
        "--keep-fp8 experts) to dequantise the dense ones")
  return dataclasses.replace(experts, linears=True)


def _check_kept(src: HFSource, variables: dict) -> None:
  """Every weight kept in FP8 is float8_e4m3fn in the source (with its scale tensor, which
  `HFSource.open` checked); a per-tensor scale (one value) has no per-channel form to keep."""
  e4m3 = np.dtype(jnp.float8_e4m3fn)
  for t in src.tensors:
    if variables[t.map.path][1] == e4m3 and t.dtype != e4m3:
      raise CheckpointError(f"{os.path.join(src.folder, t.file)}: tensor {t.map.name!r} is "
                            f"{t.dtype.name}; keeping FP8 weights needs each of them in "
                            "float8_e4m3fn (import without keep_fp8 to dequantise)")


def source_dtype(hf: dict, src: HFSource) -> tuple[np.dtype, str]:
  """(parameter dtype, why) of an import that asks for none: the source's own.

  The tensors are the truth: a `torch_dtype` in config.json that disagrees with them (an fp32
  folder whose config says bfloat16) would otherwise round every weight, silently. It names the
  dtype when it agrees, and is reported beside the tensors' dtype when it does not."""
  if any(t.scale or t.dtype in FP8_DTYPES for t in src.tensors):  # (kept ones have no t.scale)
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
             experts: ExpertWeights, *, progress, block_bytes, chunk_bytes, inflight_bytes, workers,
             verify_data, durable) -> Summary:
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
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(src.folder, name)):
        shutil.copyfile(os.path.join(src.folder, name), os.path.join(partial, name))
    sync = time.perf_counter()
    marker = {
        "format": store.FORMAT, "config": to_hf_config(cfg), "dtype": dtype.name,
        "hf_dtypes": _hf_dtypes(src, dtype),
        "source": {"folder": src.folder,
                   "quantization": scheme.description if scheme else None,
                   "dropped": src.dropped}}
    if experts.fp8:
      marker["expert_weights"] = experts.to_json()
    dest.commit(marker, durable=durable)
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
