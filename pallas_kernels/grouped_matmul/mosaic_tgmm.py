"""The grouped matmul's weight gradient (tgmm) in Pallas Mosaic GPU (Hopper: TMA, wgmma).

out[g] = lhs[rows of g].T @ dout[rows of g] ([G, K, N] from lhs [M, K], dout [M, N]); rows sorted
by group, group g owning rows [start_g, end_g) (kernel.py's `tgmm_pallas` is the Triton version
of the same op). A work item is one (group, K-block, N-block) output tile [block_k, block_n]; it
walks its group's rows in block_m steps, so an empty group stores zeros and a heavy one loops
longer. How it runs:
  * persistent: one CTA per SM walks the work items (group outermost, N-blocks innermost), so the
    CTAs running at once mostly share one group's rows and read them from L2, and each CTA keeps
    its SMEM ring and barriers across items. A plain grid would launch the same tiles, but this
    way the producer loads the next item's first row blocks while the consumers store the last
    item's tile;
  * warp-specialized, as mosaic.py's gmm: a producer warpgroup streams [block_m, block_k] lhs and
    [block_m, block_n] dout row blocks with TMA into `stages` SMEM slots; two consumer warpgroups
    each run wgmma on half of the output tile (its rows of block_k for split="k", its columns of
    block_n for "n"), the lhs block read transposed from SMEM as the A operand (a [block_k,
    block_m] view: the contraction is over rows), then store their half with TMA;
  * the row loop's length is data-dependent: `emit_pipeline_warp_specialized` takes a dynamic
    grid, (cdiv(rows, block_m),); a group of no rows runs no step and stores its zero tile.

Row blocks and masking. TMA into the wgmma's tiled, swizzled SMEM needs row offsets that are
multiples of 8 (the SMEM tile's rows): a group's row blocks start at start_g rounded down to a
multiple of 8, base_g, so step i loads rows [base_g + i block_m, + block_m). Only a group's first
block (up to 7 rows of the group before) and last block (rows of the groups after, rows past
sum(group_sizes), and rows past M, which TMA reads as zeros) hold rows that are not the group's.
Those steps zero the outside rows in SMEM before the wgmma, in both operands and with a select
(so NaN or inf in others' rows contributes nothing, as in the Triton kernel): consumer 0 masks
the lhs block and consumer 1 the dout block (a round trip through registers in the wgmma layout),
each commits (a generic -> async proxy fence), and both meet at a two-arrival barrier so neither
wgmma reads a block before the other consumer has masked it. Full blocks are not touched.

Tiles. Defaults block_k=128, block_n=128, block_m=64, stages=4, split="k": each consumer
accumulates [64, 128] in fp32 (64 registers a thread), SMEM 4 x 32 KiB of ring + 2 x 16 KiB of
output tile (bf16). block_k, block_n (the output tile) divide K and N; a consumer's half is a
multiple of 64 rows (wgmma's M) and of 64 columns (a 128-byte swizzle span). block_m (rows per
step, the contraction) is a multiple of 64 (the masking's register layout). The model shapes:
K = 576 needs split="n" with block_k 64 or 192; K = 1024, N = 1152 fits the defaults. `tiles_for`
picks them by shape from the H100 sweep.

Limits: bf16 / fp16 operands of one dtype. Where M is not a multiple of 8 (TMA's tiled view of
GMEM) or is below block_m, both operands are copied with zero rows added. One wgmma in flight:
each step waits for its own, since keeping one running needs the slot released a step late
(delay_release), and the pipeline's producer then refills the last step's slot for the next
item without waiting for that release. Load balance is by output tile: one group of all rows
makes only (K / block_k) (N / block_n) work items, fewer than the 132 SMs at the model's shapes;
splitting a big group's rows over several items plus a reduction would fix that.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mosaic import interpret_kwargs
from pallas_kernels.grouped_matmul.visits import group_bounds


def tiles_for(K: int, N: int) -> dict | None:
  """tgmm's tiles for an out [*, K, N], or None where none fit. From the H100 sweep at ling_small's
  shapes (BENCHMARKS.md#grouped_matmul-kernels; 131072 rows): [128, 192] output tiles split by K where N
  divides by 192 (d w_gate, d w_up: 604 TFLOP/s), [192, 128] split by N where K does (d w_down:
  598); otherwise the [128, 128] defaults (not swept)."""
  if K % 128 == 0 and N % 192 == 0:
    return dict(block_m=64, block_k=128, block_n=192, stages=4, split="k")
  if K % 192 == 0 and N % 128 == 0:
    return dict(block_m=64, block_k=192, block_n=128, stages=4, split="n")
  if K % 128 == 0 and N % 128 == 0:
    return dict(block_m=64, block_k=128, block_n=128, stages=4, split="k")
  return None


def tgmm(lhs, dout, group_sizes, *, out_dtype=None, cols: tuple[int, int] | None = None,
         block_k: int = 128, block_n: int = 128, block_m: int = 64, stages: int = 4,
         split: str = "k", num_sms: int | None = None, interpret=False):
  """out [G, K, N] = lhs[g rows].T @ dout[g rows] for lhs [M, K], dout [M, N], group g owning
  rows [sum(group_sizes[:g]), sum(group_sizes[:g + 1])) (clipped to M); rows past
  sum(group_sizes) are ignored and an empty group's output is zeros. bf16 / fp16 in, fp32
  accumulation, out_dtype (default lhs.dtype) out. cols = (start, width): use dout[:, start:
  start + width] (read in place, no copy; both multiples of block_n), so out is [G, K, width]. Tiles and split: the module docstring.
  num_sms: the persistent CTAs (default: the GPU's SMs, 2 in the interpreter); pass it to lower
  without a GPU. interpret: True or an InterpretGPUParams runs jax's GPU interpreter."""
  M, K = lhs.shape
  col0, N = cols or (0, dout.shape[1])
  G = group_sizes.shape[0]
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  if (lhs.ndim != 2 or dout.ndim != 2 or dout.shape[0] != M or group_sizes.ndim != 1
      or lhs.dtype != dout.dtype or lhs.dtype not in (jnp.bfloat16, jnp.float16)
      or not 0 <= col0 <= col0 + N <= dout.shape[-1]):
    raise ValueError(f"want lhs [M, K], dout [M, N] of one dtype (bf16 / fp16), group_sizes "
                     f"[G], cols within N; got {lhs.shape} {lhs.dtype}, {dout.shape} "
                     f"{dout.dtype}, {group_sizes.shape}, cols {cols}")
  if split not in ("k", "n"):
    raise ValueError(f"split must be 'k' or 'n'; got {split!r}")
  wk, wn = (block_k // 2, block_n) if split == "k" else (block_k, block_n // 2)
  if K % block_k or N % block_n or wk % 64 or wn % 64 or block_m % 64:
    raise ValueError(f"K={K} and N={N} must be multiples of block_k={block_k} and "
                     f"block_n={block_n}, each consumer's [{wk}, {wn}] tile (split={split!r}) "
                     f"and block_m={block_m} multiples of 64")
  bounds = jnp.stack(group_bounds(group_sizes, M))  # [2, G]: each group's rows [start, end)
  rows = max(block_m, -(-M // 8) * 8)
  if rows != M:  # pad with rows of no group
    lhs, dout = (jnp.pad(a, ((0, rows - M), (0, 0))) for a in (lhs, dout))
  if num_sms is None:  # one CTA per SM (persistent); a couple in the interpreter
    if not interpret and jax.devices()[0].platform != "gpu":
      raise ValueError("the Mosaic GPU tgmm runs on a Hopper GPU or in the interpreter "
                       "(interpret=True); to lower it elsewhere, pass num_sms")
    num_sms = 2 if interpret else jax.devices()[0].core_count
  if col0 % block_n:
    raise ValueError(f"cols start {col0} must be a multiple of block_n={block_n}")
  body = functools.partial(_body, block_m=block_m, block_k=block_k, block_n=block_n,
                           stages=stages, split=split, nb0=col0 // block_n)
  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((G, K, N), out_dtype), grid=(num_sms,),
      grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      **interpret_kwargs(interpret))
  return kernel(bounds, lhs, dout)


def _body(bounds_gmem, lhs_gmem, dout_gmem, o_gmem, *, block_m, block_k, block_n, stages, split,
          nb0):
  """The kernel: warpgroups 0 and 1 compute, 2 loads (see the module docstring)."""
  G, K, N = o_gmem.shape
  nk, nn = K // block_k, N // block_n
  wk, wn = (block_k // 2, block_n) if split == "k" else (block_k, block_n // 2)

  def pipeline(mma, context, steps, base, kb, nb):
    row0 = lambda i: pl.multiple_of(base + i * block_m, 8)  # step i's first row
    return plgpu.emit_pipeline_warp_specialized(
        mma, grid=(steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
        in_specs=[plgpu.BlockSpec((pl.Element(block_m), block_k), lambda i: (row0(i), kb)),
                  plgpu.BlockSpec((pl.Element(block_m), block_n),
                                  lambda i: (row0(i), nb0 + nb))],
        max_concurrent_steps=stages, compute_context=context)

  unused = lambda *_, **__: None
  zero = jnp.int32(0)

  @functools.partial(
      pl.run_scoped,
      allocations=pipeline(unused, unused, stages, zero, zero, zero).get_allocations(
          lhs_gmem, dout_gmem),
      o_smem=plgpu.SMEM((2, wk, wn), o_gmem.dtype),
      masked=plgpu.Barrier(num_arrivals=2), collective_axes="wg")
  def _(allocations, o_smem, masked):
    w = jax.lax.axis_index("wg")
    mine = o_smem.at[jnp.minimum(w, 1)]  # this consumer's half of the output tile

    @plgpu.nd_loop((G * nk * nn,), collective_axes="sm")
    def _(info):
      item = info.index[0]
      g, kb, nb = item // (nk * nn), item // nn % nk, item % nn
      start, end = bounds_gmem[0, g], bounds_gmem[1, g]
      base = pl.multiple_of(start // 8 * 8, 8)
      steps = jnp.where(end > start, (end - base + block_m - 1) // block_m, 0)

      def mask(ref, first, last):
        """Zero the rows of ref [block_m, *] outside [first, last)."""
        row = plgpu.broadcasted_iota(jnp.int32, ref.shape, 0, layout=plgpu.Layout.WGMMA)
        ref[...] = jnp.where((row >= first) & (row < last), ref[...],
                             jnp.zeros(ref.shape, ref.dtype))

      def mma(idx, a_smem, b_smem, acc_ref):
        r0 = base + idx[0] * block_m
        first, last = start - r0, end - r0  # the block's rows of group g: [first, last)

        @pl.when((first > 0) | (last < block_m))
        def _():
          jax.lax.cond(w == 0, lambda: mask(a_smem, first, last),
                       lambda: mask(b_smem, first, last))
          plgpu.commit_smem()
          plgpu.barrier_arrive(masked)
          plgpu.barrier_wait(masked)  # the other consumer's block is masked too

        if split == "k":
          a_smem = a_smem.at[:, pl.ds(w * wk, wk)]
        else:
          b_smem = b_smem.at[:, pl.ds(w * wn, wn)]
        plgpu.wgmma(acc_ref, a_smem.T, b_smem)
        plgpu.wgmma_wait(0)
        return acc_ref

      def context(run):
        def acc_scope(acc_ref):
          run(acc_ref)
          acc = acc_ref[...]
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last item's store has read it
          mine[...] = acc.astype(mine.dtype)
          plgpu.commit_smem()
          k0, n0 = kb * block_k, nb * block_n
          if split == "k":
            k0 += w * wk
          else:
            n0 += w * wn
          plgpu.copy_smem_to_gmem(mine, o_gmem.at[g, pl.ds(k0, wk), pl.ds(n0, wn)])

        pl.run_scoped(acc_scope, plgpu.ACC((wk, wn)))

      pipeline(mma, context, steps, base, kb, nb)(lhs_gmem, dout_gmem, allocations=allocations)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
