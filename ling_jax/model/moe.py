"""Sparse MoE: sigmoid router with aux-loss-free bias and group-limited top-k, dropless experts,
one shared expert (spec 3.7). The router is router.py.

Expert dispatch is behind `impl`:
* "dense": every expert on every token, weighted by the (mostly zero) combine matrix. Obviously
  correct, O(tokens x experts): the reference the tests compare against.
* "sorted": dropless XLA path. Sort the (token, expert) assignments by expert, pad each expert's
  rows to a multiple of `block_size` (a static upper bound on rows, nothing dropped) and run a
  blocked matmul, each block against its expert's weights. (`jax.lax.ragged_dot` is avoided: on
  jax 0.11.2 GPU it lowers to a dense masked expansion.)
* "gmm": dropless, unpadded: sort the assignments by expert and run the Pallas grouped-matmul
  kernels (pallas_kernels/grouped_matmul) over the ragged groups; compiled on GPU, interpret
  mode elsewhere (slow: tests only).
* "auto": "gmm" on GPU, "sorted" elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax import axes as ax
from ling_jax.model.common import SwiGLU, param
from ling_jax.model.router import Router, expert_load, route
from pallas_kernels.grouped_matmul import Config as GmmConfig, gmm, gmm_glu, tuned_config
from pallas_kernels.grouped_matmul.sort import sort_by_group, use_kernel as use_sort_kernel

IMPLS = ("auto", "dense", "sorted", "gmm")


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"unknown MoE impl {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    return "gmm" if jax.default_backend() == "gpu" else "sorted"
  return impl


def _swiglu_experts(x, wg, wu, wd):
  return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd


def experts_dense(x, idx, w, wg, wu, wd):
  """Reference dispatch: all experts on all tokens. x [N, D] -> [N, D] in fp32."""
  E = wg.shape[0]
  combine = jnp.zeros((x.shape[0], E), jnp.float32).at[jnp.arange(x.shape[0])[:, None], idx].add(w)
  h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, wg)) * jnp.einsum("nd,edf->nef", x, wu)
  y = jnp.einsum("nef,efd->ned", h, wd)  # [N, E, D]
  return jnp.einsum("ne,ned->nd", combine, y.astype(jnp.float32))


def experts_sorted(x, idx, w, wg, wu, wd, *, block_size: int = 64, blocks_per_step: int = 16):
  """Dropless sorted-and-blocked dispatch. x [N, D] -> [N, D] in fp32."""
  N, D = x.shape
  E = wg.shape[0]
  X = idx.shape[1]
  A = N * X
  b = block_size
  flat_e = idx.reshape(A)
  order = jnp.argsort(flat_e, stable=True)  # assignments grouped by expert
  sorted_e = flat_e[order]
  counts = jnp.bincount(flat_e, length=E)
  padded = (counts + b - 1) // b * b
  padded_end = jnp.cumsum(padded)
  start = jnp.cumsum(counts) - counts
  dest = (padded_end - padded)[sorted_e] + jnp.arange(A) - start[sorted_e]  # row in padded layout
  # Static bound on padded rows: every expert wastes at most b-1 rows.
  num_blocks = -(-(A + min(E, A) * (b - 1)) // b)
  rows = jnp.zeros((num_blocks * b, D), x.dtype).at[dest].set(x[order // X])
  block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(num_blocks) * b, side="right"),
                             E - 1)

  def block(args):
    xb, e = args  # [b, D], expert id
    return _swiglu_experts(xb, wg[e], wu[e], wd[e])

  out = jax.lax.map(block, (rows.reshape(num_blocks, b, D), block_expert),
                    batch_size=min(blocks_per_step, num_blocks))  # [num_blocks, b, D]
  y_sorted = out.reshape(num_blocks * b, D)[dest].astype(jnp.float32)  # [A, D]
  y = jnp.zeros((A, D), jnp.float32).at[order].set(y_sorted).reshape(N, X, D)
  return jnp.einsum("nx,nxd->nd", w, y)


def sort_by_expert(expert_ids: jax.Array, num_experts: int, *, block: int = 64,
                   config: GmmConfig | None = None):
  """A stable counting sort of assignments by expert: (order, inverse, sizes), all int32.

  expert_ids [A] in [0, E). order [A] lists the assignments expert by expert, in their original
  order within each (= a stable argsort); inverse [A] is each assignment's position in it; sizes
  [E] counts each expert's assignments. Where `config.sort_kernel` says so (by default on the
  GPU, where `sort.fits`) one Pallas kernel does it (`sort_by_group`); otherwise XLA, as
  follows. No sort: a position is the expert's start + the
  assignments of that expert in earlier blocks of `block` + those before it in its own block,
  from two fused compare-and-count reductions (O(A (E + block))) and a small prefix sum over
  blocks. On a GPU this replaces a general sort, whose many passes dominated the routing at a
  few thousand tokens.
  """
  A, E = expert_ids.shape[0], num_experts
  if config is not None and use_sort_kernel(config.sort_kernel, config.interpret, A, E):
    return sort_by_group(expert_ids, E, interpret=config.interpret)
  nb = -(-A // block)
  e = jnp.pad(expert_ids.astype(jnp.int32), (0, nb * block - A), constant_values=E)  # pads last
  e = e.reshape(nb, block)
  hist = (e[:, :, None] == jnp.arange(E, dtype=jnp.int32)).sum(1, dtype=jnp.int32)  # [nb, E]
  before = jnp.cumsum(hist, axis=0, dtype=jnp.int32) - hist  # same expert, earlier blocks
  sizes = hist.sum(0, dtype=jnp.int32)
  starts = jnp.cumsum(sizes, dtype=jnp.int32) - sizes
  lower = jnp.arange(block)[None, :] < jnp.arange(block)[:, None]  # [i, j]: j before i
  rank = ((e[:, :, None] == e[:, None, :]) & lower).sum(-1, dtype=jnp.int32)  # [nb, block]
  ec = jnp.minimum(e, E - 1)  # the pads' (dropped) rows need valid indices
  inverse = (starts[ec] + jnp.take_along_axis(before, ec, axis=1) + rank).reshape(-1)[:A]
  order = jnp.zeros((A,), jnp.int32).at[inverse].set(
      jnp.arange(A, dtype=jnp.int32), unique_indices=True)
  # Materialise the results: XLA would otherwise fuse inverse's gathers into every consumer,
  # recomputing them per element of the [N X, D] combine (228 us against 8 at the flash expert
  # shape and 256 tokens, H100).
  return jax.lax.optimization_barrier((order, inverse, sizes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch(x, order, inverse, top_k: int):
  """x [N, D] -> [N X, D]: row r is token order[r] // X. The backward sums each token's X
  copies by gathering them back through `inverse` (a scatter-add in XLA's own transpose)."""
  return x[order // top_k]


def _dispatch_fwd(x, order, inverse, top_k):
  return _dispatch(x, order, inverse, top_k), inverse


def _dispatch_bwd(top_k, inverse, dxs):
  N = inverse.shape[0] // top_k
  dx = dxs[inverse].reshape(N, top_k, -1).astype(jnp.float32).sum(1).astype(dxs.dtype)
  return dx, None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _permute(ys, perm, inverse_perm):
  """ys[perm] for a permutation, whose backward is the gather ys_bar[inverse_perm] (XLA's own
  transpose of a gather is a scatter-add, which cannot know the indices are distinct)."""
  return ys[perm]


def _permute_fwd(ys, perm, inverse_perm):
  return ys[perm], (perm, inverse_perm)


def _permute_bwd(res, dy):
  perm, inverse_perm = res
  return dy[inverse_perm], None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def experts_grouped(x, idx, w, wg, wu, wd, *, config: GmmConfig | None = None, matmul=None):
  """Dropless grouped-matmul dispatch. x [N, D] -> [N, D] in fp32.

  Assignments are sorted by expert (`sort_by_expert`: a stable counting sort, one Pallas kernel
  on the GPU where it fits; the same `config` decides) and three grouped matmuls run over the
  ragged expert groups: gate and up in one fused kernel (`gmm_glu`) that gathers each token row
  itself and applies the SwiGLU to its fp32 accumulators (neither the [N X, D] dispatched rows
  nor the gate / up products of a forward-only call are written), then down (at ling_small's
  shape and 513+ rows per expert on the Mosaic GPU kernel, forward and d input, and so is the
  gate/up d input at 2048+ rows per expert: `tuned_config`). The rows are gathered back through the
  inverse permutation and combined with the routing weights; both row movements are gathers in the
  backward pass too. Never [N, E, D]. `matmul(lhs, rhs, group_sizes)` replaces the Pallas kernels
  with three unfused grouped matmuls over explicitly dispatched rows (benchmarks).
  """
  N, D = x.shape
  E, X = wg.shape[0], idx.shape[1]
  A = N * X
  cfg = config or tuned_config(D, wg.shape[2], rows_per_group=A / E)
  cfg = cfg._replace(interpret=jax.default_backend() != "gpu")
  order, inverse, sizes = sort_by_expert(idx.reshape(A), E, config=cfg)
  if matmul is None:
    h = gmm_glu(x, order // X, inverse.reshape(N, X), wg, wu, sizes, cfg)  # [N X, F]
    ys = gmm(h, wd, sizes, cfg)  # [N X, D]
  else:
    xs = _dispatch(x, order, inverse, X)  # [N X, D], row r serves token order[r] // X
    h = jax.nn.silu(matmul(xs, wg, sizes)) * matmul(xs, wu, sizes)
    ys = matmul(h.astype(x.dtype), wd, sizes)
  y = _permute(ys, inverse, order).reshape(N, X, D).astype(jnp.float32)
  return jnp.einsum("nx,nxd->nd", w, y)


class Experts(nnx.Module):
  """Routed experts stacked per layer: gate/up [E, D, F], down [E, F, D]."""

  def __init__(self, num_experts: int, hidden: int, width: int, *, rngs: nnx.Rngs, param_dtype):
    mk = lambda shape, axes, fan: param(rngs, shape, axes, param_dtype, fan_in=fan)
    self.gate_proj = mk((num_experts, hidden, width), (ax.EXPERT, ax.EMBED, ax.MLP), hidden)
    self.up_proj = mk((num_experts, hidden, width), (ax.EXPERT, ax.EMBED, ax.MLP), hidden)
    self.down_proj = mk((num_experts, width, hidden), (ax.EXPERT, ax.MLP, ax.EMBED), width)


class SparseMoE(nnx.Module):
  """Router + routed experts + shared expert; returns (y, per-expert token counts)."""

  def __init__(self, *, hidden: int, num_experts: int, top_k: int, width: int, shared_width: int,
               n_group: int, topk_group: int, routed_scale: float, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, impl: str = "auto",
               block_size: int = 64):
    impl = resolve_impl(impl)
    self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
    self.routed_scale, self.dtype, self.impl, self.block_size = routed_scale, dtype, impl, block_size
    self.gate = Router(hidden, num_experts, rngs=rngs)
    self.experts = Experts(num_experts, hidden, width, rngs=rngs, param_dtype=param_dtype)
    self.shared_experts = (SwiGLU(hidden, shared_width, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype) if shared_width else None)

  def __call__(self, x: jax.Array):
    """x [B, T, D] -> (y [B, T, D], load [E] = tokens routed to each expert)."""
    B, T, D = x.shape
    x = x.astype(self.dtype)
    flat = x.reshape(B * T, D)  # [N, D]
    idx, w = route(flat, self.gate.weight[...], self.gate.expert_bias[...], top_k=self.top_k,
                   n_group=self.n_group, topk_group=self.topk_group, scale=self.routed_scale)
    wts = [getattr(self.experts, n)[...].astype(self.dtype) for n in ("gate_proj", "up_proj", "down_proj")]
    if self.impl == "dense":
      y = experts_dense(flat, idx, w, *wts)
    elif self.impl == "gmm":
      y = experts_grouped(flat, idx, w, *wts)
    else:
      y = experts_sorted(flat, idx, w, *wts, block_size=self.block_size)
    # Routed outputs combine in fp32 and are cast back before the shared expert (spec 3.7.6).
    y = y.astype(self.dtype).reshape(B, T, D)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x)
    load = expert_load(idx, self.gate.weight.shape[1])
    return y, load.astype(jnp.float32)
