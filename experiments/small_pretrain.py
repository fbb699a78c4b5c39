"""Pretrain `ling_small()` (1.03B total / 0.29B active) on one GPU; prints tokens/s and MFU.

    python -m experiments.small_pretrain [train.steps=50] [data.batch_size=16 train.grad_accum=2]

64 x 4096 tokens a step (262k, a modest batch for a 1B model) as 8 micro-batches of 8 x 4096
(`grad_accum`): AdamW's update, the gradient norm and the casts of the fp32 weights to bf16 (cast
once a step) cost ~18 ms each time they run, and running them once per 8 micro-batches rather than
once per 8 x 4096 is 4.9% more tokens/s (192.8k against 183.9k on an H100,
BENCHMARKS.md#design-decisions; the same update as one pass over the 64 rows up to summation order).
No rematerialisation (`remat.policy=none`): on an H100 with the GPU kernels (fused MLA attention
keeps no [T, T] scores, the fused MoE kernel no dispatched copy of the tokens) a micro-batch's
residuals fit (peak 52.0 GiB), and not recomputing the forward is 8% faster than `dots_no_scores`
(158k against 146k tokens/s). The head + cross-entropy go 8192 tokens at a time (`ce_chunk`: 13.5 ms
a head's value and gradient against 14.2 at 4096, 16.4 at 1024; `python -m benchmarks.ce_head
--chunk N`). On a smaller GPU, `train.remat.policy=dots_no_scores` keeps only each layer's deep
matmuls (XLA's temp estimate, benchmarks/train_memory.py on the CPU paths: 39 GiB at a micro-batch
of 8) and `train.remat.policy=full` keeps nothing but the layer inputs; a larger `train.grad_accum`
shrinks the micro-batch.

bf16 matmuls over fp32 master weights (router in fp32); on the GPU the MoE runs the grouped- matmul
kernels, Lightning attention the Pallas kernels and MLA cuDNN's fused attention (`train.kernels` all
"auto"; the memory estimates above used the CPU paths, sorted experts, the chunked reference and
materialised scores); on the GPU the head's cross-entropy and Lightning's QK norms + RoPE run fused
Pallas kernels. On an H100: 227.4k-228.8k tokens/s, 42.9-43.2% MFU with the MTP head's matmul
counted (2026-12-07, two leases); on an H200 243.4k, 45.9%, against 208.8k for the code before
the refactor in the same call (+16.6%, not yet explained: BENCHMARKS.md#training-throughput;
micro-batches of 12 rows run out of memory). The
default data is the synthetic packed stream, which needs neither grain nor files (the GPU image
has no grain); where grain is installed, `data.source=stdlib` (bytes) or a JSONL/ArrayRecord corpus with
`data.tokenizer=tokenizer.json` trains on text instead.
"""

import sys

from experiments.overrides import main
from ling_jax.config import ling_small
from ling_jax.data import DataConfig
from ling_jax.model.settings import Kernels, Remat
from ling_jax.train import Experiment, TrainConfig


def config() -> Experiment:
  return Experiment(
      model=ling_small(),
      data=DataConfig(source="synthetic", seq_len=4096, batch_size=64, eval_batches=1),
      train=TrainConfig(steps=100, learning_rate=1e-3, warmup_steps=10, compute_dtype="bfloat16",
                        kernels=Kernels(), remat=Remat(policy="none", scope="layer"),
                        ce_chunk=8192, grad_accum=8,
                        out_dir="runs/small_pretrain", checkpoint_every=50, keep_checkpoints=2,
                        log_every=5, sample_tokens=32, unigram_batches=1),
  )


if __name__ == "__main__":
  main(config, sys.argv[1:])
