"""Strict conversion between `LingConfig` and the HF `config.json` (model_type `bailing_hybrid`).

A config.json means what it means to the release's own remote code, whose config class
`BailingMoeV2_5Config` (`configuration_bailing_moe_v2_5.py`) gives every field a constructor
default. `from_hf_config` reads the file through one table, `FIELDS`: each field's JSON type and the
value it takes when absent, which is that class's default (never a ling-jax preset's), so a
config.json that leaves a field out builds the network the reference would build from it; the fields
it defaulted are listed in a `ConfigDefaultsWarning`. It refuses fields it does not understand,
values of the wrong JSON type, and values of known fields that this implementation does not compute
(e.g. `use_bias: true`), naming field and value, rather than silently building a different network
(docs/architecture.md §1.1, 6). `to_hf_config` writes every field of the table, so a config.json
written by ling-jax never depends on a default. docs/config.md lists the fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

from ling_jax.config import LingConfig, YarnScaling

MODEL_TYPE = "bailing_hybrid"
ARCHITECTURE = "BailingMoeV2_5ForCausalLM"


class ConfigError(ValueError):
  """A config.json that ling-jax cannot read as the network its author meant."""


class ConfigDefaultsWarning(UserWarning):
  """A config.json left out fields of the network; the reference's defaults were used."""


# Where the value of an absent field comes from (the `source` column of docs/config.md).
REFERENCE = "BailingMoeV2_5Config"   # the release's remote-code config class: its __init__ default
PRETRAINED = "PretrainedConfig"      # not a BailingMoeV2_5Config argument: transformers' default
PROJECT = "ling-jax"                 # a ling-jax extension the reference does not read
REQUIRED = "required"                # no default anywhere: absent is an error
CHECK_ONLY = "check only"            # not read by the reference: absent means nothing to check


@dataclasses.dataclass(frozen=True)
class Field:
  """How one config.json field is read: its JSON type (a key of `_KINDS`), its value when absent."""

  kind: str
  default: Any = None
  source: str = REFERENCE


FIELDS: dict[str, Field] = {
    "model_type": Field("str", None, REQUIRED),
    # The network: LingConfig fields of the same name.
    "vocab_size": Field("int", 157184),
    "hidden_size": Field("int", 2048),
    "intermediate_size": Field("int", 5120),
    "num_hidden_layers": Field("int", 20),
    "num_attention_heads": Field("int", 16),
    "head_dim": Field("int?", 128),  # null: hidden_size // num_attention_heads, as the reference
    "rms_norm_eps": Field("number", 1e-6),
    "rope_theta": Field("number", 600000.0),
    "partial_rotary_factor": Field("number", 0.5),
    "rope_scaling": Field("object?", None),
    "max_position_embeddings": Field("int", 32768),
    "layer_group_size": Field("int", 5),
    "group_norm_size": Field("int", 4),
    "use_qk_norm": Field("bool", True),
    "decay_form": Field("str", "A", PROJECT),
    "q_lora_rank": Field("int?", None),
    "kv_lora_rank": Field("int", 512),
    "qk_nope_head_dim": Field("int", 128),
    "qk_rope_head_dim": Field("int", 64),
    "v_head_dim": Field("int", 128),
    "num_experts": Field("int", 256),
    "num_experts_per_tok": Field("int", 8),
    "num_shared_experts": Field("int", 1),
    "moe_intermediate_size": Field("int", 512),
    "n_group": Field("int", 8),
    "topk_group": Field("int", 4),
    "routed_scaling_factor": Field("number", 1.0),
    "first_k_dense_replace": Field("int", 1),
    "num_nextn_predict_layers": Field("int", 0),
    "mtp_loss_scaling_factor": Field("number", 0.0),
    "bos_token_id": Field("int?", None, PRETRAINED),
    "eos_token_id": Field("ids?", 156892),
    "pad_token_id": Field("int?", 156892),
    # Read for a consistency check only.
    "num_key_value_heads": Field("int", 4),
    "moe_shared_expert_intermediate_size": Field("int?", None, CHECK_ONLY),
    "rope_parameters": Field("object?", None, CHECK_ONLY),
    # Switches with one supported value (the reference's default; the network assumes it).
    "hidden_act": Field("str", "silu"),
    "use_qkv_bias": Field("bool", False),
    "use_bias": Field("bool", False),
    "linear_silu": Field("bool", False),
    "rope_interleave": Field("bool", True),
    "tie_word_embeddings": Field("bool", False),
    "score_function": Field("str", "sigmoid"),
    "scoring_func": Field("str", "sigmoid"),
    "moe_router_enable_expert_bias": Field("bool", True),
    # Not read by the reference, which always renormalises the top-k weights.
    "norm_topk_prob": Field("bool", True, CHECK_ONLY),
}

