"""Random tiny models for tests: every variable drawn fresh (norm weights near 1, nonzero biases)."""

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.model import LingForCausalLM


def random_model(cfg, seed=0, **kwargs) -> LingForCausalLM:
  model = LingForCausalLM(cfg, rngs=nnx.Rngs(seed), **kwargs)
  flat = list(nnx.to_flat_state(nnx.state(model)))
  keys = jax.random.split(jax.random.key(seed + 1), len(flat))

  def perturb(path, x, k):
    noise = jax.random.normal(k, x.shape, jnp.float32)
    name = path[-1] if path[-1] != "weight" else path[-2]
    if "norm" in str(name) or name in ("enorm", "hnorm", "final_layernorm", "g_norm"):
      return (1.0 + 0.1 * noise).astype(x.dtype)
    if name == "expert_bias":
      return (0.05 * noise).astype(x.dtype)
    return x

  for (path, var), k in zip(flat, keys):
    var.set_value(perturb(path, var.get_value(), k))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def random_tokens(cfg, shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, dtype=jnp.int32)
