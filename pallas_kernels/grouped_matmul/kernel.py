"""Grouped (ragged) matmul in Pallas (Triton lowering): gmm, tgmm and the custom_vjp op.

Semantics are reference.py's: rows of lhs sorted by group, group g owning rows
[start_g, end_g). Nothing is padded to a tile per group; instead:

* gmm (out = lhs @ rhs[g] per row) runs on the grid (N-block, visit). A *visit* is one
  (row tile, group) pair that overlaps: a tile wholly inside one group is visited once, a tile
  straddling k group boundaries k + 1 times, each visit storing only its own group's rows
  (masked store), so every output row is written by exactly one program and no atomics or
  zero-fill are needed. With T = cdiv(M, bm) tiles and G groups there are at most T + G
  visits (counting a pseudo-group G for rows past sum(sizes), which stores zeros: nothing is
  ever left uninitialised). That visit table is built in XLA from the G sizes (O(T + G));
  unused entries are empty (no rows) and exit at once. By default (`Config.group_rows`) the
  visits are instead bm-row pieces of each group from its own first row: no visit holds two
  groups' rows, so each group's weight blocks are read once per piece, not once per tile it
  touches (H100: the flash layer's forward 13% faster at 4096 tokens, ling_small's 12% at 256).
  Each program decodes its piece from the G sizes itself (visits.piece, O(G)): no table, no
  XLA op between the routing and the kernel.
* tgmm (the weight gradient, out[g] = lhs[g rows].T @ dout[g rows]) runs on the grid
  (N-block, K-block, group); each program finds its group's rows from the sizes and walks them
  in bm-row steps, so an empty group writes zeros and a heavy one simply loops longer.
* The op's backward: d lhs = gmm(dout, rhs, transposed), d rhs = tgmm(lhs, dout). The op's
  two gmm products run on the Mosaic GPU kernel (mosaic.py) instead where `Config.mosaic` says
  so and its tiles fit, and tgmm on the Mosaic GPU tgmm (mosaic_tgmm.py) where
  `Config.mosaic_tgmm` adds it.

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

from pallas_kernels.grouped_matmul import fp8, mosaic, mosaic_tgmm
from pallas_kernels.grouped_matmul.fp8 import Fp8Weight
from pallas_kernels.grouped_matmul.visits import (group_rows_of, padded_groups, piece, pieces,
                                                  visit_table)


class Config(NamedTuple):
  """Static tile parameters (hashable: rides in custom_vjp's nondiff args)."""
  # Defaults: the best of the H100 sweep at the flash expert shape (BENCHMARKS.md#grouped_matmul-kernels).
  block_m: int = 128  # 1: one-row visits, products as multiply-and-sum (decode; below)
  block_n: int = 256
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 3
  # Kernels with two products (two operand tiles per step): the fused gate/up kernel
  # (`gmm_glu_pallas`, two [block_m, block_n_glu] accumulators) and `gmm_sum_pallas`.
  block_n_glu: int = 64
  block_n_sum: int = 128
  # The weight-gradient kernel: [block_k_t, block_n_t] output tile, rows in block_m_t steps;
  # block_n_t2 when it computes two gradients at once.
  block_m_t: int = 64
  block_k_t: int = 128
  block_n_t: int = 128
  block_n_t2: int = 64
  num_warps_t: int = 8
  # gmm_glu's backward: d x as one gmm over both products and both weight gradients from one
  # tgmm (True), or two of each (False).
  fused_backward: bool = True
  # Launch order: True runs a row tile's N-blocks (tgmm: a group's output tiles) back to back,
  # so the tile's rows are re-read from L2 rather than HBM; False puts visits (groups) innermost.
  n_inner: bool = True
  # The Triton gmm kernels' visits: bm-row pieces of each group from its own first row (True:
  # each group's weight blocks read once per piece), or bm-aligned row tiles visited once per
  # group they hold rows of (False; `visit_table`). tuned_config says where True won.
  group_rows: bool = True
  # The gmm op's forward and d lhs products (the experts' down projection) on the Mosaic GPU
  # kernel (mosaic.py) where its tiles fit (`mosaic.tiles_for`): None = when compiled for the
  # GPU with bf16 / fp16 operands; True = in the interpreter too (tests); False = never.
  mosaic: bool | None = None
  # gmm_glu's backward with gate and up side by side as one [M, 2F] product (d x on the Mosaic
  # kernel, the weight gradients from one tgmm), where `mosaic` applies.
  stacked_backward: bool = False
  # The weight gradients on the Mosaic GPU tgmm (mosaic_tgmm.py) where `mosaic` applies and its
  # tiles fit (`mosaic_tgmm.tiles_for`); gmm_glu's forward then writes x's gathered rows [M, K]
  # out for it (save_rows).
  mosaic_tgmm: bool = False
  # The Triton gmm kernels compute each output tile transposed, out^T = w^T @ x^T: the weight
  # tile is the dot's first operand (block_n rows, which Triton may keep in registers after an
  # FP8 tile's conversion) and the few token rows its second (block_m down to 16). For decode,
  # where a visit holds a row or two; measured at decode sizes on an H200 (`_decode_tiles`): no
  # faster for bf16, 1.7-1.9x slower for FP8, so off.
  swap_ab: bool = False
  # The contraction loop's body takes `k_unroll` consecutive bk-steps, their loads issued
  # together (more bytes in flight per program where Triton does not pipeline: the one-row
  # kernels below; reduced to a divisor of the step count).
  k_unroll: int = 1
  interpret: bool = False


def tuned_config(hidden: int, width: int, rows_per_group: float | None = None,
                 weights: str = "bf16") -> Config:
  """Defaults by expert shape (hidden x width), from the H100 sweeps (BENCHMARKS.md#grouped_matmul-kernels):
  at ling_small's 1024 x 576 the fused gate/up kernel ran fastest with 64-wide accumulators and
  the fused two-product backward won; at Ling-2.6-flash's 4096 x 1024, 128-wide accumulators
  (447 against 409 TFLOP/s) and separate backward kernels (~3% faster).

  With few rows per group (rows_per_group <= 64: decode and short prefills) 64-row tiles on
  4 warps waste less of each tile at group boundaries (H100: ling_small's layer at
  256 tokens, 32 rows per expert, 0.078 against 0.087 ms; the flash shape at 256 and 1024
  tokens 1% faster). At 128 rows per expert it was mixed: 64-row tiles 3% faster for
  ling_small at 1024 tokens, slower for the flash shape at 4096 (docs/history/benchmarks-log.md),
  so the switch is at 64.

  At decode sizes (rows_per_group <= 16; top-8 of 256 experts: 1-64 tokens) the tiles of the
  H200 sweep at the flash expert shape (`gpu_run.sh fp8-sweep`, BENCHMARKS.md#decode), by
  `weights` ("bf16", "fp8-block", "fp8-channel")."""
  small = hidden * width <= 1024 * 1024
  # The Mosaic GPU kernel for the down projection: ling_small's layer 3% faster
  # forward+backward at 16384 tokens, 8% forward at 4096; at the flash shape no faster forward
  # and 2.5% slower forward+backward at 16384 tokens, so Triton there.
  # At 2048+ rows per expert (ling_small, 16384 tokens) gmm_glu's backward as one stacked product
  # made the layer 2.4% faster forward+backward; at 512 (4096 tokens) 9% slower. There too the
  # weight gradients on the Mosaic tgmm (2048 and 4096 rows per expert: d w_down
  # 0.142 / 0.259 ms against Triton's 0.174 / 0.359, d w_gate + d w_up 0.296 / 0.512 against
  # 0.409 / 0.777 before x's rows are gathered for it); fewer rows were not swept.
  many = small and rows_per_group is not None and rows_per_group >= 2048
  # Visits as pieces of each group (`group_rows`) rather than aligned row tiles (the
  # layer's forward / forward+backward ms, aligned -> pieces): flash 4096 tokens 3.173 -> 2.766 /
  # 11.254 -> 10.516, 16384 tokens 7.817 -> 7.348 / 26.58 -> 25.48; ling_small 256 tokens 0.081
  # -> 0.071, 1024 0.113 -> 0.106, 4096 0.199 -> 0.193. At 2048 rows per expert (ling_small at
  # 16384 tokens, where only the glu forward is a Triton gmm) 0.598 -> 0.613 / 1.911 -> 1.921:
  # not better, so aligned tiles stay there.
  cfg = Config(block_n_glu=64 if small else 128, fused_backward=small,
               mosaic=None if small else False, stacked_backward=many, mosaic_tgmm=many,
               group_rows=not many)
  if rows_per_group is not None and rows_per_group <= 64:  # (the Mosaic kernel was no faster)
    cfg = cfg._replace(block_m=64, block_n=128, num_warps=4, mosaic=False)
  # Up to 512 rows per expert the Triton down projection, whose visits cost no XLA op
  # (ling_small's layer forward at 1024 tokens 0.087 -> 0.080 ms, forward+backward
  # 0.277 -> 0.271; at 4096 tokens 0.186 -> 0.181 / 0.601 -> 0.603). The Mosaic kernel's
  # visit table is ~7 us of XLA ops.
  if rows_per_group is not None and rows_per_group <= 512:
    cfg = cfg._replace(mosaic=False)
  if rows_per_group is not None and rows_per_group <= 16:
    cfg = cfg._replace(**_decode_tiles(weights, rows_per_group))
  return cfg


def _decode_tiles(weights: str, rows_per_group: float) -> dict:
  """Tiles for a decode step's experts: the gate/up + down kernels' device time at 1 / 16 / 64
  tokens (H200, 2026-12-07, flash shape, µs), this choice against the 64-row tiles before it.
  bf16: 16-row tiles, 128-deep steps (67 / 537 / 1218 against 84 / 554 / 1244; 128-deep steps
  with 64-row tiles ask for more shared memory than Hopper has). FP8 from 16 tokens (0.5 rows
  per expert): 16-row tiles (block 497 / 1091 against 760 / 1699 with 128-deep steps; channel
  465 / 1018 against 578 / 1275 with 64-deep ones); at one token 64-row tiles with 128-deep
  steps (block 138, channel 150 against 219 / 173). The weight tile as the first operand
  (`swap_ab`) lost for FP8 (1.7-1.9x slower) and was within 1% for bf16, so it stays off."""
  if weights not in ("bf16", "fp8-block", "fp8-channel"):
    raise ValueError(f"weights must be 'bf16', 'fp8-block' or 'fp8-channel', got {weights!r}")
  if weights == "bf16":
    return dict(block_m=16, block_k=128)
  if rows_per_group < 0.5:
    return dict(block_m=64, block_k=128)
  return dict(block_m=16, block_k=128 if weights == "fp8-block" else 64)


def _tile(n: int, want: int) -> int:
  """The power-of-two tile for a dimension of n: `want` rounded down to a power of two, no
  larger than n needs, and >= 16 (the Triton dot minimum). It need not divide n: the last
  block is masked."""
  b = 1 << (max(want, 16).bit_length() - 1)
  return max(16, min(b, 1 << max(n - 1, 1).bit_length()))


def _per_bytes(block: int, dtype) -> int:
  """A contraction step sized for 2-byte operands, halved for 4-byte ones (fp32 tests) so that
  each pipeline stage needs the same shared memory."""
  return max(16, block * 2 // jnp.dtype(dtype).itemsize)


def _dot(a, b, *, ta=False, tb=False):
  return plt.dot(a, b, trans_a=ta, trans_b=tb, precision=lax.Precision.HIGHEST)


def _tail_mask(start, size: int, limit: int):
  """In-bounds mask [size] of the block of indices start.., or None when the dimension has no
  tail (size divides limit)."""
  return start + jnp.arange(size, dtype=jnp.int32) < limit if limit % size else None


def _load(ref, mask):
  """A block load, masked (zeros outside) when there is a mask."""
  zero = fp8.ZERO if ref.dtype == fp8.FP8_DTYPE else 0  # (Triton lowering: no int -> fp8 cast)
  return plt.load(ref, mask=mask, other=None if mask is None else zero)


def _mask2(rows, cols):
  """Row mask [a] and column mask [b], either None (all in bounds) -> [a, b] mask or None."""
  if rows is None or cols is None:
    return None if rows is None and cols is None else (
        rows[:, None] if cols is None else cols[None, :])
  return rows[:, None] & cols[None, :]


# ----------------------------------------------------------------------------- kernels


def _load_rows(x_ref, rows_ref, r0, bm: int, mine, c0, width: int, cmask):
  """The [bm, width] block at columns c0.. of rows r0.. (masked to `mine` and `cmask`) of x, or
  of x[rows] when the row-index ref `rows_ref` is given (a gather: x is [tokens, K], rows_ref
  [M] token ids)."""
  mask = _mask2(mine, cmask)
  if rows_ref is None:
    return plt.load(x_ref.at[pl.ds(r0, bm), pl.ds(c0, width)], mask=mask, other=0)
  src = plt.load(rows_ref.at[pl.ds(r0, bm)], mask=mine, other=0)
  cols = c0 + jnp.arange(width, dtype=jnp.int32)
  return plt.load(x_ref.at[src[:, None], cols[None, :]], mask=mask, other=0)


def _load_sizes(sizes_ref, G: int):
  """The G group sizes as a [padded_groups(G)] vector (zeros past G): what visits.piece and
  visits.group_rows_of read."""
  P = padded_groups(G)
  return plt.load(sizes_ref.at[pl.ds(0, P)], mask=jnp.arange(P) < G, other=0)


def _gmm_kernel(meta_ref, *refs, bm, bn, bk, M, K, N, G, mode, gathered, transpose_rhs, n_inner,
                group_rows=False, copy_rows=False, fp8_block=False, swap_ab=False, k_unroll=1):
  """One (row tile, group) visit x one N-block. Modes (refs after the visit table):
    "mm"  [rows], x, w, out:              out = x @ w[g]
    "sum" x0, x1, w0, w1, out:            out = x0 @ w0[g] + x1 @ w1[g]  (two products, one acc)
    "glu" [rows], x, wg, wu, h[, g, u]:   h = silu(x @ wg[g]) * (x @ wu[g]), from fp32 accs
  `rows` (with `gathered`) makes row r of x be x[rows[r]]; copy_rows adds a last output, x[rows]
  [M, K], written by each visit's first N-block from the blocks it loads anyway. With
  `group_rows` the visits are group pieces, decoded from the group sizes in meta_ref
  (visits.piece): a visit's block starts at its row lo. Otherwise meta_ref is visit_table's.
  Unless fp8_block is False, the w refs are float8 and their scale refs follow them: block-scaled
  (fp8_block the (rows, cols) of a scale block) or channel-wise (None), as fp8.py explains.
  swap_ab accumulates each product transposed ([bn, bm] = w^T @ x^T; Config.swap_ab) and
  transposes the accumulators back after the loop. bm = 1 (one-row visits, decode) takes each
  product as an fp32 multiply-and-sum instead of a dot; k_unroll bk-steps make one loop step."""
  rows_ref, refs = (refs[0], refs[1:]) if gathered else (None, refs)
  n_x, n_w = {"mm": (1, 1), "sum": (2, 2), "glu": (1, 2)}[mode]
  x_refs, w_refs, out_refs = refs[:n_x], refs[n_x:n_x + n_w], refs[n_x + n_w:]
  if fp8_block is not False:
    s_refs, out_refs = out_refs[:n_w], out_refs[n_w:]
  copy_ref, out_refs = (out_refs[-1], out_refs[:-1]) if copy_rows else (None, out_refs)
  v, j = (pl.program_id(1), pl.program_id(0)) if n_inner else (pl.program_id(0), pl.program_id(1))
  if group_rows:  # meta_ref: the G group sizes; the visit is decoded here (visits.piece)
    grp, lo, hi = piece(_load_sizes(meta_ref, G), v, G=G, m=M, bm=bm)
    r0 = lo  # the block's first row
  else:  # meta_ref: the visit table
    tile, grp, lo, hi = meta_ref[0, v], meta_ref[1, v], meta_ref[2, v], meta_ref[3, v]
    r0 = tile * bm
  rows = r0 + jnp.arange(bm, dtype=jnp.int32)
  mine = (rows >= lo) & (rows < hi)
  cmask = _tail_mask(j * bn, bn, N)

  @pl.when(hi > lo)
  def _():
    g = jnp.minimum(grp, G - 1)  # the pseudo-group G runs zero steps; keep its address valid

    def load_w(w_ref, k0, kmask):
      if transpose_rhs:  # w[g] is [N, K]: a [bn, bk] block, contracted on its second axis
        return _load(w_ref.at[g, pl.ds(j * bn, bn), pl.ds(k0, bk)], _mask2(cmask, kmask))
      return _load(w_ref.at[g, pl.ds(k0, bk), pl.ds(j * bn, bn)], _mask2(kmask, cmask))

    if bm == 1:  # one row: no tensor-core tile to fill, so fp32 multiply-and-sum on the CUDA
      # cores; the weight tile goes straight from registers into the sum (nothing staged)
      def prod(x, w):  # x [1, bk], w [bk, bn] ([bn, bk] when transpose_rhs) -> [1, bn]
        x, w = x.astype(jnp.float32), w.astype(jnp.float32)
        if transpose_rhs:
          return jnp.sum(w * x, axis=1)[None, :]
        return jnp.sum(w * x.T, axis=0)[None, :]
    elif swap_ab:  # [bn, bm] += w^T @ x^T (w is [bn, bk] already when transpose_rhs)
      prod = lambda x, w: _dot(w, x, ta=not transpose_rhs, tb=True)
    else:
      prod = lambda x, w: _dot(x, w, tb=transpose_rhs)

    def step(kk, accs):
      for u in range(k_unroll):
        accs = one_step(kk * k_unroll + u, accs)
      return accs

    def one_step(kk, accs):
      kmask = _tail_mask(kk * bk, bk, K)
      xs = [_load_rows(x_ref, rows_ref, r0, bm, mine, kk * bk, bk, kmask) for x_ref in x_refs]
      if copy_ref is not None:
        @pl.when(j == 0)
        def _():
          plt.store(copy_ref.at[pl.ds(r0, bm), pl.ds(kk * bk, bk)], xs[0],
                    mask=_mask2(mine, kmask))
      ws = [load_w(w_ref, kk * bk, kmask) for w_ref in w_refs]
      if fp8_block:  # block-scaled: each tile scaled and rounded before the dot
        cols = j * bn + jnp.arange(bn, dtype=jnp.int32)
        ws = [fp8.scale_tile(w, s_ref, g, kk * bk, cols, cmask, fp8_block, xs[0].dtype)
              for w, s_ref in zip(ws, s_refs)]
      elif fp8_block is None:  # channel-wise: exact in the compute dtype, scaled after the loop
        ws = [w.astype(xs[0].dtype) for w in ws]
      if mode == "sum":
        return (accs[0] + prod(xs[0], ws[0]) + prod(xs[1], ws[1]),)
      return tuple(acc + prod(xs[0], w) for acc, w in zip(accs, ws))

    # (a jnp.where here lowers to mistyped scf.for bounds)
    steps = (grp < G).astype(jnp.int32) * (pl.cdiv(K, bk) // k_unroll)
    n_acc = 2 if mode == "glu" else 1
    shape = (bn, bm) if swap_ab else (bm, bn)
    accs = lax.fori_loop(0, steps, step, (jnp.zeros(shape, jnp.float32),) * n_acc)
    if swap_ab:
      accs = tuple(a.T for a in accs)
    if fp8_block is None:
      accs = tuple(fp8.scale_columns(a, s, g, j * bn, bn, cmask) for a, s in zip(accs, s_refs))
    if mode == "glu":
      gate, up = accs
      outs = (gate * jax.nn.sigmoid(gate) * up, gate, up)[:len(out_refs)]
    else:
      outs = accs
    mask = _mask2(mine, cmask)
    for o_ref, o in zip(out_refs, outs):
      plt.store(o_ref.at[pl.ds(r0, bm), pl.ds(j * bn, bn)], o.astype(o_ref.dtype), mask=mask)


def _tgmm_kernel(sizes_ref, *refs, bm, bk, bn, M, K, N, G, gathered, n_dy, n_inner):
  """out_d[g] = x[g rows].T @ dy_d[g rows] for each of n_dy (dy, out) pairs: one x block load
  serves all of them. refs: [rows], x, dy_1..n, out_1..n."""
  rows_ref, refs = (refs[0], refs[1:]) if gathered else (None, refs)
  x_ref, dy_refs, o_refs = refs[0], refs[1:1 + n_dy], refs[1 + n_dy:]
  g, i, j = _tgmm_ids(n_inner)
  lo, hi = group_rows_of(_load_sizes(sizes_ref, G), g, G=G, m=M)
  kmask, nmask = _tail_mask(i * bk, bk, K), _tail_mask(j * bn, bn, N)

  def step(t, accs):
    r0 = lo + t * bm
    mine = (r0 + jnp.arange(bm, dtype=jnp.int32)) < hi
    x = _load_rows(x_ref, rows_ref, r0, bm, mine, i * bk, bk, kmask)
    return tuple(acc + _dot(x, _load_rows(dy_ref, None, r0, bm, mine, j * bn, bn, nmask), ta=True)
                 for acc, dy_ref in zip(accs, dy_refs))

  accs = lax.fori_loop(0, pl.cdiv(hi - lo, bm), step, (jnp.zeros((bk, bn), jnp.float32),) * n_dy)
  mask = _mask2(kmask, nmask)
  for o_ref, acc in zip(o_refs, accs):
    plt.store(o_ref.at[g, pl.ds(i * bk, bk), pl.ds(j * bn, bn)], acc.astype(o_ref.dtype), mask=mask)


def _tgmm_ids(n_inner):
  """(group, K-block, N-block) program ids under either launch order."""
  if n_inner:  # grid (N-blocks, K-blocks, G): one group's tiles run back to back
    return pl.program_id(2), pl.program_id(1), pl.program_id(0)
  return pl.program_id(0), pl.program_id(1), pl.program_id(2)


def _check_rows(lhs, lhs_rows):
  """The logical row count: lhs's, or lhs_rows' when lhs rows are gathered."""
  if lhs_rows is None:
    return lhs.shape[0]
  if lhs_rows.ndim != 1 or not jnp.issubdtype(lhs_rows.dtype, jnp.integer):
    raise ValueError(f"lhs_rows must be a 1-D integer array, got {lhs_rows.dtype}{list(lhs_rows.shape)}")
  return lhs_rows.shape[0]


def _gmm_call(mode, lhs_list, rhs_list, group_sizes, cfg, *, lhs_rows, transpose_rhs, n_out,
              bn_want, name, copy_rows=False):
  lhs = lhs_list[0]
  M, K = _check_rows(lhs, lhs_rows), lhs.shape[1]
  rhs_list, scales, fp8_block = _split_fp8(rhs_list, transpose_rhs)
  rhs = rhs_list[0]
  G = rhs.shape[0]
  N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  for r in rhs_list:
    if (r.shape[2] if transpose_rhs else r.shape[1]) != K or r.shape != rhs.shape:
      raise ValueError(f"lhs {lhs.shape} and rhs {r.shape} disagree on the contraction "
                       f"(transpose_rhs={transpose_rhs})")
  bm = cfg.block_m  # rows need not divide: loads and stores are masked per visit
  bn, bk = _tile(N, bn_want), _tile(K, _per_bytes(cfg.block_k, lhs.dtype))
  if fp8_block:
    fp8.check_k_tile(fp8_block, bk)
  if bm == 1 and (copy_rows or cfg.swap_ab):
    raise ValueError("block_m=1 (one-row products) writes no saved rows and has no swap_ab")
  unroll = max(u for u in range(1, cfg.k_unroll + 1) if pl.cdiv(K, bk) % u == 0)
  if cfg.group_rows:  # the kernel decodes its visit from the sizes: no table, no XLA op
    meta, V = group_sizes.astype(jnp.int32), pieces(M, bm, G)
  else:
    meta = visit_table(group_sizes, M, bm)
    V = meta.shape[1]
  kernel = functools.partial(_gmm_kernel, bm=bm, bn=bn, bk=bk, M=M, K=K, N=N, G=G, mode=mode,
                             gathered=lhs_rows is not None, transpose_rhs=transpose_rhs,
                             n_inner=cfg.n_inner, group_rows=cfg.group_rows, copy_rows=copy_rows,
                             fp8_block=fp8_block, swap_ab=cfg.swap_ab, k_unroll=unroll)
  nb = pl.cdiv(N, bn)
  grid = (nb, V) if cfg.n_inner else (V, nb)
  rows = () if lhs_rows is None else (lhs_rows.astype(jnp.int32),)
  out = pl.pallas_call(
      kernel, grid=grid,
      out_shape=[jax.ShapeDtypeStruct((M, N), lhs.dtype)] * n_out
      + [jax.ShapeDtypeStruct((M, K), lhs.dtype)] * copy_rows,
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name=name)(meta, *rows, *lhs_list, *rhs_list, *(scales or ()))
  return out


def _split_fp8(rhs_list, transpose_rhs):
  """(weights, scales, block) of a call's weights: (rhs_list, None, False) for arrays; FP8 ones
  (fp8.Fp8Weight, forward products only) unwrapped, their scales in fp32."""
  fp8s = [isinstance(r, Fp8Weight) for r in rhs_list]
  if not any(fp8s):
    return rhs_list, None, False
  for i, r in enumerate(rhs_list):
    if not fp8s[i] or r.block != rhs_list[0].block:
      raise ValueError(f"weight {i} is {f'FP8 with block {r.block}' if fp8s[i] else 'not FP8'}; "
                       f"a kernel's weights are all FP8 of one scheme or none (weight 0: FP8 "
                       f"with block {rhs_list[0].block})")
    fp8.check(r, f"weight {i}")
  if transpose_rhs:
    raise ValueError("FP8 weights are read untransposed only (forward products; no backward)")
  return ([r.values for r in rhs_list], [r.scale.astype(jnp.float32) for r in rhs_list],
          rhs_list[0].block)


def gmm_pallas(lhs, rhs, group_sizes, cfg: Config = Config(), *, transpose_rhs: bool = False,
               lhs_rows=None):
  """out [M, N] = lhs [M, K] @ rhs[g] ([G, K, N]; [G, N, K] if transpose_rhs) per row group.
  With lhs_rows [M] (int), row r of lhs is lhs[lhs_rows[r]] (gathered in the kernel). rhs may be
  an fp8.Fp8Weight (not transposed), dequantised in the kernel."""
  return _gmm_call("mm", [lhs], [rhs], group_sizes, cfg, lhs_rows=lhs_rows,
                   transpose_rhs=transpose_rhs, n_out=1, bn_want=cfg.block_n, name="gmm")[0]


def gmm_sum_pallas(lhs0, lhs1, rhs0, rhs1, group_sizes, cfg: Config = Config(), *,
                   transpose_rhs: bool = False):
  """lhs0 @ rhs0[g] + lhs1 @ rhs1[g] in one kernel (one fp32 accumulator): the gate/up
  backward's d input."""
  if lhs0.shape != lhs1.shape:
    raise ValueError(f"lhs shapes differ: {lhs0.shape} vs {lhs1.shape}")
  return _gmm_call("sum", [lhs0, lhs1], [rhs0, rhs1], group_sizes, cfg, lhs_rows=None,
                   transpose_rhs=transpose_rhs, n_out=1, bn_want=cfg.block_n_sum, name="gmm_sum")[0]


def gmm_glu_pallas(lhs, w_gate, w_up, group_sizes, cfg: Config = Config(), *, lhs_rows=None,
                   save_gate_up: bool = False, save_rows: bool = False):
  """h = silu(lhs @ w_gate[g]) * (lhs @ w_up[g]) per row group, the SwiGLU computed from the
  fp32 accumulators (w_* [G, K, N], or both fp8.Fp8Weight of one scheme); with save_gate_up
  also returns the two products (h, gate, up) for the backward pass. lhs_rows as in gmm_pallas;
  save_rows (with lhs_rows) appends lhs[lhs_rows] [M, K] to the outputs, its rows past
  sum(group_sizes) unwritten."""
  if save_rows and lhs_rows is None:
    raise ValueError("save_rows copies gathered rows: it needs lhs_rows")
  out = _gmm_call("glu", [lhs], [w_gate, w_up], group_sizes, cfg, lhs_rows=lhs_rows,
                  transpose_rhs=False, n_out=3 if save_gate_up else 1, bn_want=cfg.block_n_glu,
                  name="gmm_glu", copy_rows=save_rows)
  return tuple(out) if save_gate_up or save_rows else out[0]


def tgmm_pallas(lhs, dout, group_sizes, cfg: Config = Config(), *, out_dtype=None, lhs_rows=None):
  """out [G, K, N] = lhs[g rows].T @ dout[g rows]; rows past sum(sizes) are ignored. `dout` may
  be a tuple of same-shape arrays: one output per entry, sharing each lhs block load. With
  lhs_rows [M], row r of lhs is lhs[lhs_rows[r]]."""
  douts = tuple(dout) if isinstance(dout, (tuple, list)) else (dout,)
  M, K = _check_rows(lhs, lhs_rows), lhs.shape[1]
  N = douts[0].shape[1]
  if any(d.shape != (M, N) for d in douts):
    raise ValueError(f"dout shapes {[d.shape for d in douts]} do not match {M} rows of lhs")
  G = group_sizes.shape[0]
  bk, bn = _tile(K, cfg.block_k_t), _tile(N, cfg.block_n_t if len(douts) == 1 else cfg.block_n_t2)
  nk, nn = pl.cdiv(K, bk), pl.cdiv(N, bn)
  grid = (nn, nk, G) if cfg.n_inner else (G, nk, nn)
  rows = () if lhs_rows is None else (lhs_rows.astype(jnp.int32),)
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, bm=_per_bytes(cfg.block_m_t, lhs.dtype), bk=bk, bn=bn, M=M,
                        K=K, N=N, G=G, gathered=lhs_rows is not None, n_dy=len(douts),
                        n_inner=cfg.n_inner),
      grid=grid,
      out_shape=[jax.ShapeDtypeStruct((G, K, N), out_dtype or lhs.dtype)] * len(douts),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps_t, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name="tgmm")(group_sizes.astype(jnp.int32), *rows, lhs, *douts)
  return tuple(out) if isinstance(dout, (tuple, list)) else out[0]


# ----------------------------------------------------------------------------- custom_vjp op


def _use_mosaic(cfg: Config, dtype) -> bool:
  """Whether cfg.mosaic puts the products of `dtype` on the Mosaic GPU kernels."""
  use = cfg.mosaic if cfg.mosaic is not None else not cfg.interpret
  return bool(use) and dtype in (jnp.bfloat16, jnp.float16)


def _mosaic_tiles(cfg: Config, dtype, K: int, N: int) -> dict | None:
  """The Mosaic GPU gmm's tiles for a [*, K] x [K, N] product where cfg.mosaic allows it."""
  return mosaic.tiles_for(K, N) if _use_mosaic(cfg, dtype) else None


def _weight_grad(lhs, dout, group_sizes, cfg: Config, *, out_dtype):
  """The op's d rhs: the Mosaic GPU tgmm where cfg.mosaic_tgmm and its tiles allow, else
  tgmm_pallas."""
  K, N = lhs.shape[1], dout.shape[1]
  use = cfg.mosaic_tgmm and _use_mosaic(cfg, lhs.dtype) and dout.dtype == lhs.dtype
  tiles = mosaic_tgmm.tiles_for(K, N) if use else None
  if tiles is None:
    return tgmm_pallas(lhs, dout, group_sizes, cfg, out_dtype=out_dtype)
  return mosaic_tgmm.tgmm(lhs, dout, group_sizes, out_dtype=out_dtype, interpret=cfg.interpret,
                          **tiles)


def _product(lhs, rhs, group_sizes, cfg: Config, *, transpose_rhs: bool = False):
  """gmm_pallas, or the Mosaic GPU kernel where cfg.mosaic and its tiles allow."""
  K, N = rhs.shape[2:0:-1] if transpose_rhs else rhs.shape[1:]
  tiles = _mosaic_tiles(cfg, lhs.dtype, K, N)
  if tiles is None:
    return gmm_pallas(lhs, rhs, group_sizes, cfg, transpose_rhs=transpose_rhs)
  return mosaic.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, interpret=cfg.interpret,
                    **tiles)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm(lhs, rhs, group_sizes, cfg: Config):
  """Differentiable grouped matmul (lhs, rhs); group_sizes gets no gradient. An fp8.Fp8Weight
  rhs runs on the Triton kernel only, and has no gradient."""
  if isinstance(rhs, Fp8Weight):
    return gmm_pallas(lhs, rhs, group_sizes, cfg)
  return _product(lhs, rhs, group_sizes, cfg)


