"""Grouped (ragged) matmul in Pallas (Triton lowering): gmm, tgmm and the custom_vjp op.

Semantics are reference.py's: rows of lhs sorted by group, group g owning rows
[start_g, end_g). Nothing is padded to a tile per group; instead:

* gmm (out = lhs @ rhs[g] per row) runs on the grid (N-block, visit). A *visit* is one
  (row tile, group) pair that overlaps: a tile wholly inside one group is visited once, a tile
  straddling k group boundaries k + 1 times, each visit storing only its own group's rows
  (masked store), so every output row is written by exactly one program and no atomics or
  zero-fill are needed. With T = cdiv(M, bm) tiles and G groups there are at most T + G
  visits (the +1 is a pseudo-group for rows past sum(sizes), which stores zeros: nothing is
  ever left uninitialised). The visit table is built in XLA from the G sizes (O(T + G)); unused
  entries are empty (no rows) and exit at once.
* tgmm (the weight gradient, out[g] = lhs[g rows].T @ dout[g rows]) runs on the grid
  (N-block, K-block, group); each program walks its group's rows in bm-row steps, so an empty
  group writes zeros and a heavy one simply loops longer.
* The op's backward: d lhs = gmm(dout, rhs, transposed), d rhs = tgmm(lhs, dout).

bf16 (or fp32) operands, fp32 accumulation; fp32 operands use full-precision dots (no TF32).
Each program loops over the contraction in bk steps, which Triton software-pipelines
(num_stages). The launch order puts N-blocks innermost (`Config.n_inner`): the programs that
share a row tile run back to back and re-read it from L2, and a group's consecutive visits share
its weight blocks the same way; on an H100 this order alone made gmm 1.3-1.6x and tgmm up to 3.5x
faster than visit-major order at the flash expert shape.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


class Config(NamedTuple):
  """Static tile parameters (hashable: rides in custom_vjp's nondiff args)."""
  # Defaults: the best of the H100 sweep at the flash expert shape (BENCHMARKS.md, session 3).
  block_m: int = 128
  block_n: int = 256
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 3
  # The weight-gradient kernel: [block_k_t, block_n_t] output tile, rows in block_m_t steps.
  block_m_t: int = 64
  block_k_t: int = 128
  block_n_t: int = 128
  num_warps_t: int = 8
  # Launch order: True runs a row tile's N-blocks (tgmm: a group's output tiles) back to back,
  # so the tile's rows are re-read from L2 rather than HBM; False puts visits (groups) innermost.
  n_inner: bool = True
  interpret: bool = False


def _fit(n: int, want: int, what: str) -> int:
  """Largest power-of-two tile <= want that divides n (>= 16: the Triton dot minimum)."""
  b = 1 << (max(want, 1).bit_length() - 1)
  while b > 16 and n % b:
    b //= 2
  if b < 16 or n % b:
    raise ValueError(f"{what}={n} must be a multiple of 16 (a power-of-two tile >= 16 must divide it)")
  return b


def _dot(a, b, *, ta=False, tb=False):
  return plt.dot(a, b, trans_a=ta, trans_b=tb, precision=lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------- visit table


def group_bounds(group_sizes: jax.Array, m: int):
  """(starts, ends) [G] int32 of each group's rows, clipped to the m rows there are."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]]), ends


def visit_table(group_sizes: jax.Array, m: int, bm: int) -> jax.Array:
  """[4, cdiv(m, bm) + G] int32 rows: tile, group (G = past the last group), row lo, row hi.

  Visits are ordered by group then tile, so consecutive programs share a group's weights.
  """
  G = group_sizes.shape[0]
  starts, ends = group_bounds(group_sizes, m)
  starts = jnp.concatenate([starts, ends[-1:]])             # + pseudo-group [total, m)
  ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
  n_tiles = jnp.where(ends > starts, (ends - 1) // bm - starts // bm + 1, 0)
  last = jnp.cumsum(n_tiles)
  first = last - n_tiles
  V = pl.cdiv(m, bm) + G
  v = jnp.arange(V, dtype=jnp.int32)
  grp = jnp.minimum(jnp.searchsorted(last, v, side="right"), G).astype(jnp.int32)
  used = v < last[-1]
  tile = starts[grp] // bm + v - first[grp]
  lo = jnp.maximum(starts[grp], tile * bm)
  hi = jnp.minimum(ends[grp], tile * bm + bm)
  zero = jnp.zeros_like(v)
  return jnp.stack([jnp.where(used, tile, zero), jnp.where(used, grp, G),
                    jnp.where(used, lo, zero), jnp.where(used, hi, zero)])


# ----------------------------------------------------------------------------- kernels


def _gmm_kernel(meta_ref, x_ref, w_ref, o_ref, *, bm, bn, bk, K, G, transpose_rhs, n_inner):
  v, j = (pl.program_id(1), pl.program_id(0)) if n_inner else (pl.program_id(0), pl.program_id(1))
  tile, grp, lo, hi = meta_ref[0, v], meta_ref[1, v], meta_ref[2, v], meta_ref[3, v]
  rows = tile * bm + jnp.arange(bm, dtype=jnp.int32)
  mine = (rows >= lo) & (rows < hi)

  @pl.when(hi > lo)
  def _():
    g = jnp.minimum(grp, G - 1)  # the pseudo-group G runs zero steps; keep its address valid

    def step(kk, acc):
      x = plt.load(x_ref.at[pl.ds(tile * bm, bm), pl.ds(kk * bk, bk)], mask=mine[:, None], other=0)
      if transpose_rhs:  # w[g] is [N, K]: a [bn, bk] block, contracted on its second axis
        w = w_ref[g, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)]
        return acc + _dot(x, w, tb=True)
      w = w_ref[g, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)]
      return acc + _dot(x, w)

    steps = (grp < G).astype(jnp.int32) * (K // bk)  # (a jnp.where here lowers to mistyped scf.for bounds)
    acc = lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
    plt.store(o_ref.at[pl.ds(tile * bm, bm), pl.ds(j * bn, bn)], acc.astype(o_ref.dtype),
              mask=mine[:, None])


def _tgmm_kernel(bounds_ref, x_ref, dy_ref, o_ref, *, bm, n_inner):
  g, i, j = _tgmm_ids(n_inner)
  lo, hi = bounds_ref[0, g], bounds_ref[1, g]
  bk, bn = o_ref.shape

  def step(t, acc):
    r0 = lo + t * bm
    mine = (r0 + jnp.arange(bm, dtype=jnp.int32)) < hi
    x = plt.load(x_ref.at[pl.ds(r0, bm), pl.ds(i * bk, bk)], mask=mine[:, None], other=0)
    dy = plt.load(dy_ref.at[pl.ds(r0, bm), pl.ds(j * bn, bn)], mask=mine[:, None], other=0)
    return acc + _dot(x, dy, ta=True)

  acc = lax.fori_loop(0, pl.cdiv(hi - lo, bm), step, jnp.zeros((bk, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _tgmm_ids(n_inner):
  """(group, K-block, N-block) program ids under either launch order."""
  if n_inner:  # grid (N-blocks, K-blocks, G): one group's tiles run back to back
    return pl.program_id(2), pl.program_id(1), pl.program_id(0)
  return pl.program_id(0), pl.program_id(1), pl.program_id(2)


def gmm_pallas(lhs, rhs, group_sizes, cfg: Config = Config(), *, transpose_rhs: bool = False):
  """out [M, N] = lhs [M, K] @ rhs[g] ([G, K, N]; [G, N, K] if transpose_rhs) per row group."""
  M, K = lhs.shape
  G = rhs.shape[0]
  N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if (rhs.shape[2] if transpose_rhs else rhs.shape[1]) != K:
    raise ValueError(f"lhs {lhs.shape} and rhs {rhs.shape} disagree on the contraction "
                     f"(transpose_rhs={transpose_rhs})")
  bm = cfg.block_m  # rows need not divide: loads and stores are masked per visit
  bn, bk = _fit(N, cfg.block_n, "N"), _fit(K, cfg.block_k, "K")
  meta = visit_table(group_sizes, M, bm)
  kernel = functools.partial(_gmm_kernel, bm=bm, bn=bn, bk=bk, K=K, G=G,
                             transpose_rhs=transpose_rhs, n_inner=cfg.n_inner)
  grid = (N // bn, meta.shape[1]) if cfg.n_inner else (meta.shape[1], N // bn)
  return pl.pallas_call(
      kernel, grid=grid,
      out_shape=jax.ShapeDtypeStruct((M, N), lhs.dtype),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name="gmm")(meta, lhs, rhs)


def tgmm_pallas(lhs, dout, group_sizes, cfg: Config = Config(), *, out_dtype=None):
  """out [G, K, N] = lhs[g rows].T @ dout[g rows]; rows past sum(sizes) are ignored."""
  M, K = lhs.shape
  N = dout.shape[1]
  G = group_sizes.shape[0]
  bk, bn = _fit(K, cfg.block_k_t, "K"), _fit(N, cfg.block_n_t, "N")
  bounds = jnp.stack(group_bounds(group_sizes, M))
  if cfg.n_inner:
    grid, index = (N // bn, K // bk, G), lambda j, i, g: (g, i, j)
  else:
    grid, index = (G, K // bk, N // bn), lambda g, i, j: (g, i, j)
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, bm=cfg.block_m_t, n_inner=cfg.n_inner), grid=grid,
      in_specs=[pl.no_block_spec] * 3,
      out_specs=pl.BlockSpec((None, bk, bn), index),
      out_shape=jax.ShapeDtypeStruct((G, K, N), out_dtype or lhs.dtype),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps_t, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name="tgmm")(bounds, lhs, dout)


# ----------------------------------------------------------------------------- custom_vjp op


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm(lhs, rhs, group_sizes, cfg: Config):
  """Differentiable grouped matmul (lhs, rhs); group_sizes gets no gradient."""
  return gmm_pallas(lhs, rhs, group_sizes, cfg)


def _gmm_fwd(lhs, rhs, group_sizes, cfg):
  return gmm_pallas(lhs, rhs, group_sizes, cfg), (lhs, rhs, group_sizes)


def _gmm_bwd(cfg, res, dout):
  lhs, rhs, group_sizes = res
  dout = dout.astype(lhs.dtype)
  dlhs = gmm_pallas(dout, rhs, group_sizes, cfg, transpose_rhs=True)
  drhs = tgmm_pallas(lhs, dout, group_sizes, cfg, out_dtype=rhs.dtype)
  return dlhs, drhs, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)
