"""RMSNorm (docs/architecture.md §3.2), plain, grouped (GroupRMSNorm) and per head (QK norm).

`rms_norm(x, w, eps=, dtype=, groups=, impl=)`:
* "pallas": kernel.py's Triton-lowered forward and backward (GPU), where the shape fits (slice
  width a power of two >= 16, rows a multiple of the row block); reference.py otherwise;
* "interpret": the same kernels in interpret mode (CPU tests);
* "reference" / "xla": reference.py under autodiff (no separate XLA form);
* "auto": "xla", on a GPU too: in a ling_small train step on an H100 the Pallas kernels halve
  the norms' own time, but XLA can no longer fuse the residual adds, gradient sums, RoPE and
  gates into them, and the step is no faster (BENCHMARKS.md).
"""

from __future__ import annotations

import math

import jax

from pallas_kernels.rms_norm.kernel import Config, rms_norm_pallas, supported
from pallas_kernels.rms_norm.reference import rms_norm_reference, rms_normalize

IMPLS = ("auto", "reference", "xla", "pallas", "interpret")

__all__ = ["Config", "IMPLS", "rms_norm", "rms_norm_pallas", "rms_norm_reference", "rms_normalize"]


def rms_norm(x, w, *, eps: float, dtype, groups: int = 1, impl: str = "auto"):
  """x [..., D], w [groups, D / groups] (or [D] for one group) -> w * dtype(x / rms(x)) per
  slice, [..., D] in `dtype` (reference.py's semantics)."""
  if impl not in IMPLS:
    raise ValueError(f"unknown rms_norm impl {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    impl = "xla"
  *lead, D = x.shape
  if D % groups:
    raise ValueError(f"the last axis {D} does not split into {groups} groups")
  W = D // groups
  if w.size != D:
    raise ValueError(f"weight {w.shape} does not match the last axis {D}")
  cfg = Config(eps=float(eps), dtype=jax.numpy.dtype(dtype), groups=groups,
               interpret=impl == "interpret")
  N = math.prod(lead)
  if impl in ("reference", "xla") or not supported(N, W, cfg):
    return rms_norm_reference(x, w, eps=eps, dtype=dtype, groups=groups)
  y = rms_norm_pallas(x.reshape(N, D), w.reshape(groups, W), cfg)
  return y.reshape(*lead, D)
