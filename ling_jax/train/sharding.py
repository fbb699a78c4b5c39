"""A training run on a mesh: the mesh and its checks, the train state's shardings, the state
initialised in place, each process's rows of the batch, and the per-device memory, printed (and
a state that cannot fit refused) before anything compiles (docs/parallelism.md §5).

Parameters and expert biases are placed by ling_jax.axes.state_shardings (a large parameter is
never replicated by accident), AdamW's moments like the parameters, the step count replicated;
the batch's rows over the batch axes. The train step is jitted with these as its in and out
shardings and traced under `jax.set_mesh(mesh)`, which is how the model's shard_map islands find
the mesh. On one device nothing in the program changes (tests/parallel/test_parallel_train.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ling_jax import axes as ax
from ling_jax.model.ling import LingForCausalLM, build_constants
from ling_jax.parallel import distributed, memory
from ling_jax.parallel.mesh import BATCH_AXES, batch_axes_size, build_mesh, check_mesh
from ling_jax.train.config import Experiment
from ling_jax.train.errors import RunRefused
from ling_jax.train.step import TrainState, init_state, split_model


def mesh_for(exp: Experiment, devices=None) -> jax.sharding.Mesh:
  """The experiment's mesh over every process's devices, refused (RunRefused, naming the axis
  and the sizes) if the devices, the model or the batch (and its micro-batches) do not fit it."""
  try:
    mesh = build_mesh(exp.mesh, devices)
    check_mesh(exp.model, mesh, exp.data.batch_size)
  except ValueError as e:
    raise RunRefused(str(e)) from None
  n, accum = batch_axes_size(mesh), exp.train.grad_accum
  if exp.data.batch_size % (n * accum):
    sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES)
    raise RunRefused(f"data.batch_size={exp.data.batch_size} does not split into "
                     f"train.grad_accum={accum} micro-batches on each of the {sizes} = {n} "
                     f"batch shards: it must be a multiple of {n * accum}")
  return mesh


def model_factory(exp: Experiment):
  """The experiment's model constructor (random init from train.seed)."""
  t = exp.train
  return lambda: LingForCausalLM(exp.model, rngs=nnx.Rngs(t.seed),
                                 dtype=jnp.dtype(t.compute_dtype), param_dtype=jnp.float32,
                                 kernels=t.kernels, parallel=t.parallel)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a run's arrays live on `mesh`: the model's graphdef, abstract states and shardings,
  the train state's shardings, and the batch's."""

  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  abstract: tuple            # (params, expert_bias, constants) as shapes
  model: tuple               # their shardings
  state: TrainState          # the train state's shardings
  batch: NamedSharding

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def layout(exp: Experiment, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation) -> Layout:
  """The run's shardings, from shapes alone (nothing is allocated)."""
  graphdef, params, bias, constants = split_model(nnx.eval_shape(model_factory(exp)))
  model = tuple(ax.state_shardings(s, mesh) for s in (params, bias, constants))
  opt = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, P())
  state = TrainState(step=replicated, params=model[0], expert_bias=model[1],
                     opt_state=memory.optimizer_shardings(opt, params, model[0]))
  return Layout(mesh, graphdef, (params, bias, constants), model, state,
                distributed.batch_sharding(mesh))


def memory_line(lay: Layout, tx: optax.GradientTransformation) -> str:
  """The per-device bytes of parameters and optimizer state on the run's mesh, refused
  (RunRefused, with the estimate) where they exceed a device's memory."""
  est = memory.estimate(lay.abstract[0], lay.model[0], tx=tx)
  try:
    return memory.check_fits(est)
  except memory.DoesNotFit as e:
    raise RunRefused(str(e)) from None


def init_model_state(exp: Experiment, lay: Layout, build_on_host) -> tuple:
  """(params, expert_bias, constants) initialised from train.seed in their shardings.

  On one device: `build_on_host(exp)` (train/loop.py's `build_model`: one program on the host's
  CPU, then placed; the GPU takes minutes to compile that program). On several: one program on
  the mesh with the shardings as its outputs, so each device draws only its shards."""
  if lay.mesh.size == 1:
    _, params, bias, constants = split_model(build_on_host(exp))
    return tuple(jax.device_put(s, sh) for s, sh in zip((params, bias, constants), lay.model))
  make = model_factory(exp)
  return jax.jit(lambda: split_model(make())[1:], out_shardings=lay.model)()


def init_constants(exp: Experiment, lay: Layout):
  """The model's constants (the Lightning decays, computed from the config) in their shardings:
  all a resumed run builds, its state coming from the checkpoint."""
  return distributed.host_to_global(build_constants(model_factory(exp)), lay.model[2])


def init_train_state(params, expert_bias, tx, lay: Layout) -> TrainState:
  """The step-0 train state (fresh AdamW moments) in the run's shardings; params and expert_bias
  are donated."""
  return jax.jit(lambda p, b: init_state(p, b, tx), out_shardings=lay.state,
                 donate_argnums=(0, 1))(params, expert_bias)


def abstract_train_state(lay: Layout, tx: optax.GradientTransformation) -> TrainState:
  """The run's train state as ShapeDtypeStructs carrying its shardings: the target a
  checkpoint restores into (onto this mesh, whatever mesh wrote it)."""
  return jax.jit(lambda p, b: init_state(p, b, tx), out_shardings=lay.state).eval_shape(
      *lay.abstract[:2])


def put_batch(local: dict, lay: Layout, global_rows: int) -> dict:
  """This process's rows of a batch (host arrays) -> the global batch on the mesh."""
  if lay.mesh.size == 1:
    return jax.device_put(local, lay.batch)
  return distributed.global_batch(local, lay.mesh, global_rows)
