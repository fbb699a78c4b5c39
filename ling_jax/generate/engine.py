"""The decode engine: a fixed batch of slots (slots.py), its prompts prefilled in chunks, then
advanced by jitted loops of decode steps (docs/architecture.md §5).

Three jitted functions move the slots on, each taking the model as (graphdef, state) so that a
mesh placement can wrap them, and donating the slots (the caches are updated in place):
* `prefill_chunk`: one chunk of C prompt tokens of every row. Rows are right-padded; padding has
  position -1, which the layers treat as absent (no Lightning state update, no cache write), so a
  batch of prompts of different lengths gives each row what it would get alone. Memory is bounded
  by the chunk, not the prompt.
* `start`: the first token of every row, from its last prompt position (and, with MTP, the first
  drafts).
* `decode`: up to `n_steps` steps in one `lax.while_loop`, which ends early once every row has
  stopped (an eos id, or max_new_tokens). No host round trip inside; rows that stopped keep running,
  their outputs dropped. A plain step feeds one token a row; a speculative step (speculative.py)
  feeds the newest token and k drafts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.generate import speculative
from ling_jax.generate.sampling import Sampling, sample
from ling_jax.generate.slots import Slots, emit, mtp


# ------------------------------------------------------------------------------------- jitted steps
@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("slots",))
def prefill_chunk(graphdef, state, slots: Slots, tokens, positions, last_col, mtp_next,
                  mtp_positions) -> Slots:
  """One prompt chunk: tokens, positions [B, C] (-1: padding); last_col [B]: the column of each
  row's last prompt token in this chunk (-1: not here); with MTP, the layer runs at mtp_positions
  (-1 where the next token is not a prompt token) on the tokens one further, mtp_next [B, C]."""
  model = nnx.merge(graphdef, state)
  out = model.forward(tokens, positions=positions, cache=slots.cache, logits=False)
  here = jnp.take_along_axis(out.hidden, jnp.maximum(last_col, 0)[:, None, None], axis=1)[:, 0]
  slots = slots.replace(cache=out.cache,
                        hidden=jnp.where(last_col[:, None] >= 0, here, slots.hidden))
  if slots.mtp_cache is not None:
    _, _, mtp_cache = mtp(model, out.hidden, mtp_next, mtp_positions, slots.mtp_cache)
    slots = slots.replace(mtp_cache=mtp_cache)
  return slots


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("slots",))
def start(graphdef, state, slots: Slots, lengths, eos, rig, *, sampling: Sampling) -> Slots:
  """Each row's first new token from its last prompt position (lengths [B]); with MTP, the
  layer's step at that position and the first drafts."""
  model = nnx.merge(graphdef, state)
  key, sub = jax.random.split(slots.key)
  tok, lp = sample(sub, model._head(slots.hidden[:, None])[:, 0], sampling)
  slots = emit(slots.replace(key=key, pos=lengths), tok[:, None], lp[:, None],
               jnp.ones_like(lengths), eos)
  if slots.drafts is not None:
    h, logits, mtp_cache = mtp(model, slots.hidden[:, None], slots.last[:, None],
                               (lengths - 1)[:, None], slots.mtp_cache)
    drafts, mtp_cache = speculative.chain(model, h[:, 0], logits[:, 0], slots.pos, mtp_cache,
                                          slots.drafts.shape[1], rig)
    slots = slots.replace(drafts=drafts, mtp_cache=mtp_cache)
  return slots


def plain_step(model, sl: Slots, key, eos, sampling: Sampling) -> Slots:
  """Feed each row's newest token; sample and emit the next."""
  out = model.forward(sl.last[:, None], positions=sl.pos[:, None], cache=sl.cache)
  tok, lp = sample(key, out.logits[:, 0], sampling)
  running = ~sl.done
  sl = emit(sl.replace(cache=out.cache), tok[:, None], lp[:, None], jnp.ones_like(sl.n), eos)
  return sl.replace(pos=jnp.where(running, sl.pos + 1, sl.pos))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("slots",))
def decode(graphdef, state, slots: Slots, n_steps, eos, rig, *, sampling: Sampling) -> Slots:
  """Up to n_steps decode steps (fewer once every row has stopped), in one while loop."""
  model = nnx.merge(graphdef, state)

  def body(carry):
    i, sl = carry
    key, sub = jax.random.split(sl.key)
    sl = sl.replace(key=key, steps=sl.steps + 1)
    if sl.drafts is None:
      sl = plain_step(model, sl, sub, eos, sampling)
    else:
      sl = speculative.step(model, sl, sub, eos, sampling, rig)
    return i + 1, sl

  def cond(carry):
    i, sl = carry
    return (i < n_steps) & ~jnp.all(sl.done)

  return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), slots))[1]
