"""Load and save the released PyTorch checkpoint layout in memory (docs/architecture.md §4).

`load_hf(folder)` reads config.json and every `*.safetensors` file of an HF folder (the headers are
the truth; `model.safetensors.index.json`, when present, must agree with them) and fills a model
built abstractly, strictly: every checkpoint tensor is used exactly once and every parameter is
filled; a missing, unexpected, mis-shaped or non-float tensor is an error naming it. It validates
and reads the folder as the streaming importer does (`ling_jax.convert.source.HFSource`), so the
two accept the same folders. `save_hf` writes the same layout back, into a temporary folder
renamed into place only once complete (`ling_jax.io.destination`).

This path holds the whole model in host memory; the streaming Orbax converter is `ling_jax.convert`.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ling_jax.config import LingConfig
from ling_jax.hf_config import write_hf_config
from ling_jax.io.destination import Destination
from ling_jax.io.safetensors import SafetensorsFile, write_safetensors
from ling_jax.model.common import CHECKPOINTED, Constant
from ling_jax.model.settings import ExpertWeights, Kernels
from ling_jax.model.ling import LingForCausalLM, build_constants
from ling_jax.weights import TensorMap, all_maps, main_maps, mtp_maps

INDEX = "model.safetensors.index.json"
MTP_FILE = "model-mtp-layer.safetensors"
# The `format` of the ling_jax.json that lists the files of an HF folder ling_jax wrote (the
# files that --overwrite may replace: `ling_jax.io.destination`).
HF_FORMAT = "ling_jax.hf/1"
# Kept in fp32 whatever the load dtype (docs/architecture.md §4.3: router and expert bias in fp32).
FP32_PARAMS = (("gate", "weight"), ("gate", "expert_bias"))


class CheckpointError(ValueError):
  """A checkpoint folder that does not match the config or the layout of docs/architecture.md §4."""


def abstract_model(cfg: LingConfig, dtype=jnp.bfloat16, *, kernels: Kernels = Kernels(),
                   expert_weights: ExpertWeights = ExpertWeights()):
  """(graphdef, abstract state, constants) of a model, without allocating parameters: the state
  of the variables a checkpoint holds (`CHECKPOINTED`) as shapes, and the model's `Constant`s,
  which no checkpoint holds, computed (`build_constants`).

  The last few are remembered (tracing a model's init and compiling its constants takes seconds,
  and a session loads the same model again and again); each call gets fresh Variables, which
  the loaders fill in place, around the same immutable leaves."""
  key = (repr(cfg), np.dtype(dtype).name, kernels, expert_weights)
  if key not in _ABSTRACT:
    make = lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                                   kernels=kernels, expert_weights=expert_weights)
    graphdef, state, _ = nnx.split(nnx.eval_shape(make), CHECKPOINTED, Constant)
    while len(_ABSTRACT) >= _ABSTRACT_KEEP:
      _ABSTRACT.pop(next(iter(_ABSTRACT)))
    _ABSTRACT[key] = graphdef, state, build_constants(make)
  graphdef, state, constants = _ABSTRACT[key]
  fresh = lambda st: jax.tree.map(lambda x: x, st)  # new State and Variables, the same leaves
  return graphdef, fresh(state), fresh(constants)


_ABSTRACT: dict = {}  # abstract_model's memory, oldest first
_ABSTRACT_KEEP = 4


def param_dtype_for(path: tuple, dtype) -> np.dtype:
  return np.dtype(jnp.float32) if tuple(path[-2:]) in FP32_PARAMS else np.dtype(dtype)


def scan_folder(folder: str | os.PathLike) -> dict[str, str]:
  """tensor name -> file, from every safetensors header; checks the index against the headers."""
  folder = os.fspath(folder)
  files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
  index_path = os.path.join(folder, INDEX)
  index = None
  if os.path.exists(index_path):
    with open(index_path) as f:
      index = json.load(f).get("weight_map", {})
    missing_files = sorted(set(index.values()) - set(files))
    if missing_files:
      raise CheckpointError(f"{folder}: shard(s) listed in {INDEX} are missing: {missing_files}")
  if not files:
    raise CheckpointError(f"{folder}: no *.safetensors files")
  where: dict[str, str] = {}
  for fname in files:
    with SafetensorsFile(os.path.join(folder, fname)) as st:
      for name in st.keys():
        if name in where:
          raise CheckpointError(f"tensor {name!r} appears in both {where[name]} and {fname}")
        where[name] = fname
  if index is not None:
    wrong = sorted(n for n, f in index.items() if where.get(n) != f)
    if wrong:
      n = wrong[0]
      raise CheckpointError(
          f"{INDEX} disagrees with the safetensors headers for {len(wrong)} tensor(s), e.g. "
          f"{n!r}: index says {index[n]}, headers say {where.get(n, 'absent')}")
  return where


def few_names(names: list[str], k: int = 5) -> str:
  """The first k names, quoted, for error messages."""
  return ", ".join(repr(n) for n in names[:k]) + (", ..." if len(names) > k else "")


def load_hf(folder: str | os.PathLike, dtype=jnp.bfloat16, *, kernels: Kernels = Kernels(),
            progress: bool = True):
  """Read an HF Ling-2.6 folder -> (config, model) with parameters (and compute) in `dtype`,
  running the ops `kernels` picks.

  The folder is validated as `python -m ling_jax.convert import` validates it (`HFSource.open`),
  and each tensor is read as the importer reads it, so both paths accept and refuse the same
  folders: float32 / float16 / bfloat16 tensors are cast to `dtype`, FP8 ones dequantised with
  their scale tensor, and any other dtype (integers, bool, FP8 without a scale) is a
  `CheckpointError` naming the file and the tensor.
  """
  # Imported here: the converter builds on this module (CheckpointError, scan_folder).
  from ling_jax.convert.source import HFSource, check_counts, read_config

  folder = os.path.abspath(os.fspath(folder))
  _, cfg, _ = read_config(folder)
  check_counts(cfg, scan_folder(folder), folder)  # before a model of 10^12 layers is described
  graphdef, abstract, constants = abstract_model(cfg, dtype, kernels=kernels)
  flat = dict(nnx.to_flat_state(abstract))
  shapes = {path: var.get_value().shape for path, var in flat.items()}
  maps = all_maps(cfg)
  check_coverage(maps, shapes)
  src = HFSource.open(folder, maps, {m.name: shapes[m.path][len(m.index):] for m in maps})
  arrays = {path: np.empty(shape, param_dtype_for(path, dtype)) for path, shape in shapes.items()}
  bar = tqdm(total=len(src.tensors), desc=f"load {os.path.basename(folder)}", unit="tensor",
             disable=not progress)
  try:
    for t in src.tensors:
      target = arrays[t.map.path]
      slice_shape = target.shape[len(t.map.index):]
      rows = slice_shape[src.block_axis(t)]  # the whole tensor in one block
      for block in src.blocks(t, slice_shape, target.dtype, rows):
        target[t.map.index] = block.compute()
      bar.update()
  finally:
    bar.close()
    src.close()
  for path, var in flat.items():
    var.set_value(jnp.asarray(arrays.pop(path)))
  model = nnx.merge(graphdef, nnx.from_flat_state(flat), constants)
  return cfg, model


def check_coverage(maps: list[TensorMap], shapes: dict[tuple, tuple]) -> None:
  """Every parameter is filled exactly once, slice by slice, by the name map (style rule 10)."""
  slices = defaultdict(set)
  for m in maps:
    if m.path not in shapes:
      raise CheckpointError(f"internal: {m.name} maps to unknown parameter {m.path}")
    slices[m.path].add(m.index)
  for path, shape in shapes.items():
    n = len(next(iter(slices[path]))) if slices.get(path) else 0
    want = int(np.prod(shape[:n]))
    if len(slices.get(path, ())) != want:
      raise CheckpointError(f"internal: parameter {'.'.join(map(str, path))} is covered by "
                            f"{len(slices.get(path, ()))} checkpoint tensors, expected {want}")


def hf_tensors(model: LingForCausalLM, maps: Iterable[TensorMap], flat: dict | None = None):
  """Yield (HF name, numpy array in PyTorch layout) for each map, one slice at a time.

  The router weight, held in fp32 for compute, is written back in the checkpoint's dtype (that of
  the embeddings), so a bf16 checkpoint round-trips bit-exactly; the expert bias stays fp32.
  `flat` (the model's flat state) may be passed by callers that convert several batches of maps.
  """
  if flat is None:
    flat = dict(nnx.to_flat_state(nnx.state(model)))
  ckpt_dtype = flat[("word_embeddings",)].get_value().dtype
  for m in maps:
    value = flat[m.path].get_value()
    if m.index:
      value = _take(value, np.asarray(m.index, np.int32))
    value = np.asarray(jax.device_get(value))
    if m.path[-2:] == ("gate", "weight"):
      value = value.astype(ckpt_dtype)
    yield m.name, np.ascontiguousarray(m.to_hf(value))


@jax.jit
def _take(array, index):
  """array[index] on device, compiled once per shape (eager indexing would compile per index)."""
  return array[tuple(index)]


def save_hf(model: LingForCausalLM, config: LingConfig, folder: str | os.PathLike, *,
            max_shard_bytes: int = 5 * 2**30, overwrite: bool = False, progress: bool = True):
  """Write `model` as an HF folder (sharded main model, MTP file, index, config.json).

  Everything goes to `folder.partial` first; only a complete folder is renamed into place, so an
  interrupted save never leaves something that looks like a checkpoint. `overwrite` replaces an
  existing folder only if ling_jax wrote it or it is empty (`ling_jax.io.destination`).
  """
  if model.config != config:
    raise ValueError("save_hf: `config` differs from the config the model was built with")
  with Destination(folder, overwrite=overwrite) as dest:
    tmp = dest.partial
    main = list(main_maps(config))
    mtp = list(mtp_maps(config))
    bar = tqdm(total=len(main) + len(mtp), desc=f"save {os.path.basename(dest.path)}",
               unit="tensor", disable=not progress)
    weight_map, total = {}, 0
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    shards = _plan_shards(flat, main, max_shard_bytes)
    for k, shard in enumerate(shards):
      fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      total += _write_file(os.path.join(tmp, fname), model, flat, shard, bar)
      weight_map.update({m.name: fname for m in shard})
    if mtp:
      total += _write_file(os.path.join(tmp, MTP_FILE), model, flat, mtp, bar)
      weight_map.update({m.name: MTP_FILE for m in mtp})
    bar.close()
    with open(os.path.join(tmp, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    write_hf_config(config, tmp)
    dest.commit({"format": HF_FORMAT})


def _plan_shards(flat: dict, maps: list[TensorMap], max_bytes: int) -> list[list[TensorMap]]:
  shards, cur, size = [], [], 0
  for m in maps:
    v = flat[m.path].get_value()
    nbytes = int(np.prod(v.shape[len(m.index):])) * v.dtype.itemsize  # an upper bound for the router
    if cur and size + nbytes > max_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(m)
    size += nbytes
  if cur:
    shards.append(cur)
  return shards


def _write_file(path: str, model, flat: dict, maps: list[TensorMap], bar) -> int:
  tensors = {}
  for name, arr in hf_tensors(model, maps, flat):
    tensors[name] = arr
    bar.update()
  write_safetensors(path, tensors, metadata={"format": "pt"})
  return sum(a.nbytes for a in tensors.values())
