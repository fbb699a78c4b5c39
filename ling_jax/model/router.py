"""The MoE router: sigmoid scores, aux-loss-free bias, group-limited top-k (docs/architecture.md
§3.7).

`route` is what the model runs: fp32 logits at fp32 accuracy (`router_logits`, with bf16
activations as split-operand bf16 matmuls), and the top-k by pairwise ranking where rows are
narrow. `route_reference` beside it is the same routing through `lax.top_k`, the form it must
match. `expert_load` (pallas_kernels.moe's, re-exported here) counts the routed assignments per
expert (the balancing rule's input).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax import axes as ax
from ling_jax.model.common import ExpertBias, param
from pallas_kernels.moe import expert_load  # noqa: F401 (re-exported)

_RANKED_MAX = 64  # widest row `top_k` ranks by pairwise comparison


def _total_order_key(x: jax.Array) -> jax.Array:
  """Floats as signed integers of the same order, lax.sort's total order (-0 < +0, NaNs at the
  ends): flip the magnitude bits of negatives."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"int{8 * x.dtype.itemsize}"))
  return jnp.where(bits < 0, bits ^ jnp.array(jnp.iinfo(bits.dtype).max, bits.dtype), bits)


def _ranks(x: jax.Array) -> jax.Array:
  """Each entry's position along the last axis in (value descending, index ascending) order, the
  order of lax.top_k: the number of entries before it, from all pairwise comparisons of their
  total-order keys. int32, same shape as x."""
  n = x.shape[-1]
  i = jnp.arange(n, dtype=jnp.int32)
  key = _total_order_key(x)
  a, b = key[..., :, None], key[..., None, :]
  return ((b > a) | ((b == a) & (i[None, :] < i[:, None]))).sum(-1, dtype=jnp.int32)


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k` (values, int32 indices; ties to the lower index, values descending) over
  the last axis. Rows of at most 64 entries (ling_small's 32 experts) are ranked by pairwise
  comparisons, one fused elementwise pass: XLA lowers lax.top_k on such rows to a sort of every
  row (BENCHMARKS.md: the router at 32768 tokens on an H100)."""
  n = x.shape[-1]
  if n > _RANKED_MAX:
    v, i = jax.lax.top_k(x, k)
    return v, i.astype(jnp.int32)
  hit = _ranks(x)[..., None, :] == jnp.arange(k, dtype=jnp.int32)[:, None]  # [..., k, n]
  idx = jnp.where(hit, jnp.arange(n, dtype=jnp.int32), 0).sum(-1, dtype=jnp.int32)
  return jnp.take_along_axis(x, idx, axis=-1), idx


def _top2_sum(x: jax.Array) -> jax.Array:
  """The sum of the two largest entries along the last axis (the one entry where it has one),
  as `lax.top_k(x, 2)[0].sum(-1)`: the max, plus the max of the rest once the first maximal
  entry is set aside. Three row reductions, for any width."""
  if x.shape[-1] == 1:
    return x[..., 0]
  first = jnp.argmax(x, axis=-1)[..., None]
  rest = jnp.where(jnp.arange(x.shape[-1]) == first, -jnp.inf, x)
  return jnp.max(x, axis=-1) + jnp.max(rest, axis=-1)


def _split_bf16(a: jax.Array, parts: int) -> list[jax.Array]:
  """fp32 a as `parts` bf16 terms, each a's remainder truncated to its top 16 bits (exact in
  bf16), so the fp32 sum of the terms is a to 2^(-8 parts) of |a|, and exactly a for 3 terms.
  Truncation by bit mask, not rounding casts: XLA's GPU compiler may fold a round trip
  f32 -> bf16 -> f32 into the identity (excess precision), which zeroes the later terms."""
  out = []
  for _ in range(parts):
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFF0000)
    top = jax.lax.bitcast_convert_type(bits, jnp.float32)
    out.append(top.astype(jnp.bfloat16))
    a = a - top
  return out


def _dot_f32(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _sum_terms(a: jax.Array, n: int) -> jax.Array:
  """[..., n E] -> [..., E]: the sum of the n side-by-side blocks of the last axis, in order."""
  E = a.shape[-1] // n
  out = a[..., :E]
  for i in range(1, n):
    out = out + a[..., i * E:(i + 1) * E]
  return out


def router_logits(x: jax.Array, weight: jax.Array) -> jax.Array:
  """x [N, D] @ weight [D, E] (fp32) -> fp32 logits, at fp32 accuracy, as the reference's
  F.linear in float32: a GPU's default precision for an fp32 dot (TF32) moves the logits by ~3e-4
  of the largest and flips near-tied experts (benchmarks/router_precision.py).

  For bf16 x (bf16 compute) the three products are bf16 tensor-core matmuls on split operands
  (`_split_logits`) instead of fp32 dots, which XLA runs at a fraction of the memory rate for
  E = 32 columns. Other dtypes: one HIGHEST-precision fp32 dot.
  """
  if x.dtype != jnp.bfloat16:
    return jnp.matmul(x.astype(jnp.float32), weight, precision=jax.lax.Precision.HIGHEST)
  return _split_logits(x, weight)


@jax.custom_vjp
def _split_logits(x: jax.Array, weight: jax.Array) -> jax.Array:
  """router_logits for bf16 x: the weight as 3 bf16 terms (x is exact in bf16, so the logits are
  exact products with fp32 accumulation), and in the backward the fp32 cotangent as 3 terms
  (d weight; d x from the six products of cotangent and weight terms that reach fp32's
  precision). One matmul each, the terms side by side on the short E axis."""
  return _split_logits_fwd(x, weight)[0]


def _split_logits_fwd(x, weight):
  w3 = _split_bf16(weight, 3)
  return _sum_terms(_dot_f32(x, jnp.concatenate(w3, axis=1), ((1,), (0,))), 3), (x, w3)


def _split_logits_bwd(res, g):
  x, w3 = res
  g3 = _split_bf16(g, 3)
  # d x = g w^T to fp32 accuracy: the six products g_i w_j with i + j < 3, one matmul over 6E.
  pairs = [(i, j) for i in range(3) for j in range(3 - i)]
  dx = _dot_f32(jnp.concatenate([g3[i] for i, _ in pairs], axis=1),
                jnp.concatenate([w3[j] for _, j in pairs], axis=1), ((1,), (1,)))
  dw = _dot_f32(x, jnp.concatenate(g3, axis=1), ((0,), (0,)))  # [D, 3E]
  return dx.astype(x.dtype), _sum_terms(dw, 3)


_split_logits.defvjp(_split_logits_fwd, _split_logits_bwd)


def route(x: jax.Array, weight: jax.Array, bias: jax.Array, *, top_k: int, n_group: int,
          topk_group: int, scale: float, replay: jax.Array | None = None):
  """The router: x [N, D] -> (expert ids [N, X] int32, weights [N, X] fp32).

  docs/architecture.md §3.7.

  Scores are fp32 sigmoids; the bias steers selection only; groups outside the top `topk_group` (by
  the sum of their top-2 biased scores) are masked with -inf (docs/architecture.md §6.3); the chosen
  unbiased scores are renormalised and multiplied by the routed scale (docs/architecture.md §6.2).

  replay [N, X] int32 (routing replay, docs/posttrain.md): a row whose first id is >= 0 takes
  those experts instead of its own top-k, weighted by its current scores as above (so the
  router's weight still gets a gradient); -1 rows route as usual.
  """
  logits = router_logits(x, weight.astype(jnp.float32))  # [N, E] fp32
  scores = jax.nn.sigmoid(logits)
  biased = scores + bias.astype(jnp.float32)
  N, E = biased.shape
  if topk_group < n_group:
    grouped = biased.reshape(N, n_group, E // n_group)  # [N, G, E/G]
    group_score = _top2_sum(grouped)  # [N, G]
    keep = _ranks(group_score) < topk_group  # the top `topk_group` groups, ties to the lower
    biased = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(N, E)
  idx = _top_k(biased, top_k)[1]  # [N, X]
  if replay is not None:
    idx = jnp.where(replay[:, :1] >= 0, replay.astype(idx.dtype), idx)
  w = jnp.take_along_axis(scores, idx, axis=-1)
  w = w / (w.sum(-1, keepdims=True) + 1e-20) * scale
  return idx.astype(jnp.int32), w

def route_reference(x, weight, bias, *, top_k: int, n_group: int, topk_group: int, scale: float):
  """`route` through `lax.top_k` for the groups' top-2, the kept groups (scattered into a mask)
  and the experts, and one HIGHEST-precision fp32 matmul for the logits: the plain form
  `route`'s ranked top-k and split-operand logits must reproduce."""
  scores = jax.nn.sigmoid(jnp.matmul(x.astype(jnp.float32), weight,
                                     precision=jax.lax.Precision.HIGHEST))
  N, E = scores.shape
  grouped = (scores + bias).reshape(N, n_group, E // n_group)
  kept = jax.lax.top_k(jax.lax.top_k(grouped, 2)[0].sum(-1), topk_group)[1]
  keep = jnp.zeros((N, n_group), bool).at[jnp.arange(N)[:, None], kept].set(True)
  idx = jax.lax.top_k(jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(N, E), top_k)[1]
  w = jnp.take_along_axis(scores, idx, axis=-1)
  return idx.astype(jnp.int32), w / (w.sum(-1, keepdims=True) + 1e-20) * scale


class Router(nnx.Module):
  """`mlp.gate`: router weight [D, E] and expert_bias [E], both kept in fp32 (docs/architecture.md
  §4.3)."""

  def __init__(self, hidden: int, num_experts: int, *, rngs: nnx.Rngs):
    self.weight = param(rngs, (hidden, num_experts), (ax.EMBED, ax.EXPERT), jnp.float32,
                        fan_in=hidden)
    self.expert_bias = param(None, (num_experts,), (ax.EXPERT,), jnp.float32, init="zeros",
                             kind=ExpertBias)
