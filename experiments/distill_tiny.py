"""Shortest-correct-response distillation of the `sft_tiny` model on CPU.

    python -m experiments.sft_tiny            # first: a verbose arithmetic model, runs/sft_tiny
    python -m experiments.distill_tiny [key.sub=value ...]

Samples `distill.samples` answers to each of `distill.prompts` training prompts, keeps the
shortest correct one per prompt, fine-tunes on those, and prints accuracy and mean answer length
(output tokens) on held-out prompts before and after. A start model that gets nothing right is
refused (nothing to distill). Writes under runs/distill_tiny (before.json, distilled.json,
checkpoints/, summary.json); a rerun resumes.
"""

import sys

from experiments.overrides import main
from ling_jax.config import ling_tiny
from ling_jax.model.settings import Kernels
from ling_jax.posttrain.config import DistillConfig, DistillExperiment, Eval, Start, Tasks
from ling_jax.train.config import TrainConfig


def config() -> DistillExperiment:
  return DistillExperiment(
      model=ling_tiny(),
      start=Start(init="runs/sft_tiny"),
      tasks=Tasks(kinds=("arith",), difficulty=1, eval_prompts=16, prompt_tokens=44),
      distill=DistillConfig(prompts=32, samples=4, temperature=1.0, max_new_tokens=112,
                            seq_len=256, batch_size=8),
      eval=Eval(max_new_tokens=112, show=2),
      train=TrainConfig(steps=60, learning_rate=1e-3, warmup_steps=5, compute_dtype="float32",
                        kernels=Kernels(moe="reference", lightning="xla", qk_norm_rope="xla"),
                        out_dir="runs/distill_tiny", checkpoint_every=30, log_every=10,
                        progress=False, sample_tokens=0, mtp=False, bias_update_rate=0.0),
  )


def run(exp):
  from ling_jax.posttrain.distill_loop import run_distill  # imports jax: not for --help
  return run_distill(exp)


if __name__ == "__main__":
  main(config, sys.argv[1:], run)
