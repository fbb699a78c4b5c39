"""Supervised fine-tuning on chat data, through pretraining's train step and checkpoints
(docs/posttrain.md, "Training loops").

`run_sft(exp)`: the conversations (a chat JSONL file, or the reference solutions of `exp.tasks`)
packed by `SFTIterator` into rows whose `loss_mask` marks the assistant tokens; pretraining's
jitted train step (`train/step.py`: with a `loss_mask` only those tokens are targets), its
optimizer, schedule and Orbax checkpoints (the iterator's {epoch, index} is the data state), so
a rerun resumes from the last checkpoint. Task accuracy and mean answer length are measured
before (kept in before.json, so a resumed run does not measure again) and after.

Outputs under train.out_dir: checkpoints/ (a run checkpoint: `ling_jax.load` and `python -m
ling_jax.convert export` read it, and the next stage's `start.init` takes it), metrics.jsonl,
loss_curve.png and summary.json.

`finetune` is the training part on its own, which shortest-correct distillation reuses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import types

import jax.numpy as jnp
from flax import nnx

from ling_jax.config import LingConfig
from ling_jax.posttrain.chat import read_chat_jsonl
from ling_jax.posttrain.config import SFTExperiment
from ling_jax.posttrain.init import (fresh_model, load_start_model, stage_config,
                                     tokenizer_and_template)
from ling_jax.posttrain.rollout import examples, rollout, select_tasks, stats
from ling_jax.posttrain.sft_data import SFTIterator
from ling_jax.posttrain.tasks import sft_conversations
from ling_jax.train.checkpoint import Checkpointer, check_compatible
from ling_jax.train.config import TrainConfig
from ling_jax.train.errors import RunRefused, TrainingInterrupted
from ling_jax.train.loop import _last, _sigint_sets, _train, train_step
from ling_jax.train.optim import optimizer
from ling_jax.train.report import MetricsLog, read_metrics, write_loss_curve
from ling_jax.train.step import init_state, split_model


def task_conversations(tasks) -> list[list[dict]]:
  """Reference conversations of the training seeds, kinds round-robin (seed s: kind s mod k),
  at tasks.verbosity (-1: seed s at verbosity s mod 3)."""
  convs = []
  for s in range(tasks.train_prompts):
    kind = tasks.kinds[s % len(tasks.kinds)]
    verbosity = s % 3 if tasks.verbosity == -1 else tasks.verbosity
    convs += sft_conversations(kind, [s], difficulty=tasks.difficulty, verbosity=verbosity)
  return convs


def eval_tasks(tasks, tokenizer, template):
  """The evaluation tasks (seeds from tasks.eval_offset)."""
  return select_tasks(tasks.kinds, tasks.difficulty,
                      range(tasks.eval_offset, tasks.eval_offset + 100 * tasks.eval_prompts),
                      tasks.eval_prompts, tokenizer=tokenizer, template=template,
                      prompt_tokens=tasks.prompt_tokens)


def measure(model, tasks, ev, tokenizer, template) -> dict:
  """Accuracy and mean answer length (output tokens) of `model` on the evaluation tasks, and a
  few of its answers."""
  eps = rollout(model, eval_tasks(tasks, tokenizer, template), tokenizer, template,
                samples=ev.samples, temperature=ev.temperature, max_new_tokens=ev.max_new_tokens,
                max_turns=ev.max_turns, seed=ev.seed)
  return {**stats(eps), "examples": examples(eps, ev.show)}


def start_model(cfg: LingConfig, init: str | None, t: TrainConfig, *, resuming: bool):
  """The model a stage trains: the checkpoint `init` (its weights are not read when resuming,
  the run's own checkpoint replaces them) or a fresh one of `cfg`."""
  dtype = jnp.dtype(t.compute_dtype)
  if init is None or resuming:
    return fresh_model(cfg, seed=t.seed, dtype=dtype, kernels=t.kernels)
  return load_start_model(init, dtype=dtype, kernels=t.kernels)[1]


def finetune(model, t: TrainConfig, batches, meta: dict, *, seq_len: int, batch_size: int):
  """Train `model` on `batches` (an SFTIterator) for t.steps optimizer steps with pretraining's
  step, resuming from t.out_dir/checkpoints; returns (the trained model, train summary)."""
  cfg = model.config
  ckpt_dir = os.path.abspath(os.path.join(t.out_dir, "checkpoints"))
  start = check_compatible(ckpt_dir, meta) or 0
  if start > t.steps:
    raise RunRefused(f"checkpoint at step {start} under {ckpt_dir} > train.steps={t.steps}")
  graphdef, params, bias, constants = split_model(model)
  tx = optimizer(t)
  state = init_state(params, bias, tx)
  os.makedirs(t.out_dir, exist_ok=True)
  ckpt = Checkpointer(ckpt_dir, every=t.checkpoint_every, keep=t.keep_checkpoints,
                      async_save=t.async_checkpoint)
  # `_train` reads the run's train config and its tokens a step from an experiment's sections.
  shape = types.SimpleNamespace(train=t, data=types.SimpleNamespace(seq_len=seq_len,
                                                                    batch_size=batch_size))
  stop = threading.Event()
  try:
    with _sigint_sets(stop):
      if start:
        state, data_state = ckpt.restore(start, state)
        batches.set_state(data_state)
        print(f"resumed from {ckpt_dir} step {start}")
      log = MetricsLog(os.path.join(t.out_dir, "metrics.jsonl"), start)
      state, tps, done = _train(train_step(cfg, t, graphdef, constants, tx), state, batches,
                                ckpt, log, shape, start, meta, lambda tps: None, stop)
  finally:
    ckpt.close()
  if stop.is_set():
    raise TrainingInterrupted(f"interrupted at step {done}; re-run the same command to resume",
                              done, _last(ckpt_dir))
  records = read_metrics(log.path)
  write_loss_curve(os.path.join(t.out_dir, "loss_curve.png"), records, eval_loss=None,
                   unigram=None)
  trained = nnx.merge(graphdef, state.params, state.expert_bias, constants)
  return trained, {"steps": t.steps, "resumed_from": start, "tokens_per_s": tps,
                   "final_train_ce": records[-1]["ce"] if records else None}


def stage_meta(cfg: LingConfig, **sections) -> dict:
  """A checkpoint's meta item: the model config (what `ling_jax.load` reads) and the sections a
  resumed run must agree with (JSON-normalised)."""
  meta = {"model": dataclasses.asdict(cfg),
          **{k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
             for k, v in sections.items()}}
  return json.loads(json.dumps(meta))


def cached_json(path: str, make):
  """The JSON in `path`, or `make()` written there first (measurements a resumed run reuses)."""
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  value = make()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)
  return value


