"""Ling-2.6 configuration: frozen dataclasses that own their derived numbers.

Field names follow the Hugging Face `config.json` of `model_type: bailing_hybrid`
(docs/architecture.md §1.1) so that `from_hf_config` / `to_hf_config` (in `hf_config.py`) list only
the exceptions. Presets are plain functions. Numbers derived from the fields (layer layout,
parameter counts, FLOPs) live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

LayerKind = Literal["linear", "mla"]
MlpKind = Literal["dense", "moe"]


@dataclasses.dataclass(frozen=True)
class YarnScaling:
  """YaRN RoPE scaling (docs/architecture.md §3.5.4): DeepSeek-style frequency blend and attention
  factor."""

  factor: float
  original_max_position_embeddings: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0

  def __post_init__(self):
    errors = _check(self, ("factor",), _finite(lambda v: v > 0), "a finite number > 0")
    errors += _check(self, ("original_max_position_embeddings",), _int_at_least(1),
                     "an integer >= 1")
    errors += _check(self, ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"),
                     _finite(lambda v: True), "a finite number")
    if errors:
      raise ValueError("invalid YarnScaling: " + "; ".join(errors))


@dataclasses.dataclass(frozen=True)
class LingConfig:
  """Architecture of a Ling-2.6 model (docs/architecture.md §1-3). Defaults are Ling-2.6-flash's,
  for the presets; a config.json is read without them: `from_hf_config` fills an absent field with
  the reference's own default (docs/config.md)."""

  vocab_size: int = 157184
  hidden_size: int = 4096
  intermediate_size: int = 9216
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  # Rotary embeddings: NeoX half-split on the first partial_rotary_factor * head_dim dims of the
  # linear layers, GPT-J interleaved on the MLA rope dims (docs/architecture.md §3.4.3, 3.5.3, 6.8).
  rope_theta: float = 6e6
  partial_rotary_factor: float = 0.5
  rope_scaling: YarnScaling | None = None
  max_position_embeddings: int = 131072
  # Hybrid layout: every layer_group_size-th layer is MLA, the rest Lightning (docs/architecture.md
  # §2).
  layer_group_size: int = 8
  group_norm_size: int = 4  # number of GroupRMSNorm groups on the linear-attention output
  use_qk_norm: bool = True
  # Decay layer factor, docs/architecture.md §6.1: "A" = 1 - l/(L-1) + 1e-5 (project default), "B" =
  # 1 - (l-1)/(L-1) + 1e-5.
  decay_form: Literal["A", "B"] = "A"
  # MLA (docs/architecture.md §3.5).
  q_lora_rank: int | None = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  # MoE (docs/architecture.md §3.7).
  num_experts: int = 256
  num_experts_per_tok: int = 8
  num_shared_experts: int = 1
  moe_intermediate_size: int = 1024
  n_group: int = 8
  topk_group: int = 4
  routed_scaling_factor: float = 2.5
  first_k_dense_replace: int = 1
  # MTP (docs/architecture.md §3.9) and training-only fields.
  num_nextn_predict_layers: int = 1
  mtp_loss_scaling_factor: float = 0.3
  # Token ids (generation only).
  bos_token_id: int | None = 156891
  eos_token_id: int | tuple[int, ...] | None = 156895
  pad_token_id: int | None = 156892

  def __post_init__(self):
    errors = _field_errors(self)
    if errors:  # the checks below assume every field has a valid type and range
      raise ValueError("invalid LingConfig: " + "; ".join(errors))
    if (self.num_attention_heads * self.head_dim) % self.group_norm_size:
      errors.append(
          f"group_norm_size={self.group_norm_size} must divide num_attention_heads * head_dim"
          f" = {self.num_attention_heads * self.head_dim}"
      )
    rot = self.rotary_dim
    if rot <= 0 or rot > self.head_dim or rot % 2:
      errors.append(f"partial_rotary_factor={self.partial_rotary_factor} gives rotary dim {rot};"
                    f" it must be even and in (0, head_dim={self.head_dim}]")
    if self.qk_rope_head_dim % 2:
      errors.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
    if self.num_experts % self.n_group:
      errors.append(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
    elif not 1 <= self.topk_group <= self.n_group:
      errors.append(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
    elif self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
      errors.append(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in the"
                    f" {self.topk_group} kept groups")
    if errors:
      raise ValueError("invalid LingConfig: " + "; ".join(errors))

  # ------------------------------------------------------------------ derived layout
  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def shared_expert_intermediate_size(self) -> int:
    return self.moe_intermediate_size * self.num_shared_experts

  def layer_types(self) -> tuple[LayerKind, ...]:
    """Token mixer of each main layer (docs/architecture.md §2, HF predicate including the tail
    clause)."""
    L, G = self.num_hidden_layers, self.layer_group_size
    tail_start = (L // G) * G
    return tuple("mla" if (i + 1) % G == 0 or i >= tail_start else "linear" for i in range(L))

  def mlp_types(self) -> tuple[MlpKind, ...]:
    return tuple("dense" if i < self.first_k_dense_replace else "moe"
                 for i in range(self.num_hidden_layers))

  @property
  def num_groups(self) -> int:
    """Number of full hybrid groups of layer_group_size layers."""
    return self.num_hidden_layers // self.layer_group_size

  @property
  def num_prefix_groups(self) -> int:
    """Leading full groups that contain a dense-MLP layer (unrolled, not scanned)."""
    return min(self.num_groups, -(-self.first_k_dense_replace // self.layer_group_size))

  @property
  def num_scanned_groups(self) -> int:
    return self.num_groups - self.num_prefix_groups

  @property
  def num_tail_layers(self) -> int:
    return self.num_hidden_layers - self.num_groups * self.layer_group_size

  # ------------------------------------------------------------------ parameter counts
  # matmul=True: only the weights of matmuls, without the norm scales and the expert bias.
  def _linear_attn_params(self, matmul: bool = False) -> int:
    D, HK = self.hidden_size, self.num_attention_heads * self.head_dim
    w = D * 3 * HK + D * HK + HK * D  # qkv, output gate, output
    return w if matmul else w + HK + (2 * self.head_dim if self.use_qk_norm else 0)

  def _mla_params(self, matmul: bool = False) -> int:
    D, H = self.hidden_size, self.num_attention_heads
    if self.q_lora_rank is None:
      q = D * H * self.qk_head_dim
    else:
      q = D * self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
    kv = (D * (self.kv_lora_rank + self.qk_rope_head_dim)
          + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim))
    w = q + kv + H * self.v_head_dim * D
    return w if matmul else w + (self.q_lora_rank or 0) + self.kv_lora_rank  # the lora norms

  def _swiglu_params(self, width: int) -> int:
    return 3 * self.hidden_size * width

  def _moe_params(self, active: bool, matmul: bool = False) -> int:
    experts = self.num_experts_per_tok if active else self.num_experts
    w = (experts * self._swiglu_params(self.moe_intermediate_size)
         + self._swiglu_params(self.shared_expert_intermediate_size)
         + self.num_experts * self.hidden_size)  # the router
    return w if matmul else w + self.num_experts  # the expert bias

  def _layer_params(self, mixer: LayerKind, mlp: MlpKind, active: bool,
                    matmul: bool = False) -> int:
    m = self._linear_attn_params(matmul) if mixer == "linear" else self._mla_params(matmul)
    f = (self._swiglu_params(self.intermediate_size) if mlp == "dense"
         else self._moe_params(active, matmul))
    return m + f + (0 if matmul else 2 * self.hidden_size)

  def _mtp_params(self, active: bool, matmul: bool = False) -> int:
    D = self.hidden_size
    return (self._layer_params("mla", "moe", active, matmul) + 2 * D * D
            + (0 if matmul else 3 * D))  # eh_proj; enorm, hnorm, final_layernorm

  def param_count(self, include_mtp: bool = False) -> int:
    """Total parameters (docs/architecture.md §1.4: 104,186,915,584 for flash, MTP 3,307,493,632
    more)."""
    layers = sum(self._layer_params(t, m, active=False)
                 for t, m in zip(self.layer_types(), self.mlp_types()))
    total = layers + 2 * self.vocab_size * self.hidden_size + self.hidden_size
    if include_mtp and self.num_nextn_predict_layers:
      total += self._mtp_params(active=False)
    return total

  def active_param_count(self, include_mtp: bool = False) -> int:
    """Parameters touched per token: top-k routed + shared experts (docs/architecture.md §1.4:
    ~7.45B for flash)."""
    layers = sum(self._layer_params(t, m, active=True)
                 for t, m in zip(self.layer_types(), self.mlp_types()))
    total = layers + 2 * self.vocab_size * self.hidden_size + self.hidden_size
    if include_mtp and self.num_nextn_predict_layers:
      total += self._mtp_params(active=True)
    return total

  def matmul_params_per_token(self, include_mtp: bool = False) -> int:
    """Weight elements a token meets in matmuls, counted each time it meets them: each layer's
    projections (the top-k routed and the shared experts, the router) and lm_head; not the
    embedding lookup, the norm scales or the expert bias. With MTP, its layer and eh_proj, and
    lm_head a second time: the MTP head shares the main head's weight but runs its own matmul on
    the MTP layer's hidden states (6 V D: 0.20 of the 1.87 GFLOPs of a ling_small training
    token)."""
    head = self.vocab_size * self.hidden_size
    n = head + sum(self._layer_params(t, m, active=True, matmul=True)
                   for t, m in zip(self.layer_types(), self.mlp_types()))
    if include_mtp and self.num_nextn_predict_layers:
      n += self._mtp_params(active=True, matmul=True) + head  # the MTP head's own matmul
    return n

  def flops_per_token(self, seq_len: int, include_mtp: bool = False, training: bool = True) -> float:
    """Model FLOPs per token (matmuls only), the MFU numerator.

    6 x `matmul_params_per_token` for the forward+backward (2 x for forward only), plus the
    sequence-dependent attention terms: MLA layers do causal softmax attention (on average T/2 keys
    per query); Lightning layers do chunked linear attention, which costs O(K*V) per token per head
    for the state plus O(C) within a chunk (chunk 64 assumed), independent of T. No recomputation
    (remat) counts. The weight term is checked against the matmuls of the traced forward pass
    (tests/model/test_config.py).
    """
    mult = 6 if training else 2
    flops = mult * self.matmul_params_per_token(include_mtp)
    H = self.num_attention_heads
    n_mla = sum(t == "mla" for t in self.layer_types()) + (
        1 if include_mtp and self.num_nextn_predict_layers else 0)
    n_lin = sum(t == "linear" for t in self.layer_types())
    # Causal softmax: QK^T and PV over T/2 keys on average, per head.
    mla = 2 * H * (self.qk_head_dim + self.v_head_dim) * (seq_len / 2)
    chunk = min(64, seq_len)
    # Chunked linear attention: intra-chunk QK^T, PV (C/2 on average) + state read/update (2 K V).
    lin = 2 * H * (2 * self.head_dim * (chunk / 2) + 2 * self.head_dim * self.head_dim)
    flops += (mult // 2) * (n_mla * mla + n_lin * lin)
    return float(flops)


# ---------------------------------------------------------------------- field checks
# Each field's type and range, checked before anything computes with it: a wrong type or a
# non-finite or negative float would otherwise surface as a raw TypeError deep in the model, or
# as NaN logits (a negative rms_norm_eps puts a NaN in every rsqrt, a NaN routed_scaling_factor
# in every MoE output).
_POSITIVE_INTS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "head_dim", "max_position_embeddings", "layer_group_size", "group_norm_size", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "n_group", "topk_group")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _int_at_least(low: int):
  return lambda v: _is_int(v) and v >= low


def _finite(ok):
  """A predicate for a float field (ints accepted): finite, and `ok` of the value."""
  return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and ok(v))


def _token_id(v) -> bool:
  return v is None or _int_at_least(0)(v)


def _check(obj, names, ok, what: str) -> list[str]:
  return [f"{n}={getattr(obj, n)!r} must be {what}" for n in names if not ok(getattr(obj, n))]


def _field_errors(cfg: LingConfig) -> list[str]:
  errors = _check(cfg, _POSITIVE_INTS, _int_at_least(1), "an integer >= 1")
  errors += _check(cfg, ("num_shared_experts", "first_k_dense_replace"), _int_at_least(0),
                   "an integer >= 0")
  errors += _check(cfg, ("q_lora_rank",), lambda v: v is None or _int_at_least(1)(v),
                   "None or an integer >= 1")
  errors += _check(cfg, ("rms_norm_eps", "rope_theta", "routed_scaling_factor"),
                   _finite(lambda v: v > 0), "a finite number > 0")
  errors += _check(cfg, ("partial_rotary_factor",), _finite(lambda v: 0 < v <= 1),
                   "a number in (0, 1]")
  errors += _check(cfg, ("mtp_loss_scaling_factor",), _finite(lambda v: v >= 0),
                   "a finite number >= 0")
  errors += _check(cfg, ("use_qk_norm",), lambda v: isinstance(v, bool), "True or False")
  errors += _check(cfg, ("decay_form",), lambda v: v in ("A", "B"), "'A' or 'B'")
  errors += _check(cfg, ("num_nextn_predict_layers",), lambda v: _is_int(v) and v in (0, 1),
                   "0 or 1 (only one MTP layer is supported)")
  errors += _check(cfg, ("rope_scaling",), lambda v: v is None or isinstance(v, YarnScaling),
                   "None or a YarnScaling")
  errors += _check(cfg, ("bos_token_id", "pad_token_id"), _token_id, "None or an integer >= 0")
  errors += _check(cfg, ("eos_token_id",), lambda v: _token_id(v) or (
      isinstance(v, tuple) and len(v) > 0 and all(_int_at_least(0)(i) for i in v)),
      "None, an integer >= 0 or a non-empty tuple of them")
  return errors


# ---------------------------------------------------------------------- presets
def ling_2_6_flash(**overrides) -> LingConfig:
  """inclusionAI/Ling-2.6-flash: 104.2B total, 7.45B active (docs/architecture.md §1.1, 1.4)."""
  return dataclasses.replace(LingConfig(), **overrides)


def ling_2_6_1t(**overrides) -> LingConfig:
  """Ling-2.6-1T / Ring-2.5-1T: ~1012B total, ~63.6B active (docs/architecture.md §1.2)."""
  cfg = LingConfig(
      hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, intermediate_size=18432,
      moe_intermediate_size=2048, first_k_dense_replace=4, group_norm_size=8,
  )
  return dataclasses.replace(cfg, **overrides)


def ling_small(**overrides) -> LingConfig:
  """A 1.03B-total, 0.29B-active Ling for one GPU: two hybrid groups of 7 linear + 1 MLA."""
  cfg = LingConfig(
      vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
      num_attention_heads=8, head_dim=128, group_norm_size=2, q_lora_rank=384, kv_lora_rank=256,
      qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, num_experts=32,
      num_experts_per_tok=4, moe_intermediate_size=576, n_group=4, topk_group=2,
      max_position_embeddings=32768, bos_token_id=None, eos_token_id=None, pad_token_id=None,
  )
  return dataclasses.replace(cfg, **overrides)


def ling_tiny(**overrides) -> LingConfig:
  """A few-hundred-thousand-parameter Ling for CPU tests: 2 groups of (linear, MLA)."""
  cfg = LingConfig(
      vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
      num_attention_heads=4, head_dim=16, rope_theta=10000.0, max_position_embeddings=2048,
      layer_group_size=2, group_norm_size=2, q_lora_rank=32, kv_lora_rank=16,
      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_experts=8,
      num_experts_per_tok=2, moe_intermediate_size=32, n_group=4, topk_group=2,
      bos_token_id=None, eos_token_id=None, pad_token_id=None,
  )
  return dataclasses.replace(cfg, **overrides)


def alibi_slopes(num_heads: int) -> list[float]:
  """ALiBi head slopes (Press et al. 2022), with the non-power-of-two fallback (docs/architecture.md
  §3.4.4)."""

  def power_of_2(n: int) -> list[float]:
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start ** (i + 1) for i in range(n)]

  if math.log2(num_heads).is_integer():
    return power_of_2(num_heads)
  p = 2 ** math.floor(math.log2(num_heads))
  return power_of_2(p) + power_of_2(2 * p)[0::2][: num_heads - p]
