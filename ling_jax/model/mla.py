"""Multi-head latent attention (DeepSeek-V2/V3 MLA with q-LoRA), spec 3.5.

Two mathematically identical forms:
* plain (training / prefill without a cache): expand the latent c_kv through kv_b_proj into
  per-head k_nope and v, then causal softmax attention over [k_nope | k_pe]. `impl` picks how:
  "xla" materialises the fp32 [B, H, T, S] scores (the reference); "flash" runs jax's Pallas
  flash-attention kernel (jax.experimental.pallas.ops.gpu.attention: online softmax, segment
  ids, a fused Triton backward) with v zero-padded to the q/k head dim, which it needs;
  "flash_interpret" is the same in interpret mode (CPU tests); "cudnn" runs cuDNN's fused
  flash attention (Hopper+, bf16 / fp16) through jax's cuDNN bindings: unsegmented rows with the
  MLA head dims as they are (q/k 96, v 64 at ling_small), packed rows in cuDNN's packed (THD)
  layout, each document its own causal sequence, so no work goes to pairs across documents; a
  batch whose rows hold more documents than `CUDNN_SEGMENT_LADDER` allows takes the flash kernel
  instead (a `lax.switch`, exact either way). "auto" is "cudnn" on GPU for bf16 / fp16 where
  cuDNN >= 9.10 is found, else "flash", when the sequence length is a multiple of 128 and the
  q/k head dim at most 256; "xla" otherwise. The kernels mask by index (i >= j) within a
  segment, which equals the position mask because positions increase along each document;
* absorbed (decode): fold W_UK into the query and W_UV into the output, so attention runs on the
  576-value latent cache [c_kv (normed) 512 | k_pe (roped) 64] per token (spec 3.5, 5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax import axes as ax
from ling_jax.model import rope
from ling_jax.model.common import RMSNorm, param

_NEG = -1e30  # finite "minus infinity": a fully masked row stays finite instead of NaN
IMPLS = ("auto", "xla", "flash", "flash_interpret", "cudnn")
_FLASH_BLOCK = 128  # the kernel's default forward block (rows of q and of k)


class MultiLatentAttention(nnx.Module):
  """MLA with the checkpoint's names (`q_a_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, `dense`...)."""

  def __init__(self, *, hidden: int, heads: int, q_lora_rank: int | None, kv_lora_rank: int,
               qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, rope_theta: float,
               rope_scaling, eps: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, impl: str = "auto"):
    if impl not in IMPLS:
      raise ValueError(f"unknown MLA impl {impl!r}; choose one of {IMPLS}")
    self.impl = impl
    self.heads, self.kv_lora_rank = heads, kv_lora_rank
    self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    self.rope_theta, self.rope_scaling, self.dtype = rope_theta, rope_scaling, dtype
    self.scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5 * rope.yarn_softmax_scale(rope_scaling)
    qk = qk_nope_head_dim + qk_rope_head_dim
    mk = lambda *a, **k: param(rngs, *a, param_dtype, **k)
    if q_lora_rank is None:
      self.q_proj = mk((hidden, heads, qk), (ax.EMBED, ax.HEADS, ax.HEAD_DIM), fan_in=hidden)
      self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
    else:
      self.q_proj = None
      self.q_a_proj = mk((hidden, q_lora_rank), (ax.EMBED, ax.Q_LORA), fan_in=hidden)
      self.q_a_layernorm = RMSNorm(q_lora_rank, eps=eps, dtype=dtype, param_dtype=param_dtype)
      self.q_b_proj = mk((q_lora_rank, heads, qk), (ax.Q_LORA, ax.HEADS, ax.HEAD_DIM),
                         fan_in=q_lora_rank)
    self.kv_a_proj_with_mqa = mk((hidden, kv_lora_rank + qk_rope_head_dim), (ax.EMBED, ax.KV_LORA),
                                 fan_in=hidden)
    self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=eps, dtype=dtype, param_dtype=param_dtype)
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
               cache: jax.Array | None = None, cache_index=None, layer_idx=None):
    """a [B, T, D] -> (y [B, T, D], updated latent cache or None)."""
    del layer_idx  # MLA has no layer-dependent parameters
    a = a.astype(self.dtype)
    q_nope, q_pe, c_kv, k_pe = self._project(a, positions)
    if cache is None:
      o = self._attend_plain(q_nope, q_pe, c_kv, k_pe, positions, segment_ids)
    else:
      latent = jnp.concatenate([c_kv, k_pe], axis=-1).astype(cache.dtype)
      cache = jax.lax.dynamic_update_slice_in_dim(cache, latent, cache_index, axis=1)
      o = self._attend_absorbed(q_nope, q_pe, cache, positions)
    y = jnp.einsum("bthv,hvd->btd", o, self._w(self.dense))
    return y, cache

  def _plain_impl(self, T: int, dtype) -> str:
    if self.impl != "auto":
      return self.impl
    fits = self.nope + self.rope_dim <= FLASH_MAX_HEAD_DIM and self.v_dim <= FLASH_MAX_HEAD_DIM
    if jax.default_backend() != "gpu" or T % _FLASH_BLOCK or not fits:
      return "xla"
    return "cudnn" if dtype in (jnp.bfloat16, jnp.float16) and cudnn_available() else "flash"

  def _attend_plain(self, q_nope, q_pe, c_kv, k_pe, positions, segment_ids):
    kv = jnp.einsum("btl,lhk->bthk", c_kv, self._w(self.kv_b_proj))  # [B, T, H, K + V]
    k_nope, v = kv[..., : self.nope], kv[..., self.nope:]
    impl = self._plain_impl(q_nope.shape[1], q_nope.dtype)
    if impl == "cudnn":
      return _cudnn(q_nope, q_pe, k_nope, k_pe, v, segment_ids, self.scale)
    if impl != "xla":
      return _flash(q_nope, q_pe, k_nope, k_pe, v, segment_ids, self.scale,
                    interpret=impl == "flash_interpret")
    return attend_xla(q_nope, q_pe, k_nope, k_pe, v, positions, segment_ids, self.scale)

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
    p = _masked_softmax(scores * self.scale, mask[:, None])
    o_lat = jnp.einsum("bhts,bsl->bthl", p.astype(c_kv.dtype), c_kv)
    return jnp.einsum("bthl,lhv->bthv", o_lat, w_uv)


