"""Which implementation each op of the model runs: one frozen settings object, passed once.

`LingForCausalLM(cfg, rngs=..., kernels=Kernels(moe="xla"))` hands each field to the modules that
call that op; training (`TrainConfig.kernels`, overridable as `train.kernels.moe=xla`), the
checkpoint loaders and the benchmarks take the same object. Every field takes its op's `impl`,
in one vocabulary:
  "reference"  the obviously correct jnp form (recurrent GLA, every expert on every token,
               materialised attention scores)
  "xla"        the fast pure-XLA form (chunked GLA, sorted blocked experts); the reference where
               an op has no other
  "pallas"     the compiled Pallas kernels (Triton, or Mosaic GPU where the op picks it)
  "interpret"  the same kernels in Pallas interpret mode (CPU tests)
  "cudnn"      attention only: cuDNN's fused flash attention
  "auto"       the op's own choice by backend, dtype and shape (each op's docstring says which)
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import attention, cross_entropy, moe, qk_norm_rope, rms_norm, simple_gla

_OPS = {"lightning": simple_gla, "qk_norm_rope": qk_norm_rope, "attention": attention,
        "moe": moe, "rms_norm": rms_norm, "cross_entropy": cross_entropy}


@dataclasses.dataclass(frozen=True)
class Kernels:
  """One `impl` per op; "auto" everywhere by default."""

  lightning: str = "auto"      # pallas_kernels.simple_gla: the Lightning layers' linear attention
  qk_norm_rope: str = "auto"   # pallas_kernels.qk_norm_rope: their QK norms + RoPE (decode steps
                               # of one token run the reference)
  attention: str = "auto"      # pallas_kernels.attention: MLA's causal attention without a cache
  moe: str = "auto"            # pallas_kernels.moe: the routed experts
  rms_norm: str = "auto"       # pallas_kernels.rms_norm: every RMSNorm and GroupRMSNorm
  cross_entropy: str = "auto"  # pallas_kernels.cross_entropy: the training loss's chunked head

  def __post_init__(self):
    errors = [f"{name}={getattr(self, name)!r} not in {op.IMPLS}" for name, op in _OPS.items()
              if getattr(self, name) not in op.IMPLS]
    if errors:
      raise ValueError("invalid Kernels: " + "; ".join(errors))
