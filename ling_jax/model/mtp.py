"""The multi-token-prediction layer `model.layers.{L}`: predicts token t+2.

docs/architecture.md §3.9.

x = eh_proj([enorm(E[token_{t+1}]) | hnorm(h_t)]) with h_t the main stack output after the final
norm (docs/architecture.md §6.6), then an MLA + MoE decoder layer and `final_layernorm`; logits come
from the shared lm_head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax import axes as ax
from ling_jax.model.common import RMSNorm
from ling_jax.model.decoder import DecoderLayer
from ling_jax.model.linear import add_linear, linear
from ling_jax.model.settings import ExpertWeights


class MTPLayer(nnx.Module):
  """weights and linear_impl: how eh_proj is held and run (model/linear.py)."""

  def __init__(self, layer: DecoderLayer, hidden: int, *, eps: float, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, norm_impl: str = "auto",
               weights: ExpertWeights = ExpertWeights(), linear_impl: str = "auto"):
    self.dtype, self.weights, self.linear_impl = dtype, weights, linear_impl
    self.layer = layer
    norm = dict(eps=eps, dtype=dtype, param_dtype=param_dtype, impl=norm_impl)
    self.enorm = RMSNorm(hidden, **norm)
    self.hnorm = RMSNorm(hidden, **norm)
    # Input rows 0..D-1 act on enorm(embedding), D..2D-1 on hnorm(hidden) (docs/architecture.md
    # §4.2).
    add_linear(self, "eh_proj", rngs, (2 * hidden, hidden), (ax.EMBED, ax.EMBED), param_dtype,
               n_in=1, weights=weights)
    self.final_layernorm = RMSNorm(hidden, **norm)

  def __call__(self, hidden: jax.Array, next_embeds: jax.Array, *, positions, segment_ids=None,
               cache=None):
    """hidden, next_embeds [B, T, D] -> (normed MTP hidden [B, T, D], cache, expert load)."""
    x = jnp.concatenate([self.enorm(next_embeds), self.hnorm(hidden)], axis=-1)
    x = linear(self, "eh_proj", "btd,de->bte", x)
    h, cache, load = self.layer(x, positions=positions, segment_ids=segment_ids, cache=cache)
    return self.final_layernorm(h), cache, load
