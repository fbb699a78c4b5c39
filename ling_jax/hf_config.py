"""Strict conversion between `LingConfig` and the HF `config.json` (model_type `bailing_hybrid`).

`from_hf_config` refuses any field it does not understand, naming it, and refuses values of known
fields that this implementation does not compute (e.g. `use_bias: true`), rather than silently
building a different network (spec 1.1, 6).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ling_jax.config import LingConfig, YarnScaling

MODEL_TYPE = "bailing_hybrid"
ARCHITECTURE = "BailingMoeV2_5ForCausalLM"

# Fields copied one to one (same name, same meaning).
_DIRECT = tuple(f.name for f in dataclasses.fields(LingConfig)
                if f.name not in ("rope_scaling", "decay_form", "eos_token_id"))

# Fields that must hold a given value for this implementation to be exact (spec 1.1 / 6).
_REQUIRED_VALUES: dict[str, Any] = {
    "model_type": MODEL_TYPE,
    "hidden_act": "silu",
    "use_qkv_bias": False,
    "use_bias": False,
    "linear_silu": False,
    "rope_interleave": True,
    "tie_word_embeddings": False,
    "score_function": "sigmoid",
    "scoring_func": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "norm_topk_prob": True,
}

# Fields read for a consistency check only.
_CHECKED = ("num_key_value_heads", "moe_shared_expert_intermediate_size")

# Fields with no effect on the network's function (HF class plumbing, training-time switches).
_IGNORED = frozenset({
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "max_window_layers", "output_router_logits", "topk_method",
    "router_dtype", "seq_aux", "embedding_dropout", "attention_dropout", "output_dropout",
    "use_rmsnorm", "_name_or_path", "use_sliding_window", "sliding_window", "rope_parameters",
    "moe_layer_freq", "num_layers", "router_aux_loss_coef", "use_flash_attention",
})

_YARN_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim", "attention_factor"}


def from_hf_config(hf: dict[str, Any], **overrides) -> LingConfig:
  """Build a `LingConfig` from a `config.json` dict; unknown fields or unsupported values raise."""
  known = set(_DIRECT) | set(_REQUIRED_VALUES) | set(_CHECKED) | _IGNORED | {
      "rope_scaling", "eos_token_id", "decay_form"}
  unknown = sorted(set(hf) - known)
  if unknown:
    raise ValueError(f"config.json has fields ling_jax does not understand: {unknown}")
  bad = {k: hf[k] for k, v in _REQUIRED_VALUES.items() if k in hf and hf[k] != v}
  if bad:
    want = {k: _REQUIRED_VALUES[k] for k in bad}
    raise ValueError(f"config.json values not supported by ling_jax: {bad} (supported: {want})")
  if hf.get("model_type") != MODEL_TYPE:
    raise ValueError(f"config.json model_type must be {MODEL_TYPE!r}, got {hf.get('model_type')!r}")

  kwargs: dict[str, Any] = {k: hf[k] for k in _DIRECT if k in hf}
  if "eos_token_id" in hf:
    eos = hf["eos_token_id"]
    kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, list) else eos
  kwargs["decay_form"] = hf.get("decay_form", "A")
  kwargs["rope_scaling"] = _yarn_from_hf(hf.get("rope_scaling"))
  kwargs.update(overrides)
  cfg = LingConfig(**kwargs)

  heads = hf.get("num_key_value_heads", cfg.num_attention_heads)
  if heads != cfg.num_attention_heads:
    raise ValueError(f"num_key_value_heads={heads} must equal num_attention_heads="
                     f"{cfg.num_attention_heads} (spec 6.11: the HF MLA path needs it)")
  shared = hf.get("moe_shared_expert_intermediate_size")
  if shared is not None and shared != cfg.shared_expert_intermediate_size:
    raise ValueError(f"moe_shared_expert_intermediate_size={shared} disagrees with "
                     f"moe_intermediate_size * num_shared_experts = "
                     f"{cfg.shared_expert_intermediate_size} (spec 6.5)")
  return cfg


def _yarn_from_hf(rs: dict[str, Any] | None) -> YarnScaling | None:
  if rs is None:
    return None
  kind = rs.get("type", rs.get("rope_type", "default"))
  if kind == "default":
    return None
  if kind not in ("yarn", "deepseek_yarn"):
    raise ValueError(f"rope_scaling type {kind!r} not supported (only 'yarn')")
  unknown = sorted(set(rs) - _YARN_KEYS)
  if unknown:
    raise ValueError(f"rope_scaling has fields ling_jax does not understand: {unknown}")
  if rs.get("attention_factor") is not None:
    raise ValueError("rope_scaling.attention_factor is not supported (spec 3.5.4 uses mscale)")
  if "original_max_position_embeddings" not in rs:
    raise ValueError("rope_scaling of type yarn needs original_max_position_embeddings")
  fields = {k: rs[k] for k in ("factor", "original_max_position_embeddings", "beta_fast",
                               "beta_slow", "mscale", "mscale_all_dim") if k in rs}
  return YarnScaling(**fields)


def to_hf_config(cfg: LingConfig) -> dict[str, Any]:
  """The `config.json` dict of `cfg`, loadable by HF remote code, sglang and mlx-lm."""
  hf: dict[str, Any] = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE]}
  hf.update({k: getattr(cfg, k) for k in _DIRECT})
  eos = cfg.eos_token_id
  hf["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
  hf["num_key_value_heads"] = cfg.num_attention_heads
  hf["moe_shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
  hf.update({k: v for k, v in _REQUIRED_VALUES.items() if k not in ("scoring_func",)})
  if cfg.decay_form != "A":
    hf["decay_form"] = cfg.decay_form  # project extension; absent means the default form (A)
  if cfg.rope_scaling is not None:
    hf["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(cfg.rope_scaling)}
  else:
    hf["rope_scaling"] = None
  return hf


def read_config_json(folder: str | os.PathLike) -> dict[str, Any]:
  """The raw `config.json` dict of an HF folder, with errors that name the file."""
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not a Hugging Face model folder")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_hf_config(folder: str | os.PathLike, **overrides) -> LingConfig:
  path = os.path.join(folder, "config.json")
  hf = read_config_json(folder)
  try:
    return from_hf_config(hf, **overrides)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path}: {e}") from None


def write_hf_config(cfg: LingConfig, folder: str | os.PathLike) -> None:
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(to_hf_config(cfg), f, indent=2, sort_keys=True)
    f.write("\n")
