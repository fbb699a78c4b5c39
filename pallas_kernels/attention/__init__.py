"""Causal softmax attention with optional segment ids (packed documents), [B, T, H, K] layout.

`causal_attention(q, k, v, scale=, q_rope=, k_rope=, segment_ids=, positions=, impl=)`, with
reference.py's semantics (an MLA layer passes its decoupled RoPE parts as q_rope / k_rope):
* "reference" / "xla": reference.py, the fp32 [B, H, T, S] scores materialised (no separate XLA
  form);
* "pallas": jax's Pallas flash-attention kernel (flash.py), q/k and v padded to one head dim;
* "interpret": the same kernel in Pallas interpret mode (CPU tests);
* "cudnn": cuDNN's fused flash attention (cudnn.py; Hopper+, bf16 / fp16), packed rows in its
  packed layout, past `CUDNN_SEGMENT_LADDER` documents a row the flash kernel;
* "auto": on a GPU, when the sequence length is a multiple of 128 and the head dims fit the
  flash kernel (at most 256 in bf16, 128 in fp32: `flash_width`), "cudnn" for bf16 / fp16 where
  cuDNN >= 9.10 is found, else "pallas"; "xla" otherwise.
The kernels mask by index within a segment; `positions` (default 0 .. T-1) only feed the
reference's mask, which equals it where positions increase along each document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.cudnn import (CUDNN_SEGMENT_LADDER, cudnn_attention, cudnn_available,
                                            ladder_rung, segment_offsets)
from pallas_kernels.attention.flash import (FLASH_BLOCK, FLASH_BLOCKS, FLASH_MAX_HEAD_DIM,
                                            flash_attention, flash_width)
from pallas_kernels.attention.reference import attention_reference, masked_softmax

IMPLS = ("auto", "reference", "xla", "pallas", "interpret", "cudnn")

__all__ = ["CUDNN_SEGMENT_LADDER", "FLASH_BLOCKS", "FLASH_MAX_HEAD_DIM", "IMPLS",
           "attention_reference", "causal_attention", "cudnn_attention", "cudnn_available",
           "flash_attention", "flash_width", "ladder_rung", "masked_softmax", "resolve_impl",
           "segment_offsets"]


def resolve_impl(impl: str, seq_len: int, qk_dim: int, v_dim: int, dtype) -> str:
  """`impl` with "auto" resolved for this shape and compute dtype on this backend."""
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
  if impl != "auto":
    return impl
  fits = flash_width(qk_dim, v_dim, dtype) <= FLASH_MAX_HEAD_DIM
  if jax.default_backend() != "gpu" or seq_len % FLASH_BLOCK or not fits:
    return "xla"
  return "cudnn" if dtype in (jnp.bfloat16, jnp.float16) and cudnn_available() else "pallas"


def _check(q, k, v, q_rope, k_rope, segment_ids, positions):
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f"q and k must both be [B, T, H, K], got shapes {q.shape} and {k.shape}")
  B, T, H, _ = q.shape
  if v.ndim != 4 or v.shape[:3] != (B, T, H):
    raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got shape {v.shape}")
  if (q_rope is None) != (k_rope is None):
    raise ValueError("q_rope and k_rope must both be given or both be None")
  R = None if q_rope is None else q_rope.shape[-1]
  if q_rope is not None and (q_rope.shape[:3] != (B, T, H) or k_rope.shape != (B, T, R)):
    raise ValueError(f"q_rope {q_rope.shape} and k_rope {k_rope.shape} must be [B, T, H, R] and "
                     f"[B, T, R] with B, T, H = {B}, {T}, {H}")
  for name, ids in (("segment_ids", segment_ids), ("positions", positions)):
    if ids is not None and ids.shape != (B, T):
      raise ValueError(f"{name} must be [B, T] = {(B, T)}, got shape {ids.shape}")


def causal_attention(q, k, v, *, scale: float, q_rope=None, k_rope=None, segment_ids=None,
                     positions=None, impl: str = "auto"):
  """q, k [B, T, H, K], v [B, T, H, V] (q_rope [B, T, H, R], k_rope [B, T, R] or both None),
  segment_ids / positions [B, T] int or None -> [B, T, H, V] in v's dtype (q's for cuDNN)."""
  _check(q, k, v, q_rope, k_rope, segment_ids, positions)
  R = 0 if q_rope is None else q_rope.shape[-1]
  impl = resolve_impl(impl, q.shape[1], q.shape[-1] + R, v.shape[-1], q.dtype)
  inputs = dict(scale=scale, q_rope=q_rope, k_rope=k_rope, segment_ids=segment_ids)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, **inputs)
  if impl in ("pallas", "interpret"):
    return flash_attention(q, k, v, interpret=impl == "interpret", **inputs)
  return attention_reference(q, k, v, positions=positions, **inputs)
