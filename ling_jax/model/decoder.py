"""Decoder layers and hybrid groups (spec 2, 3.3).

A `DecoderLayer` is given its token mixer and its MLP; it only wires the pre-norm residual block
h += mixer(norm(h)); h += mlp(norm(h)). A `HybridGroup` is `layer_group_size - 1` Lightning layers
then one MLA layer: the unit the model scans over.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.config import LingConfig
from ling_jax.model.common import RMSNorm, SwiGLU, checkpointed
from ling_jax.model.lightning import LightningAttention
from ling_jax.model.mla import MultiLatentAttention
from ling_jax.model.moe import SparseMoE


class DecoderLayer(nnx.Module):
  """input_layernorm -> attention -> residual -> post_attention_layernorm -> mlp -> residual."""

  def __init__(self, attention: nnx.Module, mlp: nnx.Module, hidden: int, *, eps: float,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.attention = attention
    self.mlp = mlp
    self.input_layernorm = RMSNorm(hidden, eps=eps, dtype=dtype, param_dtype=param_dtype)
    self.post_attention_layernorm = RMSNorm(hidden, eps=eps, dtype=dtype, param_dtype=param_dtype)

  @property
  def is_moe(self) -> bool:
    return isinstance(self.mlp, SparseMoE)

  def __call__(self, h: jax.Array, *, layer_idx, positions, segment_ids=None, cache=None,
               cache_index=None):
    """h [B, T, D] -> (h, new cache, expert load [E] or None)."""
    kwargs: dict[str, Any] = {"positions": positions, "segment_ids": segment_ids, "cache": cache,
                              "layer_idx": layer_idx}
    if isinstance(self.attention, MultiLatentAttention):
      kwargs["cache_index"] = cache_index
    r, cache = self.attention(self.input_layernorm(h), **kwargs)
    h = h + r.astype(h.dtype)
    load = None
    if self.is_moe:
      r, load = self.mlp(self.post_attention_layernorm(h))
    else:
      r = self.mlp(self.post_attention_layernorm(h))
    return h + r.astype(h.dtype), cache, load

  def init_cache(self, batch: int, max_len: int, dtype):
    if isinstance(self.attention, MultiLatentAttention):
      return self.attention.init_cache(batch, max_len, dtype)
    return self.attention.init_cache(batch)


def make_layer(cfg: LingConfig, mixer: str, mlp: str, *, rngs: nnx.Rngs, dtype, param_dtype,
               moe_impl: str = "auto", gla_impl: str = "auto",
               attn_impl: str = "auto") -> DecoderLayer:
  """Build one decoder layer of the given kinds from the config (the only place that reads it)."""
  common = dict(dtype=dtype, param_dtype=param_dtype)
  D, eps = cfg.hidden_size, cfg.rms_norm_eps
  if mixer == "linear":
    attention = LightningAttention(
        hidden=D, heads=cfg.num_attention_heads, head_dim=cfg.head_dim, rotary_dim=cfg.rotary_dim,
        norm_groups=cfg.group_norm_size, num_layers=cfg.num_hidden_layers,
        decay_form=cfg.decay_form, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        use_qk_norm=cfg.use_qk_norm, eps=eps, rngs=rngs, impl=gla_impl, **common)
  else:
    attention = MultiLatentAttention(
        hidden=D, heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, eps=eps, rngs=rngs,
        impl=attn_impl, **common)
  if mlp == "dense":
    ffn = SwiGLU(D, cfg.intermediate_size, rngs=rngs, **common)
  else:
    ffn = SparseMoE(
        hidden=D, num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
        width=cfg.moe_intermediate_size, shared_width=cfg.shared_expert_intermediate_size,
        n_group=cfg.n_group, topk_group=cfg.topk_group, routed_scale=cfg.routed_scaling_factor,
        rngs=rngs, impl=moe_impl, **common)
  return DecoderLayer(attention, ffn, D, eps=eps, **common)


def run_layer(layer: DecoderLayer, h, layer_idx, cache, *, positions, segment_ids, cache_index,
              remat: bool = False, policy=None, prevent_cse: bool = True):
  """One decoder layer, under `jax.checkpoint(policy=policy)` when `remat`. The layer index (a
  Python int or the scan's tracer) and the cache index are closed over."""
  call = lambda l, h, pos, seg, c: l(h, layer_idx=layer_idx, positions=pos, segment_ids=seg,
                                     cache=c, cache_index=cache_index)
  if remat:
    return checkpointed(layer, call, h, positions, segment_ids, cache, policy=policy,
                        prevent_cse=prevent_cse)
  return call(layer, h, positions, segment_ids, cache)


class HybridGroup(nnx.Module):
  """`layer_group_size - 1` Lightning layers then one MLA layer (spec 2)."""

  def __init__(self, layers: list[DecoderLayer]):
    self.layers = nnx.List(layers)

  def __call__(self, h, *, first_layer, positions, segment_ids=None, cache=None, cache_index=None,
               remat: bool = False, policy=None, prevent_cse: bool = True):
    """Run the group; `first_layer` (int or traced) is the global index of its first layer.

    cache: a list with one entry per layer (or None). Returns (h, new caches, loads [n_moe, E]).
    remat: run each layer under `jax.checkpoint(policy=policy, prevent_cse=prevent_cse)`.
    """
    new_cache, loads = [], []
    for j, layer in enumerate(self.layers):
      h, c, load = run_layer(layer, h, first_layer + j, None if cache is None else cache[j],
                             positions=positions, segment_ids=segment_ids,
                             cache_index=cache_index, remat=remat, policy=policy,
                             prevent_cse=prevent_cse)
      new_cache.append(c)
      if load is not None:
        loads.append(load)
    loads = jnp.stack(loads) if loads else None
    return h, (new_cache if cache is not None else None), loads

  def init_cache(self, batch: int, max_len: int, dtype):
    return [layer.init_cache(batch, max_len, dtype) for layer in self.layers]
