"""Causal attention in jax's Pallas flash-attention kernel (Triton on the GPU, or interpreted).

`jax.experimental.pallas.ops.gpu.attention.mha`: online softmax, segment ids, a fused Triton
backward. It wants one head dim for q, k and v, so the shared RoPE key is broadcast over the heads
and joined to k (and q_rope to q), and the narrower of q/k and v is zero-padded to the other's
dim (the scores and v's leading columns of the output are unchanged). It masks by index (i >= j)
within a segment, which equals reference.py's position mask because positions increase along
each document.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

# Block sizes by the kernel's padded head dim (benchmarks/mla_attention.py, H100). Up to 128
# (ling_small: 64 + 32): forward 128 x 128 (jax's default), backward 64 x 64, fwd+bwd 3.9 ms
# against 7.2 ms for jax's 32 x 32. At 256 (Ling-2.6-flash: 128 + 64) 128-row blocks need
# 320 KiB of shared memory, more than an H100 has: forward 64 x 64, backward 32 x 32.
# Shared memory grows with bytes, so the table is keyed by the head's width in bf16 terms
# (`flash_width`): an fp32 head of 128 takes the 256 row. ling_small's fp32 forward asked an H100
# for 256 KiB (2026-12-07; 227 KiB there), most likely these tiles: k and v, two stages, 4 x 64 KiB.
# With this table the kernel's fp32 GPU test at ling_small's head passes (H200, 2026-12-07).
FLASH_BLOCKS = {128: dict(block_q=128, block_k=128, block_q_dkv=64, block_kv_dkv=64,
                          block_q_dq=64, block_kv_dq=64),
                256: dict(block_q=64, block_k=64, block_q_dkv=32, block_kv_dkv=32,
                          block_q_dq=32, block_kv_dq=32)}
FLASH_MAX_HEAD_DIM = 256  # the widest head (in bf16 terms, `flash_width`) the table covers
FLASH_BLOCK = 128  # the kernel's default forward block (rows of q and of k)


def flash_width(qk_dim: int, v_dim: int, dtype) -> int:
  """The kernel's head dim (the wider of q/k's and v's, padded to a power of two >= 64) scaled by
  the element size against bf16's: the key of FLASH_BLOCKS."""
  padded = max(64, 1 << (max(qk_dim, v_dim) - 1).bit_length())
  return padded * jnp.dtype(dtype).itemsize // 2


def join_rope(q, k, q_rope=None, k_rope=None):
  """q [B, T, H, K + R] and k with the shared k_rope [B, T, R] broadcast over the heads (q, k as
  they are without RoPE parts)."""
  if q_rope is None:
    return q, k
  H, R = q.shape[2], k_rope.shape[-1]
  q = jnp.concatenate([q, q_rope], axis=-1)
  k_rope = jnp.broadcast_to(k_rope[:, :, None], (*k_rope.shape[:2], H, R)).astype(k.dtype)
  return q, jnp.concatenate([k, k_rope], axis=-1)


def one_head_dim(q, k, v):
  """q, k, v zero-padded to one head dim (the wider of q/k's and v's): the scores and the
  output's leading V columns are unchanged."""
  D = max(q.shape[-1], v.shape[-1])
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, D - x.shape[-1])))
  return pad(q), pad(k), pad(v)


def flash_attention(q, k, v, *, scale: float, q_rope=None, k_rope=None, segment_ids=None,
                    interpret: bool = False, blocks: dict | None = None):
  """Causal (per segment) flash attention; [B, T, H, V] out. `blocks` overrides the
  FLASH_BLOCKS entries for this head dim (benchmarks)."""
  with warnings.catch_warnings():  # the module is deprecated in favour of tokamax (not on PyPI here)
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import attention

  V = v.shape[-1]
  q, k, v = one_head_dim(*join_rope(q, k, q_rope, k_rope), v)  # the kernel wants one
  T = q.shape[1]
  width = flash_width(q.shape[-1], V, q.dtype)
  if width > FLASH_MAX_HEAD_DIM:
    raise ValueError(f"flash attention supports head dims up to {FLASH_MAX_HEAD_DIM} in bf16 "
                     f"({FLASH_MAX_HEAD_DIM // 2} in fp32), got {q.shape[-1]} in {q.dtype}")
  base = FLASH_BLOCKS[max(128, width)]
  sizes = {name: min(n, T) for name, n in {**base, **(blocks or {})}.items()}  # short rows: one block
  if any(T % n or n & (n - 1) for n in sizes.values()):
    raise ValueError(f"flash attention needs power-of-two blocks that divide the sequence length "
                     f"{T} (a multiple of {FLASH_BLOCK}, or a power of two below it); got {sizes};"
                     " use impl='xla' (or 'auto')")
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  o = attention.mha(q, k, v.astype(q.dtype), seg, sm_scale=scale, causal=True,
                    block_sizes=attention.BlockSizes(**sizes),
                    interpret=interpret)
  return o[..., :V]
