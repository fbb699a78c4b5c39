"""RL with verifiable rewards: group-relative advantages, the clipped policy losses (token, unit and
sequence level), the length-aware reward, and the staleness bound of asynchronous rollouts.

Notation (docs/posttrain.md, "RL losses"): a batch is [B, T] per-token arrays; mask m_t selects
the response tokens that are trained (the model's own tokens; prompt, tool messages, padding 0).
  logp      log pi_theta(y_t)  - the learner's current log-probabilities (differentiated)
  prox_logp log pi_prox(y_t)   - the proximal policy: the learner's parameters at the start of
                                 this update (version u), recomputed by the learner; optional
  behav_logp log mu(y_t)       - the behaviour policy: the sampler's log-probabilities, recorded
                                 while sampling with parameters of version v <= u
  A_t                          - the advantage of the token's sequence, broadcast to its tokens

Decoupled PPO (asynchronous rollouts, behaviour policy up to k versions stale):
  L = -agg_t [ w_t * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) ] + beta * agg_t k3_t
  r_t = pi_theta / pi_prox        the trust-region ratio, around the recent proximal policy
  w_t = sg(min(pi_prox / mu, c))  the off-policy correction, truncated at c (None: no cap)
At theta = prox the gradient is E_mu[(pi_prox / mu) A grad log pi] = E_prox[A grad log pi]: the
on-policy gradient of the proximal policy, however stale mu is; clipping around pi_prox keeps each
update small. Clipping around a stale mu instead (plain PPO with mu as "old") would, once pi_prox/mu
leaves [1 - eps, 1 + eps], zero the gradient of those tokens from the first step
(tests/posttrain/test_posttrain_losses.py shows both). Without prox_logp, pi_prox = mu and w = 1:
the plain on-policy GRPO / PPO objective.

Ratio levels (what one clip decision covers), `level=`:
  "token"    r_t = exp(logp_t - prox_t)                               (GRPO, PPO)
  "unit"     r_t = exp(mean_{s in unit(t)} (logp_s - prox_s))         (unit level, LUPO-style)
  "sequence" r_t = exp(mean_{s in seq(t)} (logp_s - prox_s))          (GSPO)
and the behaviour weight w takes the same level (a geometric mean of pi_prox / mu per unit).
The unit is a sentence / reasoning step (units.py). Why units: a token ratio is one noisy sample
of the policy change, so token clipping is high-variance and cuts single tokens out of a step;
a sequence ratio averages over the whole answer, so one clip decision keeps or drops the whole
answer. A step is the smallest piece whose correctness the reward can plausibly credit: its
geometric-mean ratio has the variance of an average over the step's tokens, and a clip removes
only the step that moved too far. Every token of a unit gets the unit's clipped surrogate, so
under token-mean aggregation an unclipped unit gives each of its tokens the gradient
-w_u * r_u * A / N: GSPO's token form, with the unit in place of the sequence.

KL to a reference policy (optional, beta = kl_coef > 0): the k3 estimator
  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (>= 0, unbiased for KL(pi_theta || pi_ref)).

Aggregation: "token-mean" averages over all masked tokens of the batch (DAPO's global token
mean: long answers weigh by their length); "seq-mean" averages each sequence's masked tokens,
then the sequences (the DeepSeekMath GRPO form). A sequence is a row, or a (row, segment) of a
packed row when segment_ids are given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LEVELS = ("token", "unit", "sequence")
AGGREGATIONS = ("token-mean", "seq-mean")


# ---------------------------------------------------------------------------------- advantages
def group_advantages(rewards, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6):
  """Per-sequence advantages [B] from rewards [B] laid out as B / group_size consecutive groups of
  one prompt's samples: (r - mean_group) / (std_group + eps), or r - mean_group when
  normalize_std is False (Dr. GRPO). std is the population std (ddof 0), so a group whose
  rewards are all equal gets advantage 0, with or without normalisation."""
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
    raise ValueError(f"rewards {r.shape} must be [B] with B a multiple of group_size={group_size}")
  g = r.reshape(-1, group_size)  # [groups, n]
  centred = g - g.mean(axis=1, keepdims=True)
  if normalize_std:
    centred = centred / (g.std(axis=1, keepdims=True) + eps)
  return centred.reshape(-1)


def length_shaped_rewards(rewards, correct, lengths, group_size: int, *, alpha: float):
  """rewards + a brevity bonus for correct answers (the efficiency trade-off):

    bonus_i = alpha * (L_max - L_i) / (L_max - L_min)   for correct i, where L_min and L_max
                                                       are the shortest and longest correct
                                                       lengths in i's group,
    bonus_i = 0                                        for wrong answers, and when the group's
                                                       correct answers all have one length.

  The shortest correct answer gains alpha, the longest none. The bonus is relative to the group,
  like the advantage, so it says "shorter than your other right answers", not "short", and it
  never lifts a wrong answer or lowers a right one: a correct answer keeps beating a wrong one
  for any alpha >= 0. Lengths are output tokens."""
  if alpha < 0:
    raise ValueError(f"alpha={alpha} must be >= 0")
  r = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
  ok = jnp.asarray(correct, bool).reshape(-1, group_size)
  L = jnp.asarray(lengths, jnp.float32).reshape(-1, group_size)
  lo = jnp.min(jnp.where(ok, L, jnp.inf), axis=1, keepdims=True)
  hi = jnp.max(jnp.where(ok, L, -jnp.inf), axis=1, keepdims=True)
  span = hi - lo
  bonus = jnp.where(ok & (span > 0), alpha * (hi - L) / jnp.where(span > 0, span, 1.0), 0.0)
  return (r + bonus).reshape(-1)


# ---------------------------------------------------------------------------------- staleness
def check_staleness(versions, learner_version: int, max_staleness: int, *, on_stale: str = "drop"):
  """keep [B] bool: rollouts whose behaviour-policy version v satisfies
  learner_version - v <= max_staleness. A stale rollout is dropped (keep False) with
  on_stale="drop" (the learner trains on the rest; the sampler's queue should drop them
  before batching), or raises with on_stale="error". A version newer than the learner's is
  always an error (the sampler cannot be ahead of the learner)."""
  if on_stale not in ("drop", "error"):
    raise ValueError(f"on_stale={on_stale!r}; choose 'drop' or 'error'")
  if max_staleness < 0:
    raise ValueError(f"max_staleness={max_staleness} must be >= 0")
  v = np.asarray(versions, np.int64)
  lag = learner_version - v
  if (lag < 0).any():
    raise ValueError(f"rollouts {np.flatnonzero(lag < 0).tolist()} have policy versions "
                     f"{v[lag < 0].tolist()} newer than the learner's {learner_version}")
  stale = lag > max_staleness
  if on_stale == "error" and stale.any():
    raise ValueError(f"rollouts {np.flatnonzero(stale).tolist()} come from policy versions "
                     f"{v[stale].tolist()}, more than max_staleness={max_staleness} behind the "
                     f"learner's {learner_version}")
  return ~stale


# ---------------------------------------------------------------------------------- policy loss
def _group_mean(x, ids, valid, num: int):
  """Per token, the mean of x over the valid tokens sharing its id (ids in [0, num)); 0 where
  not valid."""
  flat = jnp.where(valid, ids, num).reshape(-1)  # invalid tokens go to a spare segment
  w = valid.reshape(-1).astype(x.dtype)
  s = jax.ops.segment_sum(x.reshape(-1) * w, flat, num + 1)
  n = jax.ops.segment_sum(w, flat, num + 1)
  return jnp.where(valid, (s / jnp.maximum(n, 1))[flat].reshape(x.shape), 0.0)


def _pool_ids(level: str, unit_ids, segment_ids, mask):
  """(ids [B, T], their count): the pool each token's ratio averages over, unique in the batch.

  "sequence": one pool per (row, segment). "unit": one pool per maximal run of consecutive
  trained tokens with the same unit id and segment, so the ids of a packed row's sequences may
  each start from 0, and a masked-out token splits a unit.
  """
  B, T = mask.shape
  seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  if level == "sequence":
    return jnp.arange(B, dtype=jnp.int32)[:, None] * (T + 1) + jnp.clip(seg, 0, T), B * (T + 1)
  u = jnp.where(mask, jnp.asarray(unit_ids, jnp.int32), -1)
  shift = lambda x: jnp.pad(x[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  start = mask & ((u != shift(u)) | (seg != shift(seg)))
  run = jnp.clip(jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1, 0, T - 1)  # [B, T]
  return jnp.arange(B, dtype=jnp.int32)[:, None] * T + run, B * T


def policy_loss(logp, behav_logp, advantages, mask, *, prox_logp=None, level: str = "token",
                unit_ids=None, segment_ids=None, clip_eps: float = 0.2,
                clip_eps_high: float | None = None, behav_weight_cap: float | None = None,
                ref_logp=None, kl_coef: float = 0.0, aggregation: str = "token-mean"):
  """(scalar loss, metrics) of the clipped decoupled surrogate of the module docstring.

  logp, behav_logp, prox_logp, ref_logp, mask, unit_ids, segment_ids: [B, T]; advantages: [B]
  (one per row) or [B, T]. unit_ids (level "unit"): a unit is a run of consecutive trained
  tokens with one id in one segment (`units.masked_units` per sequence; -1 outside the
  response). Everything but logp is treated as a constant (stop_gradient). jit with the keyword
  options static.
  """
  if level not in LEVELS:
    raise ValueError(f"level={level!r}; choose one of {LEVELS}")
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r}; choose one of {AGGREGATIONS}")
  sg = jax.lax.stop_gradient
  logp = jnp.asarray(logp, jnp.float32)
  m = jnp.asarray(mask) > 0
  behav = sg(jnp.asarray(behav_logp, jnp.float32))
  prox = behav if prox_logp is None else sg(jnp.asarray(prox_logp, jnp.float32))
  adv = sg(jnp.asarray(advantages, jnp.float32))
  adv = jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, logp.shape)
  lo, hi = 1.0 - clip_eps, 1.0 + (clip_eps if clip_eps_high is None else clip_eps_high)

  if level == "unit":
    if unit_ids is None:
      raise ValueError("level='unit' needs unit_ids [B, T] (units.masked_units)")
    m = m & (jnp.asarray(unit_ids) >= 0)  # a token outside every unit is not trained
  if kl_coef and ref_logp is None:
    raise ValueError(f"kl_coef={kl_coef} needs ref_logp")
  log_ratio = jnp.where(m, logp - prox, 0.0)
  log_w = jnp.where(m, prox - behav, 0.0)
  if level != "token":
    ids, num = _pool_ids(level, unit_ids, segment_ids, m)
    log_ratio = _group_mean(log_ratio, ids, m, num)
    log_w = _group_mean(log_w, ids, m, num)
  ratio = jnp.exp(log_ratio)
  w = sg(jnp.exp(log_w))
  if behav_weight_cap is not None:
    w = jnp.minimum(w, behav_weight_cap)
  surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, lo, hi) * adv)
  per_token = -w * surrogate
  kl = jnp.zeros_like(logp)
  if kl_coef:
    # Masked before the exp: padding may hold -inf log-probabilities, and exp(inf) in the
    # discarded branch of a where still poisons the gradient with 0 * inf.
    d = jnp.where(m, sg(jnp.asarray(ref_logp, jnp.float32)) - logp, 0.0)
    kl = jnp.exp(d) - d - 1.0
    per_token = per_token + kl_coef * kl

  agg = _aggregate(aggregation, m, segment_ids)
  clipped = ((adv > 0) & (ratio > hi)) | ((adv < 0) & (ratio < lo))
  metrics = {"clip_frac": agg(clipped.astype(jnp.float32)), "ratio": agg(ratio),
             "behav_weight": agg(w), "kl": agg(kl), "tokens": m.sum()}
  return agg(per_token), metrics


def _aggregate(aggregation: str, valid, segment_ids):
  """x [B, T] -> a scalar: the mean over valid tokens, or of the per-sequence means."""
  v = valid.astype(jnp.float32)
  if aggregation == "token-mean":
    return lambda x: (x * v).sum() / jnp.maximum(v.sum(), 1.0)
  ids, num = _pool_ids("sequence", None, segment_ids, valid)
  flat = jnp.where(valid, ids, num).reshape(-1)
  n = jax.ops.segment_sum(v.reshape(-1), flat, num + 1)[:num]
  present = (n > 0).astype(jnp.float32)

  def seq_mean(x):
    s = jax.ops.segment_sum((x * v).reshape(-1), flat, num + 1)[:num]
    return (s / jnp.maximum(n, 1.0) * present).sum() / jnp.maximum(present.sum(), 1.0)

  return seq_mean


def grpo_loss(logp, behav_logp, advantages, mask, **kw):
  """The token-level clipped surrogate (GRPO / DAPO / PPO): `policy_loss(level="token")`."""
  return policy_loss(logp, behav_logp, advantages, mask, level="token", **kw)


def unit_policy_loss(logp, behav_logp, advantages, mask, unit_ids, **kw):
  """The unit-level clipped surrogate (ratio and clip per linguistic unit):
  `policy_loss(level="unit")`."""
  return policy_loss(logp, behav_logp, advantages, mask, level="unit", unit_ids=unit_ids, **kw)
