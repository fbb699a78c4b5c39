"""What generation carries between its jitted calls, and the pieces every step shares.

`Slots` holds a fixed batch of rows: the model's cache (fp32 Lightning states, MLA latent caches),
the MTP layer's cache when drafting, each row's newest token (sampled, not yet fed) and its
position, the tokens emitted so far with their log-probabilities, and the RNG key. `emit` appends
tokens and stops rows; `mtp` runs the MTP layer with its cache.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Slots:
  cache: Any               # the model's decode cache
  mtp_cache: Any           # the MTP layer's latent cache [B, S, L + R], or None (no drafting)
  hidden: jax.Array        # [B, D]: the main model's normed hidden at each row's last prompt token
  last: jax.Array          # [B] int32: each row's newest token, not yet fed to the model
  pos: jax.Array           # [B] int32: its position
  drafts: jax.Array | None  # [B, k] int32: drafted tokens for positions pos + 1 .. pos + k
  out: jax.Array           # [B, N] int32: tokens emitted (pad past n)
  logp: jax.Array          # [B, N] fp32: their log-probabilities (sampling.py)
  n: jax.Array             # [B] int32: tokens emitted
  done: jax.Array          # [B] bool: stopped (eos emitted, or N tokens)
  key: jax.Array           # PRNG key
  steps: jax.Array         # () int32: decode steps run (model calls on the main model)
  drafted: jax.Array       # () int32: drafts proposed to rows still running
  accepted: jax.Array      # () int32: drafts accepted that became output


def init_slots(model, batch: int, max_len: int, max_new: int, draft: int, seed: int,
               pad_id: int) -> Slots:
  """Empty slots for `batch` rows, caches of `max_len` positions, `max_new` tokens a row."""
  D = model.config.hidden_size
  mtp_cache = None
  if draft:
    mtp_cache = model.mtp.layer.init_cache(batch, max_len, model.dtype)
  zeros = lambda dtype: jnp.zeros((batch,), dtype)
  return Slots(
      cache=model.init_cache(batch, max_len), mtp_cache=mtp_cache,
      hidden=jnp.zeros((batch, D), model.dtype), last=zeros(jnp.int32), pos=zeros(jnp.int32),
      drafts=jnp.zeros((batch, draft), jnp.int32) if draft else None,
      out=jnp.full((batch, max_new), pad_id, jnp.int32),
      logp=jnp.zeros((batch, max_new), jnp.float32), n=zeros(jnp.int32), done=zeros(bool),
      key=jax.random.key(seed), steps=jnp.zeros((), jnp.int32),
      drafted=jnp.zeros((), jnp.int32), accepted=jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------------------------- model calls
def embed(model, tokens: jax.Array) -> jax.Array:
  return jnp.take(model.word_embeddings[...], tokens, axis=0).astype(model.dtype)


def mtp(model, hidden, next_tokens, positions, cache):
  """The MTP layer (docs/architecture.md §3.9) at `positions` [B, T] from the main model's normed
  hidden [B, T, D] and the tokens one further [B, T]: (its normed hidden, logits [B, T, vocab],
  cache)."""
  h, cache, _ = model.mtp(hidden, embed(model, next_tokens), positions=positions, cache=cache)
  return h, model._head(h), cache


# ------------------------------------------------------------------------------------- emitting
def emit(sl: Slots, toks: jax.Array, logp: jax.Array, count: jax.Array, eos: jax.Array) -> Slots:
  """Append each running row's first count[b] of toks [B, m] (logp [B, m]), cut after its first
  eos id and at N tokens; `last` becomes the last token appended. Stopped rows are unchanged."""
  B, m = toks.shape
  N = sl.out.shape[1]
  j = jnp.arange(m)
  is_eos = jnp.isin(toks, eos) & (j < count[:, None])
  first_eos = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1), m)
  count = jnp.minimum(jnp.minimum(count, first_eos + 1), N - sl.n)
  count = jnp.where(sl.done, 0, count)
  keep = j < count[:, None]
  col = jnp.where(keep, sl.n[:, None] + j, N)  # past the end: dropped
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], col.shape)
  n = sl.n + count
  last = jnp.take_along_axis(toks, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
  return sl.replace(
      out=sl.out.at[rows, col].set(toks, mode="drop"),
      logp=sl.logp.at[rows, col].set(logp, mode="drop"), n=n,
      last=jnp.where(count > 0, last, sl.last),
      done=sl.done | (first_eos < count) | (n >= N))
