"""`generate` and `stream`: prompts in, new tokens out (engine.py does the work on the device).

Prompts are a list of token lists (any lengths) or a [B, T] array with per-row `lengths`; each row
generates until it emits one of `eos_ids` (by default the config's `eos_token_id`, the eos
included in its output) or `max_new_tokens`. The prompt is prefilled `chunk` tokens at a time,
then the decode loop runs in jitted pieces of steps: `stream` hands each piece's new tokens back
(one host sync a piece, none a token), `generate` runs all the steps in one piece.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ling_jax.generate import engine
from ling_jax.generate.sampling import Sampling
from ling_jax.generate.slots import init_slots
from ling_jax.model import Kernels, LingForCausalLM, with_kernels

CACHE_ALIGN = 128  # cache lengths are rounded up to this, so nearby lengths share compilations


def cache_length(longest: int, mtp_draft: int) -> int:
  """Cache positions a row needs: its prompt + new tokens (`longest`) and the drafts a
  speculative step writes past them, rounded up to CACHE_ALIGN."""
  return -(-(longest + mtp_draft) // CACHE_ALIGN) * CACHE_ALIGN


def chunk_width(prompt_len: int, chunk: int) -> int:
  """Columns of one prefill call: `chunk`, or the prompt rounded up to a power of two (>= 16)
  where that is shorter."""
  return min(chunk, 1 << max(4, (prompt_len - 1).bit_length()))


@dataclasses.dataclass
class Generation:
  """tokens [B, N] int32: row b's first lengths[b] entries are its new tokens (an eos last if it
  stopped on one), the rest pad_token_id (0 if the config has none); logprobs [B, N] fp32: each
  token's log-probability (sampling.py). steps: decode steps run after the first token; drafted /
  accepted: MTP drafts proposed and accepted (0 without drafting)."""
  tokens: jax.Array
  lengths: jax.Array
  logprobs: jax.Array
  steps: int
  drafted: int = 0
  accepted: int = 0

  @property
  def acceptance(self) -> float | None:
    """The fraction of drafted tokens the main model accepted (None without drafting)."""
    return self.accepted / self.drafted if self.drafted else None

  def sequences(self) -> list[list[int]]:
    """Each row's new tokens as a list."""
    toks, lens = np.asarray(self.tokens), np.asarray(self.lengths)
    return [toks[b, :lens[b]].tolist() for b in range(len(lens))]


