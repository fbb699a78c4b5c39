"""RL losses against float64 NumPy references written here, token by token (values and gradients
by finite differences), plus the off-policy correction, advantages, length shaping and staleness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from testing import rel
from ling_jax.posttrain.losses import (check_staleness, group_advantages, grpo_loss,
                                       length_shaped_rewards, policy_loss, unit_policy_loss)

B, T = 4, 13


# ---------------------------------------------------------------------------------- reference
def ref_policy_loss(logp, behav, adv, mask, *, prox=None, level="token", units=None, segs=None,
                    eps_low=0.2, eps_high=0.2, cap=None, ref=None, beta=0.0, agg="token-mean"):
  """The decoupled clipped surrogate, one pool (token, unit or sequence) at a time, in float64."""
  logp, behav, adv = (np.asarray(x, np.float64) for x in (logp, behav, adv))
  prox = behav if prox is None else np.asarray(prox, np.float64)
  loss = np.zeros(logp.shape)
  used = np.zeros(logp.shape, bool)
  for b in range(logp.shape[0]):
    live = [t for t in range(logp.shape[1]) if mask[b, t] and (level != "unit" or units[b, t] >= 0)]
    seg = (lambda t: 0) if segs is None else (lambda t: segs[b, t])
    if level == "token":
      pools = [[t] for t in live]
    elif level == "sequence":
      pools = [[t for t in live if seg(t) == k] for k in sorted({seg(t) for t in live})]
    else:  # runs of consecutive live tokens with one unit id and segment
      pools = []
      for t in live:
        if pools and pools[-1][-1] == t - 1 and (units[b, t], seg(t)) == (units[b, t - 1], seg(t - 1)):
          pools[-1].append(t)
        else:
          pools.append([t])
    for pool in pools:
      r = np.exp(np.mean([logp[b, t] - prox[b, t] for t in pool]))
      w = np.exp(np.mean([prox[b, t] - behav[b, t] for t in pool]))
      w = w if cap is None else min(w, cap)
      for t in pool:
        a = adv[b, t] if adv.ndim == 2 else adv[b]
        s = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
        d = 0.0 if ref is None else ref[b, t] - logp[b, t]
        loss[b, t] = -w * s + beta * (np.exp(d) - d - 1)
        used[b, t] = True
  if agg == "token-mean":
    return loss[used].sum() / used.sum()
  means = []
  for b in range(logp.shape[0]):
    ids = np.zeros(logp.shape[1], int) if segs is None else segs[b]
    for k in np.unique(ids[used[b]]):
      sel = used[b] & (ids == k)
      means.append(loss[b, sel].mean())
  return float(np.mean(means))


def fd_grad(f, x, h=1e-6):
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[i] += h
    down[i] -= h
    g[i] = (f(up) - f(down)) / (2 * h)
  return g


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  behav = -rng.uniform(0.1, 3.0, (B, T))
  prox = behav + rng.normal(0, 0.15, (B, T))   # the learner moved since sampling
  logp = prox + rng.normal(0, 0.2, (B, T))     # and moves within this update
  ref = prox + rng.normal(0, 0.3, (B, T))
  adv = rng.normal(0, 1, B)
  # Packed rows: segments, response masks with prompt holes, units of 1..4 tokens per segment.
  segs = np.zeros((B, T), np.int32)
  for b in range(B):
    cut = rng.integers(3, T - 3)
    segs[b, :cut], segs[b, cut:T - 1] = 1, 2  # the last token is padding
  mask = (segs > 0) & (rng.random((B, T)) > 0.2)
  units = np.full((B, T), -1, np.int32)
  for b in range(B):  # numbered from 0 in each segment, as packed per-sequence unit ids are
    u, t = 0, 0
    while t < T:
      n = int(rng.integers(1, 5))
      units[b, t:t + n] = u
      u, t = u + 1, t + n
      if t < T and segs[b, t] != segs[b, t - 1]:
        u = 0
  units[~mask] = -1
  adv_tok = np.where(segs == 2, -adv[:, None], adv[:, None])  # one advantage per segment
  return dict(logp=logp, behav=behav, prox=prox, ref=ref, adv=adv_tok, mask=mask, segs=segs,
              units=units)


CASES = [
    dict(level="token"),  # on-policy GRPO: prox = behav
    dict(level="token", prox=True, cap=1.1, eps_high=0.28, ref=True, beta=0.05, agg="seq-mean"),
    dict(level="unit", prox=True, ref=True, beta=0.1),
    dict(level="unit", prox=True, cap=1.05, eps_low=0.1, eps_high=0.1, agg="seq-mean"),
    dict(level="sequence", prox=True, agg="seq-mean", eps_low=0.02, eps_high=0.02),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_policy_loss_matches_numpy_reference(case):
  x = _inputs()
  kw = dict(level=case["level"], eps_low=case.get("eps_low", 0.2),
            eps_high=case.get("eps_high", 0.2), cap=case.get("cap"), beta=case.get("beta", 0.0),
            agg=case.get("agg", "token-mean"))
  prox = x["prox"] if case.get("prox") else None
  ref = x["ref"] if case.get("ref") else None

  def ref_at(logp):
    return ref_policy_loss(logp, x["behav"], x["adv"], x["mask"], prox=prox, units=x["units"],
                           segs=x["segs"], ref=ref, **kw)

  def ours(logp):
    return policy_loss(logp, x["behav"], x["adv"], x["mask"], prox_logp=prox, level=kw["level"],
                       unit_ids=x["units"], segment_ids=x["segs"], clip_eps=kw["eps_low"],
                       clip_eps_high=kw["eps_high"], behav_weight_cap=kw["cap"], ref_logp=ref,
                       kl_coef=kw["beta"], aggregation=kw["agg"])

  (value, metrics), grad = jax.jit(jax.value_and_grad(ours, has_aux=True))(
      jnp.asarray(x["logp"], jnp.float32))
  want = ref_at(x["logp"])
  assert abs(float(value) - want) < 1e-5 * max(1.0, abs(want)), (float(value), want)
  assert 0 < float(metrics["clip_frac"]) < 1  # the inputs exercise both branches of the clip
  want_grad = fd_grad(ref_at, x["logp"])
  assert np.abs(want_grad).max() > 0 and rel(grad, want_grad) < 1e-4
  assert (np.asarray(grad)[~x["mask"]] == 0).all()


def test_unit_level_reduces_to_token_and_sequence_levels():
  x = _inputs(1)
  mask = x["segs"] > 0  # no holes: one run per segment
  args = (jnp.asarray(x["logp"]), x["behav"], x["adv"], mask)
  per_token_units = np.where(mask, np.arange(T)[None, :] % 2, -1)  # alternating ids: 1-token runs
  one_unit_per_segment = np.zeros((B, T), np.int32)  # the same id in both segments of a row

  @jax.jit
  def losses(logp, behav, adv, mask):
    args = (logp, behav, adv, mask)
    kw = dict(prox_logp=x["prox"], segment_ids=x["segs"], behav_weight_cap=1.2)
    return (grpo_loss(*args, **kw)[0], unit_policy_loss(*args, per_token_units, **kw)[0],
            policy_loss(*args, level="sequence", **kw)[0],
            unit_policy_loss(*args, one_unit_per_segment, **kw)[0],
            grpo_loss(*args, prox_logp=behav)[0], grpo_loss(*args)[0],
            grpo_loss(*args, prox_logp=behav)[1]["behav_weight"])

  token, unit_tokens, seq, unit_seq, with_prox, without, weight = map(float, losses(*args))
  assert abs(unit_tokens - token) < 1e-6 and abs(unit_seq - seq) < 1e-6
  # prox = behav is the same objective as no prox (weight exactly 1).
  assert with_prox == without and weight == 1.0


def test_decoupled_correction_gives_the_on_policy_gradient_under_stale_rollouts():
  """A 4-action policy; the behaviour policy mu is stale (pi/mu up to 2.9, far outside the clip
  range). A batch whose action counts are exactly proportional to mu stands for the expectation
  under mu. At theta = prox the decoupled loss's gradient equals minus the on-policy gradient of
  E_pi[A]; plain PPO with mu as the old policy clips most tokens and gets it wrong."""
  theta = jnp.array([0.3, -0.2, 0.9, -1.0])
  pi = np.asarray(jax.nn.softmax(theta), np.float64)
  mu = np.array([0.5, 0.25, 0.125, 0.125])
  actions = np.array([0, 0, 0, 0, 1, 1, 2, 3])  # 8 samples, counts 8 * mu
  A = np.array([1.0, -0.5, 2.0, -1.5])
  adv = A[actions][None, :]
  mask = np.ones((1, 8), bool)
  behav = np.log(mu[actions])[None, :]
  prox = np.log(pi[actions])[None, :]
  true_grad = pi * (A - (pi * A).sum())  # d/dtheta of sum_a pi(a) A(a)

  def loss(theta, prox_logp):
    logp = jax.nn.log_softmax(theta)[actions][None, :]
    return grpo_loss(logp, behav, adv, mask, prox_logp=prox_logp, clip_eps=0.2)[0]

  decoupled, plain = jax.jit(lambda t: (jax.grad(loss)(t, prox), jax.grad(loss)(t, None)))(theta)
  np.testing.assert_allclose(-np.asarray(decoupled), true_grad, rtol=1e-5, atol=1e-6)
  assert rel(-np.asarray(plain), true_grad) > 0.3


def test_group_advantages_against_numpy():
  rng = np.random.default_rng(2)
  r = rng.integers(0, 2, 12).astype(np.float64) + rng.normal(0, 0.1, 12)
  r[8:12] = 0.7  # one group where every answer scored the same
  got = np.asarray(group_advantages(r, 4))
  got_raw = np.asarray(group_advantages(r, 4, normalize_std=False))
  for g in range(3):
    x = r[4 * g: 4 * g + 4]
    np.testing.assert_allclose(got[4 * g: 4 * g + 4], (x - x.mean()) / (x.std() + 1e-6), atol=1e-5)
    np.testing.assert_allclose(got_raw[4 * g: 4 * g + 4], x - x.mean(), atol=1e-6)
  assert (got[8:] == 0).all()
  with pytest.raises(ValueError, match="multiple of group_size=5"):
    group_advantages(r, 5)


def test_length_shaped_rewards():
  correct = np.array([1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 1, 0], bool)
  lengths = np.array([10, 30, 5, 20, 7, 9, 40, 3, 12, 12, 12, 1])
  rewards = correct.astype(float)
  got = np.asarray(length_shaped_rewards(rewards, correct, lengths, 4, alpha=0.5))
  want = rewards.copy()
  for g in range(3):
    sl = slice(4 * g, 4 * g + 4)
    ok = correct[sl]
    if ok.sum() > 0:
      lo, hi = lengths[sl][ok].min(), lengths[sl][ok].max()
      for i in range(4):
        if ok[i] and hi > lo:
          want[4 * g + i] += 0.5 * (hi - lengths[4 * g + i]) / (hi - lo)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert got.tolist()[:4] == [1.5, 1.0, 0.0, 1.25]
  assert (got[correct] >= 1).all() and (got[~correct] == 0).all()  # right beats wrong
  with pytest.raises(ValueError, match="alpha=-1"):
    length_shaped_rewards(rewards, correct, lengths, 4, alpha=-1)


def test_staleness_bound():
  versions = np.array([10, 9, 7, 6, 10])
  assert check_staleness(versions, 10, 3).tolist() == [True, True, True, False, True]
  assert check_staleness(versions, 10, 0).tolist() == [True, False, False, False, True]
  with pytest.raises(ValueError, match=r"rollouts \[3\] come from policy versions \[6\], more than "
                                       r"max_staleness=3 behind the learner's 10"):
    check_staleness(versions, 10, 3, on_stale="error")
  with pytest.raises(ValueError, match="newer than the learner's 8"):
    check_staleness(versions, 8, 5)
  with pytest.raises(ValueError, match="on_stale='skip'"):
    check_staleness(versions, 10, 3, on_stale="skip")


def test_bad_options():
  x = _inputs()
  args = (x["logp"], x["behav"], x["adv"], x["mask"])
  with pytest.raises(ValueError, match="needs unit_ids"):
    policy_loss(*args, level="unit")
  with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logp"):
    policy_loss(*args, kl_coef=0.1)
  with pytest.raises(ValueError, match="level='word'"):
    policy_loss(*args, level="word")
  with pytest.raises(ValueError, match="aggregation='sum'"):
    policy_loss(*args, aggregation="sum")


def test_unit_loss_on_packed_task_rollouts():
  """The pieces together: task references -> chat tokens and mask -> units -> packed rows -> loss."""
  from ling_jax.data import ByteTokenizer
  from ling_jax.posttrain.chat import encode_chat
  from ling_jax.posttrain.sft_data import pack_sequences
  from ling_jax.posttrain.tasks import make_task, reference_messages
  from ling_jax.posttrain.units import masked_units

  tok, rng = ByteTokenizer(), np.random.default_rng(3)
  examples = []
  for kind, v in [("arith", 2), ("tool", 1), ("list", 2), ("arith", 0)]:
    tokens, mask = encode_chat(reference_messages(make_task(kind, 1, 2), v), tok)
    n = len(tokens)
    examples.append({"tokens": tokens, "loss_mask": mask, "unit_ids": masked_units(tokens, mask, tok),
                     "behav": -rng.uniform(0.1, 2, n).astype(np.float32),
                     "adv": np.full(n, rng.normal(), np.float32)})
  batch, _ = pack_sequences(examples, 1024, pads={"unit_ids": -1})
  assert (batch["unit_ids"][batch["loss_mask"] == 0] == -1).all()
  assert (batch["unit_ids"][batch["loss_mask"] == 1] >= 0).all()
  logp = jnp.asarray(batch["behav"] + rng.normal(0, 0.1, batch["behav"].shape), jnp.float32)
  (loss, metrics), grad = jax.jit(jax.value_and_grad(unit_policy_loss, has_aux=True))(
      logp, batch["behav"], batch["adv"], batch["loss_mask"], batch["unit_ids"],
      segment_ids=batch["segment_ids"])
  assert np.isfinite(float(loss)) and int(metrics["tokens"]) == batch["loss_mask"].sum()
  grad = np.asarray(grad)
  assert (grad[batch["loss_mask"] == 0] == 0).all() and np.abs(grad).sum() > 0


def test_padding_with_infinite_logprobs_leaves_gradients_finite():
  x = _inputs(4)
  pad = ~x["mask"]
  logp, behav, ref = (np.where(pad, -np.inf, x[k]) for k in ("logp", "behav", "ref"))
  for level in ("token", "unit", "sequence"):
    grad = jax.jit(jax.grad(lambda l: policy_loss(
        l, behav, x["adv"], x["mask"], prox_logp=np.where(pad, -np.inf, x["prox"]), level=level,
        unit_ids=x["units"], segment_ids=x["segs"], ref_logp=ref, kl_coef=0.1)[0]))(
            jnp.asarray(logp, jnp.float32))
    assert np.isfinite(np.asarray(grad)).all(), level
