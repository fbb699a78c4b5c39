"""Rematerialisation: the named `jax.checkpoint` policies and the checkpoint of one block.

The setting is `settings.Remat(policy, scope)`: a name of `REMAT` and the blocks it applies to.
The backward pass then keeps only the blocks' inputs plus what the policy saves, and recomputes
the rest one block at a time.
"""

from __future__ import annotations

import math

import jax
from flax import nnx


def dots_no_scores_saveable(prim, *avals, **params) -> bool:
  """Save the matmuls that contract over >= 256 elements: the projections, expert and output
  matmuls (>= 512 FLOPs to recompute each saved element), not the attention scores QK^T, which
  contract over one head's 32-128 dims but are [T, T] per head: the most memory per FLOP. Also
  save Pallas kernels' outputs (the GPU's Lightning and grouped-matmul kernels): no dot_general
  is visible inside them, and recomputing one costs its whole forward."""
  if prim.name == "pallas_call":
    return True
  if prim is not jax.lax.dot_general_p:
    return False
  (contract, _), _ = params["dimension_numbers"]
  return math.prod(avals[0].shape[d] for d in contract) >= 256


# Named jax.checkpoint policies for per-layer (or per-group) remat: what the backward pass keeps
# from each checkpointed block; everything else is recomputed from the block's input.
#   none            no checkpoint: every residual is kept (fastest, most memory)
#   full            keep nothing but the block's input (recompute the whole block)
#   dots            keep matmul outputs; recompute norms, SwiGLU, softmax, gathers and the like
#   dots_no_batch   keep only matmuls without batch dims (neither attention scores nor the
#                   sorted MoE's expert matmuls, which run batched over blocks)
#   dots_no_scores  keep the deep matmuls (`dots_no_scores_saveable`): dots without the [T, T]
#                   attention scores
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_no_scores": dots_no_scores_saveable,
}
def checkpointed(module: nnx.Module, *args, policy: str, prevent_cse: bool = True, **kwargs):
  """`module(*args, **kwargs)`, under `jax.checkpoint` with the named `policy` unless it is
  "none". `args` and `kwargs` are pytrees of arrays (or None); the module's state goes in as an
  explicit argument so its gradient flows through the checkpoint."""
  if policy == "none":
    return module(*args, **kwargs)
  graphdef, state = nnx.split(module)

  def pure(state, args, kwargs):
    return nnx.merge(graphdef, state)(*args, **kwargs)

  return jax.checkpoint(pure, policy=REMAT[policy], prevent_cse=prevent_cse)(state, args, kwargs)
