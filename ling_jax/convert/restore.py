"""Restore a converted checkpoint onto any mesh through Orbax, and save a live model to one.

`load` builds the model abstractly (no parameter is allocated), asks Orbax for every variable
directly in its target sharding (`ling_jax.axes.state_shardings` on the given mesh), so each device
reads only the chunks of its own shard, whatever mesh (if any) the checkpoint was written from.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ling_jax import axes as ax
from ling_jax.hf_config import from_hf_config, to_hf_config
from ling_jax.hf_io import abstract_model
from ling_jax.io.destination import Destination
from ling_jax.io.safetensors import dtype_code
from ling_jax.model.common import CHECKPOINTED
from ling_jax.model.settings import ExpertWeights, Kernels
from ling_jax.parallel.distributed import host_to_global
from ling_jax.parallel.mesh import check_mesh
from ling_jax.weights import all_maps
from ling_jax.convert import store


def _nest(flat: dict) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def load(ckpt_dir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype=None,
         *, rules=ax.RULES_FSDP_TP_EP, kernels: Kernels = Kernels()):
  """Restore `ckpt_dir` -> (config, model) with parameters (and compute) in `dtype`, by default
  the dtype the checkpoint stores (its marker's); another dtype is cast to by Orbax on restore.
  `ckpt_dir` may also be a training run's checkpoint (its out_dir, `checkpoints/` or one step;
  `train.checkpoint.load_run`): its parameters and expert biases, fp32 unless `dtype` is given.
  The model runs the ops `kernels` picks. A checkpoint that kept FP8 weights (`convert import
  --keep-fp8`: the routed experts, and the dense Linears where its marker says `linears`) restores
  them as they are stored (`ExpertWeights` from the marker), whatever dtype.

  mesh=None puts every parameter on the default device; otherwise parameters are sharded over
  `mesh` by `rules` (router weight and expert bias stay fp32, as the model builds them), and so
  are the model's constants, which it computes rather than reads.
  """
  ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
  if not os.path.exists(os.path.join(ckpt_dir, store.MARKER)):
    from ling_jax.train.checkpoint import find_run_checkpoint, load_run
    run = find_run_checkpoint(ckpt_dir)
    if run is not None:  # a training run's checkpoint
      if mesh is not None:
        check_mesh(run.config, mesh, rules=rules)
      return load_run(ckpt_dir, dtype, kernels=kernels, mesh=mesh, rules=rules)
  marker = store.read_marker(ckpt_dir)
  cfg = from_hf_config(marker["config"])
  if dtype is None:
    dtype = np.dtype(marker["dtype"])
  if mesh is not None:  # an impossible mesh is refused before anything is read
    check_mesh(cfg, mesh, rules=rules)
  experts = ExpertWeights(**marker.get("expert_weights", {}))
  graphdef, abstract, constants = abstract_model(cfg, dtype, kernels=kernels,
                                                 expert_weights=experts)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {path: device for path, _ in nnx.to_flat_state(abstract)}
  else:
    shardings = dict(nnx.to_flat_state(ax.state_shardings(abstract, mesh, rules)))
    constants = host_to_global(constants, ax.state_shardings(constants, mesh, rules))
  target = {}
  for path, var in nnx.to_flat_state(abstract):
    v = var.get_value()
    sharding = shardings[path]
    sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
    target[path] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
  state_dir = os.path.join(ckpt_dir, store.STATE)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(state_dir, _nest(target))
  nnx.replace_by_pure_dict(abstract, restored)
  return cfg, nnx.merge(graphdef, abstract, constants)


def save(model, ckpt_dir: str | os.PathLike, *, overwrite: bool = False) -> None:
  """Write a live (possibly sharded) model as a checkpoint `load` and `export_hf` read.

  Orbax writes the arrays (each process its own shards); the same `.partial` + rename protocol as
  the importer (`ling_jax.io.destination`) makes the result appear only once complete, and
  `overwrite` replaces only a checkpoint ling_jax wrote, or an empty folder.
  """
  with Destination(ckpt_dir, overwrite=overwrite) as dest:
    pure = nnx.to_pure_dict(nnx.state(model, CHECKPOINTED))
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(dest.partial, store.STATE), pure)
      ckptr.wait_until_finished()
    cfg = model.config
    dtype = np.dtype(model.word_embeddings.get_value().dtype)
    codes = {m.name: "F32" for m in all_maps(cfg) if m.name.endswith("gate.expert_bias")}
    marker = {
        "format": store.FORMAT, "config": to_hf_config(cfg), "dtype": dtype.name,
        "hf_dtypes": {"default": dtype_code(dtype), "other": codes},
        "source": {"folder": None, "quantization": None, "dropped": []}}
    if model.expert_weights.fp8:
      marker["expert_weights"] = model.expert_weights.to_json()
    dest.commit(marker)
