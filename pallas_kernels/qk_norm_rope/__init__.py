"""The Lightning layer's qkv cut, per-head QK RMSNorm and partial NeoX RoPE as one op (3.4.2-3).

`qk_norm_rope(qkv, wq, wk, cos, sin, eps=, dtype=, impl=)`:
* "pallas": kernel.py's Triton-lowered forward and backward (one read of qkv, one write of q, k,
  v; backward one read of qkv, dq, dk, dv and one write of d qkv), where the shape fits (heads
  a power of two); reference.py otherwise, with a warning. Without QK norm (wq = wk = None) it is
  the reference, silently: the model's norms are always on;
* "interpret": the same kernels in Pallas interpret mode (CPU tests);
* "reference" / "xla": reference.py under autodiff (no separate XLA form);
* "auto": "pallas" on a GPU for bf16 / fp16 compute, else "xla" (and the reference, silently,
  where the kernel does not apply).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from pallas_kernels.qk_norm_rope.kernel import (Config, check_config, qk_norm_rope_pallas,
                                               unsupported)
from pallas_kernels.qk_norm_rope.reference import apply_neox, qk_norm_rope_reference

IMPLS = ("auto", "reference", "xla", "pallas", "interpret")

__all__ = ["Config", "IMPLS", "apply_neox", "qk_norm_rope", "qk_norm_rope_pallas",
           "qk_norm_rope_reference"]


def qk_norm_rope(qkv, wq, wk, cos, sin, *, eps: float, dtype, impl: str = "auto",
                 config: Config | None = None):
  """qkv [B, T, 3, H, K]; wq, wk [K] (any float dtype) or both None; cos, sin [B, T, R/2] fp32
  (ling_jax.model.rope.cos_sin) -> (q, k, v), each [B, T, H, K] in `dtype` (reference.py's
  semantics). `config` overrides the kernel's block size and warps (benchmarks)."""
  if impl not in IMPLS:
    raise ValueError(f"unknown qk_norm_rope impl {impl!r}; choose one of {IMPLS}")
  if qkv.ndim != 5 or qkv.shape[2] != 3:
    raise ValueError(f"qkv must be [B, T, 3, H, K], got shape {qkv.shape}")
  B, T, _, H, K = qkv.shape
  half = cos.shape[-1]
  if cos.shape != (B, T, half) or sin.shape != cos.shape or not 0 < 2 * half <= K:
    raise ValueError(f"cos {cos.shape} and sin {sin.shape} must be [B, T, R/2] = [{B}, {T}, R/2]"
                     f" with 0 < R <= K = {K}")
  if (wq is None) != (wk is None):
    raise ValueError("wq and wk must both be given or both be None")
  if wq is not None and (wq.shape != (K,) or wk.shape != (K,)):
    raise ValueError(f"wq {wq.shape} and wk {wk.shape} must be [K] = [{K}]")
  dtype = jnp.dtype(dtype)
  on_gpu, asked = jax.default_backend() == "gpu", impl != "auto"
  if impl == "auto":
    impl = "pallas" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else "xla"
  cfg = (config or Config(eps=0.0, dtype=dtype))._replace(
      eps=float(eps), dtype=dtype, interpret=impl == "interpret")
  check_config(cfg)
  if impl in ("pallas", "interpret") and wq is not None:
    reason = unsupported(H, K, 2 * half)
    if reason is None:
      N = B * T
      q, k, v = qk_norm_rope_pallas(qkv.reshape(N, 3, H, K), wq, wk, cos.reshape(N, half),
                                    sin.reshape(N, half), cfg)
      return q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, H, K)
    if asked:
      warnings.warn(f"qk_norm_rope: the Pallas kernel does not apply ({reason}); "
                    "using the reference")
  return qk_norm_rope_reference(qkv, wq, wk, cos, sin, eps=eps, dtype=dtype)
