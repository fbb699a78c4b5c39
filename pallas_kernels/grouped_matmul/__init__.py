"""Grouped (ragged) matmul for dropless MoE: rows sorted by group, one weight matrix per group.

`grouped_matmul(lhs, rhs, group_sizes, impl=...)` is differentiable in lhs and rhs:
* "pallas": the Triton-lowered Pallas kernels of kernel.py (GPU);
* "interpret": the same kernels in interpret mode (CPU tests);
* "reference" / "xla": reference.py's masked einsum (O(G M K N); tests only; no separate XLA
  form);
* "auto": "pallas" on GPU, else "xla".

`pallas_kernels.grouped_matmul.mosaic.gmm` is the same product (rhs optionally transposed) as a
Mosaic GPU kernel: persistent, warp-specialized (a TMA producer, two wgmma consumers). On an H100
it ran 4-29% faster than the Triton gmm at 4096-16384 tokens (BENCHMARKS.md#grouped_matmul-kernels);
at 256 tokens, timed by device time, it was 12-32% slower.

FP8 expert weights (`Fp8Weight`, fp8.py: float8_e4m3fn values with block or channel scales) go
wherever a weight array goes in `grouped_matmul`, `gmm` and `gmm_glu`: dequantised tile by tile
inside the Triton kernels, forward only.

`sort_by_group` (sort.py) orders the MoE's routed assignments by expert in one kernel: the
dispatch's (order, inverse, sizes), where XLA takes a handful of launches.
"""

from __future__ import annotations

import jax

from pallas_kernels.grouped_matmul.kernel import (Config, gmm, gmm_glu, gmm_glu_pallas, gmm_pallas,
                                                  gmm_sum_pallas, tgmm_pallas, tuned_config)
from pallas_kernels.grouped_matmul.fp8 import Fp8Weight, dequantize
from pallas_kernels.grouped_matmul.sort import sort_by_group
from pallas_kernels.grouped_matmul.visits import visit_table
from pallas_kernels.grouped_matmul.reference import (gmm_glu_reference, gmm_reference, row_groups,
                                                     tgmm_reference)

IMPLS = ("auto", "reference", "xla", "pallas", "interpret")

__all__ = ["Config", "IMPLS", "gmm", "gmm_glu", "gmm_glu_pallas", "gmm_glu_reference", "gmm_pallas",
           "gmm_reference", "gmm_sum_pallas", "grouped_matmul", "row_groups", "sort_by_group",
           "tgmm_pallas", "tgmm_reference", "tuned_config", "visit_table",
           "Fp8Weight", "dequantize"]  # FP8 weights (fp8.py)


def resolve_impl(impl: str) -> str:
  """`impl` with "auto" resolved for this backend."""
  if impl not in IMPLS:
    raise ValueError(f"unknown grouped_matmul impl {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl


def grouped_matmul(lhs, rhs, group_sizes, *, impl: str = "auto", config: Config | None = None):
  """out [M, N] = lhs [M, K] @ rhs[g] ([G, K, N]) for the rows of each group g.

  group_sizes [G] (int) counts the rows of each group in order; rows past their sum give 0.
  rhs may be an Fp8Weight (no gradient then).
  """
  if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f"want lhs [M, K], rhs [G, K, N], group_sizes [G]; got {lhs.shape}, "
                     f"{rhs.shape}, {group_sizes.shape}")
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"lhs {lhs.shape} and rhs {rhs.shape} disagree on K")
  impl = resolve_impl(impl)
  if impl in ("reference", "xla"):
    return gmm_reference(lhs, rhs, group_sizes)
  cfg = (config or Config())._replace(interpret=impl == "interpret")
  return gmm(lhs, rhs, group_sizes, cfg)
