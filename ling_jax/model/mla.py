"""Multi-head latent attention (DeepSeek-V2/V3 MLA with q-LoRA), docs/architecture.md §3.5.

Two mathematically identical forms:
* plain (training / prefill without a cache): expand the latent c_kv through kv_b_proj into
  per-head k_nope and v, then causal softmax attention over [k_nope | k_pe] with the shared RoPE
  key k_pe: `pallas_kernels.attention.causal_attention`, whose `impl` picks materialised scores,
  jax's Pallas flash kernel or cuDNN's fused attention (and what "auto" picks);
* absorbed (decode): fold W_UK into the query and W_UV into the output, so attention runs on the
  576-value latent cache [c_kv (normed) 512 | k_pe (roped) 64] per token (docs/architecture.md §3.5,
  5). Cache slot s holds position s: each row writes its new tokens' latents at their positions, so
  rows may stand at different lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax import axes as ax
from ling_jax.model import rope
from ling_jax.model.common import RMSNorm, param
from pallas_kernels.attention import causal_attention, masked_softmax



class MultiLatentAttention(nnx.Module):
  """MLA with the checkpoint's names (`q_a_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, `dense`...).
  impl and norm_impl are the `impl`s of pallas_kernels.attention and rms_norm."""

  def __init__(self, *, hidden: int, heads: int, q_lora_rank: int | None, kv_lora_rank: int,
               qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, rope_theta: float,
               rope_scaling, eps: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, impl: str = "auto", norm_impl: str = "auto"):
    self.impl = impl
    self.heads, self.kv_lora_rank = heads, kv_lora_rank
    self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    self.rope_theta, self.rope_scaling, self.dtype = rope_theta, rope_scaling, dtype
    self.scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5 * rope.yarn_softmax_scale(rope_scaling)
    qk = qk_nope_head_dim + qk_rope_head_dim
    mk = lambda *a, **k: param(rngs, *a, param_dtype, **k)
    norm = dict(eps=eps, dtype=dtype, param_dtype=param_dtype, impl=norm_impl)
    if q_lora_rank is None:
      self.q_proj = mk((hidden, heads, qk), (ax.EMBED, ax.HEADS, ax.HEAD_DIM), fan_in=hidden)
      self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
    else:
      self.q_proj = None
      self.q_a_proj = mk((hidden, q_lora_rank), (ax.EMBED, ax.Q_LORA), fan_in=hidden)
      self.q_a_layernorm = RMSNorm(q_lora_rank, **norm)
      self.q_b_proj = mk((q_lora_rank, heads, qk), (ax.Q_LORA, ax.HEADS, ax.HEAD_DIM),
                         fan_in=q_lora_rank)
    self.kv_a_proj_with_mqa = mk((hidden, kv_lora_rank + qk_rope_head_dim), (ax.EMBED, ax.KV_LORA),
                                 fan_in=hidden)
    self.kv_a_layernorm = RMSNorm(kv_lora_rank, **norm)
    self.kv_b_proj = mk((kv_lora_rank, heads, qk_nope_head_dim + v_head_dim),
                        (ax.KV_LORA, ax.HEADS, ax.HEAD_DIM), fan_in=kv_lora_rank)
    self.dense = mk((heads, v_head_dim, hidden), (ax.HEADS, ax.HEAD_DIM, ax.EMBED),
                    fan_in=heads * v_head_dim)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> jax.Array:
    """The latent cache [B, S, L + R]: normed c_kv then roped k_pe per position."""
    return jnp.zeros((batch, max_len, self.kv_lora_rank + self.rope_dim), dtype or self.dtype)

  def _w(self, v):
    return v[...].astype(self.dtype)

  def _project(self, a: jax.Array, positions: jax.Array):
    """Query heads and the per-token latent (c_kv normed, k_pe roped)."""
    if self.q_proj is not None:
      q = jnp.einsum("btd,dhk->bthk", a, self._w(self.q_proj))
    else:
      c_q = self.q_a_layernorm(a @ self._w(self.q_a_proj))
      q = jnp.einsum("btq,qhk->bthk", c_q, self._w(self.q_b_proj))  # [B, T, H, K + R]
    q_nope, q_pe = q[..., : self.nope], q[..., self.nope:]
    ckv = a @ self._w(self.kv_a_proj_with_mqa)  # [B, T, L + R]
    c_kv = self.kv_a_layernorm(ckv[..., : self.kv_lora_rank])
    cos, sin = rope.cos_sin(positions, self.rope_dim, self.rope_theta, self.rope_scaling)
    q_pe = rope.apply_interleaved(q_pe, cos, sin)
    k_pe = rope.apply_interleaved(ckv[..., self.kv_lora_rank:], cos, sin)  # [B, T, R]
    return q_nope, q_pe, c_kv, k_pe

  def __call__(self, a: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: jax.Array | None = None):
    """a [B, T, D] -> (y [B, T, D], updated latent cache or None). With a cache, row b's tokens
    sit at positions[b, 0] onwards (consecutive) and segment_ids is ignored."""
    a = a.astype(self.dtype)
    q_nope, q_pe, c_kv, k_pe = self._project(a, positions)
    if cache is None:
      o = self._attend_plain(q_nope, q_pe, c_kv, k_pe, positions, segment_ids)
    else:
      latent = jnp.concatenate([c_kv, k_pe], axis=-1).astype(cache.dtype)
      write = lambda c, l, start: jax.lax.dynamic_update_slice_in_dim(c, l, start, axis=0)
      cache = jax.vmap(write)(cache, latent, positions[:, 0])  # slot = position, row by row
      o = self._attend_absorbed(q_nope, q_pe, cache, positions)
    y = jnp.einsum("bthv,hvd->btd", o, self._w(self.dense))
    return y, cache

  def _attend_plain(self, q_nope, q_pe, c_kv, k_pe, positions, segment_ids):
    kv = jnp.einsum("btl,lhk->bthk", c_kv, self._w(self.kv_b_proj))  # [B, T, H, K + V]
    k_nope, v = kv[..., : self.nope], kv[..., self.nope:]
    return causal_attention(q_nope, k_nope, v, scale=self.scale, q_rope=q_pe, k_rope=k_pe,
                            segment_ids=segment_ids, positions=positions, impl=self.impl)

  def _attend_absorbed(self, q_nope, q_pe, cache, positions):
    w = self._w(self.kv_b_proj)
    w_uk, w_uv = w[..., : self.nope], w[..., self.nope:]  # [L, H, K], [L, H, V]
    c_kv = cache[..., : self.kv_lora_rank].astype(self.dtype)  # [B, S, L]
    k_pe = cache[..., self.kv_lora_rank:].astype(self.dtype)  # [B, S, R]
    q_lat = jnp.einsum("bthk,lhk->bthl", q_nope, w_uk)
    scores = (jnp.einsum("bthl,bsl->bhts", q_lat, c_kv, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe, preferred_element_type=jnp.float32))
    # Cache slot s holds position s; a query at position p sees slots 0..p.
    slots = jnp.arange(cache.shape[1])
    mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
    p = masked_softmax(scores * self.scale, mask[:, None])
    o_lat = jnp.einsum("bhts,bsl->bthl", p.astype(c_kv.dtype), c_kv)
    return jnp.einsum("bthl,lhv->bthv", o_lat, w_uv)
