"""The RL learner: one step moves the log-probabilities of rewarded samples up by what the policy
gradient predicts (float64), the asynchronous off-policy weights against a float64 reference,
the staleness bound of the rollout thread, and `run_rl` end to end (scripted sampler)."""

import dataclasses
import json
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ling_jax
from experiments import rl_tiny
from ling_jax.config import ling_tiny
from ling_jax.model.settings import Kernels
from ling_jax.posttrain import rollout as rollout_module
from ling_jax.posttrain.config import RLConfig
from ling_jax.posttrain.losses import policy_loss
from ling_jax.posttrain.rl import Learner, batches
from ling_jax.posttrain.rl_loop import run_rl
from ling_jax.posttrain.sampler import score, sequence_logprobs
from testing import random_model

CFG = ling_tiny(num_hidden_layers=2)
KERNELS = Kernels(moe="reference", lightning="xla", qk_norm_rope="xla")
B, T, PROMPT = 4, 14, 5


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
  mask = np.zeros((B, T), np.int32)
  mask[:, PROMPT:] = 1
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  return {"tokens": tokens, "positions": positions, "segment_ids": np.ones((B, T), np.int32),
          "mask": mask}


@nnx.jit
def _logits(model, tokens):
  return model.forward(tokens).logits


def _f64_logp(model, batch):
  """log p(token t | < t) in float64 from the model's fp32 logits (0 at t = 0)."""
  logits = np.asarray(_logits(model, jnp.asarray(batch["tokens"])), np.float64)
  m = logits.max(-1, keepdims=True)
  lsm = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  picked = np.take_along_axis(lsm[:, :-1], batch["tokens"][:, 1:, None], -1)[..., 0]
  return np.pad(picked, ((0, 0), (1, 0)))


def test_one_step_raises_rewarded_logprobs_as_the_policy_gradient_predicts():
  model = random_model(CFG, seed=3, kernels=KERNELS)
  batch = _batch()
  rewards = np.array([1.0, 0.0, 1.0, 0.0])
  adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)  # float64 reference
  batch["advantages"] = adv.astype(np.float32)
  batch["behav_logp"] = score(model, batch, temperature=1.0)[0]
  np.testing.assert_allclose(batch["behav_logp"] * batch["mask"],
                             _f64_logp(model, batch) * batch["mask"], atol=2e-5)
  rl = RLConfig(prompts_per_step=1, group_size=B)
  lr = 1e-3
  learner = Learner(model, optax.sgd(lr), rl)
  # Per-row gradients of the summed response log-probability, for the first-order prediction.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def row_logps(p):  # [B]: each row's summed response log-probability
    arrays = {k: jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids")}
    lp, _ = sequence_logprobs(nnx.merge(graphdef, p, rest), arrays, temperature=1.0)
    return (lp * batch["mask"]).sum(1)

  jac = jax.jit(jax.jacrev(row_logps))(params)  # leaves [B, ...]
  grads = np.concatenate([np.asarray(x, np.float64).reshape(B, -1) for x in jax.tree.leaves(jac)],
                         axis=1)  # [B, P]
  metrics = learner.train_on({"batch": batch, "version": 0})
  assert metrics["lag"] == 0 and metrics["clip_frac"] == 0.0
  new = score(learner.model(), batch, temperature=1.0)[0]
  change = ((np.asarray(new, np.float64) - batch["behav_logp"]) * batch["mask"]).sum(1)
  # SGD on L = -sum_t A_b(t) logp_t / N (token mean, ratio 1): the parameters move by
  # lr / N * sum_b A_b g_b, and row b's log-probability by its inner product with g_b.
  N = batch["mask"].sum()
  predicted = lr / N * grads @ (grads.T @ adv)
  assert (change[rewards == 1] > 0).all() and (change[rewards == 0] < 0).all()
  np.testing.assert_allclose(change, predicted, rtol=0.05)


def test_async_importance_weights_match_float64():
  """A batch sampled by version 0 trained by the learner at version 1: the off-policy weights
  min(pi_prox / mu, c) per token, prox the learner's current policy."""
  old = random_model(CFG, seed=4, kernels=KERNELS)
  new = random_model(CFG, seed=5, kernels=KERNELS)
  batch = _batch(1)
  behav = score(old, batch, temperature=1.0)[0]
  prox = score(new, batch, temperature=1.0)[0]
  mu, pi = _f64_logp(old, batch), _f64_logp(new, batch)
  m = batch["mask"] > 0
  np.testing.assert_allclose(behav[m], mu[m], atol=2e-5)
  np.testing.assert_allclose(prox[m], pi[m], atol=2e-5)
  cap = float(np.median(np.exp(pi - mu)[m]))  # the cap binds on half the tokens
  want = np.minimum(np.exp(pi - mu), cap)[m].mean()
  _, metrics = policy_loss(jnp.asarray(prox), jnp.asarray(behav), jnp.ones(B), jnp.asarray(m),
                           prox_logp=jnp.asarray(prox), behav_weight_cap=cap)
  np.testing.assert_allclose(float(metrics["behav_weight"]), want, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["ratio"]), 1.0, rtol=1e-6)  # theta = prox


