"""RMSNorm, pure jnp: the semantics the Pallas kernel must match (docs/architecture.md §3.2).

HF order of operations: cast x to the compute dtype, normalise in fp32, cast back, then scale by the
weight (cast to the compute dtype):  y = w * dtype(x / rms(x)). `groups` normalises `groups` equal
slices of the last axis separately (the Lightning output's GroupRMSNorm, docs/architecture.md
§3.4.6), each with its own weight: w [groups, D / groups] (or [D]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis with fp32 statistics, cast back to x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype)


def rms_norm_reference(x: jax.Array, w: jax.Array, *, eps: float, dtype, groups: int = 1):
  """x [..., D], w [groups, D / groups] or [D] -> [..., D] in `dtype`."""
  *lead, D = x.shape
  xg = x.astype(dtype).reshape(*lead, groups, D // groups)
  wg = w.reshape(groups, D // groups).astype(dtype)
  return (wg * rms_normalize(xg, eps)).reshape(*lead, D)
