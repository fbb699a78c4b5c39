"""Building blocks shared by the Ling layers: variables with logical axes, norms.

Kernels are stored [in, ..., out] (the transpose of PyTorch's [out, in]) and may be split into
named axes, e.g. the Lightning projection is [D, 3, H, K]. Parameters are stored in `param_dtype`
and cast to the compute `dtype` at use, so training keeps fp32 master weights under bf16 compute.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax import axes as ax
from pallas_kernels.rms_norm import rms_norm


class ExpertBias(nnx.Variable):
  """The aux-loss-free router bias (docs/architecture.md §3.7.3): in the checkpoint, but moved by
  the expert-load update rule, not by the optimizer (which only sees `nnx.Param`)."""


class Constant(nnx.Variable):
  """A per-layer constant the model derives from its config when it is built (the Lightning
  decay): neither trained nor saved; every checkpoint holds only `CHECKPOINTED` variables."""


CHECKPOINTED = (nnx.Param, ExpertBias)  # the variables a checkpoint holds (an nnx filter)


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str], dtype,
          *, fan_in: int | None = None, init: str = "normal", kind=nnx.Param) -> nnx.Variable:
  """A variable with logical axis names; `normal` draws N(0, 1/fan_in), `ones`/`zeros` are constant."""
  shape = tuple(shape)
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  elif init == "normal":
    std = 1.0 if fan_in is None else 1.0 / math.sqrt(fan_in)
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  else:
    raise ValueError(f"unknown init {init!r}")
  # Shardings are applied by the caller from the logical names (ling_jax.axes), never eagerly.
  return kind(value, out_sharding=tuple(axes), eager_sharding=False)


def constant(value: jax.Array, axes: Sequence[str]) -> Constant:
  """A `Constant` holding `value`, with logical axis names (as `param`'s)."""
  if len(axes) != jnp.ndim(value):
    raise ValueError(f"axes {axes} do not match shape {jnp.shape(value)}")
  return Constant(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
  """RMSNorm with the HF order of operations: normalise in fp32, cast, then scale
  (docs/architecture.md §3.2). impl: pallas_kernels.rms_norm's."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32,
               impl: str = "auto"):
    self.eps, self.dtype, self.impl = eps, dtype, impl
    self.weight = param(None, (dim,), (ax.NORM,), param_dtype, init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], eps=self.eps, dtype=self.dtype, impl=self.impl)


class GroupRMSNorm(nnx.Module):
  """RMSNorm over `groups` equal slices of the flattened heads (docs/architecture.md §3.4.6); weight
  is [H, K]. impl: as RMSNorm's."""

  def __init__(self, heads: int, head_dim: int, groups: int, *, eps: float,
               dtype=jnp.float32, param_dtype=jnp.float32, impl: str = "auto"):
    self.groups, self.eps, self.dtype, self.impl = groups, eps, dtype, impl
    self.weight = param(None, (heads, head_dim), (ax.HEADS, ax.HEAD_DIM), param_dtype, init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    B, T, H, K = x.shape
    y = rms_norm(x.reshape(B, T, H * K), self.weight[...], eps=self.eps, dtype=self.dtype,
                 groups=self.groups, impl=self.impl)
    return y.reshape(B, T, H, K)
