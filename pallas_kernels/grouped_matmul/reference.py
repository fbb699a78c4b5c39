"""Grouped (ragged) matmul, pure jnp: the semantics the Pallas kernels must match.

Rows of `lhs` are sorted by group: group g owns rows [start_g, end_g) with end = cumsum(sizes).
  gmm:  out[m] = lhs[m] @ rhs[g(m)]        (rhs [G, K, N]; or rhs[g(m)].T with transpose_rhs,
                                            rhs [G, N, K])
  tgmm: out[g] = lhs[rows of g].T @ dout[rows of g]    ([G, K, N], the weight gradient)
Rows past sum(sizes) belong to no group: gmm gives zeros there and tgmm ignores them. Both
accumulate in fp32 and return the input dtype. O(G M K N): for tests, not for speed.
FP8 weights (fp8.Fp8Weight) are dequantised in fp32 first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.grouped_matmul.fp8 import Fp8Weight, as_f32, dequantize


def row_groups(group_sizes: jax.Array, m: int) -> jax.Array:
  """Group id of each of m rows ([m] int32; G for rows past the last group)."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def gmm_reference(lhs, rhs, group_sizes, *, transpose_rhs: bool = False):
  if isinstance(rhs, Fp8Weight):
    rhs = dequantize(rhs)
  G = rhs.shape[0]
  w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs  # [G, K, N]
  owner = row_groups(group_sizes, lhs.shape[0])
  every = jnp.einsum("mk,gkn->gmn", lhs, w, precision=lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
  mine = owner[None, :, None] == jnp.arange(G, dtype=jnp.int32)[:, None, None]
  return jnp.where(mine, every, 0.0).sum(0).astype(lhs.dtype)


def tgmm_reference(lhs, dout, group_sizes, *, out_dtype=None):
  G = group_sizes.shape[0]
  owner = row_groups(group_sizes, lhs.shape[0])
  onehot = (owner[:, None] == jnp.arange(G, dtype=jnp.int32)[None, :]).astype(jnp.float32)
  out = jnp.einsum("mg,mk,mn->gkn", onehot, lhs.astype(jnp.float32), dout.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
  return out.astype(out_dtype or lhs.dtype)


def gmm_glu_reference(x, rows, w_gate, w_up, group_sizes):
  """silu(x[rows] @ w_gate[g]) * (x[rows] @ w_up[g]) per row group, products in fp32."""
  xs = x[rows]
  g = gmm_reference(xs.astype(jnp.float32), as_f32(w_gate), group_sizes)
  u = gmm_reference(xs.astype(jnp.float32), as_f32(w_up), group_sizes)
  return (jax.nn.silu(g) * u).astype(x.dtype)
