"""The sampler of the post-training loops: token generation, the end-of-turn cut, and the
sampler's per-token log-probabilities and expert ids (docs/posttrain.md, "Training loops").

Generation goes through `generate_rows` only, so a better generator (per-row prompt lengths, eos
stopping, per-token log-probabilities) replaces one function. Today it calls
`ling_jax.generate.generate`, which takes one prompt length a call: rows are batched by prompt
length (a group's n samples share their prompt, so they are always one call) and each length
compiles once. It always generates `max_new_tokens`; `cut_at_stop` keeps the tokens up to and
including the template's end marker.

The behaviour log-probabilities are not the generator's: `score` runs one forward pass of the
sampled sequences with the sampling parameters and takes log softmax(logits / temperature) at
each sampled token, which is the distribution `generate` draws from (logits / temperature, then
a categorical draw). The two differ only by the numerics of the cached decode path against the
full forward (fp32 on the CPU: ~1e-6). The same forward records, with routing replay, the
experts each fed token went to (the sampler's routing, replayed by the learner).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ling_jax.generate import generate
from ling_jax.model.ling import record_routing


def generate_rows(model, prompts: list[np.ndarray], max_new_tokens: int, *, temperature: float,
                  seed: int) -> list[np.ndarray]:
  """Per prompt (token ids [L_i]), the `max_new_tokens` ids sampled after it (greedy at
  temperature 0). Rows of one prompt length go in one `generate` call."""
  by_length: dict[int, list[int]] = {}
  for i, p in enumerate(prompts):
    by_length.setdefault(len(p), []).append(i)
  out: list[np.ndarray | None] = [None] * len(prompts)
  for k, (length, rows) in enumerate(sorted(by_length.items())):
    batch = np.stack([np.asarray(prompts[i], np.int32) for i in rows])
    # eos_ids=None: every row gets max_new_tokens ids; the caller cuts at its own stop sequence
    tokens = np.asarray(generate(model, batch, max_new_tokens, temperature=temperature,
                                 eos_ids=None, seed=seed * 1009 + k).tokens)
    for j, i in enumerate(rows):
      out[i] = tokens[j]
  return out


def cut_at_stop(ids: np.ndarray, stop: list[int]) -> tuple[np.ndarray, bool]:
  """(the ids up to and including the first occurrence of `stop`, True), or (all ids, False)
  when the turn never ended."""
  ids = np.asarray(ids)
  n = len(stop)
  for t in range(len(ids) - n + 1):
    if ids[t] == stop[0] and all(ids[t + j] == stop[j] for j in range(1, n)):
      return ids[: t + n], True
  return ids, False


def token_logprobs(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, *, dtype,
                   temperature: float = 1.0, chunk: int = 0) -> jax.Array:
  """log softmax(hidden @ lm_head / temperature)[target] per position: hidden [B, T, D],
  targets [B, T] -> [B, T] fp32, the head matmul in `dtype` with fp32 accumulation (as the
  model's own head).

  chunk > 0: `chunk` positions at a time, each chunk under jax.checkpoint, so that neither the
  forward nor the backward pass holds more than one chunk's [chunk, vocab] logits."""
  B, T, D = hidden.shape
  w = lm_head.astype(dtype)

  def one(h, t):
    logits = jnp.einsum("nd,dv->nv", h.astype(dtype), w,
                        preferred_element_type=jnp.float32) / temperature
    picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)

  h, t = hidden.reshape(B * T, D), targets.reshape(B * T)
  N = B * T
  if chunk <= 0 or chunk >= N:
    return one(h, t).reshape(B, T)
  n = -(-N // chunk)
  h = jnp.pad(h, ((0, n * chunk - N), (0, 0))).reshape(n, chunk, D)
  t = jnp.pad(t, (0, n * chunk - N)).reshape(n, chunk)
  out = jax.lax.map(jax.checkpoint(lambda x: one(*x)), (h, t))
  return out.reshape(-1)[:N].reshape(B, T)


def sequence_logprobs(model, batch: dict, *, temperature: float, chunk: int = 0,
                      routing=None):
  """(logp [B, T], expert ids [B, T, M, X] or None): logp[:, t] = log p(token t | tokens < t)
  for t >= 1 (0 at t = 0). `routing`: the replayed (or all -1, record-only) expert ids."""
  out = model.forward(batch["tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], logits=False, routing=routing)
  logp = token_logprobs(out.hidden[:, :-1], model.lm_head[...], batch["tokens"][:, 1:],
                        dtype=model.dtype, temperature=temperature, chunk=chunk)
  return jnp.pad(logp, ((0, 0), (1, 0))), out.expert_ids


@functools.partial(jax.jit, static_argnames=("graphdef", "record", "chunk"))
def _score(graphdef, state, batch, temperature, routing, *, record: bool, chunk: int):
  model = nnx.merge(graphdef, state)
  if routing is None and record:
    routing = record_routing(model.config, *batch["tokens"].shape)
  return sequence_logprobs(model, batch, temperature=temperature, chunk=chunk, routing=routing)


def score(model, batch: dict, *, temperature: float, record: bool = False, chunk: int = 0,
          routing=None):
  """The sampler's (logp [B, T], expert ids [B, T, M, X] or None) of `batch` (tokens,
  positions, segment_ids [B, T]), as host arrays. record: route freely and return the experts;
  routing [B, T, M, X]: replay those experts (the learner's proximal and reference policies
  under the sampler's routing)."""
  graphdef, state = nnx.split(model)
  arrays = {k: jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids")}
  logp, ids = _score(graphdef, state, arrays, jnp.float32(temperature),
                     None if routing is None else jnp.asarray(routing), record=record,
                     chunk=chunk)
  return np.asarray(logp), (None if ids is None else np.asarray(ids))
