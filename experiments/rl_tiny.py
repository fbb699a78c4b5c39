"""RL with verifiable rewards on `ling_tiny` (CPU), GRPO-style by default, from `sft_tiny`.

    python -m experiments.sft_tiny            # first: runs/sft_tiny
    python -m experiments.rl_tiny [key.sub=value ...]
    python -m experiments.rl_tiny rl.level=unit rl.length_alpha=0.5 train.out_dir=runs/rl_unit
    python -m experiments.rl_tiny rl.mode=async rl.max_staleness=1 train.out_dir=runs/rl_async

Each step samples `rl.group_size` answers to each of `rl.prompts_per_step` arithmetic prompts,
rewards right answers (plus the length bonus with rl.length_alpha > 0), and takes the clipped
policy-gradient step of `rl.level` (token, unit or sequence); `rl.kl_coef > 0` adds the KL to the
starting policy, `rl.routing_replay=true` replays the sampler's experts in the learner. Prints
accuracy and mean answer length before and after; writes metrics.jsonl, efficiency.png and
summary.json (rollout throughput, learner idle time) under runs/rl_tiny; a rerun resumes.
"""

import sys

from experiments.overrides import main
from ling_jax.config import ling_tiny
from ling_jax.model.settings import Kernels
from ling_jax.posttrain.config import Eval, RLConfig, RLExperiment, Start, Tasks
from ling_jax.train.config import TrainConfig


def config() -> RLExperiment:
  return RLExperiment(
      model=ling_tiny(),
      start=Start(init="runs/sft_tiny"),
      tasks=Tasks(kinds=("arith",), difficulty=1, eval_prompts=16, prompt_tokens=44),
      rl=RLConfig(prompts_per_step=4, group_size=8, temperature=1.0, max_new_tokens=112),
      eval=Eval(max_new_tokens=112, show=2),
      train=TrainConfig(steps=30, learning_rate=3e-4, warmup_steps=0, weight_decay=0.0,
                        compute_dtype="float32",
                        kernels=Kernels(moe="reference", lightning="xla", qk_norm_rope="xla"),
                        out_dir="runs/rl_tiny", checkpoint_every=10, log_every=1,
                        progress=False, sample_tokens=0, mtp=False, bias_update_rate=0.0),
  )


def run(exp):
  from ling_jax.posttrain.rl_loop import run_rl  # imports jax: not for --help
  return run_rl(exp)


if __name__ == "__main__":
  main(config, sys.argv[1:], run)
