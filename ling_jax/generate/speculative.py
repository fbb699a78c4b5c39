"""MTP speculative decoding: the MTP layer drafts k tokens, the main model checks them in one step.

The MTP layer (docs/architecture.md §3.9) predicts the token at p + 2 from the main model's hidden
at p and the token at p + 1. After each step a row's newest token sits at position P, not yet fed,
and the layer has run at P - 1 (main hidden at P - 1, the newest token), which gives draft 1 for
P + 1. Draft j > 1 applies the layer again: at P + j - 2, fed its own previous output hidden and
draft j - 1 (the main model's hidden there is not known yet); k = 1 is what the release serves
with its one MTP layer. The draft tokens are the layer's argmax.

One step (`step`): the main model reads [newest, d_1 .. d_k] at P .. P + k and gives y_0 .. y_k,
y_j its token for P + j + 1 (argmax, or a sample). Greedy: d_j is accepted while it equals
y_{j-1}; with a = the drafts accepted, the row emits y_0 .. y_a, exactly the tokens plain greedy
decoding emits. Sampling: the standard speculative rule for a one-hot draft distribution (accept
d_j with probability p_{j-1}(d_j); at the first rejection draw from p_{j-1} with d_j removed;
after k acceptances draw y_k from p_k), whose output is distributed as plain sampling.
The Lightning states keep the first a + 1 tokens only: the step runs them as `Pending` (the state
before the step plus the step's keys and values) and commits a + 1 per row afterwards. MLA caches
(the main model's and the MTP layer's) hold one slot per position: a rejected draft's slot is
simply written again later. Then the MTP layer catches up at P .. P + k (the main hidden there and
the tokens y_0 .. y_k, exact up to P + a), and the layer's output at P + a gives the next drafts.

`rig`, for tests: (reference [B, M] tokens by position, accept [B, M] bool, on () bool): where
on, each draft for position q becomes reference[q] where accept[q], else a token that differs
from it, so a test decides which drafts are right (on False: the layer's own drafts, in the same
compiled program). With reference None, acceptance itself is rigged instead: draft j of a step
(for position q = P + j) counts as accepted where accept[q], whatever its token, and the row emits
the verifier's y_0 .. y_a. That is for benchmarks, which time a step's work at a stated rate on
random weights (whose near-tied logits make any fixed reference part from the verifier's argmax
within a few steps); its output is not plain decoding's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ling_jax.generate.sampling import Sampling, log_probs
from ling_jax.generate.slots import Slots, emit, mtp
from ling_jax.model.lightning import Pending


def _layer_kinds(cfg):
  """(kinds of each prefix group's layers, of the stacked group's, of the tail's)."""
  types, G, P = cfg.layer_types(), cfg.layer_group_size, cfg.num_prefix_groups
  prefix = [types[g * G:(g + 1) * G] for g in range(P)]
  return prefix, types[P * G:(P + 1) * G], types[cfg.num_groups * G:]


def defer(model, cache: dict) -> dict:
  """The cache with every Lightning state asking its layer to defer the update (`Pending`)."""
  prefix, group, tail = _layer_kinds(model.config)
  wrap = lambda kinds, entries: [Pending(c) if kind == "linear" else c
                                 for kind, c in zip(kinds, entries)]
  out = dict(cache)
  out["prefix"] = [wrap(kinds, c) for kinds, c in zip(prefix, cache["prefix"])]
  if cache["groups"] is not None:
    out["groups"] = wrap(group, cache["groups"])
  out["tail"] = wrap(tail, cache["tail"])
  return out


def commit(cache: dict, n: jax.Array) -> dict:
  """Every `Pending` Lightning entry replaced by the state after each row's first n[b] tokens."""
  return jax.tree.map(lambda c: c.commit(n) if isinstance(c, Pending) else c, cache,
                      is_leaf=lambda c: isinstance(c, Pending))


def rigged(drafts, positions, rig, vocab: int):
  """drafts [B, k] for positions [B, k] as the test rig says (module docstring)."""
  if rig is None or rig[0] is None:
    return drafts
  ref, accept, on = rig
  q = jnp.clip(positions, 0, ref.shape[1] - 1)
  want = jnp.take_along_axis(ref, q, axis=1)
  rigged = jnp.where(jnp.take_along_axis(accept, q, axis=1), want, (want + 1) % vocab)
  return jnp.where(on, rigged, drafts)


def chain(model, h, logits, pos, mtp_cache, k: int, rig):
  """Drafts [B, k] for pos + 1 .. pos + k from the MTP layer's output (h [B, D], logits [B, V])
  at pos - 1, applying the layer again for each further draft."""
  d = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  drafts = [d]
  for j in range(1, k):
    hj, lj, mtp_cache = mtp(model, h[:, None], d[:, None], (pos + j - 1)[:, None], mtp_cache)
    h, d = hj[:, 0], jnp.argmax(lj[:, 0], axis=-1).astype(jnp.int32)
    drafts.append(d)
  drafts = jnp.stack(drafts, axis=1)
  at = pos[:, None] + 1 + jnp.arange(k)
  return rigged(drafts, at, rig, model.config.vocab_size), mtp_cache


def step(model, sl: Slots, key, eos, sampling: Sampling, rig) -> Slots:
  """One speculative step for every row (module docstring)."""
  B, k = sl.drafts.shape
  fed = jnp.concatenate([sl.last[:, None], sl.drafts], axis=1)  # [B, k + 1]
  positions = sl.pos[:, None] + jnp.arange(k + 1)
  out = model.forward(fed, positions=positions, cache=defer(model, sl.cache))
  lp = log_probs(out.logits, sampling)  # [B, k + 1, V]
  if sampling.greedy:
    y = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)  # [B, k + 1]
    ok = sl.drafts == y[:, :k]
  else:
    k_accept, k_fix = jax.random.split(key)
    p_draft = jnp.exp(jnp.take_along_axis(lp[:, :k], sl.drafts[..., None], axis=-1)[..., 0])
    ok = jax.random.uniform(k_accept, (B, k)) < p_draft
  if rig is not None and rig[0] is None:  # acceptance rigged (module docstring)
    _, accept, on = rig
    q = jnp.clip(positions[:, 1:], 0, accept.shape[1] - 1)
    ok = jnp.where(on, jnp.take_along_axis(accept, q, axis=1), ok)
  a = jnp.cumprod(ok, axis=1).sum(1, dtype=jnp.int32)  # drafts accepted, [B]
  if not sampling.greedy:
    # Row b's token after its accepted drafts: from p_a without the rejected draft, or from p_k.
    lp_a = jnp.take_along_axis(lp, a[:, None, None], axis=1)[:, 0]  # [B, V]
    rejected = jnp.take_along_axis(jnp.pad(sl.drafts, ((0, 0), (0, 1)), constant_values=-1),
                                   a[:, None], axis=1)  # [B, 1], -1 after k acceptances
    fix = jax.random.categorical(
        k_fix, jnp.where(jnp.arange(lp.shape[-1]) == rejected, -jnp.inf, lp_a), axis=-1)
    y = jnp.concatenate([sl.drafts, jnp.zeros((B, 1), jnp.int32)], axis=1)
    y = jnp.where(jnp.arange(k + 1) == a[:, None], fix[:, None].astype(jnp.int32), y)
  running, n = ~sl.done, sl.n
  logp = jnp.take_along_axis(lp, y[..., None], axis=-1)[..., 0]
  sl = emit(sl.replace(cache=commit(out.cache, a + 1)), y, logp, a + 1, eos)
  # Accepted: the drafts that became output (not those past an eos or max_new_tokens).
  sl = sl.replace(drafted=sl.drafted + k * running.sum(dtype=jnp.int32),
                  accepted=sl.accepted + jnp.minimum(a, sl.n - n).sum(dtype=jnp.int32))
  pos = jnp.where(running, sl.pos + a + 1, sl.pos)
  # The MTP layer catches up at P .. P + k (right up to P + a), then drafts from P + a.
  h, logits, mtp_cache = mtp(model, out.hidden, y, positions, sl.mtp_cache)
  pick = lambda x: jnp.take_along_axis(x, a[:, None, None], axis=1)[:, 0]
  drafts, mtp_cache = chain(model, pick(h), pick(logits), pos, mtp_cache, k, rig)
  return sl.replace(pos=pos, drafts=drafts, mtp_cache=mtp_cache)
