"""The Ling-2.6 causal LM: embeddings, the hybrid stack, final norm, untied head, MTP
(docs/architecture.md §2, 3).

The stack is laid out for `jax.lax.scan`:
  prefix  - the leading full hybrid groups that hold a dense-MLP layer (unrolled; flash: group 0),
  groups  - the remaining full groups, parameters stacked on a leading `layers` axis and scanned,
  tail    - layers after the last full group (all MLA by the HF tail clause; unrolled).
`forward(..., scan=False)` runs the same stacked parameters group by group in a Python loop; a
test proves both paths give identical logits.

`forward(..., remat=Remat(policy, scope))` checkpoints the stack block by block (each decoder
layer, the default, or each hybrid group / scan body), and the MTP layer, so that the backward
pass keeps only the blocks' inputs plus what the policy saves, and recomputes the rest one block
at a time. Remat of the whole loss instead recomputes the whole forward and then needs every
residual at once: no saving.

`kernels` (model/settings.py) says which implementation each op runs; the model hands each layer
its part when it is built. `parallel` (model/settings.py) holds the choices of the shard_map
islands that run under a mesh: the model is never given a mesh, it runs on the one the caller
sets with `jax.set_mesh` (docs/parallelism.md §4; none, or one device: the single-device code).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax import axes as ax
from ling_jax.config import LingConfig
from ling_jax.model.common import Constant, RMSNorm, param
from ling_jax.model.decoder import HybridGroup, make_layer
from ling_jax.model.linear import dequantize_linear
from ling_jax.model.mtp import MTPLayer
from ling_jax.model.remat import REMAT, checkpointed
from ling_jax.model.settings import ExpertWeights, Kernels, Parallel, Remat
from ling_jax.parallel import islands
from pallas_kernels.grouped_matmul.fp8 import Fp8Weight, dequantize, quantize


@flax.struct.dataclass
class LingOutput:
  logits: jax.Array | None          # [B, T, vocab] fp32
  hidden: jax.Array                 # [B, T, D] after the final norm
  expert_load: jax.Array | None     # [n_moe_layers, E]: tokens routed to each expert
  mtp_logits: jax.Array | None = None       # [B, T, vocab], predicting token t+2
  mtp_expert_load: jax.Array | None = None  # [E]
  cache: Any = None
  mtp_hidden: jax.Array | None = None       # [B, T, D]: MTP final_layernorm output (head input)
  expert_ids: jax.Array | None = None       # [B, T, M, X]: the experts each token went to


class LingForCausalLM(nnx.Module):
  """Ling-2.6 (BailingMoeV2_5ForCausalLM). `model(tokens [B, T] int32) -> logits [B, T, vocab]`."""

  def __init__(self, config: LingConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, kernels: Kernels = Kernels(),
               parallel: Parallel = Parallel(),
               expert_weights: ExpertWeights = ExpertWeights()):
    cfg = self.config = config
    self.dtype, self.kernels, self.parallel = dtype, kernels, parallel
    self.expert_weights = expert_weights
    D, V, G = cfg.hidden_size, cfg.vocab_size, cfg.layer_group_size
    types, mlps = cfg.layer_types(), cfg.mlp_types()
    build = dict(dtype=dtype, param_dtype=param_dtype, kernels=kernels, parallel=parallel,
                 expert_weights=expert_weights)

    def layers(start: int, stop: int, rngs, first=None):
      """Layers start..stop-1; `first`: the global index of the first (traced in the stack)."""
      first = start if first is None else first
      return [make_layer(cfg, first + i - start, types[i], mlps[i], rngs=rngs, **build)
              for i in range(start, stop)]

    self.word_embeddings = param(rngs, (V, D), (ax.VOCAB, ax.EMBED), param_dtype)
    P, S = cfg.num_prefix_groups, cfg.num_scanned_groups
    self.prefix = nnx.List([HybridGroup(layers(g * G, (g + 1) * G, rngs)) for g in range(P)])
    if S:
      # Every stacked group has the same layer kinds; `g` (its place in the stack) gives each its
      # layers' global indices, so their per-layer constants stack along `layers` too.
      @nnx.split_rngs(splits=S)
      @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: ax.LAYERS})
      def stacked(rngs, g):
        return HybridGroup(layers(P * G, (P + 1) * G, rngs, first=(P + g) * G))
      self.groups = stacked(rngs, jnp.arange(S, dtype=jnp.int32))
    else:
      self.groups = None
    self.tail = nnx.List(layers(cfg.num_groups * G, cfg.num_hidden_layers, rngs))
    norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                impl=kernels.rms_norm)
    self.norm = RMSNorm(D, **norm)
    self.lm_head = param(rngs, (D, V), (ax.EMBED, ax.VOCAB), param_dtype, fan_in=D)
    if cfg.num_nextn_predict_layers:
      mtp = make_layer(cfg, cfg.num_hidden_layers, "mla", "moe", rngs=rngs, **build)
      self.mtp = MTPLayer(mtp, D, eps=cfg.rms_norm_eps, rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype, norm_impl=kernels.rms_norm,
                          weights=expert_weights, linear_impl=kernels.linear)
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
              scan: bool = True, mtp: bool = False, logits: bool = True,
              remat: Remat = Remat(), routing: jax.Array | None = None) -> LingOutput:
    """The full forward pass. logits=False skips the head (out.logits and out.mtp_logits are None;
    the loss is then computed from out.hidden and out.mtp_hidden).

    positions default to the cache's index onwards (0 onwards without a cache). remat: each
    block of `remat.scope` ("layer": every decoder layer; "group": every hybrid group, i.e. the
    scan body, and every tail layer) and the MTP layer run under jax.checkpoint with
    `remat.policy`.

    routing [B, T, M, X] int32, routing replay (docs/posttrain.md): per token and MoE layer of
    the main stack (M of them in layer order; not the MTP layer), the experts to send it to, -1
    = route as usual (all -1, `record_routing`: only record). out.expert_ids [B, T, M, X] are
    then the experts each token went to. None (the default): nothing changes.
    """
    B, T = tokens.shape
    index = cache["index"] if cache is not None else 0
    if positions is None:
      positions = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
    h = islands.embed(self.word_embeddings[...], tokens).astype(self.dtype)
    prefix_cache, tail_cache, loads, ids = [], [], [], []
    replay = None if routing is None else self._routing_parts(routing)
    G = self.config.layer_group_size

    def chosen(load):  # with routing, a block's aux is (loads, expert ids)
      if routing is None:
        return load
      ids.append(load[1])
      return load[0]

    for g, group in enumerate(self.prefix):
      h, c, load = _group(group, h, positions=positions, segment_ids=segment_ids,
                          cache=None if cache is None else cache["prefix"][g], remat=remat,
                          routing=None if replay is None else replay["layers"][g * G:(g + 1) * G])
      prefix_cache.append(c)
      loads.append(chosen(load))

    groups_cache = None
    if self.groups is not None:
      h, groups_cache, load = self._run_groups(h, positions, segment_ids,
                                               None if cache is None else cache["groups"], scan,
                                               remat, None if replay is None else replay["groups"])
      loads.append(chosen(load))

    first_tail = self.config.num_groups * G
    for i, layer in enumerate(self.tail):
      r = None if replay is None else replay["layers"][first_tail + i]
      h, c, load = checkpointed(layer, h, policy=remat.policy, positions=positions,
                                segment_ids=segment_ids,
                                cache=None if cache is None else cache["tail"][i],
                                **({} if r is None else {"routing": r}))
      tail_cache.append(c)
      if r is not None:
        load, tail_ids = load
        ids.append(tail_ids[None])
      loads.append(None if load is None else load[None])

    new_cache = None
    if cache is not None:
      new_cache = {"index": index + T, "prefix": prefix_cache, "groups": groups_cache,
                   "tail": tail_cache}
    loads = [l for l in loads if l is not None]
    hidden = self.norm(h)
    ids = [i for i in ids if i is not None]
    out = LingOutput(logits=self._head(hidden) if logits else None, hidden=hidden,
                     expert_load=jnp.concatenate(loads) if loads else None, cache=new_cache,
                     expert_ids=(jnp.moveaxis(jnp.concatenate(ids), 0, 2)  # [B, T, M, X]
                                 if routing is not None else None))
    if mtp:
      out = self._mtp(out, tokens, positions, segment_ids, logits, remat)
    return out

  def _routing_parts(self, routing: jax.Array) -> dict:
    """routing [B, T, M, X] -> {"layers": per main layer its [B, T, X] (None: a dense layer),
    "groups": the scanned groups' [S, G, B, T, X] (None: no scanned groups)}."""
    cfg = self.config
    moe = [i for i, kind in enumerate(cfg.mlp_types()) if kind == "moe"]
    if routing.ndim != 4 or routing.shape[2] != len(moe):
      raise ValueError(f"routing {routing.shape} must be [B, T, M, X] with M = {len(moe)} MoE "
                       "layers")
    layers = [None] * cfg.num_hidden_layers
    for k, i in enumerate(moe):
      layers[i] = routing[:, :, k]
    groups = None
    if self.groups is not None:
      G, P, S = cfg.layer_group_size, cfg.num_prefix_groups, cfg.num_scanned_groups
      k0 = moe.index(P * G)  # every layer of a scanned group is an MoE layer
      B, T, _, X = routing.shape
      part = routing[:, :, k0:k0 + S * G].reshape(B, T, S, G, X)
      groups = jnp.transpose(part, (2, 3, 0, 1, 4))  # [S, G, B, T, X]
    return {"layers": layers, "groups": groups}

  def _run_groups(self, h, positions, segment_ids, cache, scan: bool, remat: Remat,
                  routing=None):
    """Scan (or loop) the stacked hybrid groups; routing: their [S, G, B, T, X] replay."""
    n = self.config.num_scanned_groups
    graphdef, state = nnx.split(self.groups)

    def body(h, xs):
      st, c, r = xs
      # Per-layer checkpoints keep prevent_cse even inside the scan: its barrier (over the layer's
      # inputs and output cotangents) is what stops XLA from hoisting all the layers'
      # recomputations to the top of the backward loop body, or, where the scan is unrolled
      # (a trip count of 1 is), from merging them with the forward pass (no saving at all).
      h, c, load = nnx.merge(graphdef, st)(h, positions=positions, segment_ids=segment_ids,
                                           cache=c, layer_policy=remat.at("layer"), routing=r)
      return h, (c, load)

    if remat.at("group") != "none":
      # The whole body: a real loop keeps the recomputation apart from the forward by itself.
      body = jax.checkpoint(body, policy=REMAT[remat.policy], prevent_cse=not (scan and n > 1))
    xs = (state, cache, routing)
    if scan:
      h, (c, load) = jax.lax.scan(body, h, xs)
    else:
      outs = []
      for i in range(n):
        h, y = body(h, jax.tree.map(lambda a: a[i], xs))
        outs.append(y)
      c, load = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    if routing is not None:
      load, ids = load
      return h, c, (load.reshape(-1, load.shape[-1]), ids.reshape(-1, *ids.shape[2:]))
    return h, c, load.reshape(-1, load.shape[-1])

  def _head(self, hidden: jax.Array) -> jax.Array:
    w = self.lm_head[...].astype(self.dtype)
    return jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)

  def _mtp(self, out: LingOutput, tokens, positions, segment_ids, logits: bool,
           remat: Remat) -> LingOutput:
    """MTP logits for token t+2 from h_t (post-norm) and token t+1 (the last position is padding)."""
    if self.mtp is None:
      raise ValueError("this config has num_nextn_predict_layers=0: no MTP layer")
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    e = islands.embed(self.word_embeddings[...], nxt).astype(self.dtype)
    h, _, load = checkpointed(self.mtp, out.hidden, e, policy=remat.policy, positions=positions,
                              segment_ids=segment_ids)
    return out.replace(mtp_logits=self._head(h) if logits else None, mtp_hidden=h,
                       mtp_expert_load=load)


