"""How the model runs, as two small frozen settings: which implementation each op runs
(`Kernels`) and which blocks of the forward are rematerialised (`Remat`).

`LingForCausalLM(cfg, rngs=..., kernels=Kernels(moe="xla"))` hands each `Kernels` field to the
modules that call that op; `forward(..., remat=Remat("dots"))` checkpoints its blocks. Training
carries one of each (`TrainConfig.kernels`, `TrainConfig.remat`, overridable as
`train.kernels.moe=xla`, `train.remat.policy=full`), and the loaders and benchmarks take a
`Kernels`. This module imports no jax (so a config, and an experiment's `--help`, builds without
it): the names each op and policy table accepts are copied here, and tests/model/test_model.py
checks them against the ops' own `IMPLS` and model/remat.py's `REMAT`.

Every `Kernels` field takes its op's `impl`, in one vocabulary:
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

IMPLS = ("auto", "reference", "xla", "pallas", "interpret")
ATTENTION_IMPLS = IMPLS + ("cudnn",)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_no_scores")
REMAT_SCOPES = ("layer", "group")


@dataclasses.dataclass(frozen=True)
class Kernels:
  """One `impl` per op; "auto" everywhere by default."""

  lightning: str = "auto"      # pallas_kernels.simple_gla: the Lightning layers' linear attention
  qk_norm_rope: str = "auto"   # pallas_kernels.qk_norm_rope: their QK norms + RoPE (not decoding)
  attention: str = "auto"      # pallas_kernels.attention: MLA's causal attention without a cache
  moe: str = "auto"            # pallas_kernels.moe: the routed experts
  rms_norm: str = "auto"       # pallas_kernels.rms_norm: every RMSNorm and GroupRMSNorm
  cross_entropy: str = "auto"  # pallas_kernels.cross_entropy: the training loss's chunked head

  def __post_init__(self):
    errors = []
    for f in dataclasses.fields(self):
      allowed = ATTENTION_IMPLS if f.name == "attention" else IMPLS
      if getattr(self, f.name) not in allowed:
        errors.append(f"{f.name}={getattr(self, f.name)!r} not in {allowed}")
    if errors:
      raise ValueError("invalid Kernels: " + "; ".join(errors))


@dataclasses.dataclass(frozen=True)
class Remat:
  """Checkpoint each block of `scope` with the named `policy` (model/remat.py's `REMAT`; "none":
  no checkpoint). scope "layer": every decoder layer; "group": every hybrid group (the scan body)
  and every layer outside the groups. The MTP layer is a block either way."""

  policy: str = "none"         # none, full, dots, dots_no_batch, dots_no_scores
  scope: str = "layer"         # layer or group

  def __post_init__(self):
    if self.policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {self.policy!r}; choose one of {REMAT_POLICIES}")
    if self.scope not in REMAT_SCOPES:
      raise ValueError(f"unknown remat scope {self.scope!r}; choose one of {REMAT_SCOPES}")

  def at(self, scope: str) -> str:
    """The policy for blocks of `scope`: `policy` there, "none" elsewhere."""
    return self.policy if scope == self.scope else "none"
