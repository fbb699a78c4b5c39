"""`run_rl(exp)`: the RL stage end to end (docs/posttrain.md, "Training loops").

Measures accuracy and mean answer length on the evaluation tasks (before.json), runs `train.steps`
RL steps (posttrain/rl.py: synchronous or asynchronous rollouts), checkpointing the policy like
pretraining (a run checkpoint: `ling_jax.load`, `convert export` and the next stage read it; a
rerun resumes, its data state being the step), measures again, and writes metrics.jsonl (per step:
reward, accuracy and mean output tokens of the step's rollouts, the loss's metrics, rollout and
learner times), summary.json and efficiency.png: accuracy against mean output tokens across
training (the training rollouts, with the evaluations before and after as larger points).

The training tasks of step i are the pool's (seeds 0 .. tasks.train_prompts - 1 whose prompts
fit `tasks.prompt_tokens`) entries i * P .. (i + 1) * P - 1, cyclically (P = rl.prompts_per_step).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time

import jax.numpy as jnp
import numpy as np

from ling_jax.posttrain.config import RLExperiment
from ling_jax.posttrain.init import stage_config, tokenizer_and_template
from ling_jax.posttrain.rl import Learner, batches, make_batch
from ling_jax.posttrain.rollout import prompt_messages
from ling_jax.posttrain.chat import encode_prompt
from ling_jax.posttrain.sft import cached_json, measure, stage_meta, start_model
from ling_jax.posttrain.tasks import make_task
from ling_jax.train.checkpoint import Checkpointer, check_compatible
from ling_jax.train.errors import NonFiniteError, RunRefused, TrainingInterrupted
from ling_jax.train.loop import _last, _sigint_sets
from ling_jax.train.optim import optimizer
from ling_jax.train.report import MetricsLog, read_metrics
from ling_jax.train.step import TrainState


def task_pool(tasks, tokenizer, template) -> list:
  """The training tasks (module docstring)."""
  pool = []
  for seed in range(tasks.train_prompts):
    task = make_task(tasks.kinds[seed % len(tasks.kinds)], seed, tasks.difficulty)
    if tasks.prompt_tokens and len(encode_prompt(prompt_messages(task), tokenizer,
                                                 template)) != tasks.prompt_tokens:
      continue
    pool.append(task)
  if not pool:
    raise RunRefused(f"no training task of tasks.kinds={tasks.kinds} has a prompt of "
                     f"tasks.prompt_tokens={tasks.prompt_tokens} tokens")
  return pool


def _state(learner: Learner) -> TrainState:
  return TrainState(step=jnp.asarray(learner.version, jnp.int32), params=learner.params,
                    expert_bias=learner.bias, opt_state=learner.opt_state)


def run_rl(exp: RLExperiment) -> dict:
  t, rl = exp.train, exp.rl
  cfg = stage_config(exp.model, exp.start.init)
  tokenizer, template, _ = tokenizer_and_template(exp.start, cfg.vocab_size)
  meta = stage_meta(cfg, stage="rl", start=exp.start, tasks=exp.tasks, rl=rl)
  ckpt_dir = os.path.abspath(os.path.join(t.out_dir, "checkpoints"))
  start = check_compatible(ckpt_dir, meta) or 0
  if start > t.steps:
    raise RunRefused(f"checkpoint at step {start} under {ckpt_dir} > train.steps={t.steps}")
  t0 = time.perf_counter()
  model = start_model(cfg, exp.start.init, t, resuming=bool(start))
  before = cached_json(os.path.join(t.out_dir, "before.json"),
                       lambda: measure(model, exp.tasks, exp.eval, tokenizer, template))
  print(f"before: accuracy {before['accuracy']:.3f}, mean answer length "
        f"{before['mean_length']:.1f} tokens")
  pool = task_pool(exp.tasks, tokenizer, template)
  tx = optimizer(t)
  learner = Learner(model, tx, rl)
  ckpt = Checkpointer(ckpt_dir, every=t.checkpoint_every, keep=t.keep_checkpoints,
                      async_save=t.async_checkpoint)
  if start:
    state, _ = ckpt.restore(start, _state(learner))
    learner.params, learner.opt_state, learner.version = state.params, state.opt_state, start
    if rl.kl_coef and exp.start.init is not None:  # the reference is the starting policy
      learner.ref = Learner(start_model(cfg, exp.start.init, t, resuming=False), tx, rl).params
    print(f"resumed from {ckpt_dir} step {start}")
  log = MetricsLog(os.path.join(t.out_dir, "metrics.jsonl"), start)
  P = rl.prompts_per_step

  def make(model, i, version):
    tasks = [pool[(i * P + j) % len(pool)] for j in range(P)]
    return make_batch(model, tasks, tokenizer, template, rl, seed=t.seed * 100_003 + i,
                      version=version)

  stop = threading.Event()
  gen_tokens, rollout_s, idle_s, learn_s = 0, 0.0, 0.0, 0.0
  try:
    with _sigint_sets(stop):
      for item, waited in batches(learner, make, start, t.steps, rl):
        t1 = time.perf_counter()
        m = learner.train_on(item)
        s = item["stats"]
        rec = {"step": learner.version, "reward": float(np.mean(item["batch"]["rewards"])),
               "accuracy": s["accuracy"], "mean_length": s["mean_length"], **m,
               "rollout_s": item["rollout_s"], "learner_idle_s": waited,
               "learn_s": time.perf_counter() - t1}
        gen_tokens += int(item["batch"]["mask"].sum())
        rollout_s, idle_s, learn_s = rollout_s + item["rollout_s"], idle_s + waited, \
            learn_s + rec["learn_s"]
        log.write([rec])
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
          raise NonFiniteError(f"RL diverged at step {learner.version}: loss {m['loss']}, "
                               f"gradient norm {m['grad_norm']}; stopped without saving it")
        if learner.version % t.log_every == 0 or learner.version == t.steps:
          print(f"step {learner.version:>5}  reward {rec['reward']:.3f}  acc {s['accuracy']:.3f}"
                f"  len {s['mean_length']:.1f}  clip {m['clip_frac']:.3f}  ratio {m['ratio']:.4f}"
                f"  lag {m['lag']}  idle {waited:.2f}s", flush=True)
        if ckpt.due(learner.version) or learner.version == t.steps:
          ckpt.save(learner.version, _state(learner), {"step": learner.version}, meta,
                    force=learner.version == t.steps)
        if stop.is_set():
          break
  finally:
    ckpt.close()
  if stop.is_set():
    raise TrainingInterrupted(f"interrupted at step {learner.version}; re-run the same command "
                              "to resume", learner.version, _last(ckpt_dir))
  after = measure(learner.model(), exp.tasks, exp.eval, tokenizer, template)
  print(f"after:  accuracy {after['accuracy']:.3f}, mean answer length "
        f"{after['mean_length']:.1f} tokens")
  wall = time.perf_counter() - t0
  summary = {"stage": "rl", "mode": rl.mode, "before": before, "after": after,
             "steps": t.steps, "resumed_from": start,
             "rollout_tokens_per_s": gen_tokens / rollout_s if rollout_s else None,
             "rollout_s": rollout_s, "learn_s": learn_s, "learner_idle_s": idle_s,
             "seconds": wall}
  records = read_metrics(log.path)
  if efficiency_plot(os.path.join(t.out_dir, "efficiency.png"), records, before, after):
    print(f"wrote {os.path.join(t.out_dir, 'efficiency.png')}")
  with open(os.path.join(t.out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def efficiency_plot(path: str, records: list[dict], before: dict, after: dict) -> bool:
  """Accuracy against mean output tokens: one point per training step (coloured by step), the
  evaluations before and after as larger labelled points."""
  try:
    from matplotlib.figure import Figure  # no pyplot: the process's backend is left alone
  except ImportError:
    print("matplotlib is not installed: no efficiency plot written")
    return False
  fig = Figure(figsize=(6, 4), dpi=100)
  ax = fig.subplots()
  if records:
    pts = ax.scatter([r["mean_length"] for r in records], [r["accuracy"] for r in records],
                     c=[r["step"] for r in records], s=12, cmap="viridis",
                     label="training rollouts")
    fig.colorbar(pts, ax=ax, label="step")
  for name, m, marker in (("before", before, "o"), ("after", after, "*")):
    ax.scatter([m["mean_length"]], [m["accuracy"]], s=120, marker=marker, color="red",
               label=f"eval {name}")
  ax.set_xlabel("mean output tokens per answer")
  ax.set_ylabel("accuracy")
  ax.set_title("accuracy per output token across RL")
  ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  return True
