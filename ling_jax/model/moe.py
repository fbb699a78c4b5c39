"""Sparse MoE: sigmoid router with aux-loss-free bias and group-limited top-k, dropless experts,
one shared expert (docs/architecture.md §3.7).

The router is router.py; the routed experts are one op, `pallas_kernels.moe.routed_experts`,
whose `impl` picks the dispatch (all experts densely, sorted blocks in XLA, or the Pallas
grouped-matmul kernels) and what "auto" picks. Under a mesh of several devices the routed experts
run expert-parallel (ling_jax/parallel/expert.py: experts split over `expert`, their width over
`tensor`, the tokens exchanged by `Parallel.expert_exchange`), with the same op as each device's
local function; the router and the shared expert stay with GSPMD, data-parallel over the rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax import axes as ax
from ling_jax.model.common import param
from ling_jax.model.linear import SwiGLU
from ling_jax.model.router import Router, expert_load, route
from ling_jax.model.settings import ExpertWeights, Parallel
from ling_jax.parallel import islands
from ling_jax.parallel.expert import expert_parallel_experts
from pallas_kernels.grouped_matmul import Fp8Weight
from pallas_kernels.moe import routed_experts

NAMES = ("gate_proj", "up_proj", "down_proj")


class Experts(nnx.Module):
  """Routed experts stacked per layer: gate/up [E, D, F], down [E, F, D]. With FP8 weights
  (`ExpertWeights`) each is float8_e4m3fn values plus `<name>_scale` in fp32: [E, ceil(in /
  rows), ceil(out / cols)] per block, or [E, 1, out] per channel (the checkpoint's [out, 1]
  transposed, as every kernel is)."""

  def __init__(self, num_experts: int, hidden: int, width: int, *, rngs: nnx.Rngs, param_dtype,
               weights: ExpertWeights = ExpertWeights()):
    self.weights = weights
    shapes = {"gate_proj": ((num_experts, hidden, width), (ax.EXPERT, ax.EMBED, ax.MLP)),
              "up_proj": ((num_experts, hidden, width), (ax.EXPERT, ax.EMBED, ax.MLP)),
              "down_proj": ((num_experts, width, hidden), (ax.EXPERT, ax.MLP, ax.EMBED))}
    for name, (shape, axes) in shapes.items():
      E, K, N = shape
      if not weights.fp8:
        setattr(self, name, param(rngs, shape, axes, param_dtype, fan_in=K))
        continue
      # Random FP8 weights: N(0, 1) values, scales K^-1/2 (a checkpoint overwrites both).
      setattr(self, name, param(rngs, shape, axes, jnp.float8_e4m3fn))
      bk, bn = weights.block
      s_shape = (E, -(-K // bk), -(-N // bn)) if weights.format == "fp8-block" else (E, 1, N)
      # Scales follow their experts over the mesh and are replicated otherwise (a few blocks
      # along D or F need not divide the tensor axis).
      setattr(self, f"{name}_scale", nnx.Param(jnp.full(s_shape, K ** -0.5, jnp.float32),
                                               out_sharding=(ax.EXPERT, ax.NORM, ax.NORM),
                                               eager_sharding=False))

  def weight(self, name: str, dtype):
    """Expert weight `name` for the routed-experts op: an array in `dtype`, or an Fp8Weight."""
    w = getattr(self, name)[...]
    if not self.weights.fp8:
      return w.astype(dtype)
    s = getattr(self, f"{name}_scale")[...]
    if self.weights.format == "fp8-channel":
      return Fp8Weight(w, s[:, 0, :])
    return Fp8Weight(w, s, self.weights.block)


class SparseMoE(nnx.Module):
  """Router + routed experts + shared expert; called as every MLP is, x -> (y, aux), its aux the
  per-expert token counts. impl: pallas_kernels.moe's; exchange: `Parallel.expert_exchange`;
  linear_impl: the shared expert's (model/linear.py)."""

  def __init__(self, *, hidden: int, num_experts: int, top_k: int, width: int, shared_width: int,
               n_group: int, topk_group: int, routed_scale: float, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, impl: str = "auto",
               exchange: str = Parallel().expert_exchange,
               expert_weights: ExpertWeights = ExpertWeights(), linear_impl: str = "auto"):
    self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
    self.routed_scale, self.dtype, self.impl, self.exchange = routed_scale, dtype, impl, exchange
    self.gate = Router(hidden, num_experts, rngs=rngs)
    self.experts = Experts(num_experts, hidden, width, rngs=rngs, param_dtype=param_dtype,
                           weights=expert_weights)
    self.shared_experts = (SwiGLU(hidden, shared_width, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype, weights=expert_weights,
                                  linear_impl=linear_impl) if shared_width else None)

  def __call__(self, x: jax.Array, routing: jax.Array | None = None):
    """x [B, T, D] -> (y [B, T, D], load [E] = tokens routed to each expert).

    routing [B, T, X] int32 (routing replay: a token's experts, -1 = route as usual) -> (y,
    (load, expert ids [B, T, X] the tokens were sent to))."""
    B, T, D = x.shape
    x = x.astype(self.dtype)
    flat = x.reshape(B * T, D)  # [N, D]
    replay = None if routing is None else routing.reshape(B * T, -1)
    idx, w = route(flat, self.gate.weight[...], self.gate.expert_bias[...], top_k=self.top_k,
                   n_group=self.n_group, topk_group=self.topk_group, scale=self.routed_scale,
                   replay=replay)
    wts = [self.experts.weight(n, self.dtype) for n in NAMES]
    E = self.gate.weight.shape[1]
    mesh = islands.active_mesh()
    if mesh is None:
      y, load = routed_experts(flat, idx, w, *wts, impl=self.impl), expert_load(idx, E)
    elif self.experts.weights.fp8:
      raise NotImplementedError("FP8 routed experts run on one device only (no mesh) for now")
    else:
      local = functools.partial(routed_experts, impl=self.impl, empty=True)
      y, load = expert_parallel_experts(flat, idx, w, *wts, mesh=mesh, token_axes=islands.ROWS,
                                        tensor_axis=islands.TENSOR, strategy=self.exchange,
                                        local=local)
    # Routed outputs combine in fp32 and are cast back before the shared expert
    # (docs/architecture.md §3.7.6).
    y = y.astype(self.dtype).reshape(B, T, D)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x)[0]
    load = load.astype(jnp.float32)
    return (y, load) if routing is None else (y, (load, idx.reshape(B, T, -1)))
