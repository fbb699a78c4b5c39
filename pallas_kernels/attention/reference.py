"""Causal softmax attention through materialised fp32 scores: the semantics the kernels match.

q, k [B, T, H, K], v [B, T, H, V]; optionally a second query part q_rope [B, T, H, R] against one
key part k_rope [B, T, R] that every head shares (MLA's decoupled RoPE key, docs/architecture.md
§3.5), scored as a separate product and added. Token t attends to token s when s's position is at
most t's and (with segment ids) both lie in the same segment. The scores are [B, H, T, S] in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite "minus infinity": a fully masked row stays finite instead of NaN


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """fp32 softmax with masked entries selected out by `where` (never multiplied by 0)."""
  scores = jnp.where(mask, scores, _NEG)
  return jax.nn.softmax(scores, axis=-1)


def attention_reference(q, k, v, *, scale: float, q_rope=None, k_rope=None, segment_ids=None,
                        positions=None):
  """Causal (by position, per segment) attention -> [B, T, H, V] in v's dtype. positions [B, T]
  default to 0 .. T-1 in every row."""
  scores = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32)
  if q_rope is not None:
    scores = scores + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope,
                                 preferred_element_type=jnp.float32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
  mask = positions[:, :, None] >= positions[:, None, :]  # [B, T, S]
  if segment_ids is not None:
    mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
  p = masked_softmax(scores * scale, mask[:, None])
  return jnp.einsum("bhts,bshv->bthv", p.astype(v.dtype), v)
