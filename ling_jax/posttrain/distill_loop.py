"""Shortest-correct-response distillation as a stage: sample, keep the shortest correct answer per
prompt, fine-tune on those (docs/posttrain.md, "Shortest-correct distillation").

`run_distill(exp)`:
  1. measure accuracy and mean answer length on the evaluation tasks (before.json);
  2. sample `distill.samples` answers to each of `distill.prompts` training tasks with the
     starting model and keep, per task, the shortest one the checker accepts (distilled.json:
     the conversations and the statistics of all samples);
  3. SFT on those conversations (`sft.finetune`: pretraining's step, resumable);
  4. measure again, the same way as in 1.
Steps 1 and 2 are written once and reused by a resumed run, whose starting weights are then
never read again. summary.json holds before, samples, after and the change in mean length.
"""

from __future__ import annotations

import json
import os
import time

from ling_jax.posttrain.config import DistillExperiment
from ling_jax.posttrain.distill import distill
from ling_jax.posttrain.init import stage_config, tokenizer_and_template
from ling_jax.posttrain.rollout import rollout, select_tasks
from ling_jax.posttrain.sft import cached_json, finetune, measure, stage_meta, start_model
from ling_jax.posttrain.sft_data import SFTIterator
from ling_jax.train.checkpoint import check_compatible
from ling_jax.train.errors import RunRefused


def sample_and_select(model, exp: DistillExperiment, tokenizer, template) -> dict:
  """{conversations: the kept shortest-correct conversations, samples: stats of every sample}."""
  d, tasks = exp.distill, exp.tasks
  chosen = select_tasks(tasks.kinds, tasks.difficulty, range(tasks.train_prompts), d.prompts,
                        tokenizer=tokenizer, template=template,
                        prompt_tokens=tasks.prompt_tokens)
  eps = rollout(model, chosen, tokenizer, template, samples=d.samples,
                temperature=d.temperature, max_new_tokens=d.max_new_tokens,
                max_turns=exp.eval.max_turns, seed=exp.train.seed)
  groups = []
  for g in range(len(chosen)):
    group = eps[g * d.samples:(g + 1) * d.samples]
    groups.append({"prompt": group[0].messages[:group[0].prompt_messages],
                   "samples": [e.answer for e in group], "rewards": [e.reward for e in group],
                   "lengths": [e.length for e in group]})
  convs, sample_stats = distill(groups)
  return {"conversations": convs, "samples": sample_stats}


def run_distill(exp: DistillExperiment) -> dict:
  t, d = exp.train, exp.distill
  cfg = stage_config(exp.model, exp.start.init)
  tokenizer, template, _ = tokenizer_and_template(exp.start, cfg.vocab_size)
  meta = stage_meta(cfg, stage="distill", start=exp.start, tasks=exp.tasks, distill=d)
  resuming = bool(check_compatible(os.path.abspath(os.path.join(t.out_dir, "checkpoints")), meta))
  t0 = time.perf_counter()
  model = start_model(cfg, exp.start.init, t, resuming=resuming)
  before = cached_json(os.path.join(t.out_dir, "before.json"),
                       lambda: measure(model, exp.tasks, exp.eval, tokenizer, template))
  print(f"before: accuracy {before['accuracy']:.3f}, mean answer length "
        f"{before['mean_length']:.1f} tokens")
  picked = cached_json(os.path.join(t.out_dir, "distilled.json"),
                       lambda: sample_and_select(model, exp, tokenizer, template))
  s = picked["samples"]
  print(f"sampled {s['n']} answers: accuracy {s['accuracy']:.3f}, mean length "
        f"{s['mean_length']:.1f}; kept the shortest correct of {s['kept']} prompts")
  if not picked["conversations"]:
    raise RunRefused(f"no sampled answer was correct ({os.path.join(t.out_dir, 'distilled.json')}"
                     "): nothing to distill; start from a model that solves some tasks "
                     "(e.g. start.init=runs/sft_tiny) or raise distill.samples")
  batches = SFTIterator(picked["conversations"], tokenizer, template, seq_len=d.seq_len,
                        batch_size=d.batch_size, seed=t.seed)
  model, train = finetune(model, t, batches, meta, seq_len=d.seq_len, batch_size=d.batch_size)
  after = measure(model, exp.tasks, exp.eval, tokenizer, template)
  change = (after["mean_length"] / before["mean_length"] - 1) if before["mean_length"] else None
  print(f"after:  accuracy {after['accuracy']:.3f}, mean answer length "
        f"{after['mean_length']:.1f} tokens" +
        (f" ({100 * change:+.1f}%)" if change is not None else ""))
  summary = {"stage": "distill", "before": before, "samples": s, "after": after,
             "length_change": change, **train, "seconds": time.perf_counter() - t0}
  with open(os.path.join(t.out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
