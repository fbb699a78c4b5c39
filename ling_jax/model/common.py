"""Building blocks shared by the Ling layers: parameters with logical axes, norms, SwiGLU.

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
  """The aux-loss-free router bias (spec 3.7.3): in the checkpoint, but moved by the expert-load
  update rule, not by the optimizer (which only sees `nnx.Param`)."""


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


class RMSNorm(nnx.Module):
  """RMSNorm with the HF order of operations: normalise in fp32, cast, then scale (spec 3.2).

  impl: pallas_kernels.rms_norm's choice. "xla" by default: in a ling_small train step on an
  H100 the Pallas kernels halve the norms' own time, but XLA can no longer fuse the residual adds,
  gradient sums, RoPE and gates into them, and the step is no faster (BENCHMARKS.md)."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32,
               impl: str = "xla"):
    self.eps, self.dtype, self.impl = eps, dtype, impl
    self.weight = param(None, (dim,), (ax.NORM,), param_dtype, init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], eps=self.eps, dtype=self.dtype, impl=self.impl)


class GroupRMSNorm(nnx.Module):
  """RMSNorm over `groups` equal slices of the flattened heads (spec 3.4.6); weight is [H, K].
  impl: as RMSNorm's."""

  def __init__(self, heads: int, head_dim: int, groups: int, *, eps: float,
               dtype=jnp.float32, param_dtype=jnp.float32, impl: str = "xla"):
    self.groups, self.eps, self.dtype, self.impl = groups, eps, dtype, impl
    self.weight = param(None, (heads, head_dim), (ax.HEADS, ax.HEAD_DIM), param_dtype, init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    B, T, H, K = x.shape
    y = rms_norm(x.reshape(B, T, H * K), self.weight[...], eps=self.eps, dtype=self.dtype,
                 groups=self.groups, impl=self.impl)
    return y.reshape(B, T, H, K)


class SwiGLU(nnx.Module):
  """W_down(silu(W_gate x) * W_up x): the dense MLP, the shared expert (spec 3.6)."""

  def __init__(self, hidden: int, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.dtype = dtype
    self.gate_proj = param(rngs, (hidden, width), (ax.EMBED, ax.MLP), param_dtype, fan_in=hidden)
    self.up_proj = param(rngs, (hidden, width), (ax.EMBED, ax.MLP), param_dtype, fan_in=hidden)
    self.down_proj = param(rngs, (width, hidden), (ax.MLP, ax.EMBED), param_dtype, fan_in=width)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    g = x @ self.gate_proj[...].astype(self.dtype)
    u = x @ self.up_proj[...].astype(self.dtype)
    return (jax.nn.silu(g) * u) @ self.down_proj[...].astype(self.dtype)


# ---------------------------------------------------------------------- rematerialisation
def dots_no_scores_saveable(prim, *avals, **params) -> bool:
  """Save the matmuls that contract over >= 256 elements: the projections, expert and output
  matmuls (>= 512 FLOPs to recompute each saved element), not the attention scores QK^T, which
  contract over one head's 32-128 dims but are [T, T] per head: the most memory per FLOP. Also
  save Pallas kernels' outputs (the GPU's Lightning and grouped-matmul kernels): no dot_general
  is visible inside them, and recomputing one costs its whole forward."""
  if prim.name == "pallas_call":
    return True
  if prim is not jax.lax.dot_general_p:
    return False
  (contract, _), _ = params["dimension_numbers"]
  return math.prod(avals[0].shape[d] for d in contract) >= 256


# Named jax.checkpoint policies for per-layer (or per-group) remat: what the backward pass keeps
# from each checkpointed block; everything else is recomputed from the block's input.
#   none            no checkpoint: every residual is kept (fastest, most memory)
#   full            keep nothing but the block's input (recompute the whole block)
#   dots            keep matmul outputs; recompute norms, SwiGLU, softmax, gathers and the like
#   dots_no_batch   keep only matmuls without batch dims (neither attention scores nor the
#                   sorted MoE's expert matmuls, which run batched over blocks)
#   dots_no_scores  keep the deep matmuls (`dots_no_scores_saveable`): dots without the [T, T]
#                   attention scores
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_no_scores": dots_no_scores_saveable,
}
REMAT_SCOPES = ("layer", "group")


def remat_policy(remat):
  """A name of `REMAT`, a jax.checkpoint policy, or None -> (checkpoint?, policy)."""
  if remat is None or isinstance(remat, str):
    if remat is not None and remat not in REMAT:
      raise ValueError(f"unknown remat policy {remat!r}; choose one of {tuple(REMAT)}")
    remat = None if remat is None else REMAT[remat]
    return (remat is not None), remat
  return True, remat


def checkpointed(module: nnx.Module, fn, *args, policy, prevent_cse: bool = True):
  """`fn(module, *args)` under `jax.checkpoint(policy=policy)`; `args` are pytrees of arrays
  (or None). The module's state goes in as an explicit argument so its gradient flows through
  the checkpoint; Python values `fn` closes over stay static."""
  graphdef, state = nnx.split(module)

  def pure(state, *args):
    return fn(nnx.merge(graphdef, state), *args)

  return jax.checkpoint(pure, policy=policy, prevent_cse=prevent_cse)(state, *args)
