"""Simple GLA (Lightning attention): S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

The public op `simple_gla` dispatches on `impl`:
* "reference": reference.py's recurrent form (a scan over tokens);
* "xla": reference.py's chunked form (a scan over chunks of `chunk_size`, Lightning Attention-2);
* "pallas": the GPU kernels of chunk.py (Mosaic GPU forward on an H100, Triton backward);
* "interpret": the same kernels interpreted (CPU tests);
* "auto": "pallas" on a GPU when both head dims are powers of two >= 16, else "xla".
`simple_gla_step` is the one-token decode step, with the same `impl` vocabulary: the reference
(XLA's fused update) or decode.py's Pallas kernel, which "auto" picks on a GPU up to
`DECODE_KERNEL_MAX_BATCH` rows (where it was faster: docs/kernels.md#simple_gla).
`simple_gla_prefix_state` is the state after a prefix of each row's tokens (ragged or
speculative decoding calls).
Semantics, layouts and numerics are those of `reference.py` (the spec; Lightning Attention-2,
arXiv 2401.04658, and fla's simple_gla).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.simple_gla.reference import (simple_gla_chunked, simple_gla_prefix_state,
                                                 simple_gla_recurrent, simple_gla_step as _step)
from pallas_kernels.simple_gla.decode import simple_gla_step_pallas

from pallas_kernels.simple_gla.chunk import simple_gla_pallas

IMPLS = ("auto", "reference", "xla", "pallas", "interpret")
# The decode kernel's "auto" range: on an H100 it took 16.3 against XLA's 21.9 us a step at batch
# 1, 20.6 against 21.1 at 16, and 111.8 against 101.4 at 64 (BENCHMARKS.md#decode).
DECODE_KERNEL_MAX_BATCH = 16


def resolve_impl(impl: str, head_dim: int, v_dim: int) -> str:
  """`impl` with "auto" resolved: the Pallas kernels on GPU when the head dims suit them, else
  the chunked reference."""
  if impl not in IMPLS:
    raise ValueError(f"unknown simple_gla impl {impl!r}; choose one of {IMPLS}")
  if impl != "auto":
    return impl
  pow2 = lambda n: n >= 16 and n & (n - 1) == 0
  if jax.default_backend() == "gpu" and pow2(head_dim) and pow2(v_dim):
    return "pallas"
  return "xla"


def _check(q, k, v, g, initial_state, segment_ids, chunk_size):
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, H, K], got shape {q.shape}")
  B, T, H, K = q.shape
  if k.shape != q.shape:
    raise ValueError(f"k shape {k.shape} must equal q shape {q.shape} ([B, T, H, K])")
  if v.ndim != 4 or v.shape[:3] != (B, T, H):
    raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got shape {v.shape}")
  if jnp.shape(g) not in ((H,), (B, T, H)):
    raise ValueError(f"g must be [H] = [{H}] or [B, T, H] = [{B}, {T}, {H}], "
                     f"got shape {jnp.shape(g)}")
  if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
    raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}, "
                     f"got shape {initial_state.shape}")
  if segment_ids is not None and segment_ids.shape != (B, T):
    raise ValueError(f"segment_ids must be [B, T] = {(B, T)}, got shape {segment_ids.shape}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def simple_gla(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None, chunk_size=64,
               impl="auto"):
  """Simple GLA over a sequence: returns (o [B, T, H, V] in q.dtype, final_state [B, H, K, V] fp32).

  q, k [B, T, H, K]; v [B, T, H, V]; g [H] (per-head constant) or [B, T, H] (per token), a
  log-decay <= 0; scale defaults to K ** -0.5; initial_state [B, H, K, V] feeds the first
  segment of each row; segment_ids [B, T] resets the state wherever the id changes.
  impl: see the module docstring.
  """
  impl = resolve_impl(impl, q.shape[-1], v.shape[-1])
  _check(q, k, v, g, initial_state, segment_ids, chunk_size)
  if impl in ("pallas", "interpret"):
    return simple_gla_pallas(q, k, v, g, scale=scale, initial_state=initial_state,
                             segment_ids=segment_ids, chunk_size=chunk_size,
                             interpret=impl == "interpret")
  if impl == "reference":
    return simple_gla_recurrent(q, k, v, g, scale=scale, initial_state=initial_state,
                                segment_ids=segment_ids)
  return simple_gla_chunked(q, k, v, g, scale=scale, initial_state=initial_state,
                            segment_ids=segment_ids, chunk_size=chunk_size)


def resolve_step_impl(impl: str, batch: int, head_dim: int, v_dim: int, per_head: bool) -> str:
  """The decode step's `impl` resolved: "pallas" / "interpret" run decode.py's kernel (a per-head
  g [H] only), "reference" / "xla" the reference; "auto" the kernel on a GPU for at most
  `DECODE_KERNEL_MAX_BATCH` rows with power-of-two head dims, else "xla"."""
  if impl not in IMPLS:
    raise ValueError(f"unknown simple_gla impl {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0
    fits = per_head and pow2(head_dim) and pow2(v_dim) and batch <= DECODE_KERNEL_MAX_BATCH
    return "pallas" if jax.default_backend() == "gpu" and fits else "xla"
  return impl


def simple_gla_step(q, k, v, g, state, *, scale=None, impl="xla"):
  """One decode step: q, k [B, H, K], v [B, H, V], g [H] or [B, H], state [B, H, K, V] fp32.

  Returns (o [B, H, V] in q.dtype, new_state [B, H, K, V] fp32); see `reference.simple_gla_step`.
  impl: `resolve_step_impl` (the kernel updates the state in place where the caller donates it).
  """
  if q.ndim != 3 or k.shape != q.shape:
    raise ValueError(f"q and k must both be [B, H, K], got shapes {q.shape} and {k.shape}")
  B, H, K = q.shape
  if v.ndim != 3 or v.shape[:2] != (B, H):
    raise ValueError(f"v must be [B, H, V] = [{B}, {H}, V], got shape {v.shape}")
  if jnp.shape(g) not in ((H,), (B, H)):
    raise ValueError(f"g must be [H] = [{H}] or [B, H] = [{B}, {H}], got shape {jnp.shape(g)}")
  if state.shape != (B, H, K, v.shape[-1]):
    raise ValueError(f"state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}, "
                     f"got shape {state.shape}")
  impl = resolve_step_impl(impl, B, K, v.shape[-1], jnp.shape(g) == (H,))
  if impl in ("pallas", "interpret"):
    if jnp.shape(g) != (H,):
      raise ValueError(f"the decode kernel takes a per-head decay g [H] = [{H}], got "
                       f"{jnp.shape(g)}")
    return simple_gla_step_pallas(q, k, v, g, state, scale=scale, interpret=impl == "interpret")
  return _step(q, k, v, g, state, scale=scale)


__all__ = ["DECODE_KERNEL_MAX_BATCH", "IMPLS", "resolve_impl", "resolve_step_impl", "simple_gla",
           "simple_gla_chunked", "simple_gla_prefix_state", "simple_gla_recurrent",
           "simple_gla_step", "simple_gla_step_pallas"]
