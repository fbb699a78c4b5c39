"""Random tiny Ling-2.6 checkpoints in the released HF layout, and mlx-lm as the reference on them.

Everything here is written from docs/architecture.md (§1.1, 2, 4.1, 4.2), independently of
`ling_jax.weights`, so that a test loading these folders checks the name map against the spec and
not against itself. fp32 shards are written with the `safetensors` package, not with our writer.

    cfg = tiny_hf_config(num_hidden_layers=5, q_lora_rank=None)
    tensors = write_random_hf_checkpoint(tmp_path, cfg)
    logits = mlx_logits(tmp_path, tokens)        # mlx-lm's bailing_hybrid, strict load
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy

from ling_jax.io.safetensors import write_safetensors

INDEX = "model.safetensors.index.json"
MTP_FILE = "model-mtp-layer.safetensors"

_TORCH_DTYPE = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                np.dtype(ml_dtypes.bfloat16): "bfloat16"}


def tiny_hf_config(**overrides) -> dict[str, Any]:
  """A complete tiny `config.json` dict (every field the network depends on, so nothing is left
  to the reference's defaults; docs/config.md).

  Same structure as Ling-2.6-flash at toy sizes: MLA every `layer_group_size`-th layer, layer 0
  dense, sigmoid router with expert bias and group-limited top-k, one MTP layer. `overrides`
  replace (or add) keys; `q_lora_rank=None` gives the MLA variant with a plain `q_proj`.
  """
  cfg = {
      "model_type": "bailing_hybrid",
      "architectures": ["BailingMoeV2_5ForCausalLM"],
      "vocab_size": 256,
      "hidden_size": 64,
      "intermediate_size": 96,
      "moe_intermediate_size": 32,
      "num_hidden_layers": 4,
      "num_attention_heads": 4,
      "num_key_value_heads": 4,
      "head_dim": 16,
      "hidden_act": "silu",
      "use_qkv_bias": False,
      "use_bias": False,
      "rms_norm_eps": 1e-6,
      "tie_word_embeddings": False,
      "max_position_embeddings": 512,
      "rope_theta": 6e6,
      "rope_scaling": None,
      "partial_rotary_factor": 0.5,
      "rope_interleave": True,
      "use_qk_norm": True,
      "layer_group_size": 2,
      "group_norm_size": 2,
      "linear_silu": False,
      "q_lora_rank": 24,
      "kv_lora_rank": 16,
      "qk_nope_head_dim": 16,
      "qk_rope_head_dim": 8,
      "v_head_dim": 16,
      "num_experts": 8,
      "num_experts_per_tok": 2,
      "num_shared_experts": 1,
      "n_group": 4,
      "topk_group": 2,
      "routed_scaling_factor": 2.5,
      "score_function": "sigmoid",
      "moe_router_enable_expert_bias": True,
      "first_k_dense_replace": 1,
      "num_nextn_predict_layers": 1,
      "mtp_loss_scaling_factor": 0.3,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "pad_token_id": 0,
      "torch_dtype": "float32",
  }
  cfg.update(overrides)
  return cfg


def is_mla_layer(i: int, hf: dict) -> bool:
  """docs/architecture.md §2: MLA iff (i+1) % G == 0 or i >= floor(L/G)*G (the tail clause; MTP
  index L is MLA)."""
  g, n = hf["layer_group_size"], hf["num_hidden_layers"]
  return (i + 1) % g == 0 or i >= (n // g) * g


def hf_tensor_shapes(hf: dict, include_mtp: bool = True) -> dict[str, tuple[int, ...]]:
  """Every checkpoint tensor name -> PyTorch-layout shape ([out, in] for Linear),
  docs/architecture.md §4.2."""
  d_model, n_layers = hf["hidden_size"], hf["num_hidden_layers"]
  h, d = hf["num_attention_heads"], hf["head_dim"]
  nope, rope, v_dim = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
  q_lora, kv_lora = hf.get("q_lora_rank"), hf["kv_lora_rank"]
  n_exp, m_exp = hf["num_experts"], hf["moe_intermediate_size"]
  # docs/architecture.md §6.5: the HF code sizes the shared expert as moe_intermediate_size *
  # num_shared_experts.
  n_shared = hf["num_shared_experts"]
  m_shared = m_exp * n_shared
  if hf.get("moe_shared_expert_intermediate_size") not in (None, m_shared):
    raise ValueError("moe_shared_expert_intermediate_size disagrees with moe_intermediate_size * "
                     "num_shared_experts; HF and mlx-lm would build different shared experts")

  shapes: dict[str, tuple[int, ...]] = {
      "model.word_embeddings.weight": (hf["vocab_size"], d_model),
      "model.norm.weight": (d_model,),
  }
  if not hf.get("tie_word_embeddings", False):
    shapes["lm_head.weight"] = (hf["vocab_size"], d_model)

  def swiglu(prefix: str, inner: int):
    shapes[f"{prefix}.gate_proj.weight"] = (inner, d_model)
    shapes[f"{prefix}.up_proj.weight"] = (inner, d_model)
    shapes[f"{prefix}.down_proj.weight"] = (d_model, inner)

  def layer(i: int, mla: bool, moe: bool):
    p = f"model.layers.{i}"
    shapes[f"{p}.input_layernorm.weight"] = (d_model,)
    shapes[f"{p}.post_attention_layernorm.weight"] = (d_model,)
    a = f"{p}.attention"
    if mla:
      if q_lora is None:
        shapes[f"{a}.q_proj.weight"] = (h * (nope + rope), d_model)
      else:
        shapes[f"{a}.q_a_proj.weight"] = (q_lora, d_model)
        shapes[f"{a}.q_a_layernorm.weight"] = (q_lora,)
        shapes[f"{a}.q_b_proj.weight"] = (h * (nope + rope), q_lora)
      shapes[f"{a}.kv_a_proj_with_mqa.weight"] = (kv_lora + rope, d_model)
      shapes[f"{a}.kv_a_layernorm.weight"] = (kv_lora,)
      shapes[f"{a}.kv_b_proj.weight"] = (h * (nope + v_dim), kv_lora)
      shapes[f"{a}.dense.weight"] = (d_model, h * v_dim)
    else:
      # Linear attention has no GQA: K and V have all H heads (docs/architecture.md §3.4 step 1).
      shapes[f"{a}.query_key_value.weight"] = (3 * h * d, d_model)
      if hf.get("use_qk_norm", True):
        shapes[f"{a}.query_layernorm.weight"] = (d,)
        shapes[f"{a}.key_layernorm.weight"] = (d,)
      shapes[f"{a}.g_proj.weight"] = (h * d, d_model)
      shapes[f"{a}.g_norm.weight"] = (h * d,)
      shapes[f"{a}.dense.weight"] = (d_model, h * d)
    if moe:
      shapes[f"{p}.mlp.gate.weight"] = (n_exp, d_model)
      if hf.get("moe_router_enable_expert_bias", True):
        shapes[f"{p}.mlp.gate.expert_bias"] = (n_exp,)
      for e in range(n_exp):
        swiglu(f"{p}.mlp.experts.{e}", m_exp)
      if n_shared:
        swiglu(f"{p}.mlp.shared_experts", m_shared)
    else:
      swiglu(f"{p}.mlp", hf["intermediate_size"])

  for i in range(n_layers):
    layer(i, is_mla_layer(i, hf), i >= hf["first_k_dense_replace"])
  if include_mtp:
    for i in range(n_layers, n_layers + hf.get("num_nextn_predict_layers", 0)):
      layer(i, mla=True, moe=True)  # docs/architecture.md §2: the MTP layer is always MLA + MoE.
      for norm in ("enorm", "hnorm", "final_layernorm"):
        shapes[f"model.layers.{i}.{norm}.weight"] = (d_model,)
      shapes[f"model.layers.{i}.eh_proj.weight"] = (d_model, 2 * d_model)
  return shapes


def _layer_of(name: str) -> int | None:
  parts = name.split(".")
  return int(parts[2]) if name.startswith("model.layers.") else None


def _file_order(name: str):
  """Embedding, layers 0, 1, 2, ... (numerically), final norm, lm_head: how HF shards are filled."""
  layer = _layer_of(name)
  if layer is not None:
    return (1, layer, name)
  return (0 if "word_embeddings" in name else 2 if name == "model.norm.weight" else 3, 0, name)


def _random_tensor(rng: np.random.Generator, name: str, shape: tuple, dtype) -> np.ndarray:
  """Scales that keep a random tiny model's logits O(1) and far from degenerate."""
  z = rng.standard_normal(shape)
  if name.endswith("expert_bias"):
    # docs/architecture.md §4.3: the bias stays fp32 whatever the dtype.
    return (0.05 * z).astype(np.float32)
  if len(shape) == 1:  # every 1-D tensor besides the bias is a norm weight
    x = 1.0 + 0.1 * z
  elif "word_embeddings" in name:
    x = 0.5 * z
  else:
    x = z / np.sqrt(shape[1])  # Linear [out, in]: unit-variance outputs for unit inputs.
  return x.astype(dtype)


def _save(path: str, tensors: dict[str, np.ndarray]) -> None:
  if all(a.dtype in (np.float32, np.float16, np.int64, np.int32) for a in tensors.values()):
    # The reference writer, so a bug in ours cannot hide behind a matching bug in our reader.
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  else:  # bf16 / fp8: the package's numpy backend has no such dtypes.
    write_safetensors(path, tensors, metadata={"format": "pt"})


def write_random_hf_checkpoint(folder: str | os.PathLike, hf_config: dict, *, seed: int = 0,
                               dtype=np.float32, num_shards: int = 3,
                               with_mtp: bool = True) -> dict[str, np.ndarray]:
  """Write a random checkpoint laid out like the release (docs/architecture.md §4.1); returns every
  tensor.

  Main-model tensors go to `model-0000k-of-0000N.safetensors`, filled in layer order and split by
  size (so a layer may straddle two shards, as in the release); the MTP layer goes to
  `model-mtp-layer.safetensors`; `model.safetensors.index.json` lists every tensor, MTP included;
  `config.json` is `hf_config` (with torch_dtype set to `dtype`). `with_mtp=False` leaves the MTP
  file out but writes the config unchanged. The MoE router bias is fp32 in every dtype.
  """
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  dtype = np.dtype(dtype)
  rng = np.random.default_rng(seed)
  shapes = hf_tensor_shapes(hf_config, include_mtp=with_mtp)
  tensors = {name: _random_tensor(rng, name, shapes[name], dtype) for name in sorted(shapes)}

  n_layers = hf_config["num_hidden_layers"]
  mtp = sorted(n for n in tensors if (_layer_of(n) or 0) >= n_layers)
  main = sorted((n for n in tensors if n not in set(mtp)), key=_file_order)
  if not 1 <= num_shards <= len(main):
    raise ValueError(f"num_shards={num_shards} must be in 1..{len(main)}")

  # Cut the ordered list where the running size passes k/N of the total.
  sizes = np.cumsum([tensors[n].nbytes for n in main])
  cuts = [0] + [int(np.searchsorted(sizes, sizes[-1] * k / num_shards)) + 1
                for k in range(1, num_shards)] + [len(main)]
  for k in range(1, num_shards):  # Each shard gets at least one tensor.
    cuts[k] = min(max(cuts[k], cuts[k - 1] + 1), len(main) - (num_shards - k))

  weight_map = {}
  for k in range(num_shards):
    fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
    names = main[cuts[k]:cuts[k + 1]]
    _save(str(folder / fname), {n: tensors[n] for n in names})
    weight_map.update({n: fname for n in names})
  if mtp:
    _save(str(folder / MTP_FILE), {n: tensors[n] for n in mtp})
    weight_map.update({n: MTP_FILE for n in mtp})

  index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
           "weight_map": dict(sorted(weight_map.items()))}
  (folder / INDEX).write_text(json.dumps(index, indent=2))
  config = dict(hf_config, torch_dtype=_TORCH_DTYPE.get(dtype, str(dtype)))
  (folder / "config.json").write_text(json.dumps(config, indent=2))
  return tensors


