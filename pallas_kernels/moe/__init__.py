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
"interpret"). The weights may be `Fp8Weight`s (pallas_kernels/grouped_matmul/fp8.py): the kernels
read them as they are, "reference" and "xla" dequantise them to x's dtype first. `empty=True` lets
an id equal E: an empty slot that contributes nothing (the expert-parallel layer's slots of
experts on other devices). `expert_load` counts the assignments per expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import Config, Fp8Weight, dequantize
from pallas_kernels.moe import grouped
from pallas_kernels.moe.blocked import routed_experts_blocked
from pallas_kernels.moe.grouped import routed_experts_grouped, sort_by_expert
from pallas_kernels.moe.reference import routed_experts_reference

IMPLS = ("auto", "reference", "xla", "pallas", "interpret")

__all__ = ["IMPLS", "expert_load", "resolve_impl", "routed_experts", "routed_experts_blocked",
           "routed_experts_grouped", "routed_experts_reference", "sort_by_expert"]


def resolve_impl(impl: str) -> str:
  """`impl` with "auto" resolved for this backend."""
  if impl not in IMPLS:
    raise ValueError(f"unknown MoE impl {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl


def expert_load(idx: jax.Array, num_experts: int) -> jax.Array:
  """Assignments per expert [E] int32 from expert ids [..., X]: a compare-and-count, not
  bincount, whose scatter-add into E counters serialises on them on a GPU."""
  return (idx.reshape(-1, 1) == jnp.arange(num_experts, dtype=idx.dtype)).sum(0, dtype=jnp.int32)


def routed_experts(x, expert_ids, weights, w_gate, w_up, w_down, *, impl: str = "auto",
                   config: Config | None = None, empty: bool = False):
  """x [N, D], expert_ids [N, X] int32 in [0, E), weights [N, X] fp32, w_gate / w_up [E, D, F],
  w_down [E, F, D] -> [N, D] fp32: sum_x weights[n, x] * SwiGLU expert expert_ids[n, x] (x[n]).

  empty: expert_ids may also equal E, an empty slot whose weight is 0 and which contributes
  nothing. The grouped kernels ("pallas", "interpret") sort such slots past the experts' groups,
  where they cost no matmul; the other forms compute them with expert 0 and weight 0 ("xla": its
  blocks are static, so that costs no more; "reference": every expert runs on every token
  anyway)."""
  N, D = x.shape
  E, _, F = w_gate.shape
  if expert_ids.ndim != 2 or expert_ids.shape[0] != N or weights.shape != expert_ids.shape:
    raise ValueError(f"expert_ids {expert_ids.shape} and weights {weights.shape} must both be "
                     f"[N, X] with N = {N}")
  if w_gate.shape != (E, D, F) or w_up.shape != (E, D, F) or w_down.shape != (E, F, D):
    raise ValueError(f"w_gate {w_gate.shape}, w_up {w_up.shape}, w_down {w_down.shape} must be "
                     f"[E, D, F], [E, D, F], [E, F, D] with D = {D}")
  impl = resolve_impl(impl)
  if impl in ("reference", "xla"):
    w_gate, w_up, w_down = (dequantize(w, x.dtype) if isinstance(w, Fp8Weight) else w
                            for w in (w_gate, w_up, w_down))
  if empty and impl not in ("pallas", "interpret"):
    none = expert_ids >= E
    expert_ids = jnp.where(none, 0, expert_ids)
    weights = jnp.where(none, jnp.zeros((), weights.dtype), weights)
  args = (x, expert_ids, weights, w_gate, w_up, w_down)
  if impl == "reference":
    return routed_experts_reference(*args)
  if impl == "xla":
    return routed_experts_blocked(*args)
  # Through the module attribute, so a test can swap the grouped matmuls (flop counting).
  return grouped.routed_experts_grouped(*args, config=config, interpret=impl == "interpret",
                                        empty=empty)
