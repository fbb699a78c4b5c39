"""The Lightning linear-attention layer (Lightning Attention-2 / simple GLA), docs/architecture.md
§3.4.

a -> fused QKV [D, 3, H, K] -> per-head QK RMSNorm -> partial NeoX RoPE (the two as one op,
pallas_kernels.qk_norm_rope) -> simple GLA with a per-head constant log-decay
g_h = -slope_h * layer_factor(l) and an fp32 state [H, K, V] -> GroupRMSNorm -> * sigmoid(a W_g)
-> W_o. The decay is a `Constant` of the layer, computed from its global index l when the layer
is built. Under a mesh the two ops run in shard_map islands, heads over `tensor`
(ling_jax/parallel/islands.py); the projections and the norm are GSPMD's.

With a cache (the state [B, H, K, V], docs/architecture.md §5) a call continues each row's
recurrence: one token through `simple_gla_step` (XLA's update or the Pallas decode kernel, by
`impl` and batch; XLA's under a mesh), more through `simple_gla` from the cached state. A token
at a negative position is padding: it neither enters nor decays the state (a ragged prompt chunk:
each row's real tokens come first), so the returned state is each row's after its real tokens. A
`Pending` cache entry asks the call to defer that choice: it returns the state before the call
with the call's keys and values, and `Pending.commit(n)` later keeps each row's first n tokens
(speculative decoding, where how many drafts survive is known only from the call's own logits).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ling_jax import axes as ax
from ling_jax.config import alibi_slopes
from ling_jax.model import rope
from ling_jax.model.common import GroupRMSNorm, RMSNorm, constant
from ling_jax.model.linear import add_linear, linear
from ling_jax.model.settings import ExpertWeights
from ling_jax.parallel import islands
from pallas_kernels.simple_gla import simple_gla_prefix_state, simple_gla_step


@flax.struct.dataclass
class Pending:
  """A Lightning cache entry whose update waits for each row's count of kept tokens.

  `Pending(state)` (k, v, decay None) asks a cached call to defer; the call returns
  `Pending(state, k, v, decay)`: the state before it, its keys [B, T, H, K] and values
  [B, T, H, V] (padding keys zeroed) and the layer's log-decay [H]. Under the stacked groups every
  field has the leading `layers` axis."""
  state: jax.Array
  k: jax.Array | None = None
  v: jax.Array | None = None
  decay: jax.Array | None = None

  def commit(self, n: jax.Array) -> jax.Array:
    """The state after each row's first n[b] tokens of the deferred call (n [B] int32)."""
    f = simple_gla_prefix_state
    for _ in range(self.state.ndim - 4):  # the stacked groups' leading axis
      f = jax.vmap(f, in_axes=(0, 0, 0, 0, None))
    return f(self.k, self.v, self.decay, self.state, n)


def layer_decay(slopes: jax.Array, layer_idx, num_layers: int, form: str) -> jax.Array:
  """Log-decay g [H] of layer `layer_idx` (may be traced), docs/architecture.md §3.4.4 and 6.1."""
  denom = max(1, num_layers - 1)
  l = jnp.asarray(layer_idx, jnp.float32)
  if form == "B":
    l = jnp.maximum(l - 1.0, 0.0)
  return -slopes * (1.0 - l / denom + 1e-5)


