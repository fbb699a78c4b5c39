"""The Lightning linear-attention layer (Lightning Attention-2 / simple GLA), docs/architecture.md
§3.4.

a -> fused QKV [D, 3, H, K] -> per-head QK RMSNorm -> partial NeoX RoPE (the two as one op,
pallas_kernels.qk_norm_rope) -> simple GLA with a per-head constant log-decay
g_h = -slope_h * layer_factor(l) and an fp32 state [H, K, V] -> GroupRMSNorm -> * sigmoid(a W_g)
-> W_o. The decay is a `Constant` of the layer, computed from its global index l when the layer
is built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ling_jax import axes as ax
from ling_jax.config import alibi_slopes
from ling_jax.model import rope
from ling_jax.model.common import GroupRMSNorm, RMSNorm, constant, param
from pallas_kernels.qk_norm_rope import qk_norm_rope
from pallas_kernels.simple_gla import simple_gla, simple_gla_step


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
  are the `impl`s of simple_gla, qk_norm_rope and rms_norm."""

  def __init__(self, *, hidden: int, heads: int, head_dim: int, rotary_dim: int,
               norm_groups: int, layer_idx, num_layers: int, decay_form: str, rope_theta: float,
               rope_scaling, use_qk_norm: bool, eps: float, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, impl: str = "auto",
               qk_impl: str = "auto", norm_impl: str = "auto"):
    self.heads, self.head_dim, self.rotary_dim = heads, head_dim, rotary_dim
    self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
    self.dtype, self.impl, self.qk_impl = dtype, impl, qk_impl
    slopes = jnp.asarray(np.asarray(alibi_slopes(heads)), jnp.float32)
    self.decay = constant(layer_decay(slopes, layer_idx, num_layers, decay_form), (ax.HEADS,))
    HK = (ax.HEADS, ax.HEAD_DIM)
    self.query_key_value = param(rngs, (hidden, 3, heads, head_dim), (ax.EMBED, ax.QKV, *HK),
                                 param_dtype, fan_in=hidden)
    self.g_proj = param(rngs, (hidden, heads, head_dim), (ax.EMBED, *HK), param_dtype, fan_in=hidden)
    self.dense = param(rngs, (heads, head_dim, hidden), (*HK, ax.EMBED), param_dtype,
                       fan_in=heads * head_dim)
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
    return jnp.zeros((batch, self.heads, self.head_dim, self.head_dim), jnp.float32)

  def __call__(self, a: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: jax.Array | None = None):
    """a [B, T, D] -> (y [B, T, D], new state or None)."""
    dt = self.dtype
    a = a.astype(dt)
    qkv = jnp.einsum("btd,dshk->btshk", a, self.query_key_value[...].astype(dt))  # [B, T, 3, H, K]
    cos, sin = rope.cos_sin(positions, self.rotary_dim, self.rope_theta, self.rope_scaling)
    qn, kn = self.query_layernorm, self.key_layernorm
    # The one-token decode step runs the reference: nothing for the kernel to fuse.
    decoding = cache is not None and a.shape[1] == 1
    wq, wk = (None, None) if qn is None else (qn.weight[...], kn.weight[...])
    q, k, v = qk_norm_rope(qkv, wq, wk, cos, sin, eps=qn.eps if qn is not None else 0.0,
                           dtype=dt, impl="xla" if decoding else self.qk_impl)
    g = self.decay[...]
    if decoding and segment_ids is None:
      o, state = simple_gla_step(q[:, 0], k[:, 0], v[:, 0], g, cache)
      o = o[:, None]  # [B, 1, H, V]
    else:
      o, state = simple_gla(q, k, v, g, initial_state=cache, segment_ids=segment_ids,
                            impl=self.impl)
    o = self.g_norm(o.astype(dt))
    gate = jnp.einsum("btd,dhk->bthk", a, self.g_proj[...].astype(dt))
    o = o * jax.nn.sigmoid(gate)
    y = jnp.einsum("bthk,hkd->btd", o, self.dense[...].astype(dt))
    return y, (state if cache is not None else None)
