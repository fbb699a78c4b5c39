"""The Lightning layer's QK norm and partial NeoX RoPE, pure jnp: the semantics
(docs/architecture.md §3.4.2-3).

qkv [B, T, 3, H, K] -> q, k, v [B, T, H, K] in `dtype`:
  q = rope(rms_norm(qkv[:, :, 0]; wq)),  k = rope(rms_norm(qkv[:, :, 1]; wk)),  v = qkv[:, :, 2]
with rms_norm in the HF order (pallas_kernels.rms_norm: w * dtype(x / rms(x)), fp32 statistics)
and NeoX rotate-half on the first R = 2 cos.shape[-1] dims, computed in fp32 and cast back; the
last K - R dims pass through. `apply_neox` is also the model's (ling_jax.model.rope imports it
from here: kernels never import the model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.rms_norm.reference import rms_norm_reference


def apply_neox(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE on the first 2*cos.shape[-1] dims of x [B, T, H, K]; the rest pass through."""
  half = cos.shape[-1]
  rot, rest = x[..., : 2 * half].astype(jnp.float32), x[..., 2 * half:]
  x1, x2 = rot[..., :half], rot[..., half:]
  c, s = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, R/2]
  out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
  return jnp.concatenate([out, rest], axis=-1)


def qk_norm_rope_reference(qkv, wq, wk, cos, sin, *, eps: float, dtype):
  """qkv [B, T, 3, H, K]; wq, wk [K] or both None (no QK norm); cos, sin [B, T, R/2] fp32
  -> (q, k, v), each [B, T, H, K] in `dtype`."""
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, K]
  if wq is not None:
    q = rms_norm_reference(q, wq, eps=eps, dtype=dtype)
    k = rms_norm_reference(k, wk, eps=eps, dtype=dtype)
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)  # no-ops in the model
  return apply_neox(q, cos, sin), apply_neox(k, cos, sin), v
