"""Every Pallas Triton kernel lowers to a *verified* Triton module for an H100, here on the CPU.

Interpret mode (the other CPU tests) checks the maths but not the Triton lowering: a kernel can
pass in interpret mode and then fail to compile on the GPU (e.g. an `scf.for` whose bounds have
different integer types). Exporting the jitted op for the "cuda" platform runs the real Pallas ->
Triton MLIR lowering without a GPU; we pin the target to sm_90 and verify each module.
Uses two private JAX hooks; the test skips (never passes vacuously) if they move.
"""

import jax
import jax.numpy as jnp
import pytest

from ling_jax.model.linear import fp8_matmul
from pallas_kernels.attention import flash_attention
from pallas_kernels.grouped_matmul import (Config, Fp8Weight, gmm_glu, gmm_glu_pallas, gmm_pallas,
                                           sort_by_group, tgmm_pallas, tuned_config)
from pallas_kernels.rms_norm import Config as NormConfig, rms_norm_pallas
from pallas_kernels.simple_gla.chunk import simple_gla_pallas
from pallas_kernels.simple_gla.decode import simple_gla_step_pallas
from testing import export_for_cuda

S = jax.ShapeDtypeStruct


M, K, N, G = 512, 256, 128, 8
CASES = {
    "gmm": (lambda x, w, s: gmm_pallas(x, w, s, Config()),
            (S((M, K), jnp.bfloat16), S((G, K, N), jnp.bfloat16), S((G,), jnp.int32)), 1),
    "gmm_transposed": (lambda d, w, s: gmm_pallas(d, w, s, Config(), transpose_rhs=True),
                       (S((M, N), jnp.bfloat16), S((G, K, N), jnp.bfloat16), S((G,), jnp.int32)), 1),
    "gmm_big_tiles": (lambda x, w, s: gmm_pallas(x, w, s, Config(block_m=128, num_warps=8)),
                      (S((M, K), jnp.bfloat16), S((G, K, N), jnp.bfloat16), S((G,), jnp.int32)), 1),
    "tgmm": (lambda x, d, s: tgmm_pallas(x, d, s, Config()),
             (S((M, K), jnp.bfloat16), S((M, N), jnp.bfloat16), S((G,), jnp.int32)), 1),
    "gmm_tails": (lambda x, w, s: gmm_pallas(x, w, s, Config()),  # N 72: a masked 128-wide block
                  (S((M, 80), jnp.bfloat16), S((G, 80, 72), jnp.bfloat16), S((G,), jnp.int32)), 1),
    "tgmm_gathered_tails": (
        lambda x, r, d, s: tgmm_pallas(x, (d, d), s, Config(), lhs_rows=r),
        (S((M // 4, 80), jnp.bfloat16), S((M,), jnp.int32), S((M, 72), jnp.bfloat16),
         S((G,), jnp.int32)), 1),
    "gmm_glu_fwd_bwd": (  # fused gate/up: gathered rows, saved products, gmm_sum and dual tgmm
        lambda x, r, tr, wg, wu, s: jax.vjp(lambda x, wg, wu: gmm_glu(x, r, tr, wg, wu, s, Config()),
                                            x, wg, wu)[1](jnp.ones((M, 72), jnp.bfloat16)),
        (S((M // 4, K), jnp.bfloat16), S((M,), jnp.int32), S((M // 4, 4), jnp.int32),
         S((G, K, 72), jnp.bfloat16), S((G, K, 72), jnp.bfloat16), S((G,), jnp.int32)), 3),
    "gmm_glu_save_rows": (  # the gate/up forward that also writes the gathered rows out
        lambda x, r, wg, wu, s: gmm_glu_pallas(x, wg, wu, s, Config(), lhs_rows=r,
                                               save_gate_up=True, save_rows=True),
        (S((M // 4, K), jnp.bfloat16), S((M,), jnp.int32), S((G, K, 192), jnp.bfloat16),
         S((G, K, 192), jnp.bfloat16), S((G,), jnp.int32)), 1),
    "gmm_aligned_tiles": (lambda x, w, s: gmm_pallas(x, w, s, Config(group_rows=False)),
                          (S((M, K), jnp.bfloat16), S((G, K, N), jnp.bfloat16), S((G,), jnp.int32)),
                          1),
    "sort_by_group": (lambda ids: sort_by_group(ids, 256), (S((2048,), jnp.int32),), 1),
    # FP8 weights dequantised in the kernel, both scale schemes (fp8.py); decode tiles, N tails
    "gmm_fp8_block": (lambda x, v, sc, s: gmm_pallas(x, Fp8Weight(v, sc, (128, 128)), s, Config()),
                      (S((M, K), jnp.bfloat16), S((G, K, 200), jnp.float8_e4m3fn),
                       S((G, 2, 2), jnp.float32), S((G,), jnp.int32)), 1),
    "gmm_fp8_channel": (lambda x, v, sc, s: gmm_pallas(x, Fp8Weight(v, sc), s,
                                                       tuned_config(K, N, 8)),
                        (S((M, K), jnp.bfloat16), S((G, K, 200), jnp.float8_e4m3fn),
                         S((G, 200), jnp.float32), S((G,), jnp.int32)), 1),
    "gmm_glu_fp8_block": (
        lambda x, r, vg, vu, sg, su, s: gmm_glu_pallas(
            x, Fp8Weight(vg, sg, (128, 128)), Fp8Weight(vu, su, (128, 128)), s,
            tuned_config(K, 192, 8), lhs_rows=r),
        (S((M // 4, K), jnp.bfloat16), S((M,), jnp.int32), S((G, K, 192), jnp.float8_e4m3fn),
         S((G, K, 192), jnp.float8_e4m3fn), S((G, 2, 2), jnp.float32), S((G, 2, 2), jnp.float32),
         S((G,), jnp.int32)), 1),
    "gmm_glu_fp8_block_swapped": (  # decode's tiles: 16 token rows, the weight tile first
        lambda x, r, vg, vu, sg, su, s: gmm_glu_pallas(
            x, Fp8Weight(vg, sg, (128, 128)), Fp8Weight(vu, su, (128, 128)), s,
            tuned_config(K, 192, 1)._replace(block_m=16, swap_ab=True), lhs_rows=r),
        (S((M // 4, K), jnp.bfloat16), S((M,), jnp.int32), S((G, K, 192), jnp.float8_e4m3fn),
         S((G, K, 192), jnp.float8_e4m3fn), S((G, 2, 2), jnp.float32), S((G, 2, 2), jnp.float32),
         S((G,), jnp.int32)), 1),
    "gmm_glu_fp8_block_decode": (  # tuned_config's decode tiles (16 rows, 128-deep steps)
        lambda x, r, vg, vu, sg, su, s: gmm_glu_pallas(
            x, Fp8Weight(vg, sg, (128, 128)), Fp8Weight(vu, su, (128, 128)), s,
            tuned_config(K, 192, 1, "fp8-block"), lhs_rows=r),
        (S((M // 4, K), jnp.bfloat16), S((M,), jnp.int32), S((G, K, 192), jnp.float8_e4m3fn),
         S((G, K, 192), jnp.float8_e4m3fn), S((G, 2, 2), jnp.float32), S((G, 2, 2), jnp.float32),
         S((G,), jnp.int32)), 1),
    "gmm_glu_fp8_block_one_row": (  # one-row visits: multiply-and-sum, unrolled K-steps
        lambda x, r, vg, vu, sg, su, s: gmm_glu_pallas(
            x, Fp8Weight(vg, sg, (128, 128)), Fp8Weight(vu, su, (128, 128)), s,
            tuned_config(K, 192, 1, "fp8-block")._replace(block_m=1, k_unroll=2), lhs_rows=r),
        (S((M // 4, K), jnp.bfloat16), S((M,), jnp.int32), S((G, K, 192), jnp.float8_e4m3fn),
         S((G, K, 192), jnp.float8_e4m3fn), S((G, 2, 2), jnp.float32), S((G, 2, 2), jnp.float32),
         S((G,), jnp.int32)), 1),
    "gmm_fp8_channel_one_row": (lambda x, v, sc, s: gmm_pallas(
        x, Fp8Weight(v, sc), s, tuned_config(K, N, 1, "fp8-channel")._replace(block_m=1)),
                                (S((M, K), jnp.bfloat16), S((G, K, 200), jnp.float8_e4m3fn),
                                 S((G, 200), jnp.float32), S((G,), jnp.int32)), 1),
    "gmm_bf16_one_row_transposed": (lambda d, w, s: gmm_pallas(
        d, w, s, tuned_config(K, N, 1)._replace(block_m=1, k_unroll=4), transpose_rhs=True),
                                    (S((M, N), jnp.bfloat16), S((G, K, N), jnp.bfloat16),
                                     S((G,), jnp.int32)), 1),
    "gmm_bf16_decode": (lambda x, w, s: gmm_pallas(x, w, s, tuned_config(K, N, 1)),
                        (S((M, K), jnp.bfloat16), S((G, K, N), jnp.bfloat16),
                         S((G,), jnp.int32)), 1),
    "gmm_fp8_channel_swapped": (lambda x, v, sc, s: gmm_pallas(
        x, Fp8Weight(v, sc), s, tuned_config(K, N, 1)._replace(block_m=16, swap_ab=True)),
                                (S((M, K), jnp.bfloat16), S((G, K, 200), jnp.float8_e4m3fn),
                                 S((G, 200), jnp.float32), S((G,), jnp.int32)), 1),
    "gmm_glu_fp8_channel": (
        lambda x, r, vg, vu, sg, su, s: gmm_glu(x, r, None, Fp8Weight(vg, sg), Fp8Weight(vu, su), s,
                                                Config()),
        (S((M // 4, K), jnp.bfloat16), S((M,), jnp.int32), S((G, K, 72), jnp.float8_e4m3fn),
         S((G, K, 72), jnp.float8_e4m3fn), S((G, 72), jnp.float32), S((G, 72), jnp.float32),
         S((G,), jnp.int32)), 1),
    # A dense FP8 Linear (ling_jax/model/linear.py): one group, at decode and prefill sizes
    "linear_fp8_block_decode": (lambda x, v, sc: fp8_matmul(x, Fp8Weight(v, sc, (128, 128)),
                                                            "pallas"),
                                (S((1, K), jnp.bfloat16), S((1, K, 200), jnp.float8_e4m3fn),
                                 S((1, 2, 2), jnp.float32)), 1),
    "linear_fp8_channel_decode": (lambda x, v, sc: fp8_matmul(x, Fp8Weight(v, sc), "pallas"),
                                  (S((16, K), jnp.bfloat16), S((1, K, 200), jnp.float8_e4m3fn),
                                   S((1, 200), jnp.float32)), 1),
    # (a kernel of over 2^20 weights, as every flash Linear is: tuned_config's pieces of a group)
    "linear_fp8_block_prefill": (lambda x, v, sc: fp8_matmul(x, Fp8Weight(v, sc, (128, 128)),
                                                             "pallas"),
                                 (S((4096, 1536), jnp.bfloat16),
                                  S((1, 1536, 1000), jnp.float8_e4m3fn),
                                  S((1, 12, 8), jnp.float32)), 1),
    "linear_fp8_channel_prefill": (lambda x, v, sc: fp8_matmul(x, Fp8Weight(v, sc), "pallas"),
                                   (S((4096, 1536), jnp.bfloat16),
                                    S((1, 1536, 1000), jnp.float8_e4m3fn),
                                    S((1, 1000), jnp.float32)), 1),
    "simple_gla_fwd_bwd_packed": (
        lambda q, k, v, g, seg: jax.vjp(
            lambda q, k, v: simple_gla_pallas(q, k, v, g, segment_ids=seg)[0], q, k, v)[1](q),
        (S((1, 1000, 4, 64), jnp.bfloat16),) * 3 + (S((4,), jnp.float32), S((1, 1000), jnp.int32)),
        3),
    "mla_flash_fwd_bwd_packed": (  # jax's Pallas flash attention at MLA's head dims (96 / 64)
        lambda qn, qp, kn, kp, v, seg: jax.vjp(
            lambda qn, qp, kn, kp, v: flash_attention(qn, kn, v, scale=0.1, q_rope=qp, k_rope=kp,
                                                      segment_ids=seg), qn, qp, kn, kp, v)[1](v),
        (S((1, 256, 2, 64), jnp.bfloat16), S((1, 256, 2, 32), jnp.bfloat16),
         S((1, 256, 2, 64), jnp.bfloat16), S((1, 256, 32), jnp.bfloat16),
         S((1, 256, 2, 64), jnp.bfloat16), S((1, 256), jnp.int32)),
        3),
    "rms_norm_fwd_bwd_grouped": (  # fp32 in, bf16 compute, two 512-wide slices
        lambda x, w: jax.vjp(lambda x, w: rms_norm_pallas(x, w, NormConfig(1e-6, jnp.bfloat16, 2)),
                             x, w)[1](jnp.ones((256, 1024), jnp.bfloat16)),
        (S((256, 1024), jnp.float32), S((2, 512), jnp.float32)), 2),
    "simple_gla_decode": (
        lambda q, k, v, g, s: simple_gla_step_pallas(q, k, v, g, s),
        (S((2, 4, 128), jnp.bfloat16),) * 3 + (S((4,), jnp.float32), S((2, 4, 128, 128), jnp.float32)),
        1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_lowers_to_verified_triton_for_sm90(name):
  f, args, at_least = CASES[name]
  assert export_for_cuda(f, *args) >= at_least
