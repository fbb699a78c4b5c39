"""ling-jax: Ling-2.6 (hybrid Lightning linear attention + MLA, sparse MoE) in JAX / Flax NNX."""

from ling_jax.config import (LingConfig, YarnScaling, ling_2_6_1t, ling_2_6_flash, ling_small,
                             ling_tiny)
from ling_jax.hf_config import from_hf_config, to_hf_config
from ling_jax.model import LingForCausalLM, LingOutput


def __getattr__(name):
  # Checkpoint I/O pulls in more modules; import it on first use.
  if name in ("load_hf", "save_hf"):
    from ling_jax import hf_io
    return getattr(hf_io, name)
  if name == "load":
    from ling_jax.convert import load
    return load
  raise AttributeError(f"module 'ling_jax' has no attribute {name!r}")


__all__ = ["LingConfig", "YarnScaling", "ling_2_6_flash", "ling_2_6_1t", "ling_small", "ling_tiny",
           "from_hf_config", "to_hf_config", "LingForCausalLM", "LingOutput", "load_hf", "save_hf", "load"]