def prompt_array(prompts, lengths=None, vocab: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, T] int32 right-padded with 0, lengths [B] int32) from a list of token lists or a
  [B, T] array (+ lengths, default all T); ValueError naming the row for an empty prompt or an id
  outside the vocabulary."""
  if isinstance(prompts, (list, tuple)) and lengths is None:
    rows = [np.asarray(p).reshape(-1) for p in prompts]
    if not rows:
      raise ValueError("no prompts: pass a list of token lists or a [batch, time] array")
    lengths = np.array([len(r) for r in rows], np.int32)
    tokens = np.zeros((len(rows), max(1, lengths.max())), np.int64)
    for b, r in enumerate(rows):
      tokens[b, :len(r)] = r
  else:
    tokens = np.asarray(prompts)
    if tokens.ndim != 2:
      raise ValueError(f"prompts must be [batch, time] token ids, got shape {tokens.shape}")
    B, T = tokens.shape
    lengths = np.full(B, T, np.int32) if lengths is None else np.asarray(lengths)
    if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
      raise ValueError(f"lengths must be [batch] = [{B}] ints, got "
                       f"{lengths.dtype}{list(lengths.shape)}")
    if (lengths > T).any():
      b = int(np.argmax(lengths > T))
      raise ValueError(f"lengths[{b}] = {lengths[b]} exceeds the prompts' {T} columns")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"prompt tokens must be integer ids, got {tokens.dtype}")
  if (lengths < 1).any():
    raise ValueError(f"prompt {int(np.argmin(lengths))} is empty: every row needs a token")
  real = np.arange(tokens.shape[1]) < lengths[:, None]
  bad = real & ((tokens < 0) | (tokens >= (vocab if vocab is not None else np.inf)))
  if bad.any():
    b, t = map(int, np.argwhere(bad)[0])
    raise ValueError(f"prompt {b} token {t} is {tokens[b, t]}, outside the vocabulary "
                     f"[0, {vocab})")
  return np.where(real, tokens, 0).astype(np.int32), lengths.astype(np.int32)


def _eos(model, eos_ids) -> np.ndarray:
  """The eos ids as int32, padded with -1 (no token) to a multiple of 8: calls with different
  eos ids share one compilation."""
  if isinstance(eos_ids, str) and eos_ids == "config":
    eos_ids = model.config.eos_token_id
  ids = np.zeros((0,), np.int64) if eos_ids is None else np.atleast_1d(np.asarray(eos_ids))
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"eos_ids must be token ids, got {eos_ids!r}")
  width = max(8, -(-len(ids) // 8) * 8)
  return np.pad(ids, (0, width - len(ids)), constant_values=-1).astype(np.int32)


def stream(model: LingForCausalLM, prompts, max_new_tokens: int, *, lengths=None,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_ids="config",
           seed: int = 0, mtp_draft: int = 0, kernels: Kernels | None = None, chunk: int = 2048,
           steps_per_sync: int = 16, mesh: jax.sharding.Mesh | None = None,
           _rig=None) -> Iterator[list[list[int]] | Generation]:
  """Generate as `generate` does: checks the arguments at once and returns an iterator that
  yields each row's new tokens ([B] lists) after the first token and after every
  `steps_per_sync` decode steps, then the `Generation` last."""
  cfg = model.config
  if kernels is not None:
    model = with_kernels(model, kernels)
  sampling = Sampling(temperature, top_k, top_p)
  tokens, lens = prompt_array(prompts, lengths, cfg.vocab_size)
  B, T = tokens.shape
  if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  if not (isinstance(chunk, int) and chunk >= 1):
    raise ValueError(f"chunk must be an int >= 1 (prompt tokens per prefill call), got {chunk!r}")
  if not (isinstance(mtp_draft, int) and mtp_draft >= 0):
    raise ValueError(f"mtp_draft must be an int >= 0 (drafted tokens a step), got {mtp_draft!r}")
  if mtp_draft and model.mtp is None:
    raise ValueError("mtp_draft needs the MTP layer, but this config has "
                     "num_nextn_predict_layers=0")
  longest = int(lens.max()) + max_new_tokens
  if longest > cfg.max_position_embeddings:
    raise ValueError(f"the longest prompt ({int(lens.max())} tokens) + max_new_tokens "
                     f"({max_new_tokens}) = {longest} exceeds the model's "
                     f"max_position_embeddings ({cfg.max_position_embeddings})")
  eos = jnp.asarray(_eos(model, eos_ids))
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  max_len = cache_length(longest, mtp_draft)
  # speculative.py's test rig
  rig = None if _rig is None else tuple(None if r is None else jnp.asarray(r) for r in _rig)
  host, rows = np.asarray, B
  if mesh is not None and mesh.size > 1:  # ling_jax/generate_sharded.py
    from ling_jax.generate_sharded import place, to_host
    model, tokens, lens = place(model, tokens, lens, mesh, max_len)
    host = lambda x: to_host(x, mesh)
  return _run(model, tokens, lens, max_new_tokens, max_len, sampling, eos, pad, seed, mtp_draft,
              chunk, steps_per_sync, rig, mesh, host, rows)


def _run(model, tokens, lens, max_new_tokens, max_len, sampling, eos, pad, seed, mtp_draft, chunk,
         steps_per_sync, rig, mesh, host, rows):
  with jax.set_mesh(mesh) if mesh is not None and mesh.size > 1 else contextlib.nullcontext():
    yield from _steps(model, tokens, lens, max_new_tokens, max_len, sampling, eos, pad, seed,
                      mtp_draft, chunk, steps_per_sync, rig, host, rows)


def _steps(model, tokens, lens, max_new_tokens, max_len, sampling, eos, pad, seed, mtp_draft,
           chunk, steps_per_sync, rig, host, rows):
  B, T = tokens.shape
  graphdef, state = nnx.split(model)
  slots = init_slots(model, B, max_len, max_new_tokens, mtp_draft, seed, pad)

  # Prefill: chunks of C columns; a column past a row's end is padding (position -1).
  C = chunk_width(T, chunk)
  n_chunks = -(-T // C)
  cols = np.arange(n_chunks * C + 1)
  padded = np.zeros((B, len(cols)), np.int32)
  padded[:, :T] = tokens
  for c0 in range(0, n_chunks * C, C):
    c = cols[c0:c0 + C]
    positions = np.where(c < lens[:, None], c, -1).astype(np.int32)
    last_col = np.where((lens - 1 >= c0) & (lens - 1 < c0 + C), lens - 1 - c0, -1)
    mtp_positions = np.where(c < lens[:, None] - 1, c, -1).astype(np.int32)
    slots = engine.prefill_chunk(graphdef, state, slots, padded[:, c0:c0 + C], positions,
                                 last_col.astype(np.int32), padded[:, c0 + 1:c0 + C + 1],
                                 mtp_positions)
  slots = engine.start(graphdef, state, slots, jnp.asarray(lens), eos, rig, sampling=sampling)
  seen = np.zeros(B, np.int64)

  def fresh(slots):
    n, out = host(slots.n), host(slots.out)
    new = [out[b, seen[b]:n[b]].tolist() for b in range(rows)]
    seen[:] = n
    return new

  yield fresh(slots)
  while not bool(host(slots.done).all()):
    slots = engine.decode(graphdef, state, slots, jnp.int32(steps_per_sync), eos, rig,
                          sampling=sampling)
    yield fresh(slots)
  # Rows past `rows` pad a batch to the mesh's batch axes (generate_sharded.py).
  yield Generation(tokens=host(slots.out)[:rows], lengths=host(slots.n)[:rows],
                   logprobs=host(slots.logp)[:rows], steps=int(host(slots.steps)),
                   drafted=int(host(slots.drafted)), accepted=int(host(slots.accepted)))


def generate(model: LingForCausalLM, prompts, max_new_tokens: int, *, lengths=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_ids="config",
             seed: int = 0, mtp_draft: int = 0, kernels: Kernels | None = None,
             chunk: int = 2048, mesh: jax.sharding.Mesh | None = None, _rig=None) -> Generation:
  """New tokens for each prompt (module docstring): greedy unless temperature > 0 (then top_k
  and top_p cut the distribution, sampling.py); eos_ids: "config" (the config's eos_token_id),
  None (never stop early) or ids; mtp_draft: k > 0 drafts k tokens a step with the MTP layer
  (speculative.py; greedy output identical to k = 0); kernels: the ops to run, if not those the
  model was built with; chunk: prompt tokens per prefill call (memory is bounded by it); mesh:
  run sharded over it (ling_jax/generate_sharded.py; the same tokens as on one device)."""
  *_, result = stream(model, prompts, max_new_tokens, lengths=lengths, temperature=temperature,
                      top_k=top_k, top_p=top_p, eos_ids=eos_ids, seed=seed, mtp_draft=mtp_draft,
                      kernels=kernels, chunk=chunk, steps_per_sync=max_new_tokens, mesh=mesh,
                      _rig=_rig)
  return result
