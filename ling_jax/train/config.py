"""Training configuration: `TrainConfig` and the `Experiment` triple (model, data, train).

Experiments (`experiments/<name>.py`) build an `Experiment`; `key.sub=value` command-line
overrides replace its typed fields (experiments/overrides.py).
"""

from __future__ import annotations

import dataclasses

from ling_jax.config import LingConfig
from ling_jax.data.pipeline import DataConfig
from ling_jax.model.kernels import Kernels
from ling_jax.model.remat import Remat

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer, schedule, numerics, checkpointing and reporting of one training run."""

  steps: int = 600
  seed: int = 0                    # parameter init
  # AdamW with linear warmup then cosine decay to min_lr_ratio * learning_rate.
  learning_rate: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 50
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1        # not applied to norms and biases
  grad_clip: float = 1.0           # global-norm clipping
  # Numerics: parameters are fp32 masters, matmuls run in compute_dtype, the router in fp32.
  compute_dtype: str = "bfloat16"
  kernels: Kernels = Kernels()     # which implementation each op runs (ling_jax.model.kernels)
  # Activation memory: jax.checkpoint each decoder layer (remat.scope "layer") or hybrid group /
  # scan body ("group") with the named remat.policy, and the head + cross-entropy in chunks of
  # ce_chunk tokens (0: materialise the full [tokens, vocab] fp32 logits).
  remat: Remat = Remat()
  ce_chunk: int = 4096
  # Gradient accumulation: each batch runs as grad_accum equal micro-batches (one optimizer step;
  # activation memory of one micro-batch). data.batch_size must be a multiple of it.
  grad_accum: int = 1
  mtp: bool = True                 # add the MTP loss, weighted by model.mtp_loss_scaling_factor
  # Aux-loss-free balancing (DeepSeek-V3): b_e += rate * sign(mean load - load_e) after each step.
  bias_update_rate: float = 1e-3
  # Output: checkpoints/, metrics.jsonl and loss_curve.png under out_dir.
  out_dir: str = "runs/default"
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  log_every: int = 10
  progress: bool = True            # tqdm progress bar
  peak_flops: float = 0.0          # per device, for MFU; 0 = look it up from the device kind
  sample_tokens: int = 200         # generated after training (0: none)
  sample_temperature: float = 0.7
  unigram_batches: int = 64        # train batches counted for the unigram baseline

  def __post_init__(self):
    errors = []
    if self.steps < 1:
      errors.append(f"steps={self.steps} must be >= 1")
    if self.compute_dtype not in DTYPES:
      errors.append(f"compute_dtype={self.compute_dtype!r} not in {DTYPES}")
    if self.ce_chunk < 0:
      errors.append(f"ce_chunk={self.ce_chunk} must be >= 0")
    if self.grad_accum < 1:
      errors.append(f"grad_accum={self.grad_accum} must be >= 1")
    if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
      errors.append("checkpoint_every, keep_checkpoints and log_every must be >= 1")
    if self.warmup_steps < 0:
      errors.append(f"warmup_steps={self.warmup_steps} must be >= 0")
    if errors:
      raise ValueError("invalid TrainConfig: " + "; ".join(errors))


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: LingConfig
  data: DataConfig
  train: TrainConfig

  def __post_init__(self):
    if self.data.batch_size % self.train.grad_accum:
      raise ValueError(f"invalid Experiment: data.batch_size={self.data.batch_size} is not a "
                       f"multiple of train.grad_accum={self.train.grad_accum}")
