"""Softmax cross-entropy over given logits and its gradient, pure jnp: the kernel's spec.

Per row n of logits x [C, V] (fp32 math), with target t_n in [0, V) and weight m_n:
  lse_n = log sum_v exp(x_nv)
  ce_n  = m_n (lse_n - x_n,t_n)                          (the weighted cross-entropy)
  g_nv  = m_n (exp(x_nv - lse_n) - [v == t_n])           (d sum_n ce_n / d x_nv)
g is rounded once, to `grad_dtype`, at the end (the LM head feeds it to bf16 matmuls);
grad_dtype=None leaves it out (the value alone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_reference(logits, targets, mask, *, grad_dtype=jnp.bfloat16):
  """logits [C, V], targets [C] int, mask [C] -> (g [C, V] in grad_dtype or None, lse [C] fp32,
  ce [C] fp32)."""
  x = logits.astype(jnp.float32)
  t = targets.astype(jnp.int32)
  m = mask.astype(jnp.float32)
  lse = jax.nn.logsumexp(x, axis=-1)
  ce = (lse - jnp.take_along_axis(x, t[:, None], axis=-1)[:, 0]) * m
  if grad_dtype is None:
    return None, lse, ce
  onehot = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :] == t[:, None]
  g = (jnp.exp(x - lse[:, None]) - onehot) * m[:, None]
  return g.astype(grad_dtype), lse, ce
