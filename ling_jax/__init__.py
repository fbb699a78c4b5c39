"""ling-jax: Ling-2.6 (hybrid Lightning linear attention + MLA, sparse MoE) in JAX / Flax NNX."""

from ling_jax.config import (LingConfig, YarnScaling, ling_2_6_1t, ling_2_6_flash, ling_small,
                             ling_tiny)
from ling_jax.hf_config import from_hf_config, to_hf_config


def __getattr__(name):
  # The model and checkpoint I/O import jax: on first use, so that configs (and an experiment's
  # `--help`) build without it.
  if name in ("LingForCausalLM", "LingOutput"):
    from ling_jax import model
    return getattr(model, name)
  if name in ("load_hf", "save_hf"):
    from ling_jax import hf_io
    return getattr(hf_io, name)
  if name == "load":
    from ling_jax.convert import load
    return load
  raise AttributeError(f"module 'ling_jax' has no attribute {name!r}")


__all__ = ["LingConfig", "YarnScaling", "ling_2_6_flash", "ling_2_6_1t", "ling_small", "ling_tiny",
           "from_hf_config", "to_hf_config", "LingForCausalLM", "LingOutput", "load_hf", "save_hf", "load"]