_MODEL = tuple(f.name for f in dataclasses.fields(LingConfig))
_FIXED = ("model_type", "hidden_act", "use_qkv_bias", "use_bias", "linear_silu", "rope_interleave",
          "tie_word_embeddings", "score_function", "scoring_func", "moe_router_enable_expert_bias",
          "norm_topk_prob")
_SUPPORTED = {k: MODEL_TYPE if k == "model_type" else FIELDS[k].default for k in _FIXED}
assert set(_MODEL) <= set(FIELDS), "every LingConfig field has a row in FIELDS"

# Fields with no effect on the network's function (HF class plumbing, training-time switches).
_IGNORED = frozenset({
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "max_window_layers", "output_router_logits", "topk_method",
    "router_dtype", "seq_aux", "embedding_dropout", "attention_dropout", "output_dropout",
    "use_rmsnorm", "_name_or_path", "use_sliding_window", "sliding_window",
    "moe_layer_freq", "num_layers", "router_aux_loss_coef", "use_flash_attention",
})

# rope_scaling of type yarn: sub-field -> JSON type. Absent sub-fields take YarnScaling's defaults
# (the DeepSeek YaRN constants; docs/config.md).
_YARN = {"type": "str", "rope_type": "str", "factor": "number",
         "original_max_position_embeddings": "int", "beta_fast": "number", "beta_slow": "number",
         "mscale": "number", "mscale_all_dim": "number", "attention_factor": "number?"}


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


# JSON type -> (test, what the message says is expected).
_KINDS = {
    "int": (_is_int, "an integer"),
    "int?": (lambda v: v is None or _is_int(v), "an integer or null"),
    "number": (_is_number, "a number"),
    "number?": (lambda v: v is None or _is_number(v), "a number or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object?": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "ids?": (lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
             "an integer, a list of integers, or null"),
}


def _check_type(name: str, value: Any, kind: str, source: str) -> None:
  ok, what = _KINDS[kind]
  if not ok(value):
    shown = json.dumps(value, default=repr)  # as the file spells it (repr: a non-JSON object)
    raise ConfigError(f"{source}: field {name!r} = {shown} ({type(value).__name__}); "
                      f"expected {what}")


def from_hf_config(hf: dict[str, Any], *, source: str = "config.json", **overrides) -> LingConfig:
  """Build a `LingConfig` from a `config.json` dict; unknown fields or unsupported values raise
  `ConfigError`. An absent field takes the reference's default (`FIELDS`), with a
  `ConfigDefaultsWarning` naming each network field so filled; `overrides` replace LingConfig
  fields after reading. `source` names the dict in messages."""
  if not isinstance(hf, dict):
    raise ConfigError(f"{source} must hold a JSON object, not {type(hf).__name__}")
  unknown = sorted(set(hf) - set(FIELDS) - _IGNORED)
  if unknown:
    raise ConfigError(f"{source} has fields ling_jax does not understand: {unknown}")
  for name, value in hf.items():
    if name in FIELDS:
      _check_type(name, value, FIELDS[name].kind, source)
  if "model_type" not in hf:
    raise ConfigError(f"{source} has no model_type; it must be {MODEL_TYPE!r}")
  bad = {k: hf[k] for k in _FIXED if k in hf and hf[k] != _SUPPORTED[k]}
  if bad:
    want = {k: _SUPPORTED[k] for k in bad}
    raise ConfigError(f"{source} values not supported by ling_jax: {bad} (supported: {want})")

  def get(name):
    return hf[name] if name in hf else FIELDS[name].default

  kwargs: dict[str, Any] = {}
  for name in _MODEL:
    value = get(name)
    kwargs[name] = float(value) if FIELDS[name].kind == "number" else value
  if isinstance(kwargs["eos_token_id"], list):
    kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
  if "head_dim" in hf and hf["head_dim"] is None:  # the reference: head_dim or hidden // heads
    heads = kwargs["num_attention_heads"]
    kwargs["head_dim"] = kwargs["hidden_size"] // heads if heads > 0 else None
  kwargs["rope_scaling"] = _yarn_from_hf(get("rope_scaling"), source)
  kwargs.update(overrides)
  try:
    cfg = LingConfig(**kwargs)
  except ValueError as e:
    raise ConfigError(f"{source}: {e}") from None

  defaulted = [n for n in _MODEL if n not in hf and n not in overrides
               and FIELDS[n].source != PROJECT]
  if defaulted:
    warnings.warn(ConfigDefaultsWarning(
        f"{source} leaves out {len(defaulted)} field(s) of the network; using the defaults of "
        f"the reference's {REFERENCE} (docs/config.md): "
        + ", ".join(f"{n}={json.dumps(FIELDS[n].default)}" for n in defaulted)), stacklevel=2)
  _check_consistency(hf, cfg, source)
  return cfg


def _check_consistency(hf: dict[str, Any], cfg: LingConfig, source: str) -> None:
  """The fields read only to be checked against the network (docs/config.md)."""
  heads = cfg.num_attention_heads
  if "num_key_value_heads" not in hf:
    if heads != FIELDS["num_key_value_heads"].default:
      raise ConfigError(
          f"{source} has no num_key_value_heads, so the reference takes its default "
          f"{FIELDS['num_key_value_heads'].default}, which differs from num_attention_heads="
          f"{heads}: its MLA layers would then repeat the keys and values as if they had that "
          f"many heads, which is not the network ling_jax builds (docs/config.md); add "
          f"\"num_key_value_heads\": {heads}")
  elif hf["num_key_value_heads"] != heads:
    raise ConfigError(f"{source}: num_key_value_heads={hf['num_key_value_heads']} must equal "
                      f"num_attention_heads={heads} (docs/architecture.md §6.11: the HF MLA path needs "
                      "it)")
  shared = hf.get("moe_shared_expert_intermediate_size")
  if shared is not None and shared != cfg.shared_expert_intermediate_size:
    raise ConfigError(f"{source}: moe_shared_expert_intermediate_size={shared} disagrees with "
                      f"moe_intermediate_size * num_shared_experts = "
                      f"{cfg.shared_expert_intermediate_size} (docs/architecture.md §6.5)")
  rp = hf.get("rope_parameters")
  if rp:  # transformers 5's home for rope_theta and the scaling; ling_jax reads the older fields
    theta = rp.get("rope_theta")
    if theta is not None and theta != cfg.rope_theta:
      raise ConfigError(f"{source}: rope_parameters.rope_theta={json.dumps(theta)} differs from "
                        f"the rope_theta ling_jax uses, {cfg.rope_theta}"
                        + ("" if "rope_theta" in hf else " (the reference's default: config.json"
                           " has no rope_theta)"))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind != "default" and cfg.rope_scaling is None:
      raise ConfigError(f"{source}: rope_parameters asks for {kind!r} RoPE scaling, but "
                        f"rope_scaling, which ling_jax reads, is null")


def _yarn_from_hf(rs: dict[str, Any] | None, source: str) -> YarnScaling | None:
  if rs is None:
    return None
  for name, value in rs.items():
    if name in _YARN:
      _check_type(f"rope_scaling.{name}", value, _YARN[name], source)
  kind = rs.get("type", rs.get("rope_type", "default"))
  if kind == "default":
    return None
  if kind not in ("yarn", "deepseek_yarn"):
    raise ConfigError(f"{source}: rope_scaling type {kind!r} not supported (only 'yarn')")
  unknown = sorted(set(rs) - set(_YARN))
  if unknown:
    raise ConfigError(f"{source}: rope_scaling has fields ling_jax does not understand: {unknown}")
  if rs.get("attention_factor") is not None:
    raise ConfigError(f"{source}: rope_scaling.attention_factor is not supported "
                      "(docs/architecture.md §3.5.4 uses mscale)")
  if "original_max_position_embeddings" not in rs or "factor" not in rs:
    raise ConfigError(f"{source}: rope_scaling of type yarn needs factor and "
                      "original_max_position_embeddings")
  fields = {k: float(rs[k]) if _YARN[k] == "number" else rs[k]
            for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                      "mscale", "mscale_all_dim") if k in rs}
  try:
    return YarnScaling(**fields)
  except ValueError as e:
    raise ConfigError(f"{source}: rope_scaling: {e}") from None


