"""Per-device memory of a run's state, known before compiling: parameters, optimizer state and
decode cache under their shardings (docs/parallelism.md).

Counted from shapes alone (jax.ShapeDtypeStructs from `jax.eval_shape` / `nnx.eval_shape` serve
as well as arrays), so a mesh that cannot hold Ling-2.6-flash is refused on a laptop. Activations
and XLA's temporaries come on top; `compiled.memory_analysis()` reports those after compiling.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


def _is_sharding(x) -> bool:
  return isinstance(x, jax.sharding.Sharding)


def _sharding_leaves(shardings, n: int) -> list:
  if _is_sharding(shardings):
    return [shardings] * n
  out = jax.tree.leaves(shardings, is_leaf=_is_sharding)
  if len(out) != n or not all(map(_is_sharding, out)):
    raise ValueError(f"{len(out)} shardings for {n} arrays: pass a tree with one Sharding per "
                     "array, in the same order (e.g. ling_jax.axes.state_shardings of the state)")
  return out


def per_device_bytes(tree, shardings) -> int:
  """The most bytes one device holds of `tree` (arrays or ShapeDtypeStructs; any pytree,
  nnx.State included) with each leaf placed by the matching leaf of `shardings` (a tree with one
  Sharding per array, in the same order, or one Sharding for all)."""
  leaves = jax.tree.leaves(tree)
  per_device = collections.Counter()
  for x, s in zip(leaves, _sharding_leaves(shardings, len(leaves))):
    nbytes = math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    for d in s.device_set:
      per_device[d] += nbytes
  return max(per_device.values(), default=0)


def optimizer_shardings(opt_state, params, param_shardings):
  """Shardings of an optax state: every subtree shaped like `params` (Adam's two moments) as the
  parameters, every other leaf (the step count) replicated."""
  treedef = jax.tree.structure(params)
  leaves = _sharding_leaves(param_shardings, treedef.num_leaves)
  replicated = NamedSharding(leaves[0].mesh, P())

  def like_params(x) -> bool:
    return jax.tree.structure(x) == treedef

  def place(x):
    return jax.tree.unflatten(treedef, leaves) if like_params(x) else replicated

  return jax.tree.map(place, opt_state, is_leaf=like_params)


def _fmt(n: int) -> str:
  if n < 1024:
    return f"{n} B"
  exp = min(3, int(math.log(n, 1024)))
  return f"{n / 1024 ** exp:.1f} {('KiB', 'MiB', 'GiB')[exp - 1]}"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes on the fullest device of each part of the state (each part's own fullest device, so
  the total is an upper bound where shardings are uneven)."""

  params: int
  opt_state: int
  cache: int
  mesh: dict

  @property
  def total(self) -> int:
    return self.params + self.opt_state + self.cache

  def report(self, device_memory_bytes: int | None = None) -> str:
    mesh = " ".join(f"{a}={n}" for a, n in self.mesh.items())
    text = (f"per device on mesh {mesh}: parameters {_fmt(self.params)}, optimizer state "
            f"{_fmt(self.opt_state)}, cache {_fmt(self.cache)}; total {_fmt(self.total)}")
    if device_memory_bytes:
      text += f" of {_fmt(device_memory_bytes)} ({100 * self.total / device_memory_bytes:.0f}%)"
    return text + " before activations"


def estimate(params, param_shardings, *, tx: optax.GradientTransformation | None = None,
             cache=None, cache_shardings=None) -> MemoryEstimate:
  """Per-device bytes of `params`, of `tx`'s state for them (its shapes from `jax.eval_shape`,
  sharded by `optimizer_shardings`; tx=None: no optimizer, as for inference) and of `cache`."""
  p_leaves = _sharding_leaves(param_shardings, len(jax.tree.leaves(params)))
  opt = 0
  if tx is not None:
    opt_state = jax.eval_shape(tx.init, params)
    opt = per_device_bytes(opt_state, optimizer_shardings(opt_state, params, param_shardings))
  cache_bytes = 0
  if cache is not None:
    if cache_shardings is None:
      raise ValueError("a cache needs its shardings (cache_shardings)")
    cache_bytes = per_device_bytes(cache, cache_shardings)
  mesh = getattr(p_leaves[0], "mesh", None)
  return MemoryEstimate(params=per_device_bytes(params, p_leaves), opt_state=opt,
                        cache=cache_bytes, mesh=dict(mesh.shape) if mesh is not None else {})


def device_memory_bytes(device: jax.Device | None = None) -> int | None:
  """The memory XLA may use on `device` (default: this process's first), or None where the
  platform does not say (CPU)."""
  stats = (device or jax.local_devices()[0]).memory_stats()
  return stats.get("bytes_limit") if stats else None


class DoesNotFit(ValueError):
  """The state alone exceeds a device's memory on the chosen mesh."""


def check_fits(est: MemoryEstimate, device_memory: int | None = None) -> str:
  """Refuse (DoesNotFit, with the estimate) a state larger than `device_memory` bytes (default:
  `device_memory_bytes()`; unknown, as on CPU: nothing to check). Returns the report line."""
  limit = device_memory if device_memory is not None else device_memory_bytes()
  text = est.report(limit)
  if limit is not None and est.total > limit:
    raise DoesNotFit(f"the state does not fit: {text}. Split it further (more fsdp or expert "
                     "ways, on more devices) or use devices with more memory")
  return text
