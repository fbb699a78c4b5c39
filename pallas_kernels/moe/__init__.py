"""Routed experts of a dropless MoE layer: each token's top-X SwiGLU experts, weighted and summed.

`routed_experts(x, expert_ids, weights, w_gate, w_up, w_down, impl=)` -> [N, D] fp32, with
reference.py's value:
* "reference": reference.py, every expert on every token (O(tokens x experts); tests);
* "xla": blocked.py, assignments sorted by expert and padded to blocks, a blocked matmul;
* "pallas": grouped.py, assignments sorted by expert (one Pallas kernel where it fits) and the
  grouped-matmul kernels over the ragged groups (Triton, and Mosaic GPU where `tuned_config`
  puts them), unpadded;
* "interpret": the same kernels in Pallas interpret mode, XLA's counting sort (CPU tests);
* "auto": "pallas" on a GPU, "xla" elsewhere.
`config` replaces the grouped-matmul tiles `tuned_config` picks for the shape ("pallas",
"interpret").
"""

from __future__ import annotations

import jax

from pallas_kernels.grouped_matmul import Config
from pallas_kernels.moe import grouped
from pallas_kernels.moe.blocked import routed_experts_blocked
from pallas_kernels.moe.grouped import routed_experts_grouped, sort_by_expert
from pallas_kernels.moe.reference import routed_experts_reference

IMPLS = ("auto", "reference", "xla", "pallas", "interpret")

__all__ = ["IMPLS", "resolve_impl", "routed_experts", "routed_experts_blocked",
           "routed_experts_grouped", "routed_experts_reference", "sort_by_expert"]


def resolve_impl(impl: str) -> str:
  """`impl` with "auto" resolved for this backend."""
  if impl not in IMPLS:
    raise ValueError(f"unknown MoE impl {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl


def routed_experts(x, expert_ids, weights, w_gate, w_up, w_down, *, impl: str = "auto",
                   config: Config | None = None):
  """x [N, D], expert_ids [N, X] int32 in [0, E), weights [N, X] fp32, w_gate / w_up [E, D, F],
  w_down [E, F, D] -> [N, D] fp32: sum_x weights[n, x] * SwiGLU expert expert_ids[n, x] (x[n])."""
  N, D = x.shape
  E, _, F = w_gate.shape
  if expert_ids.ndim != 2 or expert_ids.shape[0] != N or weights.shape != expert_ids.shape:
    raise ValueError(f"expert_ids {expert_ids.shape} and weights {weights.shape} must both be "
                     f"[N, X] with N = {N}")
  if w_gate.shape != (E, D, F) or w_up.shape != (E, D, F) or w_down.shape != (E, F, D):
    raise ValueError(f"w_gate {w_gate.shape}, w_up {w_up.shape}, w_down {w_down.shape} must be "
                     f"[E, D, F], [E, D, F], [E, F, D] with D = {D}")
  impl = resolve_impl(impl)
  args = (x, expert_ids, weights, w_gate, w_up, w_down)
  if impl == "reference":
    return routed_experts_reference(*args)
  if impl == "xla":
    return routed_experts_blocked(*args)
  # Through the module attribute, so a test can swap the grouped matmuls (flop counting).
  return grouped.routed_experts_grouped(*args, config=config, interpret=impl == "interpret")
