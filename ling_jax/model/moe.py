"""Sparse MoE: sigmoid router with aux-loss-free bias and group-limited top-k, dropless experts,
one shared expert (docs/architecture.md §3.7).

The router is router.py; the routed experts are one op, `pallas_kernels.moe.routed_experts`,
whose `impl` picks the dispatch (all experts densely, sorted blocks in XLA, or the Pallas
grouped-matmul kernels) and what "auto" picks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax import axes as ax
from ling_jax.model.common import SwiGLU, param
from ling_jax.model.router import Router, expert_load, route
from pallas_kernels.moe import routed_experts

class Experts(nnx.Module):
  """Routed experts stacked per layer: gate/up [E, D, F], down [E, F, D]."""

  def __init__(self, num_experts: int, hidden: int, width: int, *, rngs: nnx.Rngs, param_dtype):
    mk = lambda shape, axes, fan: param(rngs, shape, axes, param_dtype, fan_in=fan)
    self.gate_proj = mk((num_experts, hidden, width), (ax.EXPERT, ax.EMBED, ax.MLP), hidden)
    self.up_proj = mk((num_experts, hidden, width), (ax.EXPERT, ax.EMBED, ax.MLP), hidden)
    self.down_proj = mk((num_experts, width, hidden), (ax.EXPERT, ax.MLP, ax.EMBED), width)


class SparseMoE(nnx.Module):
  """Router + routed experts + shared expert; called as every MLP is, x -> (y, aux), its aux the
  per-expert token counts. impl: pallas_kernels.moe's."""

  def __init__(self, *, hidden: int, num_experts: int, top_k: int, width: int, shared_width: int,
               n_group: int, topk_group: int, routed_scale: float, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, impl: str = "auto"):
    self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
    self.routed_scale, self.dtype, self.impl = routed_scale, dtype, impl
    self.gate = Router(hidden, num_experts, rngs=rngs)
    self.experts = Experts(num_experts, hidden, width, rngs=rngs, param_dtype=param_dtype)
    self.shared_experts = (SwiGLU(hidden, shared_width, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype) if shared_width else None)

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
    wts = [getattr(self.experts, n)[...].astype(self.dtype) for n in ("gate_proj", "up_proj", "down_proj")]
    y = routed_experts(flat, idx, w, *wts, impl=self.impl)
    # Routed outputs combine in fp32 and are cast back before the shared expert
    # (docs/architecture.md §3.7.6).
    y = y.astype(self.dtype).reshape(B, T, D)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x)[0]
    load = expert_load(idx, self.gate.weight.shape[1]).astype(jnp.float32)
    return (y, load) if routing is None else (y, (load, idx.reshape(B, T, -1)))