def _heads(q_nope, q_pe, k_nope, k_pe):
  """q [B, T, H, K + R] and k with the shared k_pe [B, T, R] broadcast over the heads."""
  H, R = q_nope.shape[2], k_pe.shape[-1]
  q = jnp.concatenate([q_nope, q_pe], axis=-1)
  k_pe = jnp.broadcast_to(k_pe[:, :, None], (*k_pe.shape[:2], H, R)).astype(k_nope.dtype)
  return q, jnp.concatenate([k_nope, k_pe], axis=-1)


def _one_head_dim(q, k, v):
  """q, k, v zero-padded to one head dim (the wider of q/k's and v's): the scores and the
  output's leading V columns are unchanged."""
  D = max(q.shape[-1], v.shape[-1])
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, D - x.shape[-1])))
  return pad(q), pad(k), pad(v)


def attend_xla(q_nope, q_pe, k_nope, k_pe, v, positions, segment_ids, scale: float):
  """Causal (by position, per segment) attention through materialised fp32 [B, H, T, S] scores."""
  scores = (jnp.einsum("bthk,bshk->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
            + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe, preferred_element_type=jnp.float32))
  mask = positions[:, :, None] >= positions[:, None, :]  # [B, T, S]
  if segment_ids is not None:
    mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
  p = _masked_softmax(scores * scale, mask[:, None])
  return jnp.einsum("bhts,bshv->bthv", p.astype(v.dtype), v)


# Block sizes by the kernel's padded head dim (benchmarks/mla_attention.py, H100). Up to 128
# (ling_small: 64 + 32): forward 128 x 128 (jax's default), backward 64 x 64, fwd+bwd 3.9 ms
# against 7.2 ms for jax's 32 x 32. At 256 (Ling-2.6-flash: 128 + 64) 128-row blocks need
# 320 KiB of shared memory, more than an H100 has: forward 64 x 64, backward 32 x 32.
FLASH_BLOCKS = {128: dict(block_q=128, block_k=128, block_q_dkv=64, block_kv_dkv=64,
                          block_q_dq=64, block_kv_dq=64),
                256: dict(block_q=64, block_k=64, block_q_dkv=32, block_kv_dkv=32,
                          block_q_dq=32, block_kv_dq=32)}
FLASH_MAX_HEAD_DIM = 256


def _flash(q_nope, q_pe, k_nope, k_pe, v, segment_ids, scale: float, *, interpret: bool = False,
           blocks: dict | None = None):
  """Causal (per segment) flash attention over [nope | rope] keys; [B, T, H, V] out.
  `blocks` overrides the FLASH_BLOCKS entries for this head dim (benchmarks)."""
  import warnings

  with warnings.catch_warnings():  # the module is deprecated in favour of tokamax (not on PyPI here)
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import attention

  V = v.shape[-1]
  q, k, v = _one_head_dim(*_heads(q_nope, q_pe, k_nope, k_pe), v)  # the kernel wants one
  T = q.shape[1]
  padded = max(64, 1 << (q.shape[-1] - 1).bit_length())
  if padded > FLASH_MAX_HEAD_DIM:
    raise ValueError(f"flash MLA supports q/k head dims up to {FLASH_MAX_HEAD_DIM}, got {q.shape[-1]}")
  base = FLASH_BLOCKS[max(128, padded)]
  sizes = {name: min(n, T) for name, n in {**base, **(blocks or {})}.items()}  # short rows: one block
  if any(T % n or n & (n - 1) for n in sizes.values()):
    raise ValueError(f"flash MLA needs power-of-two blocks that divide the sequence length {T} "
                     f"(a multiple of {_FLASH_BLOCK}, or a power of two below it); got {sizes}; "
                     "use impl='xla' (or 'auto')")
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  o = attention.mha(q, k, v.astype(q.dtype), seg, sm_scale=scale, causal=True,
                    block_sizes=attention.BlockSizes(**sizes),
                    interpret=interpret)
  return o[..., :V]


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """fp32 softmax with masked entries selected out by `where` (never multiplied by 0)."""
  scores = jnp.where(mask, scores, _NEG)
  return jax.nn.softmax(scores, axis=-1)


