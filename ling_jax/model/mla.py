"""Multi-head latent attention (DeepSeek-V2/V3 MLA with q-LoRA), docs/architecture.md §3.5.

Two mathematically identical forms:
* plain (training / prefill without a cache): expand the latent c_kv through kv_b_proj into
  per-head k_nope and v, then causal softmax attention over [k_nope | k_pe] with the shared RoPE
  key k_pe: `pallas_kernels.attention.causal_attention`, whose `impl` picks materialised scores,
  jax's Pallas flash kernel or cuDNN's fused attention (and what "auto" picks);
* absorbed (decode, and prefill in chunks against the cache): fold W_UK into the query and W_UV
  into the output, so attention runs on the 576-value latent cache [c_kv (normed) 512 | k_pe
  (roped) 64] per token (docs/architecture.md §3.5, §5). Cache slot s holds position s: each
  token's latent is written at its position, so rows may stand at different lengths, and a token
  at a negative position (padding) writes nothing. A query at position p attends to slots 0..p,
  in blocks of slots with an online softmax (only the blocks up to the batch's largest position),
  so a chunk of a long prompt needs memory for one block of scores, not for the whole cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax import axes as ax
from ling_jax.model import rope
from ling_jax.model.common import RMSNorm
from ling_jax.model.linear import add_linear, dense_kernel, linear
from ling_jax.model.settings import ExpertWeights
from ling_jax.parallel import islands

# Fp32 scores of one block of cache slots, [B, T, H, block], are kept under this many bytes
# (the block: a power of two of at least MIN_BLOCK slots, at most the cache).
BLOCK_BYTES = 256 * 2**20
MIN_BLOCK = 16
_NEG = -1e30  # finite "minus infinity": a row with no visible slot stays finite

class MultiLatentAttention(nnx.Module):
  """MLA with the checkpoint's names (`q_a_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, `dense`...).
  impl and norm_impl are the `impl`s of pallas_kernels.attention and rms_norm; weights and
  linear_impl say how the projections are held and run (model/linear.py)."""

  def __init__(self, *, hidden: int, heads: int, q_lora_rank: int | None, kv_lora_rank: int,
               qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, rope_theta: float,
               rope_scaling, eps: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, impl: str = "auto", norm_impl: str = "auto",
               weights: ExpertWeights = ExpertWeights(), linear_impl: str = "auto"):
    self.impl, self.weights, self.linear_impl = impl, weights, linear_impl
    self.heads, self.kv_lora_rank = heads, kv_lora_rank
    self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    self.rope_theta, self.rope_scaling, self.dtype = rope_theta, rope_scaling, dtype
    self.scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5 * rope.yarn_softmax_scale(rope_scaling)
    qk = qk_nope_head_dim + qk_rope_head_dim
    mk = lambda name, shape, axes, n_in=1: add_linear(self, name, rngs, shape, axes, param_dtype,
                                                      n_in=n_in, weights=weights)
    norm = dict(eps=eps, dtype=dtype, param_dtype=param_dtype, impl=norm_impl)
    if q_lora_rank is None:
      mk("q_proj", (hidden, heads, qk), (ax.EMBED, ax.HEADS, ax.HEAD_DIM))
      self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
    else:
      self.q_proj = None
      mk("q_a_proj", (hidden, q_lora_rank), (ax.EMBED, ax.Q_LORA))
      self.q_a_layernorm = RMSNorm(q_lora_rank, **norm)
      mk("q_b_proj", (q_lora_rank, heads, qk), (ax.Q_LORA, ax.HEADS, ax.HEAD_DIM))
    mk("kv_a_proj_with_mqa", (hidden, kv_lora_rank + qk_rope_head_dim), (ax.EMBED, ax.KV_LORA))
    self.kv_a_layernorm = RMSNorm(kv_lora_rank, **norm)
    mk("kv_b_proj", (kv_lora_rank, heads, qk_nope_head_dim + v_head_dim),
       (ax.KV_LORA, ax.HEADS, ax.HEAD_DIM))
    mk("dense", (heads, v_head_dim, hidden), (ax.HEADS, ax.HEAD_DIM, ax.EMBED), n_in=2)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> jax.Array:
    """The latent cache [B, S, L + R]: normed c_kv then roped k_pe per position."""
    latent = jnp.zeros((batch, max_len, self.kv_lora_rank + self.rope_dim), dtype or self.dtype)
    return islands.constrain(latent, islands.LATENT_CACHE)  # under a mesh: by rows

  def _project(self, a: jax.Array, positions: jax.Array):
    """Query heads and the per-token latent (c_kv normed, k_pe roped)."""
    if self.q_proj is not None:
      q = linear(self, "q_proj", "btd,dhk->bthk", a)
    else:
      c_q = self.q_a_layernorm(linear(self, "q_a_proj", "btd,dq->btq", a))
      q = linear(self, "q_b_proj", "btq,qhk->bthk", c_q)  # [B, T, H, K + R]
    q_nope, q_pe = q[..., : self.nope], q[..., self.nope:]
    ckv = linear(self, "kv_a_proj_with_mqa", "btd,dl->btl", a)  # [B, T, L + R]
    c_kv = self.kv_a_layernorm(ckv[..., : self.kv_lora_rank])
    cos, sin = rope.cos_sin(positions, self.rope_dim, self.rope_theta, self.rope_scaling)
    q_pe = rope.apply_interleaved(q_pe, cos, sin)
    k_pe = rope.apply_interleaved(ckv[..., self.kv_lora_rank:], cos, sin)  # [B, T, R]
    return q_nope, q_pe, c_kv, k_pe

  def __call__(self, a: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: jax.Array | None = None):
    """a [B, T, D] -> (y [B, T, D], updated latent cache or None). With a cache each token is
    written at (and attends up to) its position, negative positions are padding, and
    segment_ids is ignored."""
    a = a.astype(self.dtype)
    q_nope, q_pe, c_kv, k_pe = self._project(a, positions)
    if cache is None:
      o = self._attend_plain(q_nope, q_pe, c_kv, k_pe, positions, segment_ids)
    else:
      latent = jnp.concatenate([c_kv, k_pe], axis=-1).astype(cache.dtype)
      B, S = cache.shape[:2]
      slot = jnp.where(positions >= 0, positions, S)  # slot = position; padding falls off the end
      rows = jnp.broadcast_to(jnp.arange(B)[:, None], slot.shape)
      cache = cache.at[rows, slot].set(latent, mode="drop")
      o = self._attend_absorbed(q_nope, q_pe, cache, positions)
    y = linear(self, "dense", "bthv,hvd->btd", o)
    return y, cache

  def _attend_plain(self, q_nope, q_pe, c_kv, k_pe, positions, segment_ids):
    kv = linear(self, "kv_b_proj", "btl,lhk->bthk", c_kv)  # [B, T, H, K + V]
    k_nope, v = kv[..., : self.nope], kv[..., self.nope:]
    # Under a mesh of several devices: per device, on its rows and heads (parallel/islands.py).
    return islands.causal_attention(q_nope, k_nope, v, scale=self.scale, q_rope=q_pe, k_rope=k_pe,
                                    segment_ids=segment_ids, positions=positions, impl=self.impl)

  def _attend_absorbed(self, q_nope, q_pe, cache, positions):
    w = dense_kernel(self, "kv_b_proj")  # small: dequantised in XLA whatever linear_impl
    w_uk, w_uv = w[..., : self.nope], w[..., self.nope:]  # [L, H, K], [L, H, V]
    q_lat = jnp.einsum("bthk,lhk->bthl", q_nope, w_uk)  # [B, T, H, L]
    B, T, H, L = q_lat.shape
    S = cache.shape[1]
    blk = block_slots(B * T * H, S)
    # Only the blocks up to the largest position hold anything a query may see.
    n_blocks = jnp.minimum(jnp.max(positions) // blk + 1, -(-S // blk))

    def body(i, carry):
      m, l, acc = carry  # running max, normaliser [B, T, H] fp32; output [B, T, H, L] fp32
      # The last block is clamped to end at slot S; slots an earlier block covered are masked.
      start = jnp.minimum(i * blk, S - blk)
      lat = jax.lax.dynamic_slice_in_dim(cache, start, blk, axis=1).astype(self.dtype)
      c_kv, k_pe = lat[..., :L], lat[..., L:]  # [B, blk, L], [B, blk, R]
      s = (jnp.einsum("bthl,bsl->bths", q_lat, c_kv, preferred_element_type=jnp.float32)
           + jnp.einsum("bthr,bsr->bths", q_pe, k_pe, preferred_element_type=jnp.float32))
      slots = start + jnp.arange(blk)
      # A query at position p sees slots 0..p (slot s holds position s).
      see = (slots >= i * blk)[None, None] & (slots[None, None] <= positions[:, :, None])
      see = see[:, :, None]  # [B, T, 1, blk]
      s = jnp.where(see, s * self.scale, _NEG)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(see, jnp.exp(s - m_new[..., None]), 0.0)
      fix = jnp.exp(m - m_new)
      acc = acc * fix[..., None] + jnp.einsum("bths,bsl->bthl", p.astype(c_kv.dtype), c_kv,
                                              preferred_element_type=jnp.float32)
      return m_new, l * fix + p.sum(-1), acc

    init = (jnp.full((B, T, H), _NEG, jnp.float32), jnp.zeros((B, T, H), jnp.float32),
            jnp.zeros((B, T, H, L), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    o_lat = (acc / jnp.maximum(l, 1e-30)[..., None]).astype(self.dtype)
    return jnp.einsum("bthl,lhv->bthv", o_lat, w_uv)


def block_slots(rows: int, slots: int) -> int:
  """Cache slots per block of the absorbed attention for `rows` = B T H query rows: the largest
  power of two whose fp32 scores fit BLOCK_BYTES, at least MIN_BLOCK, at most the cache."""
  fit = max(1, BLOCK_BYTES // (4 * rows))
  return min(slots, max(MIN_BLOCK, 1 << (fit.bit_length() - 1)))