def run_sft(exp: SFTExperiment) -> dict:
  """Fine-tune, measure before and after, and write summary.json (module docstring)."""
  t, d = exp.train, exp.data
  cfg = stage_config(exp.model, exp.start.init)
  tokenizer, template, _ = tokenizer_and_template(exp.start, cfg.vocab_size)
  if d.jsonl is not None:
    convs = read_chat_jsonl(d.jsonl)
    names = [f"{d.jsonl}: conversation {i + 1}" for i in range(len(convs))]
  else:
    convs, names = task_conversations(exp.tasks), None
  batches = SFTIterator(convs, tokenizer, template, seq_len=d.seq_len, batch_size=d.batch_size,
                        seed=d.seed, names=names)
  meta = stage_meta(cfg, stage="sft", start=exp.start, tasks=exp.tasks, data=d)
  ckpt_dir = os.path.join(t.out_dir, "checkpoints")
  resuming = bool(check_compatible(os.path.abspath(ckpt_dir), meta))
  t0 = time.perf_counter()
  model = start_model(cfg, exp.start.init, t, resuming=resuming)
  print(f"model: {cfg.param_count(include_mtp=True):,} parameters, from "
        f"{exp.start.init or 'a fresh init'}; {len(convs)} conversations")
  before = cached_json(os.path.join(t.out_dir, "before.json"),
                       lambda: measure(model, exp.tasks, exp.eval, tokenizer, template))
  print(f"before: accuracy {before['accuracy']:.3f}, mean answer length "
        f"{before['mean_length']:.1f} tokens")
  model, train = finetune(model, t, batches, meta, seq_len=d.seq_len, batch_size=d.batch_size)
  after = measure(model, exp.tasks, exp.eval, tokenizer, template)
  print(f"after:  accuracy {after['accuracy']:.3f}, mean answer length "
        f"{after['mean_length']:.1f} tokens")
  summary = {"stage": "sft", "before": before, "after": after, **train,
             "seconds": time.perf_counter() - t0}
  with open(os.path.join(t.out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
