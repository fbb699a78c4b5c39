"""Routed experts, pure jnp: every expert on every token, weighted by the (mostly zero) combine
matrix. Obviously correct, O(tokens x experts): the semantics the dispatching forms match."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def routed_experts_reference(x, expert_ids, weights, w_gate, w_up, w_down):
  """x [N, D] -> [N, D] in fp32: sum over x of weights[n, x] * SwiGLU expert expert_ids[n, x]."""
  N, E = x.shape[0], w_gate.shape[0]
  combine = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], expert_ids].add(weights)
  h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, w_gate)) * jnp.einsum("nd,edf->nef", x, w_up)
  y = jnp.einsum("nef,efd->ned", h, w_down)  # [N, E, D]
  return jnp.einsum("ne,ned->nd", combine, y.astype(jnp.float32))
