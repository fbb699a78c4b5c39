"""Fine-tune `ling_tiny` (bytes, the built-in chat template) to answer one-step arithmetic with a
verbose chain of thought, on CPU in about a minute.

    python -m experiments.sft_tiny [key.sub=value ...]

The training conversations are the tasks' reference solutions (`tasks.verbosity=2`: a sentence
per step), made in process; accuracy and mean answer length on held-out prompts are printed
before and after. `start.init=` starts from an HF folder, a converted checkpoint or a run's
checkpoint (e.g. runs/tiny_pretrain) instead of a fresh model. Writes checkpoints/,
metrics.jsonl, loss_curve.png and summary.json under runs/sft_tiny; a rerun resumes; `python -m
ling_jax.convert export runs/sft_tiny HF_DIR` writes the result in the HF layout.
"""

import sys

from experiments.overrides import main
from ling_jax.config import ling_tiny
from ling_jax.model.settings import Kernels
from ling_jax.posttrain.config import Eval, SFTData, SFTExperiment, Start, Tasks
from ling_jax.train.config import TrainConfig


def config() -> SFTExperiment:
  return SFTExperiment(
      model=ling_tiny(),
      start=Start(),
      tasks=Tasks(kinds=("arith",), difficulty=1, train_prompts=4096, eval_prompts=16,
                  verbosity=2, prompt_tokens=44),
      data=SFTData(seq_len=256, batch_size=8),
      eval=Eval(max_new_tokens=112, show=2),
      train=TrainConfig(steps=150, learning_rate=3e-3, warmup_steps=10, compute_dtype="float32",
                        kernels=Kernels(moe="reference", lightning="xla", qk_norm_rope="xla"),
                        out_dir="runs/sft_tiny", checkpoint_every=50, log_every=25,
                        progress=False, sample_tokens=0, mtp=False),
  )


def run(exp):
  from ling_jax.posttrain.sft import run_sft  # imports jax: not for --help
  return run_sft(exp)


if __name__ == "__main__":
  main(config, sys.argv[1:], run)