_MLX_MODELS: dict[tuple, Any] = {}


def mlx_model(folder: str | os.PathLike, dtype: str | None = None):
  """mlx-lm's `bailing_hybrid` Model loaded strictly from `folder` (cached per folder and dtype).

  `dtype="float32"` upcasts every parameter after the load. mlx 0.32.4 on CPU runs the routed
  experts (`gather_mm`) in float32 only, so a bf16 checkpoint needs it to run at all.
  """
  import mlx.core as mx
  from mlx_lm.utils import load_model

  path = Path(folder).resolve()
  key = (str(path), (path / "config.json").stat().st_mtime_ns, dtype)
  if key not in _MLX_MODELS:
    model, _ = load_model(path, strict=True)
    if dtype is not None:
      model.set_dtype(getattr(mx, dtype))
    _MLX_MODELS[key] = model
  return _MLX_MODELS[key]


def mlx_logits(folder: str | os.PathLike, tokens: np.ndarray, dtype: str | None = None
               ) -> np.ndarray:
  """[B, T, vocab] fp32 logits of a plain (cache-free) mlx-lm forward over `tokens` [B, T]."""
  import mlx.core as mx

  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
  logits = mlx_model(folder, dtype)(mx.array(tokens.astype(np.int32)))
  return np.array(logits.astype(mx.float32))
