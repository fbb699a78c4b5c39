"""One process of tests/parallel/test_multiprocess.py, started as docs/parallelism.md documents
(each process's environment says which one it is):

    JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<0 or 1> \\
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
    PYTHONPATH=. python tests/multiprocess_worker.py OUT_DIR

It computes ling_tiny's loss (with MTP) and every gradient on a data x fsdp x tensor mesh over
all processes' devices, parameters sharded by ling_jax.axes.state_shardings, each process feeding
only its rows of the batch, and writes them to OUT_DIR/process<i>.npz. The test runs `step()` in
one process too.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ling_jax import axes as ax
from ling_jax.config import ling_tiny
from ling_jax.model import LingForCausalLM
from ling_jax.model.common import Constant, ExpertBias
from ling_jax.model.ling import build_constants
from ling_jax.parallel import distributed
from ling_jax.parallel.mesh import MeshConfig, build_mesh, check_mesh

MESH = dict(data=2, fsdp=2, tensor=2)
BATCH, SEQ = 8, 12


def step() -> dict:
  """{"loss": ..., "grad.<path>": ...} as host arrays, the same in every process."""
  cfg = ling_tiny(num_hidden_layers=2)  # one Lightning (dense MLP) and one MLA (MoE) layer
  mesh = build_mesh(MeshConfig(**MESH))
  check_mesh(cfg, mesh, BATCH)
  make = lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest, _ = nnx.split(nnx.eval_shape(make), nnx.Param, ExpertBias, Constant)
  # The Lightning decays, computed (the same in every process), as host arrays.
  constants = nnx.map_state(lambda _, v: v.replace(np.asarray(v.get_value())),
                            build_constants(make))
  # Every process draws the same weights, on the host: eager jax ops would compile one small
  # program per parameter shape, longer than the test's whole step.
  rng = np.random.default_rng(3)

  def draw(path, var):
    x = rng.standard_normal(var.get_value().shape).astype(np.float32)
    name = str(path[-2] if path[-1] == "weight" else path[-1])
    if "norm" in name:
      return var.replace(1.0 + 0.1 * x)
    return var.replace((0.05 if name == "expert_bias" else 0.1) * x)

  params, rest, constants = (jax.device_put(s, ax.state_shardings(s, mesh))
                             for s in (nnx.map_state(draw, params), nnx.map_state(draw, rest),
                                       constants))
  tokens = rng.integers(0, cfg.vocab_size, (BATCH, SEQ), dtype=np.int32)
  tokens = distributed.global_batch(tokens[distributed.process_batch_slice(BATCH, mesh)], mesh,
                                    BATCH)

  def loss_fn(params, rest, constants, tokens):  # next-token and MTP CE: every Param's gradient
    out = nnx.merge(graphdef, params, rest, constants).forward(tokens, mtp=True)
    lp = jax.nn.log_softmax(out.logits[:, :-1])
    mp = jax.nn.log_softmax(out.mtp_logits[:, :-2])
    return -(jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean()
             + jnp.take_along_axis(mp, tokens[:, 2:, None], -1).mean())

  # Replicated outputs: every process can read the whole result.
  step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=NamedSharding(mesh, P()))
  # Unoptimised: compiling dominates the test's time.
  step = step.lower(params, rest, constants, tokens).compile({"xla_backend_optimization_level": 0})
  loss, grads = step(params, rest, constants, tokens)
  out = {"loss": np.asarray(loss)}
  for path, g in nnx.to_flat_state(grads):
    out["grad." + ".".join(map(str, path))] = np.asarray(g.get_value())
  return out


if __name__ == "__main__":
  distributed.initialize(timeout_s=60)  # before any JAX computation
  result = step()
  np.savez(os.path.join(sys.argv[1], f"process{jax.process_index()}.npz"), **result)
  jax.distributed.shutdown()
