"""Decoder layers and hybrid groups (docs/architecture.md §2, 3.3).

A `DecoderLayer` is given its token mixer and its MLP; it only wires the pre-norm residual block
h += mixer(norm(h)); h += mlp(norm(h)). Every mixer is called as
`mixer(x, positions=, segment_ids=, cache=) -> (y, cache)` and has `init_cache(batch, max_len,
dtype)`; every MLP as `mlp(x) -> (y, aux)`, aux the MoE's expert load or None. A `HybridGroup` is
`layer_group_size - 1` Lightning layers then one MLA layer: the unit the model scans over.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.config import LingConfig
from ling_jax.model.common import RMSNorm
from ling_jax.model.lightning import LightningAttention
from ling_jax.model.linear import SwiGLU
from ling_jax.model.mla import MultiLatentAttention
from ling_jax.model.moe import SparseMoE
from ling_jax.model.remat import checkpointed
from ling_jax.model.settings import ExpertWeights, Kernels, Parallel
from ling_jax.parallel.islands import constrain_rows


class DecoderLayer(nnx.Module):
  """input_layernorm -> attention -> residual -> post_attention_layernorm -> mlp -> residual."""

  def __init__(self, attention: nnx.Module, mlp: nnx.Module, hidden: int, *, eps: float,
               dtype=jnp.float32, param_dtype=jnp.float32, norm_impl: str = "auto"):
    self.attention = attention
    self.mlp = mlp
    norm = dict(eps=eps, dtype=dtype, param_dtype=param_dtype, impl=norm_impl)
    self.input_layernorm = RMSNorm(hidden, **norm)
    self.post_attention_layernorm = RMSNorm(hidden, **norm)

  def __call__(self, h: jax.Array, *, positions, segment_ids=None, cache=None, routing=None):
    """h [B, T, D] -> (h, new cache, expert load [E] or None). routing (an MoE layer's replayed
    experts [B, T, X], -1 = route as usual): the aux is (load, expert ids [B, T, X]). Under a mesh,
    h enters and leaves with its rows over the batch axes and D whole (`constrain_rows`; nothing
    without one)."""
    h = constrain_rows(h)
    r, cache = self.attention(self.input_layernorm(h), positions=positions,
                              segment_ids=segment_ids, cache=cache)
    h = h + r.astype(h.dtype)
    x = self.post_attention_layernorm(h)
    r, load = self.mlp(x) if routing is None else self.mlp(x, routing)
    return constrain_rows(h + r.astype(h.dtype)), cache, load

  def init_cache(self, batch: int, max_len: int, dtype):
    return self.attention.init_cache(batch, max_len, dtype)


def make_layer(cfg: LingConfig, layer_idx, mixer: str, mlp: str, *, rngs: nnx.Rngs, dtype,
               param_dtype, kernels: Kernels, parallel: Parallel = Parallel(),
               expert_weights: ExpertWeights = ExpertWeights()) -> DecoderLayer:
  """Build decoder layer `layer_idx` (its global index: an int, or traced inside the stacked
  groups' nnx.vmap) of the given kinds from the config (the only place that reads it)."""
  common = dict(dtype=dtype, param_dtype=param_dtype)
  linears = dict(weights=expert_weights, linear_impl=kernels.linear)
  D, eps, norm_impl = cfg.hidden_size, cfg.rms_norm_eps, kernels.rms_norm
  if mixer == "linear":
    attention = LightningAttention(
        hidden=D, heads=cfg.num_attention_heads, head_dim=cfg.head_dim, rotary_dim=cfg.rotary_dim,
        norm_groups=cfg.group_norm_size, layer_idx=layer_idx, num_layers=cfg.num_hidden_layers,
        decay_form=cfg.decay_form, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        use_qk_norm=cfg.use_qk_norm, eps=eps, rngs=rngs, impl=kernels.lightning,
        qk_impl=kernels.qk_norm_rope, norm_impl=norm_impl, **linears, **common)
  else:
    attention = MultiLatentAttention(
        hidden=D, heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, eps=eps, rngs=rngs,
        impl=kernels.attention, norm_impl=norm_impl, **linears, **common)
  if mlp == "dense":
    ffn = SwiGLU(D, cfg.intermediate_size, rngs=rngs, **linears, **common)
  else:
    ffn = SparseMoE(
        hidden=D, num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
        width=cfg.moe_intermediate_size, shared_width=cfg.shared_expert_intermediate_size,
        n_group=cfg.n_group, topk_group=cfg.topk_group, routed_scale=cfg.routed_scaling_factor,
        rngs=rngs, impl=kernels.moe, exchange=parallel.expert_exchange,
        expert_weights=expert_weights, linear_impl=kernels.linear, **common)
  return DecoderLayer(attention, ffn, D, eps=eps, norm_impl=norm_impl, **common)


class HybridGroup(nnx.Module):
  """`layer_group_size - 1` Lightning layers then one MLA layer (docs/architecture.md §2)."""

  def __init__(self, layers: list[DecoderLayer]):
    self.layers = nnx.List(layers)

  def __call__(self, h, *, positions, segment_ids=None, cache=None, layer_policy: str = "none",
               routing=None):
    """Run the group: (h, new caches, loads [n_moe, E] or None). cache: a list with one entry per
    layer (or None). layer_policy: run each layer under `jax.checkpoint` with that named policy
    (`remat.REMAT`; "none": not), prevent_cse on. routing: per layer, its replayed experts
    [B, T, X] (None for a dense layer); then loads is (loads, expert ids [n_moe, B, T, X])."""
    new_cache, loads, ids = [], [], []
    for j, layer in enumerate(self.layers):
      r = None if routing is None else routing[j]
      h, c, load = checkpointed(layer, h, policy=layer_policy, positions=positions,
                                segment_ids=segment_ids, cache=None if cache is None else cache[j],
                                **({} if r is None else {"routing": r}))
      new_cache.append(c)
      if r is not None:
        load, chosen = load
        ids.append(chosen)
      if load is not None:
        loads.append(load)
    loads = jnp.stack(loads) if loads else None
    if routing is not None:
      loads = (loads, jnp.stack(ids) if ids else None)
    return h, (new_cache if cache is not None else None), loads

  def init_cache(self, batch: int, max_len: int, dtype):
    return [layer.init_cache(batch, max_len, dtype) for layer in self.layers]
