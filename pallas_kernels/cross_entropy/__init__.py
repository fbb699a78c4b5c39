"""Softmax cross-entropy with its gradient from given logits, in one read (the LM head's loss).

`cross_entropy(logits, targets, mask, grad_dtype=, impl=)` -> (g, lse, ce), reference.py's values:
* "pallas": kernel.py's Triton-lowered kernel (GPU): one HBM read of the fp32 logits, one write
  of g; any C and V (masked tails);
* "interpret": the same kernel in interpret mode (CPU tests);
* "reference" / "xla": reference.py (XLA reads the logits more than once; no separate XLA form);
* "auto": "pallas" on a GPU, else "xla".
It returns the gradient rather than being differentiable: `ling_jax/train/loss.py` forms the
head's gradient in its forward pass (fused linear cross-entropy), chunk by chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.cross_entropy.kernel import Config, cross_entropy_pallas
from pallas_kernels.cross_entropy.reference import cross_entropy_reference

IMPLS = ("auto", "reference", "xla", "pallas", "interpret")

__all__ = ["Config", "IMPLS", "cross_entropy", "cross_entropy_pallas", "cross_entropy_reference",
           "resolve_impl"]


def resolve_impl(impl: str) -> str:
  """`impl` with "auto" resolved for this backend."""
  if impl not in IMPLS:
    raise ValueError(f"unknown cross_entropy impl {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl


def cross_entropy(logits, targets, mask, *, grad_dtype=jnp.bfloat16, impl: str = "auto",
                  config: Config | None = None):
  """logits [C, V], targets [C] int in [0, V), mask [C] -> (g = d ce.sum() / d logits [C, V] in
  grad_dtype (None when grad_dtype is None), lse [C] fp32, ce = mask * (lse - target logit) [C]
  fp32)."""
  impl = resolve_impl(impl)
  if impl in ("reference", "xla"):
    return cross_entropy_reference(logits, targets, mask, grad_dtype=grad_dtype)
  cfg = (config or Config())._replace(interpret=impl == "interpret")
  return cross_entropy_pallas(logits, targets, mask, cfg, grad_dtype=grad_dtype)
