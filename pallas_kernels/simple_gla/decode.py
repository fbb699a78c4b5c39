"""One decode step of simple GLA in Pallas (Triton lowering), docs/architecture.md §3.4.5.

For a batch of single tokens: S' = exp(g_h) S + k^T v, o = scale * q S'. The step is memory-bound
on the fp32 state [B, H, K, V] (read once, written once; q, k, v, o are tiny), so a program owns
one (b, h, V-block) slice of the state, does the rank-1 update and the q-contraction with vector
ops (no tensor cores: a 1-row matmul would waste them), and writes the slice back in place
(input_output_aliases; donate the state under jit to avoid XLA's defensive copy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


def _step_kernel(g_ref, q_ref, k_ref, v_ref, s_ref, o_ref, s_out_ref, *, scale: float):
  g = g_ref[0]
  q = q_ref[...].astype(jnp.float32)  # [K]
  k = k_ref[...].astype(jnp.float32)  # [K]
  v = v_ref[...].astype(jnp.float32)  # [BV]
  S = jnp.exp(g) * s_ref[...] + k[:, None] * v[None, :]  # [K, BV] fp32
  o_ref[...] = (scale * jnp.sum(q[:, None] * S, axis=0)).astype(o_ref.dtype)
  s_out_ref[...] = S


def simple_gla_step_pallas(q, k, v, g, state, *, scale=None, block_v=32, num_warps=4,
                           interpret=False):
  """q, k [B, H, K], v [B, H, V], g [H], state [B, H, K, V] fp32 -> (o [B, H, V], new state).

  The state is updated in place when the caller donates it (jax.jit(..., donate_argnums)).
  K and block_v must be powers of two.
  """
  B, H, K = q.shape
  V = v.shape[-1]
  BV = min(block_v, V)
  if V % BV or K & (K - 1) or BV & (BV - 1):
    raise ValueError(f"K={K} and block_v={BV} must be powers of two, block_v dividing V={V}")
  scale = float(K ** -0.5 if scale is None else scale)
  vec_k = pl.BlockSpec((None, None, K), lambda b, h, j: (b, h, 0))
  vec_v = pl.BlockSpec((None, None, BV), lambda b, h, j: (b, h, j))
  st = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
  return pl.pallas_call(
      functools.partial(_step_kernel, scale=scale),
      grid=(B, H, V // BV),
      in_specs=[pl.BlockSpec((1,), lambda b, h, j: (h,)), vec_k, vec_k, vec_v, st],
      out_specs=[vec_v, st],
      out_shape=[jax.ShapeDtypeStruct((B, H, V), q.dtype),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
      input_output_aliases={4: 1},
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="simple_gla_step",
  )(jnp.asarray(g, jnp.float32), q, k, v, state.astype(jnp.float32))