def to_hf_config(cfg: LingConfig) -> dict[str, Any]:
  """The `config.json` dict of `cfg`, loadable by HF remote code, sglang and mlx-lm. Every field
  of `FIELDS` is written (but `rope_parameters`, which only transformers 5 writes), so reading it
  back never depends on a default."""
  hf: dict[str, Any] = {"architectures": [ARCHITECTURE], **_SUPPORTED}
  hf.update({k: getattr(cfg, k) for k in _MODEL})
  eos = cfg.eos_token_id
  hf["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
  hf["rope_scaling"] = (None if cfg.rope_scaling is None
                        else {"type": "yarn", **dataclasses.asdict(cfg.rope_scaling)})
  hf["num_key_value_heads"] = cfg.num_attention_heads
  hf["moe_shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
  return hf


def read_config_json(folder: str | os.PathLike) -> dict[str, Any]:
  """The raw `config.json` dict of an HF folder, with errors that name the file."""
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not a Hugging Face model folder")
  with open(path) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(hf, dict):
    raise ConfigError(f"{path} must hold a JSON object, not {type(hf).__name__}")
  return hf


def read_hf_config(folder: str | os.PathLike, **overrides) -> LingConfig:
  path = os.path.join(folder, "config.json")
  return from_hf_config(read_config_json(folder), source=path, **overrides)


def write_hf_config(cfg: LingConfig, folder: str | os.PathLike) -> None:
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(to_hf_config(cfg), f, indent=2, sort_keys=True)
    f.write("\n")