# cuDNN's packed layout is [B, M] sequence slots of up to T tokens, and its backward pays for
# every slot (H100, ling_small's shape, 16 documents a row: forward+backward 1.03 ms at M = 16,
# 1.43 at 32, 2.29 at 64, 3.91 at 128, the flash kernel 3.94; the growth fits zero-filling and
# converting an fp32 d q buffer of B M T H D). So M is picked per batch from this ladder, the
# smallest that holds every row's documents (a `lax.switch`; the branches share their residuals'
# buffers), and rows with more documents than the last rung take the flash kernel. The ladder
# stops at 32: with rungs up to 128 the small_pretrain step was slower (167.0k against 173.0k
# tokens/s) and took longer to compile, though those rungs never ran; the rung at 24 took the
# step's MLA time from 10.4 to 9.6 ms (synthetic data, ~17 documents a row).
CUDNN_SEGMENT_LADDER = (8, 16, 24, 32)


def cudnn_available() -> bool:
  """cuDNN >= 9.10 on a Hopper-or-later GPU: what `_cudnn` needs (MLA head dims, packing)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  try:
    return cudnn.check_cudnn_version() >= 91000 and cudnn.check_compute_capability("9.0")
  except RuntimeError:  # no cuDNN
    return False


def segment_offsets(segment_ids: jax.Array, max_segments: int):
  """cuDNN's packed-layout view of [B, T] segment ids (a document = one contiguous run of an id):
  offsets [B, M + 1] (each run's first index, then -1), lengths [B, M] (each run's length, then
  -1) and the run count [B] (int32; runs past M are cut off, so callers check count <= M)."""
  B, T = segment_ids.shape
  starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  count = starts.sum(1, dtype=jnp.int32)
  first = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments + 1, fill_value=T)[0])(starts)
  first = first.astype(jnp.int32)
  valid = jnp.arange(max_segments + 1) < count[:, None]
  lengths = jnp.where(valid[:, :-1], first[:, 1:] - first[:, :-1], -1)
  return jnp.where(valid, first, -1), lengths, count


def _cudnn(q_nope, q_pe, k_nope, k_pe, v, segment_ids, scale: float, *,
           ladder: tuple[int, ...] | None = None):
  """Causal (per segment) attention in cuDNN's fused flash kernel; [B, T, H, V] out. q/k keep
  their K + R head dim; unsegmented, v keeps its V (cuDNN's MLA mode). bf16 / fp16 only."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # jax.nn's wrapper has no packing

  if q_nope.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"cuDNN attention takes bf16 / fp16, got {q_nope.dtype}; use impl='flash'")
  T = q_nope.shape[1]
  if segment_ids is not None and T % _FLASH_BLOCK and T & (T - 1):
    raise ValueError(f"cuDNN MLA over segment ids falls back to the flash kernel past its ladder, "
                     f"which needs a sequence length divisible by {_FLASH_BLOCK} (or a power of "
                     f"two below it); got {T} (use impl='auto' or 'xla')")
  q, k = _heads(q_nope, q_pe, k_nope, k_pe)
  v = v.astype(q.dtype)
  if segment_ids is None:
    return cudnn.dot_product_attention(q, k, v, scale=scale, mask_type=cudnn.MaskType.CAUSAL)
  ladder = CUDNN_SEGMENT_LADDER if ladder is None else ladder
  offsets, lengths, count = segment_offsets(segment_ids, max(ladder, default=1))

  def packed(m: int):
    # jax turns token offsets into element offsets with q's (and k's) head dim and uses them for
    # v and the output too, so in the packed layout all three get one head dim (H100: a narrower
    # v gave wrong outputs in every document, relative error 0.70-1.9).
    qp, kp, vp = _one_head_dim(q, k, v)
    o = cudnn.dot_product_attention(
        qp, kp, vp, q_seqlen=lengths[:, :m], kv_seqlen=lengths[:, :m], q_offsets=offsets[:, :m + 1],
        kv_offsets=offsets[:, :m + 1], scale=scale, mask_type=cudnn.MaskType.PADDING_CAUSAL)
    return o[..., :v.shape[-1]]

  branches = [functools.partial(packed, m) for m in ladder]
  branches.append(lambda: _flash(q_nope, q_pe, k_nope, k_pe, v, segment_ids, scale))
  return jax.lax.switch(ladder_rung(count, ladder), branches)


def ladder_rung(count: jax.Array, ladder: tuple[int, ...]) -> jax.Array:
  """The index of the smallest rung of `ladder` that holds every row's document count, or
  len(ladder) (the flash kernel's branch) when none does."""
  return jnp.sum(jnp.asarray(ladder) < count.max())
