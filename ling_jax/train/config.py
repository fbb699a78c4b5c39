"""Training configuration: `TrainConfig` and the `Experiment` of model, data, train and mesh.

Experiments (`experiments/<name>.py`) build an `Experiment`; `key.sub=value` command-line
overrides replace its typed fields (experiments/overrides.py).
"""

from __future__ import annotations

import dataclasses
import math

from ling_jax.config import LingConfig
from ling_jax.data.pipeline import DataConfig
from ling_jax.model.settings import Kernels, Parallel, Remat  # (imports no jax)
from ling_jax.parallel.mesh import MeshConfig  # (imports no jax)

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer, schedule, numerics, checkpointing and reporting of one training run."""

  steps: int = 600                 # optimizer steps in all (a resumed run goes on up to it)
  seed: int = 0                    # parameter init
  # Start from released or trained weights instead of random init (parameters and expert
  # biases only; the optimizer starts fresh; the model config must match): an HF folder (read
  # whole into host memory: for a large model convert it first, python -m ling_jax.convert
  # import HF_DIR CKPT_DIR), a converted checkpoint (restored sharded) or a run's out_dir.
  init_from: str | None = None
  # AdamW with linear warmup then cosine decay to min_lr_ratio * learning_rate.
  learning_rate: float = 3e-3
  min_lr_ratio: float = 0.1        # in [0, 1]
  warmup_steps: int = 50           # linear from 0 to learning_rate
  b1: float = 0.9                  # in [0, 1): first-moment decay
  b2: float = 0.95                 # in [0, 1): second-moment decay
  eps: float = 1e-8                # > 0: added to the root of the second moment
  weight_decay: float = 0.1        # not applied to norms and biases
  grad_clip: float = 1.0           # global-norm clipping (0: off)
  # Numerics: parameters are fp32 masters, matmuls run in compute_dtype, the router in fp32.
  compute_dtype: str = "bfloat16"  # "float32" or "bfloat16"
  kernels: Kernels = Kernels()     # which implementation each op runs (model/settings.py)
  parallel: Parallel = Parallel()  # the shard_map islands' choices under a mesh (settings.py)
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
  checkpoint_every: int = 100      # steps between checkpoints (and one at the last step)
  keep_checkpoints: int = 3        # the latest ones; older ones are deleted
  async_checkpoint: bool = True    # write files while the next steps run
  log_every: int = 10             # steps between log lines (metric fetches: host syncs)
  progress: bool = True            # tqdm progress bar
  peak_flops: float = 0.0          # per device, for MFU; 0 = look it up from the device kind
  sample_tokens: int = 200         # generated after training (0: none)
  sample_temperature: float = 0.7  # 0: greedy
  unigram_batches: int = 64        # train batches counted for the unigram baseline

  def __post_init__(self):
    errors = []
    if self.steps < 1:
      errors.append(f"steps={self.steps} must be >= 1")
    # The optimizer's numbers: a NaN, or a learning rate <= 0, would train nothing or diverge
    # without an error (`not x > 0` is also true for NaN).
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      errors.append(f"learning_rate={self.learning_rate} must be a finite number > 0")
    if not 0 <= self.min_lr_ratio <= 1:
      errors.append(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        errors.append(f"{name}={getattr(self, name)} must be in [0, 1)")
    if not (math.isfinite(self.eps) and self.eps > 0):
      errors.append(f"eps={self.eps} must be a finite number > 0")
    for name in ("weight_decay", "grad_clip", "bias_update_rate", "sample_temperature",
                 "peak_flops"):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
        errors.append(f"{name}={getattr(self, name)} must be a finite number >= 0")
    if self.compute_dtype not in DTYPES:
      errors.append(f"compute_dtype={self.compute_dtype!r} not in {DTYPES}")
    if self.ce_chunk < 0:
      errors.append(f"ce_chunk={self.ce_chunk} must be >= 0")
    if self.grad_accum < 1:
      errors.append(f"grad_accum={self.grad_accum} must be >= 1")
    for name in ("checkpoint_every", "keep_checkpoints", "log_every"):
      if getattr(self, name) < 1:
        errors.append(f"{name}={getattr(self, name)} must be >= 1")
    for name in ("warmup_steps", "sample_tokens", "unigram_batches"):
      if getattr(self, name) < 0:
        errors.append(f"{name}={getattr(self, name)} must be >= 0")
    if errors:
      raise ValueError("invalid TrainConfig: " + "; ".join(errors))


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: LingConfig
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig = MeshConfig()

  def __post_init__(self):
    if self.data.batch_size % self.train.grad_accum:
      raise ValueError(f"invalid Experiment: data.batch_size={self.data.batch_size} is not a "
                       f"multiple of train.grad_accum={self.train.grad_accum}")
