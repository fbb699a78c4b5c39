"""RL with verifiable rewards: rollouts, the learner's update, synchronous and asynchronous loops
(docs/posttrain.md, "Training loops"; the losses are posttrain/losses.py's).

A step: `rl.prompts_per_step` training tasks, `rl.group_size` episodes each (`rollout`), rewards
from the checkers (plus the length-aware bonus when `rl.length_alpha > 0`), group-relative
advantages, then one optimizer step per minibatch on the clipped surrogate at `rl.level`
(token: GRPO; unit: linguistic units; sequence: GSPO), optionally with the k3 KL to the initial
(reference) policy. Each episode is one row of the batch (tokens, positions, segment ids 1 on the
episode and 0 on padding, `mask` 1 on the model's own tokens).

The behaviour log-probabilities are the sampler's: one forward pass of the sampled rows with the
sampling parameters (`sampler.score`), which also records each token's experts when
`rl.routing_replay` is on; the learner's forward then replays them (`LingForCausalLM.forward`'s
`routing`). The expert biases are not updated in RL (they steer routing, and the policy that is
trained should be the one that sampled).

Asynchronous mode (`rl.mode=async`): a rollout thread samples batch i with the newest published
parameters while the learner trains on batch i - 1. It may start batch i only once the learner
holds version >= i - k (k = `rl.max_staleness`; version = updates done), so the batch's version
v satisfies u - v <= k when the learner, at version u = i, trains on it (`check_staleness`
checks it again). The correction is decoupled PPO (losses.py): the learner recomputes the
proximal log-probabilities with its parameters at the start of the update, clips the ratio
against them and weighs each token by min(pi_prox / mu, c). With k = 0 the two modes are the same
computation. The learner's idle time (waiting for rollouts) and the rollout time are reported.
"""

from __future__ import annotations

import math
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ling_jax.posttrain.losses import (check_staleness, group_advantages, length_shaped_rewards,
                                       policy_loss)
from ling_jax.posttrain.rollout import rollout, stats
from ling_jax.posttrain.sampler import score, sequence_logprobs
from ling_jax.posttrain.units import masked_units


def episode_rows(episodes, *, pad_to: int = 32) -> dict:
  """{tokens, positions, segment_ids, mask} [B, T] int32, one episode a row, T the longest
  episode rounded up to a multiple of `pad_to` (fewer distinct shapes to compile)."""
  T = pad_to * math.ceil(max(len(e.tokens) for e in episodes) / pad_to)
  B = len(episodes)
  rows = {k: np.zeros((B, T), np.int32) for k in ("tokens", "segment_ids", "mask")}
  for b, e in enumerate(episodes):
    n = len(e.tokens)
    rows["tokens"][b, :n], rows["segment_ids"][b, :n], rows["mask"][b, :n] = e.tokens, 1, e.mask
  rows["positions"] = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  return rows


def rewards_and_advantages(episodes, rl) -> tuple[np.ndarray, np.ndarray]:
  """(rewards [B] after the length bonus, advantages [B])."""
  r = np.array([e.reward for e in episodes], np.float32)
  if rl.length_alpha:
    r = np.asarray(length_shaped_rewards(r, r >= 1.0, [e.length for e in episodes],
                                         rl.group_size, alpha=rl.length_alpha))
  return r, np.asarray(group_advantages(r, rl.group_size, normalize_std=rl.normalize_std))


def make_batch(model, tasks, tokenizer, template, rl, *, seed: int, version: int) -> dict:
  """Sample, score and lay out one step's rollouts (host arrays) and their statistics."""
  t0 = time.perf_counter()
  eps = rollout(model, tasks, tokenizer, template, samples=rl.group_size,
                temperature=rl.temperature, max_new_tokens=rl.max_new_tokens,
                max_turns=rl.max_turns, seed=seed)
  batch = episode_rows(eps)
  batch["rewards"], batch["advantages"] = rewards_and_advantages(eps, rl)
  batch["behav_logp"], ids = score(model, batch, temperature=rl.temperature,
                                   record=rl.routing_replay, chunk=rl.logprob_chunk)
  if ids is not None:
    batch["routing"] = ids
  if rl.level == "unit":
    batch["unit_ids"] = np.stack([masked_units(batch["tokens"][b], batch["mask"][b], tokenizer)
                                  for b in range(len(eps))])
  return {"batch": batch, "version": version, "stats": stats(eps),
          "rollout_s": time.perf_counter() - t0, "example": eps[0].text}


def make_rl_step(graphdef, constants, tx: optax.GradientTransformation, rl):
  """A jitted `(params, opt_state, expert_bias, batch) -> (params, opt_state, metrics)` for one
  minibatch: the clipped surrogate of `rl.level` (losses.policy_loss), with `prox_logp` and
  `ref_logp` when the batch carries them."""
  cap = rl.behav_weight_cap or None

  def loss_fn(params, expert_bias, batch):
    model = nnx.merge(graphdef, params, expert_bias, constants)
    logp, _ = sequence_logprobs(model, batch, temperature=rl.temperature,
                                chunk=rl.logprob_chunk, routing=batch.get("routing"))
    return policy_loss(logp, batch["behav_logp"], batch["advantages"], batch["mask"],
                       prox_logp=batch.get("prox_logp"), level=rl.level,
                       unit_ids=batch.get("unit_ids"), segment_ids=batch["segment_ids"],
                       clip_eps=rl.clip_eps, clip_eps_high=rl.clip_eps_high,
                       behav_weight_cap=cap, ref_logp=batch.get("ref_logp"),
                       kl_coef=rl.kl_coef, aggregation=rl.aggregation)

  def step(params, opt_state, expert_bias, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, expert_bias,
                                                                       batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}

  return jax.jit(step)  # no donation: the rollout thread may still hold the parameters


