"""Shortest-correct-response distillation of the `sft_small` model on one GPU.

    python -m experiments.sft_small           # first: runs/sft_small
    python -m experiments.distill_small [key.sub=value ...]

Samples `distill.samples` answers to each of `distill.prompts` training prompts, keeps the
shortest correct one per prompt, fine-tunes on those, and prints accuracy and mean answer length
(output tokens) on held-out prompts before and after (summary.json: `length_change`). Writes
under runs/distill_small; a rerun resumes.
"""

import sys

from experiments.overrides import main
from ling_jax.config import ling_small
from ling_jax.model.settings import Kernels, Remat
from ling_jax.posttrain.config import DistillConfig, DistillExperiment, Eval, Start, Tasks
from ling_jax.train.config import TrainConfig


def config() -> DistillExperiment:
  return DistillExperiment(
      model=ling_small(),
      start=Start(init="runs/sft_small"),
      tasks=Tasks(kinds=("arith",), difficulty=2, train_prompts=50_000, eval_prompts=256,
                  prompt_tokens=46),
      distill=DistillConfig(prompts=2048, samples=8, temperature=1.0, max_new_tokens=160,
                            seq_len=1024, batch_size=32),
      eval=Eval(max_new_tokens=160, show=4),
      train=TrainConfig(steps=300, learning_rate=1e-4, warmup_steps=20, compute_dtype="bfloat16",
                        kernels=Kernels(), remat=Remat(policy="none", scope="layer"),
                        ce_chunk=8192, out_dir="runs/distill_small", checkpoint_every=100,
                        keep_checkpoints=2, log_every=25, progress=False, sample_tokens=0,
                        mtp=False, bias_update_rate=0.0),
  )


def run(exp):
  from ling_jax.posttrain.distill_loop import run_distill  # imports jax: not for --help
  return run_distill(exp)


if __name__ == "__main__":
  main(config, sys.argv[1:], run)
