"""The Ling-2.6 causal LM: embeddings, the hybrid stack, final norm, untied head, MTP (spec 2, 3).

The stack is laid out for `jax.lax.scan`:
  prefix  - the leading full hybrid groups that hold a dense-MLP layer (unrolled; flash: group 0),
  groups  - the remaining full groups, parameters stacked on a leading `layers` axis and scanned,
  tail    - layers after the last full group (all MLA by the HF tail clause; unrolled).
`forward(..., scan=False)` runs the same stacked parameters group by group in a Python loop; a
test proves both paths give identical logits.

`forward(..., remat=policy)` checkpoints the stack block by block (`remat_scope`: each decoder
layer, the default, or each hybrid group / scan body), and the MTP layer, so that the backward
pass keeps only the blocks' inputs plus what the policy saves, and recomputes the rest one block
at a time. Remat of the whole loss instead recomputes the whole forward and then needs every
residual at once: no saving.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax import axes as ax
from ling_jax.config import LingConfig
from ling_jax.model.common import REMAT_SCOPES, RMSNorm, checkpointed, param, remat_policy
from ling_jax.model.decoder import HybridGroup, make_layer, run_layer
from ling_jax.model.mtp import MTPLayer


@flax.struct.dataclass
class LingOutput:
  logits: jax.Array | None          # [B, T, vocab] fp32
  hidden: jax.Array                 # [B, T, D] after the final norm
  expert_load: jax.Array | None     # [n_moe_layers, E]: tokens routed to each expert
  mtp_logits: jax.Array | None = None       # [B, T, vocab], predicting token t+2
  mtp_expert_load: jax.Array | None = None  # [E]
  cache: Any = None
  mtp_hidden: jax.Array | None = None       # [B, T, D]: MTP final_layernorm output (head input)


class LingForCausalLM(nnx.Module):
  """Ling-2.6 (BailingMoeV2_5ForCausalLM). `model(tokens [B, T] int32) -> logits [B, T, vocab]`."""

  def __init__(self, config: LingConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, moe_impl: str = "auto", gla_impl: str = "auto",
               attn_impl: str = "auto"):
    cfg = self.config = config
    self.dtype = dtype
    D, V, G = cfg.hidden_size, cfg.vocab_size, cfg.layer_group_size
    types, mlps = cfg.layer_types(), cfg.mlp_types()
    build = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, moe_impl=moe_impl,
                 gla_impl=gla_impl, attn_impl=attn_impl)

    def layers(start: int, stop: int):
      return [make_layer(cfg, types[i], mlps[i], **build) for i in range(start, stop)]

    self.word_embeddings = param(rngs, (V, D), (ax.VOCAB, ax.EMBED), param_dtype)
    P, S = cfg.num_prefix_groups, cfg.num_scanned_groups
    self.prefix = nnx.List([HybridGroup(layers(g * G, (g + 1) * G)) for g in range(P)])
    if S:
      @nnx.split_rngs(splits=S)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: ax.LAYERS})
      def stacked(rngs):
        return HybridGroup([make_layer(cfg, types[i], mlps[i], **{**build, "rngs": rngs})
                            for i in range(P * G, (P + 1) * G)])
      self.groups = stacked(rngs)
    else:
      self.groups = None
    self.tail = nnx.List(layers(cfg.num_groups * G, cfg.num_hidden_layers))
    self.norm = RMSNorm(D, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.lm_head = param(rngs, (D, V), (ax.EMBED, ax.VOCAB), param_dtype, fan_in=D)
    if cfg.num_nextn_predict_layers:
      self.mtp = MTPLayer(make_layer(cfg, "mla", "moe", **build), D, eps=cfg.rms_norm_eps,
                          rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    else:
      self.mtp = None

  # ------------------------------------------------------------------ decode cache
  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """Empty decode cache: fp32 Lightning states and MLA latent caches of `max_len` slots."""
    dtype = dtype or self.dtype
    cache: dict[str, Any] = {"index": jnp.zeros((), jnp.int32)}
    cache["prefix"] = [g.init_cache(batch, max_len, dtype) for g in self.prefix]
    if self.groups is not None:
      n = self.config.num_scanned_groups
      one = nnx.merge(*_first(nnx.split(self.groups))).init_cache(batch, max_len, dtype)
      cache["groups"] = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), one)
    else:
      cache["groups"] = None
    cache["tail"] = [layer.init_cache(batch, max_len, dtype) for layer in self.tail]
    return cache

  # ------------------------------------------------------------------ forward
  def __call__(self, tokens: jax.Array, *, positions=None, segment_ids=None, cache=None,
               scan: bool = True):
    """tokens [B, T] int32 -> logits [B, T, vocab] (and the updated cache when one is given)."""
    out = self.forward(tokens, positions=positions, segment_ids=segment_ids, cache=cache, scan=scan)
    return out.logits if cache is None else (out.logits, out.cache)

  def forward(self, tokens: jax.Array, *, positions=None, segment_ids=None, cache=None,
              scan: bool = True, mtp: bool = False, logits: bool = True, remat=None,
              remat_scope: str = "layer") -> LingOutput:
    """The full forward pass. logits=False skips the head (out.logits and out.mtp_logits are None;
    the loss is then computed from out.hidden and out.mtp_hidden).

    remat: None / "none" (keep every residual), a name of `common.REMAT` ("full", "dots",
    "dots_no_batch", "dots_no_scores") or a jax.checkpoint policy: each block of `remat_scope`
    ("layer": every decoder layer; "group": every hybrid group, i.e. the scan body, and every
    tail layer) and the MTP layer run under jax.checkpoint with that policy.
    """
    cfg = self.config
    B, T = tokens.shape
    G = cfg.layer_group_size
    if remat_scope not in REMAT_SCOPES:
      raise ValueError(f"unknown remat_scope {remat_scope!r}; choose one of {REMAT_SCOPES}")
    do_remat, policy = remat_policy(remat)
    rm = dict(remat=do_remat, policy=policy, scope=remat_scope)
    index = cache["index"] if cache is not None else 0
    if positions is None:
      positions = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
    run = dict(positions=positions, segment_ids=segment_ids, cache_index=index)
    h = jnp.take(self.word_embeddings[...], tokens, axis=0).astype(self.dtype)
    new_cache: dict[str, Any] = {"index": index + T} if cache is not None else None
    loads = []

    prefix_cache = []
    for g, group in enumerate(self.prefix):
      h, c, load = _call_group(group, h, g * G, None if cache is None else cache["prefix"][g],
                               run, prevent_cse=True, **rm)
      prefix_cache.append(c)
      loads.append(load)

    groups_cache = None
    if self.groups is not None:
      h, groups_cache, load = self._run_groups(h, cache, run, scan, rm)
      loads.append(load)

    tail_cache = []
    for i, layer in enumerate(self.tail):
      h, c, load = run_layer(layer, h, cfg.num_groups * G + i,
                             None if cache is None else cache["tail"][i], **run, remat=do_remat,
                             policy=policy)
      tail_cache.append(c)
      loads.append(None if load is None else load[None])

    if cache is not None:
      new_cache.update(prefix=prefix_cache, groups=groups_cache, tail=tail_cache)
    loads = [l for l in loads if l is not None]
    hidden = self.norm(h)
    out = LingOutput(logits=self._head(hidden) if logits else None, hidden=hidden,
                     expert_load=jnp.concatenate(loads) if loads else None, cache=new_cache)
    if mtp:
      out = self._mtp(out, tokens, positions, segment_ids, logits, do_remat, policy)
    return out

  def _run_groups(self, h, cache, run, scan: bool, rm: dict):
    """Scan (or loop) the stacked hybrid groups."""
    cfg = self.config
    G, start, n = cfg.layer_group_size, cfg.num_prefix_groups * cfg.layer_group_size, cfg.num_scanned_groups
    graphdef, state = nnx.split(self.groups)

    def body(h, xs):
      st, g, c = xs
      group = nnx.merge(graphdef, st)
      # Per-layer checkpoints keep prevent_cse even inside the scan: its barrier (over the layer's
      # inputs and output cotangents) is what stops XLA from hoisting all the layers'
      # recomputations to the top of the backward loop body, or, where the scan is unrolled
      # (a trip count of 1 is), from merging them with the forward pass (no saving at all).
      rm_layers = dict(rm, remat=rm["remat"] and rm["scope"] == "layer")
      h, c, load = _call_group(group, h, start + g * G, c, run, prevent_cse=True, **rm_layers)
      return h, (c, load)

    if rm["remat"] and rm["scope"] == "group":
      # The whole body: a real loop keeps the recomputation apart from the forward by itself.
      body = jax.checkpoint(body, policy=rm["policy"], prevent_cse=not (scan and n > 1))
    xs = (state, jnp.arange(n, dtype=jnp.int32), None if cache is None else cache["groups"])
    if scan:
      h, (c, load) = jax.lax.scan(body, h, xs)
    else:
      outs = []
      for i in range(n):
        h, y = body(h, jax.tree.map(lambda a: a[i], xs))
        outs.append(y)
      c, load = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return h, c, load.reshape(-1, load.shape[-1])

  def _head(self, hidden: jax.Array) -> jax.Array:
    w = self.lm_head[...].astype(self.dtype)
    return jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)

  def _mtp(self, out: LingOutput, tokens, positions, segment_ids, logits: bool = True,
           remat: bool = False, policy=None) -> LingOutput:
    """MTP logits for token t+2 from h_t (post-norm) and token t+1 (the last position is padding)."""
    if self.mtp is None:
      raise ValueError("this config has num_nextn_predict_layers=0: no MTP layer")
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    e = jnp.take(self.word_embeddings[...], nxt, axis=0).astype(self.dtype)
    L = self.config.num_hidden_layers
    call = lambda m, hid, e, pos, seg: m(hid, e, layer_idx=L, positions=pos, segment_ids=seg)
    if remat:
      h, _, load = checkpointed(self.mtp, call, out.hidden, e, positions, segment_ids,
                                policy=policy)
    else:
      h, _, load = call(self.mtp, out.hidden, e, positions, segment_ids)
    return out.replace(mtp_logits=self._head(h) if logits else None, mtp_hidden=h,
                       mtp_expert_load=load)


def _call_group(group, h, first_layer, cache, run, *, remat: bool, policy, scope: str,
                prevent_cse: bool):
  """One hybrid group: checkpointed as a whole (scope "group") or layer by layer ("layer")."""
  if remat and scope == "group":
    call = lambda g, h, pos, seg, c: g(h, first_layer=first_layer, positions=pos, segment_ids=seg,
                                       cache=c, cache_index=run["cache_index"])
    return checkpointed(group, call, h, run["positions"], run["segment_ids"], cache,
                        policy=policy, prevent_cse=prevent_cse)
  return group(h, first_layer=first_layer, cache=cache, remat=remat, policy=policy,
               prevent_cse=prevent_cse, **run)


def _first(split):
  """(graphdef, stacked state) -> (graphdef, state of the first stacked element)."""
  graphdef, state = split
  return graphdef, jax.tree.map(lambda a: a[0], state)
