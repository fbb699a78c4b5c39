"""The name map between the HF checkpoint (docs/architecture.md §4.2) and the model's NNX state.

Module and parameter names are copied from the checkpoint, so the map is mostly mechanical: each
HF tensor is one slice of one model variable (a stacked-group index and/or an expert index), and
the transform is either a plain reshape (embeddings, norms, biases) or a transpose of PyTorch's
[out, in] into our [in..., out...] kernel then a reshape. This module knows nothing about files;
`hf_io` (in memory) and the streaming converter build on it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from ling_jax.config import LingConfig

Path = tuple  # a path into the flat NNX state, e.g. ("groups", "layers", 0, "attention", "dense")


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """HF tensor `name` <-> `state[path][index]`; `n_in` > 0 marks a Linear with n_in input axes.

  With n_in == 0 there is no transpose; `flat` marks a 1-D HF tensor held with split axes (the
  Lightning g_norm [H*K] is [H, K] in the model).
  """

  name: str
  path: Path
  index: tuple[int, ...]
  n_in: int  # 0 = no transpose (embedding, norm, bias)
  flat: bool = False

  def hf_shape(self, slice_shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.n_in == 0:
      return (math.prod(slice_shape),) if self.flat else slice_shape
    return (math.prod(slice_shape[self.n_in:]), math.prod(slice_shape[: self.n_in]))

  def to_hf(self, value: np.ndarray) -> np.ndarray:
    if self.n_in == 0:
      return value.reshape(-1) if self.flat else value
    return value.reshape(math.prod(value.shape[: self.n_in]), -1).T


def _norm(name: str, path: Path, index=()) -> TensorMap:
  return TensorMap(f"{name}.weight", path + ("weight",), index, 0, flat=True)


def _attention_maps(cfg: LingConfig, kind: str, hf: str, path: Path, idx) -> list[TensorMap]:
  a, p = f"{hf}.attention", path + ("attention",)
  if kind == "linear":
    maps = [TensorMap(f"{a}.query_key_value.weight", p + ("query_key_value",), idx, 1),
            TensorMap(f"{a}.g_proj.weight", p + ("g_proj",), idx, 1),
            TensorMap(f"{a}.dense.weight", p + ("dense",), idx, 2),
            _norm(f"{a}.g_norm", p + ("g_norm",), idx)]
    if cfg.use_qk_norm:
      maps += [_norm(f"{a}.query_layernorm", p + ("query_layernorm",), idx),
               _norm(f"{a}.key_layernorm", p + ("key_layernorm",), idx)]
    return maps
  if cfg.q_lora_rank is None:
    maps = [TensorMap(f"{a}.q_proj.weight", p + ("q_proj",), idx, 1)]
  else:
    maps = [TensorMap(f"{a}.q_a_proj.weight", p + ("q_a_proj",), idx, 1),
            _norm(f"{a}.q_a_layernorm", p + ("q_a_layernorm",), idx),
            TensorMap(f"{a}.q_b_proj.weight", p + ("q_b_proj",), idx, 1)]
  return maps + [TensorMap(f"{a}.kv_a_proj_with_mqa.weight", p + ("kv_a_proj_with_mqa",), idx, 1),
                 _norm(f"{a}.kv_a_layernorm", p + ("kv_a_layernorm",), idx),
                 TensorMap(f"{a}.kv_b_proj.weight", p + ("kv_b_proj",), idx, 1),
                 TensorMap(f"{a}.dense.weight", p + ("dense",), idx, 2)]


def _swiglu_maps(hf: str, path: Path, idx) -> list[TensorMap]:
  return [TensorMap(f"{hf}.{n}.weight", path + (n,), idx, 1)
          for n in ("gate_proj", "up_proj", "down_proj")]


def _mlp_maps(cfg: LingConfig, kind: str, hf: str, path: Path, idx) -> list[TensorMap]:
  m, p = f"{hf}.mlp", path + ("mlp",)
  if kind == "dense":
    return _swiglu_maps(m, p, idx)
  maps = [TensorMap(f"{m}.gate.weight", p + ("gate", "weight"), idx, 1),
          TensorMap(f"{m}.gate.expert_bias", p + ("gate", "expert_bias"), idx, 0)]
  for e in range(cfg.num_experts):
    maps += [TensorMap(f"{m}.experts.{e}.{n}.weight", p + ("experts", n), idx + (e,), 1)
             for n in ("gate_proj", "up_proj", "down_proj")]
  if cfg.shared_expert_intermediate_size:
    maps += _swiglu_maps(f"{m}.shared_experts", p + ("shared_experts",), idx)
  return maps


def _layer_maps(cfg, kind, mlp, hf, path, idx) -> list[TensorMap]:
  return ([_norm(f"{hf}.input_layernorm", path + ("input_layernorm",), idx)]
          + _attention_maps(cfg, kind, hf, path, idx)
          + [_norm(f"{hf}.post_attention_layernorm", path + ("post_attention_layernorm",), idx)]
          + _mlp_maps(cfg, mlp, hf, path, idx))


def layer_location(cfg: LingConfig, i: int) -> tuple[Path, tuple[int, ...]]:
  """Where main layer i lives in the state: (path, stack index)."""
  G, P = cfg.layer_group_size, cfg.num_prefix_groups
  if i < P * G:
    return ("prefix", i // G, "layers", i % G), ()
  if i < cfg.num_groups * G:
    j = i - P * G
    return ("groups", "layers", j % G), (j // G,)
  return ("tail", i - cfg.num_groups * G), ()


def main_maps(cfg: LingConfig) -> Iterator[TensorMap]:
  """Main-model tensors in checkpoint order (embeddings, layers 0..L-1, norm, head)."""
  yield TensorMap("model.word_embeddings.weight", ("word_embeddings",), (), 0)
  for i, (kind, mlp) in enumerate(zip(cfg.layer_types(), cfg.mlp_types())):
    path, idx = layer_location(cfg, i)
    yield from _layer_maps(cfg, kind, mlp, f"model.layers.{i}", path, idx)
  yield _norm("model.norm", ("norm",))
  yield TensorMap("lm_head.weight", ("lm_head",), (), 1)


def mtp_maps(cfg: LingConfig) -> Iterator[TensorMap]:
  """The MTP layer `model.layers.{L}` (docs/architecture.md §4.2), stored in
  model-mtp-layer.safetensors."""
  if not cfg.num_nextn_predict_layers:
    return
  hf = f"model.layers.{cfg.num_hidden_layers}"
  for n in ("enorm", "hnorm", "final_layernorm"):
    yield _norm(f"{hf}.{n}", ("mtp", n))
  yield TensorMap(f"{hf}.eh_proj.weight", ("mtp", "eh_proj"), (), 1)
  yield from _layer_maps(cfg, "mla", "moe", hf, ("mtp", "layer"), ())


def all_maps(cfg: LingConfig) -> list[TensorMap]:
  return list(main_maps(cfg)) + list(mtp_maps(cfg))


def is_dense_linear(m: TensorMap) -> bool:
  """Whether `m` is one of the dense Linears that FP8 linears (`ExpertWeights.linears`) hold in
  FP8: every Linear but the routed experts' (FP8 with the experts), the router gate and the head
  (kept in their own dtypes, as the FP8 releases store them)."""
  return (m.n_in > 0 and m.path[-2:-1] != ("experts",) and m.path[-2:] != ("gate", "weight")
          and m.path != ("lm_head",))


def fp8_scale_maps(maps: list[TensorMap], suffix: str, linears: bool) -> list[TensorMap]:
  """The FP8 scale tensor `<weight>.<suffix>` of every routed expert weight in `maps` (and, with
  `linears`, of every dense Linear), for a model that keeps them in FP8 (`ExpertWeights`): into
  the variable `<name>_scale` beside the weight, transposed as a Linear ([out blocks, in blocks]
  -> [in blocks, out blocks]; a per-channel [out, 1] -> [1, out])."""
  return [TensorMap(m.name[:-len("weight")] + suffix, m.path[:-1] + (f"{m.path[-1]}_scale",),
                    m.index, 1)
          for m in maps if m.path[-2:-1] == ("experts",) or (linears and is_dense_linear(m))]
