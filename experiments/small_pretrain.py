"""Pretrain `ling_small()` (1.03B total / 0.29B active) on one GPU; prints tokens/s and MFU.

    python -m experiments.small_pretrain [train.steps=50] [data.batch_size=4] [train.remat=dots]

bf16 matmuls over fp32 master weights (router in fp32). The default data is the synthetic packed
stream, which needs neither grain nor files (the GPU image has no grain); where grain is
installed, `data.source=stdlib` (bytes) or a JSONL/ArrayRecord corpus with
`data.tokenizer=tokenizer.json` trains on text instead.
"""

import sys

from experiments.overrides import main
from ling_jax.config import ling_small
from ling_jax.data import DataConfig
from ling_jax.train import Experiment, TrainConfig


def config() -> Experiment:
  return Experiment(
      model=ling_small(),
      data=DataConfig(source="synthetic", seq_len=2048, batch_size=8, eval_batches=4),
      train=TrainConfig(steps=300, learning_rate=1e-3, warmup_steps=50, compute_dtype="bfloat16",
                        moe_impl="sorted", gla_impl="chunked", remat="none",
                        out_dir="runs/small_pretrain", checkpoint_every=100, keep_checkpoints=2,
                        log_every=10, sample_tokens=32, unigram_batches=8),
  )


if __name__ == "__main__":
  main(config, sys.argv[1:])