class LightningAttention(nnx.Module):
  """Lightning attention with the checkpoint's names (`query_key_value`, `g_proj`, `g_norm`,
  `dense`). layer_idx: the layer's global index (an int, or traced where the model builds a
  stack of layers under nnx.vmap); `decay` holds its log-decay [H]. impl, qk_impl and norm_impl
  are the `impl`s of simple_gla, qk_norm_rope and rms_norm; weights and linear_impl say how the
  three projections are held and run (model/linear.py)."""

  def __init__(self, *, hidden: int, heads: int, head_dim: int, rotary_dim: int,
               norm_groups: int, layer_idx, num_layers: int, decay_form: str, rope_theta: float,
               rope_scaling, use_qk_norm: bool, eps: float, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, impl: str = "auto",
               qk_impl: str = "auto", norm_impl: str = "auto",
               weights: ExpertWeights = ExpertWeights(), linear_impl: str = "auto"):
    self.heads, self.head_dim, self.rotary_dim = heads, head_dim, rotary_dim
    self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
    self.dtype, self.impl, self.qk_impl = dtype, impl, qk_impl
    self.weights, self.linear_impl = weights, linear_impl
    slopes = jnp.asarray(np.asarray(alibi_slopes(heads)), jnp.float32)
    self.decay = constant(layer_decay(slopes, layer_idx, num_layers, decay_form), (ax.HEADS,))
    HK = (ax.HEADS, ax.HEAD_DIM)
    lin = dict(weights=weights, n_in=1)
    add_linear(self, "query_key_value", rngs, (hidden, 3, heads, head_dim),
               (ax.EMBED, ax.QKV, *HK), param_dtype, **lin)
    add_linear(self, "g_proj", rngs, (hidden, heads, head_dim), (ax.EMBED, *HK), param_dtype,
               **lin)
    add_linear(self, "dense", rngs, (heads, head_dim, hidden), (*HK, ax.EMBED), param_dtype,
               weights=weights, n_in=2)
    norm = dict(eps=eps, dtype=dtype, param_dtype=param_dtype, impl=norm_impl)
    self.g_norm = GroupRMSNorm(heads, head_dim, norm_groups, **norm)
    if use_qk_norm:
      self.query_layernorm = RMSNorm(head_dim, **norm)
      self.key_layernorm = RMSNorm(head_dim, **norm)
    else:
      self.query_layernorm = self.key_layernorm = None

  def init_cache(self, batch: int, max_len: int, dtype=None) -> jax.Array:
    """The fixed-size decode state [B, H, K, V] in fp32 whatever max_len and dtype
    (docs/architecture.md §5)."""
    del max_len, dtype
    state = jnp.zeros((batch, self.heads, self.head_dim, self.head_dim), jnp.float32)
    return islands.constrain(state, islands.LIGHTNING_STATE)  # under a mesh: rows and heads

  def __call__(self, a: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: jax.Array | Pending | None = None):
    """a [B, T, D] -> (y [B, T, D], new state, a `Pending`, or None): module docstring."""
    dt = self.dtype
    a = a.astype(dt)
    qkv = linear(self, "query_key_value", "btd,dshk->btshk", a)  # [B, T, 3, H, K]
    cos, sin = rope.cos_sin(positions, self.rotary_dim, self.rope_theta, self.rope_scaling)
    qn, kn = self.query_layernorm, self.key_layernorm
    pending = isinstance(cache, Pending)
    # The one-token decode step runs the reference: nothing for the kernel to fuse.
    decoding = cache is not None and a.shape[1] == 1 and not pending
    wq, wk = (None, None) if qn is None else (qn.weight[...], kn.weight[...])
    # Under a mesh of several devices the two ops run per device, on its rows and heads.
    q, k, v = islands.qk_norm_rope(qkv, wq, wk, cos, sin, eps=qn.eps if qn is not None else 0.0,
                                   dtype=dt, impl="xla" if decoding else self.qk_impl)
    g = self.decay[...]
    if decoding and segment_ids is None:
      # The decode kernel is a single-device call: under a mesh GSPMD partitions XLA's update.
      step_impl = self.impl if islands.active_mesh() is None else "xla"
      o, state = simple_gla_step(q[:, 0], k[:, 0], v[:, 0], g, cache, impl=step_impl)
      o = o[:, None]  # [B, 1, H, V]
    elif cache is None:
      o, state = islands.simple_gla(q, k, v, g, segment_ids=segment_ids, impl=self.impl)
    else:
      s0 = cache.state if pending else cache
      real = positions >= 0  # [B, T]: a prefix of each row
      # A padding token's zero key adds nothing to the state; its decay is undone below.
      k = jnp.where(real[..., None, None], k, 0).astype(k.dtype)
      o, final = islands.simple_gla(q, k, v, g, initial_state=s0, segment_ids=segment_ids,
                                    impl=self.impl)
      if pending:
        state = Pending(s0, k, v, g)
      else:
        n = real.sum(1, dtype=jnp.int32)
        state = jax.lax.cond(jnp.all(real), lambda: final,
                             lambda: simple_gla_prefix_state(k, v, g, s0, n))
    o = self.g_norm(o.astype(dt))
    gate = linear(self, "g_proj", "btd,dhk->bthk", a)
    o = o * jax.nn.sigmoid(gate)
    y = linear(self, "dense", "bthk,hkd->btd", o)
    return y, (state if cache is not None else None)
