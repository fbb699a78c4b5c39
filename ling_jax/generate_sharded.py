"""Generation on a mesh: `generate(model, prompts, ..., mesh=mesh)` (ling_jax/generate/api.py)
runs the same chunked prefill and decode loop with the model's variables sharded by ling_jax.axes
(heads over `tensor`, FSDP and expert splits as in training), traced under
`jax.set_mesh(mesh)` so the layers run their shard_map islands (docs/parallelism.md §6).

The decode caches are laid out by the layers (ling_jax/parallel/islands.py): Lightning states
[B, H, K, V] by rows and heads, MLA latents [B, S, L + R] by rows. A prompt whose rows do not
divide the batch axes is padded with copies of its first row (their tokens are dropped). Before
compiling, the per-device bytes of the parameters and the cache are printed, and a mesh on which
they do not fit a device is refused (ling_jax.parallel.memory.DoesNotFit).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ling_jax import axes as ax
from ling_jax.parallel import islands, memory
from ling_jax.parallel.mesh import batch_axes_size, check_mesh


def cache_shardings(cache, mesh: jax.sharding.Mesh):
  """NamedShardings of a decode cache (`LingForCausalLM.init_cache`'s, or its shapes): the
  layers' layout, with a leading whole axis for the stacked groups' caches."""
  def spec(path, x):
    stacked = any(getattr(k, "key", None) == "groups" for k in path)
    layout = {0: P(), 3: islands.LATENT_CACHE, 4: islands.LIGHTNING_STATE}[x.ndim - stacked]
    return NamedSharding(mesh, P(None, *layout) if stacked else layout)

  return jax.tree_util.tree_map_with_path(spec, cache)


def memory_line(model, mesh: jax.sharding.Mesh, batch: int, max_len: int) -> str:
  """The per-device bytes of `model`'s variables and of a `batch` x `max_len` cache on `mesh`,
  refused (DoesNotFit) where they exceed a device's memory."""
  state = nnx.state(model)
  cache = jax.eval_shape(lambda: model.init_cache(batch, max_len))
  est = memory.estimate(state, ax.state_shardings(state, mesh), cache=cache,
                        cache_shardings=cache_shardings(cache, mesh))
  return "generate: " + memory.check_fits(est)


def place(model, tokens: np.ndarray, lengths: np.ndarray, mesh: jax.sharding.Mesh,
          max_len: int):
  """(`model` with its variables placed on `mesh` by the rules, tokens [B', T] and lengths [B']
  padded with copies of row 0 to a multiple of the batch axes): module docstring."""
  check_mesh(model.config, mesh)
  B, n = tokens.shape[0], batch_axes_size(mesh)
  padded = -(-B // n) * n
  print(memory_line(model, mesh, padded, max_len))
  if padded != B:
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], padded - B, axis=0)])
    lengths = np.concatenate([lengths, np.repeat(lengths[:1], padded - B)])
  graphdef, state = nnx.split(model)
  shardings = ax.state_shardings(state, mesh)
  if all(x.is_fully_addressable for x in jax.tree.leaves(state)):
    state = jax.device_put(state, shardings)
  else:  # several processes: already global; moved only where laid out otherwise
    state = jax.jit(lambda s: s, out_shardings=shardings)(state)
  return nnx.merge(graphdef, state), tokens, lengths


def to_host(x: jax.Array, mesh: jax.sharding.Mesh) -> np.ndarray:
  """A (possibly sharded) array as a host array: replicated first, so every process reads it."""
  return np.asarray(jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))(x))
