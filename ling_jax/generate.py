"""Autoregressive generation with the decode cache (docs/architecture.md §5): one prefill, then a
scanned decode loop.

The cache holds the fp32 Lightning states and the MLA latent caches; each decode step runs the
model on one token per row. Greedy by default; `temperature > 0` samples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.model import Kernels, LingForCausalLM, with_kernels


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "max_len"))
def _generate(graphdef, state, prompt, key, temperature, *, max_new_tokens: int, max_len: int):
  model = nnx.merge(graphdef, state)
  B = prompt.shape[0]

  def pick(logits, key):
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

  cache = model.init_cache(B, max_len)
  logits, cache = model(prompt, cache=cache)
  keys = jax.random.split(key, max_new_tokens)
  first = pick(logits[:, -1], keys[0])

  def step(carry, key):
    tok, cache = carry
    logits, cache = model(tok[:, None], cache=cache)
    nxt = pick(logits[:, 0], key)
    return (nxt, cache), nxt

  (_, _), rest = jax.lax.scan(step, (first, cache), keys[1:])
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


def generate(model: LingForCausalLM, prompt: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, seed: int = 0, kernels: Kernels | None = None) -> jax.Array:
  """prompt [B, T] int32 -> [B, T + max_new_tokens] int32 (greedy unless temperature > 0).
  kernels: the ops to run, if not those the model was built with."""
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2:
    raise ValueError(f"prompt must be [batch, time] token ids, got shape {prompt.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if kernels is not None:
    model = with_kernels(model, kernels)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt, jax.random.key(seed), jnp.float32(temperature),
                   max_new_tokens=max_new_tokens, max_len=prompt.shape[1] + max_new_tokens)
