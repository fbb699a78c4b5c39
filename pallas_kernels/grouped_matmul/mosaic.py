"""The grouped matmul's forward in Pallas Mosaic GPU (Hopper: TMA, wgmma), opt-in.

Same op and visit table as kernel.py's `gmm_pallas` (rows sorted by group, out = lhs @ rhs[g]
per row; a row tile straddling group boundaries is visited once per group, each visit storing
only its own rows). The differences are in how it runs:
  * persistent: one CTA per SM walks the (visit, N-block) work items, N-blocks innermost so a
    row tile is re-read from L2;
  * the contraction is a TMA-fed pipeline of `stages` SMEM slots into wgmma (fp32 accumulator);
  * a visit's rows [lo, hi) are stored with TMA as a ladder of power-of-two row blocks (TMA
    stores rectangles only; the counts are dynamic, the ladder's sizes are static).

Not timed on a GPU yet: written and tested in the Mosaic GPU interpreter and lowered for sm_90
on the CPU (tests/test_grouped_matmul.py). Limits: K a multiple of block_k, N of block_n.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mosaic import interpret_kwargs
from pallas_kernels.grouped_matmul.kernel import visit_table


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
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gmm(lhs, rhs, group_sizes, *, block_m: int = 128, block_n: int = 128, block_k: int = 64,
        stages: int = 4, num_sms: int | None = None, interpret=False):
  """out [M, N] = lhs [M, K] @ rhs[g] ([G, K, N]) for the rows of each group g (bf16 / fp16 in,
  fp32 accumulation); rows past sum(group_sizes) give zeros."""
  M, K = lhs.shape
  G, K2, N = rhs.shape
  if K2 != K or group_sizes.shape != (G,) or lhs.dtype != rhs.dtype:
    raise ValueError(f"want lhs [M, K], rhs [G, K, N] of one dtype, group_sizes [G]; got "
                     f"{lhs.shape} {lhs.dtype}, {rhs.shape} {rhs.dtype}, {group_sizes.shape}")
  if K % block_k or N % block_n:
    raise ValueError(f"K={K} and N={N} must be multiples of block_k={block_k}, block_n={block_n}")
  meta = visit_table(group_sizes, M, block_m)  # [4, V]: tile, group, row lo, row hi
  V, nb = meta.shape[1], N // block_n
  if num_sms is None:  # one CTA per SM (persistent); a couple in the interpreter
    if not interpret and jax.devices()[0].platform != "gpu":
      raise ValueError("the Mosaic GPU gmm runs on a Hopper GPU or in the interpreter "
                       "(interpret=True); to lower it elsewhere, pass num_sms")
    num_sms = 2 if interpret else jax.devices()[0].core_count

  def body(meta_gmem, lhs_gmem, rhs_gmem, o_gmem):
    @plgpu.nd_loop((V * nb,), collective_axes="sm")
    def _(info):
      item = info.index[0]
      v, j = item // nb, item % nb
      tile, grp, lo, hi = (meta_gmem[i, v] for i in range(4))

      @pl.when(hi > lo)
      def _():
        def acc_scope(acc_ref):
          plgpu.emit_pipeline(
              lambda _, a_smem, b_smem: plgpu.wgmma(acc_ref, a_smem, b_smem),
              grid=(K // block_k,),
              in_specs=[plgpu.BlockSpec((block_m, block_k), lambda k: (tile, k), delay_release=1),
                        plgpu.BlockSpec((block_k, block_n), lambda k: (k, j), delay_release=1)],
              max_concurrent_steps=stages,
          )(lhs_gmem, rhs_gmem.at[jnp.minimum(grp, G - 1)])
          return acc_ref[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((block_m, block_n)))
        acc = acc * (grp < G).astype(jnp.float32)  # the pseudo-group past the last: zeros

        def store_scope(o_smem):
          o_smem[...] = acc.astype(o_smem.dtype)
          plgpu.commit_smem()
          _store_rows(o_smem, o_gmem, lo - tile * block_m, hi - lo, lo, j * block_n, block_m)

        pl.run_scoped(store_scope, plgpu.SMEM((block_m, block_n), lhs.dtype))

  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((M, N), lhs.dtype), grid=(num_sms,),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      **interpret_kwargs(interpret))
  return kernel(meta, lhs, rhs)
