"""Flax NNX modules of Ling-2.6 (spec section 3)."""

from ling_jax.model.kernels import Kernels
from ling_jax.model.ling import LingForCausalLM, LingOutput, with_kernels
from ling_jax.model.remat import Remat

__all__ = ["Kernels", "LingForCausalLM", "LingOutput", "Remat", "with_kernels"]
