"""Fine-tune `ling_small()` on one GPU to answer multi-step arithmetic with a chain of thought,
starting from a `small_pretrain` run.

    python -m experiments.small_pretrain            # first: writes runs/small_pretrain
    python -m experiments.sft_small [key.sub=value ...]

`start.init` takes an HF folder, a converted checkpoint or a run's checkpoint (`start.init=none`:
a fresh model). Text is UTF-8 bytes (ids < 256 of the model's vocabulary) in the built-in chat
template, unless `start.tokenizer=` names a tokenizer.json. The training conversations are the
tasks' reference solutions, made in process, at mixed verbosity (`tasks.verbosity=-1`: a third
each answer only, terse and verbose), so that the model samples answers of different lengths
for distillation and the length-aware reward to choose between (`tasks.verbosity=2`: verbose
only); accuracy and mean answer length on held-out prompts are printed before and after. Writes
under runs/sft_small; a rerun resumes; `python -m ling_jax.convert export runs/sft_small
HF_DIR` writes the result in the HF layout, and `experiments.rl_small` /
`experiments.distill_small` start from it.
"""

import sys

from experiments.overrides import main
from ling_jax.config import ling_small
from ling_jax.model.settings import Kernels, Remat
from ling_jax.posttrain.config import Eval, SFTData, SFTExperiment, Start, Tasks
from ling_jax.train.config import TrainConfig


def config() -> SFTExperiment:
  return SFTExperiment(
      model=ling_small(),
      start=Start(init="runs/small_pretrain"),
      tasks=Tasks(kinds=("arith",), difficulty=2, train_prompts=50_000, eval_prompts=256,
                  verbosity=-1, prompt_tokens=46),
      data=SFTData(seq_len=1024, batch_size=32),
      eval=Eval(max_new_tokens=160, show=4),
      train=TrainConfig(steps=1000, learning_rate=3e-4, warmup_steps=50, compute_dtype="bfloat16",
                        kernels=Kernels(), remat=Remat(policy="none", scope="layer"),
                        ce_chunk=8192, out_dir="runs/sft_small", checkpoint_every=250,
                        keep_checkpoints=2, log_every=25, progress=False, sample_tokens=0,
                        mtp=False, bias_update_rate=0.0),
  )


def run(exp):
  from ling_jax.posttrain.sft import run_sft  # imports jax: not for --help
  return run_sft(exp)


if __name__ == "__main__":
  main(config, sys.argv[1:], run)
