"""Turning logits into tokens: greedy, or sampling with temperature, top-k and top-p.

`Sampling` holds the settings. `log_probs(logits, s)` is the sampling distribution itself, as fp32
log-probabilities over the vocabulary (-inf where top-k / top-p cut a token): the logits over the
temperature, the top_k largest kept, then the smallest set of the most likely whose probability
reaches top_p (the token that crosses it included), renormalised; tokens tied with the last one
kept by either cut are kept too. `sample` draws from it, greedy
(temperature 0) takes the argmax of the logits. Both return each token's log-probability under
the distribution it came from, what policy-gradient training needs; for greedy tokens, whose
distribution is a point mass, it is the model's own (temperature 1) log-probability instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0: greedy. top_k 0 and top_p 1: no cut."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    errors = []
    if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < float("inf")):
      errors.append(f"temperature={self.temperature!r} must be a finite number >= 0")
    if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
      errors.append(f"top_k={self.top_k!r} must be an int >= 0 (0: no top-k cut)")
    if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
      errors.append(f"top_p={self.top_p!r} must be in (0, 1] (1: no top-p cut)")
    if errors:
      raise ValueError("invalid sampling settings: " + "; ".join(errors))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def log_probs(logits: jax.Array, s: Sampling) -> jax.Array:
  """[..., V] logits -> [..., V] fp32 log-probabilities of the sampling distribution (for greedy
  settings: the plain log-softmax)."""
  x = logits.astype(jnp.float32)
  if s.greedy:
    return jax.nn.log_softmax(x, axis=-1)
  x = x / s.temperature
  if s.top_k and s.top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
    x = jnp.where(x >= kth, x, -jnp.inf)  # ties with the k-th largest stay
  if s.top_p < 1:
    desc = -jnp.sort(-x, axis=-1)
    p = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # the mass of the tokens more likely than each
    n = (before < s.top_p).sum(-1, keepdims=True)  # >= 1: the most likely token always stays
    cut = jnp.take_along_axis(desc, n - 1, axis=-1)
    x = jnp.where(x >= cut, x, -jnp.inf)  # ties with the last kept token stay
  return jax.nn.log_softmax(x, axis=-1)


def sample(key: jax.Array, logits: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
  """[B, V] logits -> (tokens [B] int32, their log-probabilities [B] fp32): module docstring."""
  lp = log_probs(logits, s)
  if s.greedy:
    tok = jnp.argmax(logits, axis=-1)
  else:
    tok = jax.random.categorical(key, lp, axis=-1)
  tok = tok.astype(jnp.int32)
  return tok, jnp.take_along_axis(lp, tok[..., None], axis=-1)[..., 0]