def _no_fp8_grad(op: str):
  return ValueError(f"{op} with FP8 weights (Fp8Weight) is for inference and has no gradient; "
                    f"differentiate a model whose weights are dequantised (fp8.dequantize)")


def _gmm_fwd(lhs, rhs, group_sizes, cfg):
  if isinstance(rhs, Fp8Weight):
    raise _no_fp8_grad("gmm")
  return _product(lhs, rhs, group_sizes, cfg), (lhs, rhs, group_sizes)


def _gmm_bwd(cfg, res, dout):
  lhs, rhs, group_sizes = res
  dout = dout.astype(lhs.dtype)
  dlhs = _product(dout, rhs, group_sizes, cfg, transpose_rhs=True)
  drhs = _weight_grad(lhs, dout, group_sizes, cfg, out_dtype=rhs.dtype)
  return dlhs, drhs, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def gmm_glu(x, rows, token_rows, w_gate, w_up, group_sizes, cfg: Config):
  """The routed experts' SwiGLU half, fused: h [M, F] = silu(x[rows] @ w_gate[g]) *
  (x[rows] @ w_up[g]) per row group. x [tokens, K] is gathered row by row inside the kernel
  (the [M, K] dispatched copy is never written); w_* [G, K, F].

  Differentiable in x, w_gate and w_up. `token_rows` [tokens, X] lists each token's rows (the
  inverse of `rows`, every row listed once), so d x is a gather-sum over them; None falls back
  to a scatter-add over `rows`. The backward: d gate and d up elementwise from the saved
  products, d x = one gmm over both (`gmm_sum_pallas`; where `Config.mosaic` applies, the
  Mosaic kernel over [d gate, d up] and the weights concatenated), d w_gate and d w_up from one
  tgmm that gathers x's rows and shares each block between the two. With FP8 weights
  (fp8.Fp8Weight, both of one scheme): forward only, on the dequantised products.
  """
  return gmm_glu_pallas(x, w_gate, w_up, group_sizes, cfg, lhs_rows=rows)


