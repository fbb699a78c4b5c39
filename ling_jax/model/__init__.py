"""Flax NNX modules of Ling-2.6 (docs/architecture.md §3).

`Kernels` and `Remat` (settings.py) import no jax; the model imports on first use, so that
configs build without it.
"""

from ling_jax.model.settings import Kernels, Remat


def __getattr__(name):
  if name in ("LingForCausalLM", "LingOutput", "with_kernels"):
    from ling_jax.model import ling
    return getattr(ling, name)
  raise AttributeError(f"module 'ling_jax.model' has no attribute {name!r}")


__all__ = ["Kernels", "LingForCausalLM", "LingOutput", "Remat", "with_kernels"]
