"""Routed experts in XLA, dropless: sorted by expert and blocked.

Sort the (token, expert) assignments by expert, pad each expert's rows to a multiple of
`block_size` (a static upper bound on rows, nothing dropped) and run a blocked matmul, each block
against its expert's weights. (`jax.lax.ragged_dot` is avoided: on jax 0.11.2 GPU it lowers to a
dense masked expansion.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def routed_experts_blocked(x, idx, w, wg, wu, wd, *, block_size: int = 64,
                           blocks_per_step: int = 16):
  """x [N, D] -> [N, D] in fp32, reference.py's value; `blocks_per_step` blocks per step of the
  `lax.map` over blocks."""
  N, D = x.shape
  E = wg.shape[0]
  X = idx.shape[1]
  A = N * X
  b = block_size
  flat_e = idx.reshape(A)
  order = jnp.argsort(flat_e, stable=True)  # assignments grouped by expert
  sorted_e = flat_e[order]
  counts = jnp.bincount(flat_e, length=E)
  padded = (counts + b - 1) // b * b
  padded_end = jnp.cumsum(padded)
  start = jnp.cumsum(counts) - counts
  dest = (padded_end - padded)[sorted_e] + jnp.arange(A) - start[sorted_e]  # row in padded layout
  # Static bound on padded rows: every expert wastes at most b-1 rows.
  num_blocks = -(-(A + min(E, A) * (b - 1)) // b)
  rows = jnp.zeros((num_blocks * b, D), x.dtype).at[dest].set(x[order // X])
  block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(num_blocks) * b, side="right"),
                             E - 1)

  def block(args):
    xb, e = args  # [b, D], expert id
    return (jax.nn.silu(xb @ wg[e]) * (xb @ wu[e])) @ wd[e]

  out = jax.lax.map(block, (rows.reshape(num_blocks, b, D), block_expert),
                    batch_size=min(blocks_per_step, num_blocks))  # [num_blocks, b, D]
  y_sorted = out.reshape(num_blocks * b, D)[dest].astype(jnp.float32)  # [A, D]
  y = jnp.zeros((A, D), jnp.float32).at[order].set(y_sorted).reshape(N, X, D)
  return jnp.einsum("nx,nxd->nd", w, y)
