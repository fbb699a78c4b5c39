"""RL with verifiable rewards on `ling_small()` (one GPU), from the `sft_small` model.

    python -m experiments.sft_small           # first: runs/sft_small
    python -m experiments.rl_small [key.sub=value ...]
    python -m experiments.rl_small rl.level=unit rl.length_alpha=0.5 train.out_dir=runs/rl_unit
    python -m experiments.rl_small rl.mode=async rl.max_staleness=1 train.out_dir=runs/rl_async

The options of experiments.rl_tiny, at ling_small's scale: 16 prompts x 8 answers a step,
multi-step arithmetic. summary.json holds accuracy and mean answer length before and after, the
rollout throughput and the learner's idle time (compare rl.mode=sync and async side by side);
efficiency.png plots accuracy against mean output tokens across training.
"""

import sys

from experiments.overrides import main
from ling_jax.config import ling_small
from ling_jax.model.settings import Kernels
from ling_jax.posttrain.config import Eval, RLConfig, RLExperiment, Start, Tasks
from ling_jax.train.config import TrainConfig


def config() -> RLExperiment:
  return RLExperiment(
      model=ling_small(),
      start=Start(init="runs/sft_small"),
      tasks=Tasks(kinds=("arith",), difficulty=2, train_prompts=50_000, eval_prompts=256,
                  prompt_tokens=46),
      rl=RLConfig(prompts_per_step=16, group_size=8, temperature=1.0, max_new_tokens=160,
                  minibatches=2, logprob_chunk=4096),
      eval=Eval(max_new_tokens=160, show=4),
      train=TrainConfig(steps=200, learning_rate=1e-6, warmup_steps=0, weight_decay=0.0,
                        compute_dtype="bfloat16", kernels=Kernels(),
                        out_dir="runs/rl_small", checkpoint_every=50, keep_checkpoints=2,
                        log_every=5, progress=False, sample_tokens=0, mtp=False,
                        bias_update_rate=0.0),
  )


def run(exp):
  from ling_jax.posttrain.rl_loop import run_rl  # imports jax: not for --help
  return run_rl(exp)


if __name__ == "__main__":
  main(config, sys.argv[1:], run)
