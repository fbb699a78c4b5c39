"""Causal attention in cuDNN's fused flash kernel (Hopper+, bf16 / fp16) through jax's bindings.

Unsegmented rows keep the head dims as they are (q/k 96, v 64 at ling_small: cuDNN's MLA mode);
packed rows go in cuDNN's packed (THD) layout, each document its own causal sequence, so no work
goes to pairs across documents. A batch whose rows hold more documents than
`CUDNN_SEGMENT_LADDER` allows takes the flash kernel instead (a `lax.switch`, exact either way).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.attention.flash import FLASH_BLOCK, flash_attention, join_rope, one_head_dim

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
  """cuDNN >= 9.10 on a Hopper-or-later GPU: what `cudnn_attention` needs (MLA head dims,
  packing)."""
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


def ladder_rung(count: jax.Array, ladder: tuple[int, ...]) -> jax.Array:
  """The index of the smallest rung of `ladder` that holds every row's document count, or
  len(ladder) (the flash kernel's branch) when none does."""
  return jnp.sum(jnp.asarray(ladder) < count.max())


def cudnn_attention(q, k, v, *, scale: float, q_rope=None, k_rope=None, segment_ids=None,
                    ladder: tuple[int, ...] | None = None):
  """Causal (per segment) attention in cuDNN's fused flash kernel; [B, T, H, V] out. q/k keep
  their head dim; unsegmented, v keeps its own (cuDNN's MLA mode). bf16 / fp16 only."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # jax.nn's wrapper has no packing

  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"cuDNN attention takes bf16 / fp16, got {q.dtype}; use impl='pallas'")
  T = q.shape[1]
  if segment_ids is not None and T % FLASH_BLOCK and T & (T - 1):
    raise ValueError(f"cuDNN attention over segment ids falls back to the flash kernel past its "
                     f"ladder, which needs a sequence length divisible by {FLASH_BLOCK} (or a "
                     f"power of two below it); got {T} (use impl='auto' or 'xla')")
  qj, kj = join_rope(q, k, q_rope, k_rope)
  vq = v.astype(qj.dtype)
  if segment_ids is None:
    return cudnn.dot_product_attention(qj, kj, vq, scale=scale, mask_type=cudnn.MaskType.CAUSAL)
  ladder = CUDNN_SEGMENT_LADDER if ladder is None else ladder
  offsets, lengths, count = segment_offsets(segment_ids, max(ladder, default=1))

  def packed(m: int):
    # jax turns token offsets into element offsets with q's (and k's) head dim and uses them for
    # v and the output too, so in the packed layout all three get one head dim (H100: a narrower
    # v gave wrong outputs in every document, relative error 0.70-1.9).
    qp, kp, vp = one_head_dim(qj, kj, vq)
    o = cudnn.dot_product_attention(
        qp, kp, vp, q_seqlen=lengths[:, :m], kv_seqlen=lengths[:, :m], q_offsets=offsets[:, :m + 1],
        kv_offsets=offsets[:, :m + 1], scale=scale, mask_type=cudnn.MaskType.PADDING_CAUSAL)
    return o[..., :vq.shape[-1]]

  branches = [functools.partial(packed, m) for m in ladder]
  branches.append(lambda: flash_attention(q, k, v, scale=scale, q_rope=q_rope, k_rope=k_rope,
                                          segment_ids=segment_ids))
  return jax.lax.switch(ladder_rung(count, ladder), branches)
