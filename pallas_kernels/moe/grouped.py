"""Routed experts on the Pallas grouped-matmul kernels, dropless and unpadded.

Sort the assignments by expert (`sort_by_expert`), then the fused gather + gate/up + SwiGLU
kernel and the down grouped matmul (pallas_kernels/grouped_matmul) over the ragged expert groups,
and gather the rows back. Both row movements are custom_vjp gathers whose backward is a gather
too (XLA's own transpose of a gather is a scatter-add, which cannot know the indices are
distinct).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import Config, Fp8Weight, gmm, gmm_glu, tuned_config
from pallas_kernels.grouped_matmul.sort import fits, sort_by_group


def sort_by_expert(expert_ids: jax.Array, num_experts: int, *, block: int = 64,
                   kernel: bool = False, interpret: bool = False):
  """A stable counting sort of assignments by expert: (order, inverse, sizes), all int32.

  expert_ids [A] in [0, E). order [A] lists the assignments expert by expert, in their original
  order within each (= a stable argsort); inverse [A] is each assignment's position in it; sizes
  [E] counts each expert's assignments. With `kernel` one Pallas kernel does it
  (`sort_by_group`, interpreted with `interpret`); otherwise XLA, as follows. No sort: a
  position is the expert's start + the assignments of that expert in earlier blocks of `block`
  + those before it in its own block, from two fused compare-and-count reductions
  (O(A (E + block))) and a small prefix sum over blocks. On a GPU this replaces a general sort,
  whose many passes dominated the routing at a few thousand tokens.
  """
  A, E = expert_ids.shape[0], num_experts
  if kernel:
    return sort_by_group(expert_ids, E, interpret=interpret)
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


def routed_experts_grouped(x, idx, w, wg, wu, wd, *, config: Config | None = None,
                           interpret: bool = False, sort_kernel: bool | None = None, matmul=None,
                           empty: bool = False):
  """Dropless grouped-matmul dispatch. x [N, D] -> [N, D] in fp32, reference.py's value.

  Assignments are sorted by expert (`sort_by_expert`: one Pallas kernel where `sort_kernel` says
  so, by default (None) when compiled rather than interpreted, and where it `fits`; else XLA's
  counting sort) and three grouped matmuls run over the ragged expert groups: gate and up in one
  fused kernel (`gmm_glu`) that gathers each token row itself and applies the SwiGLU to its fp32
  accumulators (neither the [N X, D] dispatched rows nor the gate / up products of a
  forward-only call are written), then down (at ling_small's shape and 513+ rows per expert on
  the Mosaic GPU kernel, forward and d input, and so is the gate/up d input at 2048+ rows per
  expert: `tuned_config`, the tiles unless `config` is given). The rows are gathered back
  through the inverse permutation and combined with the routing weights; both row movements are
  gathers in the backward pass too. Never [N, E, D]. `interpret` runs every kernel in Pallas
  interpret mode. `matmul(lhs, rhs, group_sizes)` replaces the Pallas kernels with three unfused
  grouped matmuls over explicitly dispatched rows (benchmarks).
  """
  N, D = x.shape
  E, X = wg.shape[0], idx.shape[1]
  A = N * X
  weights = ("bf16" if not isinstance(wg, Fp8Weight)
             else "fp8-channel" if wg.block is None else "fp8-block")
  cfg = (config or tuned_config(D, wg.shape[2], rows_per_group=A / E, weights=weights))._replace(
      interpret=interpret)
  if config is None and isinstance(wg, Fp8Weight) and wg.block is not None:
    # A contraction tile must lie inside one scale block (fp8.check_k_tile).
    cfg = cfg._replace(block_k=math.gcd(cfg.block_k, wg.block[0]))
  groups = E + 1 if empty else E
  kernel = (not interpret if sort_kernel is None else sort_kernel) and fits(A, groups)
  order, inverse, sizes = sort_by_expert(idx.reshape(A), groups, kernel=kernel,
                                         interpret=interpret)
  sizes = sizes[:E]
  if matmul is None:
    h = gmm_glu(x, order // X, inverse.reshape(N, X), wg, wu, sizes, cfg)  # [N X, F]
    ys = gmm(h, wd, sizes, cfg)  # [N X, D]
  else:
    xs = _dispatch(x, order, inverse, X)  # [N X, D], row r serves token order[r] // X
    h = jax.nn.silu(matmul(xs, wg, sizes)) * matmul(xs, wu, sizes)
    ys = matmul(h.astype(x.dtype), wd, sizes)
  y = _permute(ys, inverse, order).reshape(N, X, D).astype(jnp.float32)
  return jnp.einsum("nx,nxd->nd", w, y)
