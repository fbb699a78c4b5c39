"""The grouped matmul in Pallas Mosaic GPU (Hopper: TMA, wgmma, warp specialization).

Same op and visit table as kernel.py's `gmm_pallas` (rows sorted by group, out = lhs @ rhs[g]
per row; a row tile straddling group boundaries is visited once per group, each visit storing
only its own rows). The differences are in how it runs:
  * persistent: one CTA per SM walks the (visit, N-block) work items, N-blocks innermost so a
    row tile is re-read from L2;
  * warp-specialized: a producer warpgroup streams the operands' K blocks with TMA into `stages`
    SMEM slots; two consumer warpgroups each run wgmma on half of the (block_m, block_n) tile
    (its rows for split="m", its columns for "n") into fp32 registers, then store their half
    while the producer already loads the next work item;
  * a visit's rows [lo, hi) are stored with TMA as a ladder of power-of-two row blocks (TMA
    stores rectangles only; the counts are dynamic, the ladder's sizes are static).

Limits: K a multiple of block_k, N of block_n; bf16 / fp16 operands.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mosaic import interpret_kwargs
from pallas_kernels.grouped_matmul.visits import visit_table


def _store_rows(o_smem, o_gmem, first, count, row0, col0, rows: int):
  """TMA-store rows [first, first + count) of o_smem [rows, N] to o_gmem rows row0.. at columns
  col0: one store per set bit of count (count <= rows)."""
  size = 1 << (rows.bit_length() - 1)
  done = jnp.int32(0)
  while size:
    @pl.when(count & size != 0)
    def _(size=size, done=done):
      plgpu.copy_smem_to_gmem(
          o_smem.at[pl.ds(first + done, size)],
          o_gmem.at[pl.ds(row0 + done, size), pl.ds(col0, o_smem.shape[1])])
    done = done + (count & size)
    size //= 2


def _half_tile(block_m: int, block_n: int, split: str) -> tuple[int, int]:
  """The (rows, columns) of the tile each of the two consumer warpgroups computes."""
  return (block_m // 2, block_n) if split == "m" else (block_m, block_n // 2)


def tiles_for(K: int, N: int) -> dict | None:
  """gmm's tiles for a [*, K] x [K, N] product, or None where they do not fit. From the H100
  sweeps (BENCHMARKS.md#grouped_matmul-kernels): 128 x 256 tiles with the consumers splitting the columns
  where N divides by 256 (the flash shapes, ling_small's down projection); 128 x 192 split by
  rows where it divides by 192 (ling_small's width 576). There one wgmma left in flight measured
  1-3% faster before `gmm`'s mma drained the last step to close a race; with the drain it is no
  faster (down's d input: 497 / 540 against 502 / 546 TFLOP/s at 16384 / 32768
  tokens), so none is left in flight."""
  if K % 64:
    return None
  if N % 256 == 0:
    return dict(block_m=128, block_n=256, block_k=64, stages=3, split="n", in_flight=0)
  if N % 192 == 0:
    return dict(block_m=128, block_n=192, block_k=64, stages=4, split="m", in_flight=0)
  return None


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, block_m: int = 128,
        block_n: int = 256, block_k: int = 64, stages: int = 3, split: str = "n",
        in_flight: int = 0, num_sms: int | None = None, interpret=False):
  """out [M, N] = lhs [M, K] @ rhs[g] for the rows of each group g; rhs is [G, K, N], or [G, N, K]
  with transpose_rhs (then rhs[g].T is used). bf16 / fp16 in, fp32 accumulation, lhs.dtype out;
  rows past sum(group_sizes) give zeros. split: how the two consumer warpgroups share a tile;
  in_flight: wgmma groups a consumer leaves running when it moves to the next K block (0 or 1;
  with 1 a slot is released one step later)."""
  M, K = lhs.shape
  G = rhs.shape[0]
  K2, N = rhs.shape[2:0:-1] if transpose_rhs else rhs.shape[1:]
  if K2 != K or group_sizes.shape != (G,) or lhs.dtype != rhs.dtype:
    raise ValueError(f"want lhs [M, K], rhs [G, {'N, K' if transpose_rhs else 'K, N'}] of one "
                     f"dtype, group_sizes [G]; got {lhs.shape} {lhs.dtype}, {rhs.shape} "
                     f"{rhs.dtype}, {group_sizes.shape}")
  if split not in ("m", "n"):
    raise ValueError(f"split must be 'm' or 'n'; got {split!r}")
  wm, wn = _half_tile(block_m, block_n, split)
  if wm % 64 or wn % 64:  # (a 64 x 32 half-tile faulted on the H100 with a misaligned address)
    raise ValueError(f"each consumer's {wm} x {wn} half of the tile must be multiples of 64 "
                     f"(wgmma's 64 rows; 128-byte swizzled columns): block_m={block_m}, "
                     f"block_n={block_n}, split={split!r}")
  if K % block_k or N % block_n:
    raise ValueError(f"K={K} and N={N} must be multiples of block_k={block_k}, block_n={block_n}")
  meta = visit_table(group_sizes, M, block_m)  # [4, V]: tile, group, row lo, row hi
  if num_sms is None:  # one CTA per SM (persistent); a couple in the interpreter
    if not interpret and jax.devices()[0].platform != "gpu":
      raise ValueError("the Mosaic GPU gmm runs on a Hopper GPU or in the interpreter "
                       "(interpret=True); to lower it elsewhere, pass num_sms")
    num_sms = 2 if interpret else jax.devices()[0].core_count
  body = functools.partial(_body, block_m=block_m, block_n=block_n, block_k=block_k,
                           stages=stages, split=split, in_flight=in_flight,
                           transpose_rhs=transpose_rhs, K=K, N=N)
  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((M, N), lhs.dtype), grid=(num_sms,),
      grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      **interpret_kwargs(interpret))
  return kernel(meta, lhs, rhs)


def _body(meta_gmem, lhs_gmem, rhs_gmem, o_gmem, *, block_m, block_n, block_k, stages, split,
          in_flight, transpose_rhs, K, N):
  """The kernel: warpgroups 0 and 1 compute, 2 loads (see the module docstring)."""
  G, V, nb = rhs_gmem.shape[0], meta_gmem.shape[1], N // block_n
  wm, wn = _half_tile(block_m, block_n, split)
  rhs_block = (block_n, block_k) if transpose_rhs else (block_k, block_n)

  def pipeline(mma, context, tile, j):
    return plgpu.emit_pipeline_warp_specialized(
        mma, grid=(K // block_k,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
        in_specs=[plgpu.BlockSpec((block_m, block_k), lambda k: (tile, k),
                                  delay_release=in_flight),
                  plgpu.BlockSpec(rhs_block, lambda k: (j, k) if transpose_rhs else (k, j),
                                  delay_release=in_flight)],
        max_concurrent_steps=stages, compute_context=context)

  unused = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped,
      allocations=pipeline(unused, unused, 0, 0).get_allocations(lhs_gmem, rhs_gmem.at[0]),
      o_smem=plgpu.SMEM((2, wm, wn), o_gmem.dtype), collective_axes="wg")
  def _(allocations, o_smem):
    w = jax.lax.axis_index("wg")
    mine = o_smem.at[jnp.minimum(w, 1)]  # this consumer's half of the output tile

    @plgpu.nd_loop((V * nb,), collective_axes="sm")
    def _(info):
      item = info.index[0]
      v, j = item // nb, item % nb
      tile, grp, lo, hi = (meta_gmem[i, v] for i in range(4))

      def mma(idxs, a_smem, b_smem, acc_ref):
        if split == "m":
          a_smem = a_smem.at[pl.ds(w * wm, wm)]
        elif transpose_rhs:
          b_smem = b_smem.at[pl.ds(w * wn, wn)]
        else:
          b_smem = b_smem.at[:, pl.ds(w * wn, wn)]
        plgpu.wgmma(acc_ref, a_smem, b_smem.T if transpose_rhs else b_smem)
        if not in_flight:
          plgpu.wgmma_wait(0)
          return acc_ref
        # With a slot released one step late, the pipeline's producer never waits for the last
        # step's slot before the next item's prologue refills it: so the last step drains its
        # wgmma before the pipeline's release of the step before (which the producer does wait
        # for), and the refill cannot land under a running wgmma.
        last = idxs[0] == K // block_k - 1

        @pl.when(last)
        def _():
          plgpu.wgmma_wait(0)

        @pl.when(~last)
        def _():
          plgpu.wgmma_wait(in_flight)
        return acc_ref

      def context(run):
        def acc_scope(acc_ref):
          run(acc_ref)
          acc = acc_ref[...] * (grp < G).astype(jnp.float32)  # the pseudo-group: zeros
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last item's stores have read it
          mine[...] = acc.astype(mine.dtype)
          plgpu.commit_smem()
          if split == "m":  # rows [r0, r0 + wm) of the tile are mine; store those in [lo, hi)
            r0 = tile * block_m + w * wm
            first, last = (jnp.clip(b - r0, 0, wm) for b in (lo, hi))
            _store_rows(mine, o_gmem, first, last - first, r0 + first, j * block_n, wm)
          else:
            _store_rows(mine, o_gmem, lo - tile * block_m, hi - lo, lo, j * block_n + w * wn,
                        block_m)

        pl.run_scoped(acc_scope, plgpu.ACC((wm, wn)))

      @pl.when(hi > lo)
      def _():
        pipeline(mma, context, tile, j)(lhs_gmem, rhs_gmem.at[jnp.minimum(grp, G - 1)],
                                        allocations=allocations)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