def _glu_tgmm_tiles(cfg: Config, x, F: int) -> dict | None:
  """The Mosaic tgmm's tiles for gmm_glu's stacked backward, where cfg puts it there: each of
  d w_gate, d w_up is a [K, F] product reading its half of [d gate, d up] in place."""
  if not (cfg.stacked_backward and cfg.mosaic_tgmm and _mosaic_tiles(cfg, x.dtype, 2 * F,
                                                                     x.shape[1])):
    return None
  tiles = mosaic_tgmm.tiles_for(x.shape[1], F)
  return tiles if tiles and F % tiles["block_n"] == 0 else None


def _gmm_glu_fwd(x, rows, token_rows, w_gate, w_up, group_sizes, cfg):
  if isinstance(w_gate, Fp8Weight) or isinstance(w_up, Fp8Weight):
    raise _no_fp8_grad("gmm_glu")
  save_rows = _glu_tgmm_tiles(cfg, x, w_gate.shape[2]) is not None
  h, gate, up, *xr = gmm_glu_pallas(x, w_gate, w_up, group_sizes, cfg, lhs_rows=rows,
                                    save_gate_up=True, save_rows=save_rows)
  return h, (x, rows, token_rows, w_gate, w_up, group_sizes, gate, up, xr)


def _gmm_glu_bwd(cfg, res, dh):
  x, rows, token_rows, w_gate, w_up, group_sizes, gate, up, xr = res
  g, u, dh = gate.astype(jnp.float32), up.astype(jnp.float32), dh.astype(jnp.float32)
  s = jax.nn.sigmoid(g)
  dg = (dh * u * s * (1 + g * (1 - s))).astype(x.dtype)  # d silu(g) = s (1 + g (1 - s))
  du = (dh * g * s).astype(x.dtype)
  F = w_gate.shape[2]
  if cfg.stacked_backward and _mosaic_tiles(cfg, x.dtype, 2 * F, x.shape[1]):
    # Gate and up side by side as one [M, 2F] product: d x on the Mosaic kernel with a K of 2F
    # (the weights concatenated, one weight-sized copy), both weight gradients from one tgmm.
    dgu = jnp.concatenate([dg, du], axis=1)
    dxs = _product(dgu, jnp.concatenate([w_gate, w_up], axis=2), group_sizes, cfg,
                   transpose_rhs=True)
    tiles = _glu_tgmm_tiles(cfg, x, F)
    if tiles:
      # x's rows as the forward kernel copied them (the Mosaic tgmm cannot gather), then
      # d w_gate and d w_up as two [K, F] products reading their halves of dgu in place (H100,
      # ling_small, 131072 rows: 2 x 0.256 ms against one [K, 2F] product's 0.674 ms)
      dwg, dwu = (mosaic_tgmm.tgmm(xr[0], dgu, group_sizes, out_dtype=w_gate.dtype,
                                   cols=(c, F), interpret=cfg.interpret, **tiles)
                  for c in (0, F))
    else:
      dw = tgmm_pallas(x, dgu, group_sizes, cfg, out_dtype=w_gate.dtype, lhs_rows=rows)
      dwg, dwu = dw[..., :F], dw[..., F:]
  elif cfg.fused_backward:
    dxs = gmm_sum_pallas(dg, du, w_gate, w_up, group_sizes, cfg, transpose_rhs=True)  # [M, K]
    dwg, dwu = tgmm_pallas(x, (dg, du), group_sizes, cfg, out_dtype=w_gate.dtype, lhs_rows=rows)
  else:
    dxs = (gmm_pallas(dg, w_gate, group_sizes, cfg, transpose_rhs=True).astype(jnp.float32)
           + gmm_pallas(du, w_up, group_sizes, cfg, transpose_rhs=True))
    dwg, dwu = (tgmm_pallas(x, d, group_sizes, cfg, out_dtype=w_gate.dtype, lhs_rows=rows)
                for d in (dg, du))
  if token_rows is not None:
    dx = dxs[token_rows].astype(jnp.float32).sum(1)
  else:
    dx = jnp.zeros(x.shape, jnp.float32).at[rows].add(dxs.astype(jnp.float32))
  return dx.astype(x.dtype), None, None, dwg, dwu, None


gmm_glu.defvjp(_gmm_glu_fwd, _gmm_glu_bwd)
