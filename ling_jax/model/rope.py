"""Rotary position embeddings: partial NeoX (Lightning layers) and GPT-J interleaved (MLA).

docs/architecture.md §3.4.3 (NeoX, rotate-half on the first `rotary_dim` dims, the rest pass
through) and 3.5.3 (interleaved pairs (2j, 2j+1) on the MLA rope dims). Mixing the two up is the
classic Ling porting bug (docs/architecture.md §6.8). YaRN (docs/architecture.md §3.5.4) blends
interpolated and extrapolated frequencies and scales cos/sin by the attention factor
0.1 ln(factor) + 1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import YarnScaling
# NeoX rotate-half on the first 2 cos.shape[-1] dims (the rest pass through): defined beside the
# Lightning layer's fused QK norm + RoPE kernel, whose reference it is.
from pallas_kernels.qk_norm_rope.reference import apply_neox

__all__ = ["apply_interleaved", "apply_neox", "cos_sin", "inv_frequencies", "yarn_softmax_scale"]


def _yarn_mscale(factor: float, mscale: float) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inv_frequencies(dim: int, theta: float, yarn: YarnScaling | None) -> tuple[np.ndarray, float]:
  """Inverse frequencies [dim/2] (float64 on the host) and the cos/sin attention factor."""
  inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if yarn is None:
    return inv, 1.0

  def correction_dim(rotations: float) -> float:
    return (dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(theta)))

  low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
  high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  extrapolate = 1.0 - ramp  # high-frequency dims keep their original frequency
  inv = inv / yarn.factor * (1 - extrapolate) + inv * extrapolate
  attn = _yarn_mscale(yarn.factor, yarn.mscale) / _yarn_mscale(yarn.factor, yarn.mscale_all_dim)
  return inv, attn


def yarn_softmax_scale(yarn: YarnScaling | None) -> float:
  """Extra MLA softmax-scale multiplier: mscale(factor, mscale_all_dim)^2 when set
  (docs/architecture.md §3.5.4)."""
  if yarn is None or not yarn.mscale_all_dim:
    return 1.0
  return _yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2


def cos_sin(positions: jax.Array, dim: int, theta: float, yarn: YarnScaling | None):
  """cos, sin of positions [B, T] x inv_freq, each [B, T, dim/2] in fp32."""
  inv, attn = inv_frequencies(dim, theta, yarn)
  # Angles in fp32 from integer positions: exact enough up to ~1M positions for these thetas.
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
  return jnp.cos(angles) * attn, jnp.sin(angles) * attn


def apply_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """GPT-J RoPE: rotate pairs (x[2j], x[2j+1]) of x [B, T, H, R] (or [B, T, R]) in place."""
  x32 = x.astype(jnp.float32)
  even, odd = x32[..., 0::2], x32[..., 1::2]
  if x.ndim == 4:
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
