"""Pretrain `ling_tiny` on the Python standard library's source (bytes) on CPU in a few minutes.

    python -m experiments.tiny_pretrain [key.sub=value ...]

No download: the corpus is this machine's stdlib `.py` files, tokenised as UTF-8 bytes (vocab 256).
Writes checkpoints, metrics.jsonl, summary.json and loss_curve.png under runs/tiny_pretrain; a
rerun resumes from the last checkpoint (and with train.steps larger, trains on).
"""

import sys

from experiments.overrides import main
from ling_jax.config import ling_tiny
from ling_jax.data import DataConfig
from ling_jax.model.settings import Kernels
from ling_jax.train import Experiment, TrainConfig


def config() -> Experiment:
  return Experiment(
      model=ling_tiny(),
      data=DataConfig(source="stdlib", seq_len=128, batch_size=16, eval_docs=16, eval_batches=8),
      # Chosen for CPU speed, on any backend: every expert on every token, the chunked GLA and
      # the reference QK norm + RoPE.
      train=TrainConfig(steps=500, learning_rate=3e-3, warmup_steps=40, compute_dtype="float32",
                        kernels=Kernels(moe="reference", lightning="xla", qk_norm_rope="xla"),
                        out_dir="runs/tiny_pretrain", checkpoint_every=50,
                        log_every=10, bias_update_rate=1e-3),
  )


if __name__ == "__main__":
  main(config, sys.argv[1:])