class _Versions:
  """The part of a Learner that the rollout thread sees: a version under a condition."""

  def __init__(self):
    self.version, self.lock = 0, threading.Condition()

  def snapshot(self):
    with self.lock:
      return self.version, None

  wait_for = Learner.wait_for

  def bump(self):
    with self.lock:
      self.version += 1
      self.lock.notify_all()


@pytest.mark.parametrize("k", [0, 1, 2])
def test_rollout_thread_stays_within_the_staleness_bound(k):
  learner = _Versions()
  rl = RLConfig(prompts_per_step=1, group_size=2, mode="async", max_staleness=k)

  def make(model, i, version):
    time.sleep(0.01)
    return {"i": i, "version": version}

  lags = []
  for n, (item, _) in enumerate(batches(learner, make, 0, 8, rl)):
    assert item["i"] == n
    lags.append(learner.version - item["version"])
    time.sleep(0.05)  # the learner is slower than the sampler: the sampler runs ahead
    learner.bump()
  assert max(lags) == k and min(lags) >= 0


def test_run_rl_async_unit_replay_end_to_end(monkeypatch, tmp_path):
  """Two asynchronous RL steps (unit level, routing replay, KL) with a sampler that answers
  right in half the rows: the loop trains, checkpoints, reports, and the result loads."""
  exp = rl_tiny.config()
  out = str(tmp_path / "rl")
  exp = dataclasses.replace(
      exp, model=CFG, start=dataclasses.replace(exp.start, init=None),
      tasks=dataclasses.replace(exp.tasks, eval_prompts=1, train_prompts=200),
      rl=dataclasses.replace(exp.rl, prompts_per_step=2, group_size=2, max_new_tokens=40,
                             level="unit", routing_replay=True, kl_coef=0.1, mode="async",
                             max_staleness=1),
      eval=dataclasses.replace(exp.eval, max_new_tokens=40),
      train=dataclasses.replace(exp.train, steps=2, checkpoint_every=2, out_dir=out,
                                async_checkpoint=False, kernels=KERNELS))

  def answers(model, prompts, max_new_tokens, *, temperature, seed):
    out = []
    for i, p in enumerate(prompts):
      right = eval(bytes(np.asarray(p, np.uint8)).decode().split("Compute ")[1].split(".<")[0])
      text = f"So. Yes.\nAnswer: {right + i % 2}<|end|>"
      ids = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
      out.append(np.concatenate([ids, np.full(max_new_tokens - len(ids), 120, np.int32)]))
    return out

  monkeypatch.setattr(rollout_module, "generate_rows", answers)
  summary = run_rl(exp)
  records = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
  assert [r["step"] for r in records] == [1, 2]
  assert all(r["accuracy"] == 0.5 and r["lag"] <= 1 for r in records)
  assert np.isfinite([r["loss"] for r in records]).all()
  # One minibatch: the learner is at the proximal policy, and both score the tokens under the
  # sampler's (replayed) routing, so the ratio is 1 however stale the batch.
  assert all(abs(r["ratio"] - 1) < 1e-6 for r in records), records
  assert summary["learner_idle_s"] >= 0 and summary["rollout_tokens_per_s"] > 0
  assert os.path.isfile(os.path.join(out, "efficiency.png"))
  cfg, _ = ling_jax.load(out)
  assert cfg == CFG


def test_rl_raises_the_reward_of_a_trivial_task():
  """Real sampling and learning on a two-layer ling_tiny: the reward is 1 when the first sampled
  token is below 64 (a quarter of the byte vocabulary); a dozen GRPO steps raise it."""
  from ling_jax.posttrain.losses import group_advantages
  from ling_jax.posttrain.sampler import generate_rows

  model = random_model(CFG, seed=6, kernels=KERNELS)
  # Committed, as a loaded checkpoint's arrays are (optax's new counters are not): the
  # learner's step compiles once for all twelve steps (checked at the end).
  nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
  rl = RLConfig(prompts_per_step=4, group_size=8, temperature=1.0)
  learner = Learner(model, optax.adam(1e-2), rl)
  prompts = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 6)).astype(np.int32)
  rows = np.repeat(prompts, 8, axis=0)  # [32, 6]: 4 groups of 8
  rewards = []
  for step in range(12):
    _, policy = learner.snapshot()
    new = np.stack(generate_rows(policy, list(rows), 2, temperature=1.0, seed=step))
    tokens = np.concatenate([rows, new], 1)
    r = (new[:, 0] < 64).astype(np.float32)
    rewards.append(r.mean())
    mask = np.zeros_like(tokens)
    mask[:, 6:] = 1
    positions = np.broadcast_to(np.arange(8, dtype=np.int32), tokens.shape).copy()
    batch = {"tokens": tokens, "positions": positions, "segment_ids": np.ones_like(tokens),
             "mask": mask,
             "advantages": np.asarray(group_advantages(r, 8))}
    batch["behav_logp"] = score(policy, batch, temperature=1.0)[0]
    learner.train_on({"batch": batch, "version": learner.version})
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.25, rewards
  assert learner.step_fn._cache_size() == 1
