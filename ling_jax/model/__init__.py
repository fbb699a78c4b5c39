"""Flax NNX modules of Ling-2.6 (spec section 3)."""

from ling_jax.model.ling import LingForCausalLM, LingOutput

__all__ = ["LingForCausalLM", "LingOutput"]