def build_constants(make: Callable[[], nnx.Module]) -> nnx.State:
  """The `Constant`s of the model `make()` builds, computed without allocating its parameters:
  one small compiled program (XLA drops every parameter's init). For models built abstractly
  (`nnx.eval_shape`), whose constants are shapes too."""
  return jax.jit(lambda: nnx.state(make(), Constant))()


def with_kernels(model: LingForCausalLM, kernels: Kernels | None = None,
                 parallel: Parallel | None = None) -> LingForCausalLM:
  """`model`'s variables (the same arrays) under other kernel or parallel settings (None: the
  model's own)."""
  make = lambda: LingForCausalLM(model.config, rngs=nnx.Rngs(0), dtype=model.dtype,
                                 kernels=kernels or model.kernels,
                                 parallel=parallel or model.parallel,
                                 expert_weights=model.expert_weights)
  return nnx.merge(nnx.graphdef(nnx.eval_shape(make)), nnx.state(model))


def with_fp8_experts(model: LingForCausalLM, expert_weights: ExpertWeights) -> LingForCausalLM:
  """`model` with its routed experts, and with `expert_weights.linears` its dense Linears too,
  quantised to FP8 (`pallas_kernels.grouped_matmul.fp8.quantize`: the scale of each block or
  column is its largest magnitude over e4m3's 448; a Linear over its [in, out] view), every other
  variable shared. For tests and benchmarks; a released FP8 checkpoint keeps its own scales
  (`convert import --keep-fp8`)."""
  make = lambda: LingForCausalLM(model.config, rngs=nnx.Rngs(0), dtype=model.dtype,
                                 kernels=model.kernels, parallel=model.parallel,
                                 expert_weights=expert_weights)
  fp8_model = nnx.eval_shape(make)
  graphdef, abstract = nnx.split(fp8_model)
  old = dict(nnx.to_flat_state(nnx.state(model)))
  scales = dict(nnx.to_flat_state(abstract))
  block = expert_weights.block if expert_weights.format == "fp8-block" else None
  linears = fp8_linears(fp8_model)
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    name = path[-1]
    scale_path = path[:-1] + (f"{name}_scale",)
    if scale_path not in scales:
      if not str(name).endswith("_scale"):
        flat.append((path, old[path]))  # not FP8; a scale is set with its weight
      continue
    w = old[path].get_value()
    if path[-2:-1] == ("experts",):  # [..., E, K, N]
      view = w
    else:  # a dense Linear: its [..., K, N] view below the stacked groups' axes
      lead = scales[scale_path].get_value().ndim - 2
      view = w.reshape(*w.shape[:lead], math.prod(w.shape[lead:lead + linears[path]]), -1)
    q = quantize(view, block)
    scale = q.scale if block is not None else q.scale[..., None, :]
    flat += [(path, var.replace(q.values.reshape(w.shape))),
             (scale_path, scales[scale_path].replace(scale))]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def fp8_linears(model: nnx.Module) -> dict[tuple, int]:
  """The state path of every FP8 dense Linear kernel in `model` -> its input axes
  (model/linear.py)."""
  return {path + (name,): n_in for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module) for name, n_in in getattr(node, "fp8_linears", ())}


