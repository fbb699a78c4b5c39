"""How the model runs, as small frozen settings: which implementation each op runs (`Kernels`),
which blocks of the forward are rematerialised (`Remat`), how its shard_map islands exchange data
under a mesh (`Parallel`), and how the routed experts' weights, and optionally the dense
Linears', are held (`ExpertWeights`: the parameter dtype, or FP8 for serving).

`LingForCausalLM(cfg, rngs=..., kernels=Kernels(moe="xla"))` hands each `Kernels` field to the
modules that call that op; `forward(..., remat=Remat("dots"))` checkpoints its blocks. Training
carries one of each (`TrainConfig.kernels`, `TrainConfig.remat`, overridable as
`train.kernels.moe=xla`, `train.remat.policy=full`), and the loaders and benchmarks take a
`Kernels`. This module imports no jax (so a config, and an experiment's `--help`, builds without
it): the names each op and policy table accepts are copied here, and tests/train/test_train.py
checks them against the ops' own `IMPLS` and model/remat.py's `REMAT` (and `EXPERT_EXCHANGES`
against ling_jax/parallel/expert.py's `STRATEGIES`).

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
EXPERT_FORMATS = ("dense", "fp8-block", "fp8-channel")
EXPERT_EXCHANGES = ("all_gather", "ragged_all_to_all", "all_to_all")


@dataclasses.dataclass(frozen=True)
class Kernels:
  """One `impl` per op; "auto" everywhere by default."""

  lightning: str = "auto"      # pallas_kernels.simple_gla: the Lightning layers' linear attention
  qk_norm_rope: str = "auto"   # pallas_kernels.qk_norm_rope: their QK norms + RoPE (not decoding)
  attention: str = "auto"      # pallas_kernels.attention: MLA's causal attention without a cache
  moe: str = "auto"            # pallas_kernels.moe: the routed experts
  rms_norm: str = "auto"       # pallas_kernels.rms_norm: every RMSNorm and GroupRMSNorm
  cross_entropy: str = "auto"  # pallas_kernels.cross_entropy: the training loss's chunked head
  linear: str = "auto"         # pallas_kernels.grouped_matmul: the dense Linears' FP8 products

  def __post_init__(self):
    errors = []
    for f in dataclasses.fields(self):
      allowed = ATTENTION_IMPLS if f.name == "attention" else IMPLS
      if getattr(self, f.name) not in allowed:
        errors.append(f"{f.name}={getattr(self, f.name)!r} not in {allowed}")
    if errors:
      raise ValueError("invalid Kernels: " + "; ".join(errors))

  @classmethod
  def every(cls, impl: str) -> "Kernels":
    """Every op on `impl`; `Kernels.every("xla")` is the reference an fp32 model or a kernel
    change is checked against."""
    return cls(**{f.name: impl for f in dataclasses.fields(cls)})


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


@dataclasses.dataclass(frozen=True)
class ExpertWeights:
  """How the routed experts' weights are held (docs/checkpoints.md, "FP8"):
    "dense"        arrays in the model's param_dtype (the default; training needs it)
    "fp8-block"    float8_e4m3fn values with one fp32 scale per `block` = (rows, cols) tile of
                   the [in, out] weight (the "fp8" release's 128 x 128 blocks)
    "fp8-channel"  float8_e4m3fn values with one fp32 scale per output column
                   (compressed-tensors' channel strategy)
  `linears` holds the dense Linears in the same FP8 form too (attention, dense and shared-expert
  MLPs, MTP eh_proj; not the router gate or the head), over the 2-D view [prod(in axes),
  prod(out axes)] of each kernel (docs/inference.md, "FP8 weights"). The FP8 forms are read by
  the grouped-matmul kernels as they are (the XLA paths dequantise them first) and are forward
  only."""

  format: str = "dense"
  block: tuple[int, int] = (128, 128)
  linears: bool = False

  def __post_init__(self):
    if isinstance(self.block, list):  # from JSON
      object.__setattr__(self, "block", tuple(self.block))
    if self.format not in EXPERT_FORMATS:
      raise ValueError(f"unknown expert weight format {self.format!r}; choose one of "
                       f"{EXPERT_FORMATS}")
    b = self.block
    if not (isinstance(b, tuple) and len(b) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in b)):
      raise ValueError(f"ExpertWeights.block={b!r} must be (rows, cols), two ints > 0")
    if not isinstance(self.linears, bool):
      raise ValueError(f"ExpertWeights.linears={self.linears!r} must be True or False")
    if self.linears and self.format == "dense":
      raise ValueError("ExpertWeights.linears=True needs an FP8 format (fp8-block or "
                       "fp8-channel), not 'dense'")

  @property
  def fp8(self) -> bool:
    return self.format != "dense"

  def to_json(self) -> dict:
    # `linears` only when on: a marker of FP8 experts alone reads as it did before the field.
    out = {"format": self.format, "block": list(self.block)}
    return {**out, "linears": True} if self.linears else out


@dataclasses.dataclass(frozen=True)
class Parallel:
  """Choices of the model's shard_map islands under a mesh of several devices
  (docs/parallelism.md §4); without one (or on one device) nothing here applies.

  expert_exchange: how the routed experts' tokens reach the devices holding their experts
  (ling_jax/parallel/expert.py): "all_gather" (gather the expert group's tokens, reduce-scatter
  the outputs), "all_to_all" (one row per token and owner device, exchanged as padded blocks),
  "ragged_all_to_all" (the same rows through XLA's ragged collective; GPU or TPU only)."""

  expert_exchange: str = "all_gather"  # all_gather, all_to_all or ragged_all_to_all

  def __post_init__(self):
    if self.expert_exchange not in EXPERT_EXCHANGES:
      raise ValueError(f"unknown expert_exchange {self.expert_exchange!r}; choose one of "
                       f"{EXPERT_EXCHANGES}")