def learner_inputs(batch: dict) -> dict:
  """The arrays the learner's step reads (device arrays)."""
  keys = ("tokens", "positions", "segment_ids", "mask", "advantages", "behav_logp", "routing",
          "unit_ids", "prox_logp", "ref_logp")
  return {k: jnp.asarray(batch[k]) for k in keys if k in batch}


def update(step_fn, params, opt_state, expert_bias, batch: dict, minibatches: int):
  """Split the batch's rows into `minibatches` and take one optimizer step on each; the last
  step's metrics (host floats)."""
  B = batch["tokens"].shape[0]
  size = B // minibatches
  metrics = None
  for m in range(minibatches):
    part = {k: v[m * size:(m + 1) * size] for k, v in batch.items()}
    params, opt_state, metrics = step_fn(params, opt_state, expert_bias, learner_inputs(part))
  return params, opt_state, {k: float(v) for k, v in jax.device_get(metrics).items()}


class Learner:
  """The policy's parameters and optimizer state, its version (updates done) and the frozen
  reference policy; `publish` hands the sampler a model of the newest version."""

  def __init__(self, model, tx, rl, *, version: int = 0, opt_state=None):
    from ling_jax.train.step import split_model
    self.graphdef, params, self.bias, self.constants = split_model(model)
    self.rl, self.tx, self.version = rl, tx, version
    opt_state = opt_state if opt_state is not None else tx.init(params)
    # Each array committed where it is, as the step's outputs are: a fresh model's arrays and
    # optax's new counters are uncommitted, and the second step compiled the step again for the
    # first's committed outputs (5 s of a tiny model's CPU run).
    self.params, self.opt_state = jax.tree.map(lambda x: jax.device_put(x, x.sharding),
                                               (params, opt_state))
    self.ref = self.params if rl.kl_coef else None
    self.step_fn = make_rl_step(self.graphdef, self.constants, tx, rl)
    self.lock = threading.Condition()

  def model(self, params=None):
    return nnx.merge(self.graphdef, self.params if params is None else params, self.bias,
                     self.constants)

  def snapshot(self):
    """(version, a model of it) under the lock."""
    with self.lock:
      return self.version, self.model()

  def train_on(self, item: dict) -> dict:
    """One update on a rollout batch of any version within the staleness bound."""
    rl, batch = self.rl, dict(item["batch"])
    check_staleness([item["version"]], self.version, rl.max_staleness, on_stale="error")
    # Both under the sampler's routing when it is replayed, as the learner's own logp is.
    routing = batch.get("routing")
    if rl.mode == "async":
      batch["prox_logp"] = score(self.model(), batch, temperature=rl.temperature,
                                 chunk=rl.logprob_chunk, routing=routing)[0]
    if rl.kl_coef:
      batch["ref_logp"] = score(self.model(self.ref), batch, temperature=rl.temperature,
                                chunk=rl.logprob_chunk, routing=routing)[0]
    params, opt_state, metrics = update(self.step_fn, self.params, self.opt_state, self.bias,
                                        batch, rl.minibatches)
    with self.lock:
      self.params, self.opt_state, self.version = params, opt_state, self.version + 1
      self.lock.notify_all()
    return {**metrics, "lag": self.version - 1 - item["version"]}

  def wait_for(self, version: int, stop: threading.Event):
    """Block until the learner holds `version` (or `stop` is set)."""
    with self.lock:
      while self.version < version and not stop.is_set():
        self.lock.wait(0.1)


def batches(learner: Learner, make, start: int, steps: int, rl):
  """Rollout batches for steps start..steps-1, in order, with the time the learner waited for
  each: made in turn (sync) or by a thread at most `rl.max_staleness` versions ahead (async;
  the thread stops when the consumer stops iterating)."""
  if rl.mode == "sync":
    for i in range(start, steps):
      version, model = learner.snapshot()
      t0 = time.perf_counter()
      item = make(model, i, version)
      yield item, time.perf_counter() - t0
    return
  out: queue.Queue = queue.Queue()
  stop = threading.Event()

  def producer():
    try:
      for i in range(start, steps):
        learner.wait_for(i - rl.max_staleness, stop)
        if stop.is_set():
          return
        version, model = learner.snapshot()
        out.put(make(model, i, version))
    except BaseException as e:  # handed to the learner, which raises it
      out.put(e)

  thread = threading.Thread(target=producer, daemon=True, name="rollouts")
  thread.start()
  try:
    for _ in range(start, steps):
      t0 = time.perf_counter()
      item = out.get()
      if isinstance(item, BaseException):
        raise item
      yield item, time.perf_counter() - t0
  finally:
    stop.set()
    thread.join()