def record_routing(config, batch: int, seq: int) -> jax.Array:
  """The `forward(routing=)` that changes nothing and records: [batch, seq, M, X] of -1 (route
  as usual), so that out.expert_ids holds the experts each token went to, ready to replay."""
  moe_layers = config.mlp_types().count("moe")
  return jnp.full((batch, seq, moe_layers, config.num_experts_per_tok), -1, jnp.int32)


def with_dense_experts(model: LingForCausalLM, dtype=None) -> LingForCausalLM:
  """The inverse of `with_fp8_experts`: `model` with its FP8 routed experts and dense Linears
  dequantised (values x scale in fp32, rounded once to the compute dtype) as dense weights, the
  reference an FP8 model is checked against. With `dtype` (e.g. float32) the model computes in
  it and every floating variable is cast to it: float32 gives the FP8 model's weights to fp32's
  one rounding, an accuracy reference for both. Without, the other variables are shared."""
  dtype = model.dtype if dtype is None else dtype
  make = lambda: LingForCausalLM(model.config, rngs=nnx.Rngs(0), dtype=dtype,
                                 kernels=model.kernels, parallel=model.parallel)
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  old = dict(nnx.to_flat_state(nnx.state(model)))
  ew = model.expert_weights
  linears = fp8_linears(model)
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    value = old[path].get_value()
    scale_path = path[:-1] + (f"{path[-1]}_scale",)
    if path[-2:-1] == ("experts",) and ew.fp8:
      f = lambda v, s: dequantize(Fp8Weight(v, s[:, 0] if ew.format == "fp8-channel" else s,
                                            ew.block if ew.format == "fp8-block" else None), dtype)
      lead = value.ndim - 3  # the stacked groups' leading axis
    elif path in linears:
      f = functools.partial(dequantize_linear, n_in=linears[path], weights=ew, dtype=dtype,
                            name="/".join(map(str, path)))
      lead = old[scale_path].get_value().ndim - 2
    elif dtype != model.dtype and jnp.issubdtype(value.dtype, jnp.floating):
      flat.append((path, var.replace(value.astype(dtype))))
      continue
    else:
      flat.append((path, old[path]))
      continue
    for _ in range(lead):
      f = jax.vmap(f)
    flat.append((path, var.replace(f(value, old[scale_path].get_value()))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _group(group: HybridGroup, h, *, positions, segment_ids, cache, remat: Remat, routing=None):
  """One hybrid group outside the scan: checkpointed as a whole (scope "group") or layer by
  layer ("layer")."""
  if remat.scope == "group":
    return checkpointed(group, h, policy=remat.policy, positions=positions,
                        segment_ids=segment_ids, cache=cache, routing=routing)
  return group(h, positions=positions, segment_ids=segment_ids, cache=cache,
               layer_policy=remat.policy, routing=routing)


def _first(split):
  """(graphdef, stacked state) -> (graphdef, state of the first stacked element)."""
  graphdef, state = split
  return graphdef, jax.tree.map(lambda a: a[0], state)
