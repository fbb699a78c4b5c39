"""FP8 expert weights in the grouped matmul (pallas_kernels/grouped_matmul/fp8.py): the Triton
kernels dequantising in the kernel, both scale schemes, against float64 NumPy and against the
bf16 kernels on the dequantised weights.

The float64 reference dequantises values x scale exactly and multiplies in float64. On the CPU
the kernels run in interpret mode; the `gpu` test compiles them (skipped without a GPU).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import (Config, Fp8Weight, dequantize, gmm, gmm_glu,
                                           gmm_glu_pallas, gmm_glu_reference, gmm_pallas,
                                           gmm_sum_pallas, grouped_matmul)
from testing import gpu, rel, rel_max

CFG = Config(block_m=32, block_n=64, block_k=64, block_n_glu=64, interpret=True)
SCHEMES = {"block": (128, 128), "channel": None}


def random_fp8(rng, shape, block):
  """An Fp8Weight [G, K, N]: e4m3 values rounded from random floats spanning 2^-3 .. 2^4 (and
  clipped to the format's +-448), random positive fp32 scales spanning 2^-10 .. 2^-2."""
  G, K, N = shape
  v = np.clip(rng.standard_normal(shape) * 2.0 ** rng.integers(-3, 5, shape), -448, 448)
  s_shape = (G, N) if block is None else (G, -(-K // block[0]), -(-N // block[1]))
  return Fp8Weight(jnp.asarray(v, jnp.float8_e4m3fn),
                   jnp.asarray(2.0 ** rng.uniform(-10, -2, s_shape), jnp.float32), block)


def np_weight(w: Fp8Weight) -> np.ndarray:
  """values x scale in float64 (exact), [G, K, N]."""
  v, s = np.asarray(w.values, np.float64), np.asarray(w.scale, np.float64)
  if w.block is None:
    return v * s[:, None, :]
  K, N = v.shape[1:]
  s = np.repeat(np.repeat(s, w.block[0], axis=1)[:, :K], w.block[1], axis=2)[:, :, :N]
  return v * s


def np_grouped(x, w, sizes):
  """out[m] = x[m] @ w[g(m)] in float64; rows past sum(sizes) stay zero."""
  x = np.asarray(x, np.float64)
  out, start = np.zeros((x.shape[0], w.shape[2])), 0
  for g, n in enumerate(sizes):
    out[start:start + n] = x[start:start + n] @ w[g]
    start += n
  return out


def routing(rng, M, G, past):
  """Group sizes [G] over M - past rows, group 1 empty (rows past the groups: `past`)."""
  sizes = np.bincount(rng.integers(0, G - 1, M - past), minlength=G - 1)
  return np.insert(sizes, 1, 0)


# block_n 64: a column tile inside one 128-wide scale block; 256: across two
@pytest.mark.parametrize("scheme,dtype,block_n", [
    ("block", jnp.float32, 64), ("block", jnp.bfloat16, 256), ("channel", jnp.float32, 256),
    ("channel", jnp.bfloat16, 64)])
def test_fp8_gmm_matches_float64_and_the_dequantised_bf16_kernel(scheme, dtype, block_n):
  rng = np.random.default_rng(block_n + len(scheme))
  M, K, N, G = 64, 256, 256, 4
  sizes = routing(rng, M, G, past=5)
  gs = jnp.asarray(sizes, jnp.int32)
  w = random_fp8(rng, (G, K, N), SCHEMES[scheme])
  x = jnp.asarray(rng.standard_normal((M, K)), dtype)
  cfg = CFG._replace(block_n=block_n)
  out = gmm_pallas(x, w, gs, cfg)
  want = np_grouped(x, np_weight(w), sizes)
  assert out.dtype == dtype
  assert (np.asarray(out[M - 5:], np.float32) == 0).all()  # rows of no group
  # fp32: only fp32 rounding. bf16: the output's rounding, plus (block-scaled) each dequantised
  # weight's, as in the dequantised checkpoint.
  assert rel(out, want) < (1e-6 if dtype == jnp.float32 else 5e-3)
  assert rel_max(out, want) < (1e-6 if dtype == jnp.float32 else 8e-3)
  # Against the same kernel on the dequantised weights (rounded to the compute dtype once):
  # block-scaled tiles are scaled and rounded exactly as that checkpoint's, so equal bit for bit;
  # channel-wise scales the fp32 accumulator instead, which differs by the weights' rounding.
  plain = gmm_pallas(x, dequantize(w, dtype), gs, cfg)
  if scheme == "block":
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(plain, np.float32))
  else:
    assert rel(out, plain) < (1e-6 if dtype == jnp.float32 else 5e-3)
  # the jnp reference (dequantised in fp32) and the public op's two impls
  ref = grouped_matmul(x, w, gs, impl="reference")
  assert rel(ref, want) < (1e-6 if dtype == jnp.float32 else 5e-3)
  np.testing.assert_array_equal(
      np.asarray(grouped_matmul(x, w, gs, impl="interpret", config=cfg), np.float32),
      np.asarray(out, np.float32))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_fp8_gmm_glu_matches_float64(scheme):
  """The fused gate/up + SwiGLU on gathered token rows, bf16, with partial scale blocks and tiles
  in both dims (K 192 = 1.5 blocks, F 160 = 1.25 blocks and 2.5 column tiles), an empty group
  and rows past the groups; also through the `gmm_glu` op, and the down projection after it."""
  rng = np.random.default_rng(len(scheme))
  T, M, K, F, G = 24, 60, 192, 160, 4
  sizes = routing(rng, M, G, past=4)
  gs = jnp.asarray(sizes, jnp.int32)
  rows = rng.integers(0, T, M)  # row r reads token rows[r]
  r = jnp.asarray(rows, jnp.int32)
  wg, wu = (random_fp8(rng, (G, K, F), SCHEMES[scheme]) for _ in range(2))
  wd = random_fp8(rng, (G, F, K), SCHEMES[scheme])
  x = jnp.asarray(rng.standard_normal((T, K)), jnp.bfloat16)
  xs = np.asarray(x, np.float64)[rows]
  g, u = np_grouped(xs, np_weight(wg), sizes), np_grouped(xs, np_weight(wu), sizes)
  want = g / (1 + np.exp(-g)) * u
  h, gate, up = gmm_glu_pallas(x, wg, wu, gs, CFG, lhs_rows=r, save_gate_up=True)
  assert h.dtype == jnp.bfloat16 and (np.asarray(h[M - 4:], np.float32) == 0).all()
  assert rel(gate, g) < 5e-3 and rel(up, u) < 5e-3
  assert rel(h, want) < 1e-2 and rel_max(h, want) < 1e-2
  op = gmm_glu(x, r, None, wg, wu, gs, CFG)
  np.testing.assert_array_equal(np.asarray(op, np.float32), np.asarray(h, np.float32))
  plain = gmm_glu_pallas(x, dequantize(wg, jnp.bfloat16), dequantize(wu, jnp.bfloat16), gs, CFG,
                         lhs_rows=r)
  if scheme == "block":  # bit for bit, as for gmm
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(plain, np.float32))
  else:
    assert rel(h, plain) < 1e-2
  assert rel(gmm_glu_reference(x, r, wg, wu, gs), want) < 1e-2
  down = gmm(h, wd, gs, CFG)  # [M, K]
  assert rel(down, np_grouped(np.asarray(h, np.float64), np_weight(wd), sizes)) < 5e-3


DECODE_VARIANTS = {"swap_ab": dict(swap_ab=True), "one_row": dict(block_m=1, k_unroll=2)}


@pytest.mark.parametrize("variant", list(DECODE_VARIANTS))
@pytest.mark.parametrize("scheme", [*SCHEMES, "bf16"])
def test_decode_variants_give_the_same_products(scheme, variant):
  """The decode-sized kernels: Config.swap_ab (each tile accumulated as w^T @ x^T) and one-row
  visits (block_m 1: products as multiply-and-sum, two K-steps a loop step): gmm, the fused
  gate/up on gathered rows and (bf16 weights) the transposed-weight gmm and the two-product
  kernel, at decode-like groups of 0-3 rows, against float64 and the 16-row dot kernel."""
  rng = np.random.default_rng(7 + len(scheme))
  T, M, K, N, G = 6, 12, 256, 192, 5
  sizes = np.array([3, 0, 2, 1, 3])  # 9 rows in groups, 3 past them
  gs = jnp.asarray(sizes, jnp.int32)
  rows = jnp.asarray(rng.integers(0, T, M), jnp.int32)
  if scheme == "bf16":
    wg, wu, wd = (jnp.asarray(rng.standard_normal(s) / 16, jnp.float32)
                  for s in ((G, K, N), (G, K, N), (G, N, K)))
    np_w = lambda w: np.asarray(w, np.float64)
  else:
    wg, wu, wd = (random_fp8(rng, s, SCHEMES[scheme]) for s in ((G, K, N), (G, K, N), (G, N, K)))
    np_w = np_weight
  x = jnp.asarray(rng.standard_normal((T, K)), jnp.float32)
  xs = np.asarray(x, np.float64)[np.asarray(rows)]
  cfg = CFG._replace(block_m=16, block_n=64, block_n_glu=64)
  swapped = cfg._replace(**DECODE_VARIANTS[variant])
  g, u = np_grouped(xs, np_w(wg), sizes), np_grouped(xs, np_w(wu), sizes)
  h_want = g / (1 + np.exp(-g)) * u
  hs = [gmm_glu_pallas(x, wg, wu, gs, c, lhs_rows=rows) for c in (cfg, swapped)]
  assert rel(hs[1], h_want) < 1e-5 and rel(hs[1], hs[0]) < 1e-6
  assert (np.asarray(hs[1][9:]) == 0).all()  # rows past the groups
  downs = [gmm_pallas(hs[1], wd, gs, c) for c in (cfg, swapped)]
  want = np_grouped(np.asarray(hs[1], np.float64), np_w(wd), sizes)
  assert rel(downs[1], want) < 1e-6 and rel(downs[1], downs[0]) < 1e-6
  if scheme == "bf16":  # the weights as [G, N, K], contracted on their second axis; and the
    # two-product kernel of the gate/up backward
    wt = jnp.swapaxes(wd, 1, 2)
    got = gmm_pallas(hs[1], wt, gs, swapped, transpose_rhs=True)
    assert rel(got, want) < 1e-6
    h2 = jnp.flip(hs[1], axis=0)
    both = gmm_sum_pallas(hs[1], h2, wd, wd * 0.5, gs, swapped)
    want2 = want + np_grouped(np.asarray(h2, np.float64), np_w(wd) * 0.5, sizes)
    assert rel(both, want2) < 1e-6


def test_fp8_weights_refuse_gradients():
  """Differentiating through an FP8 product is an error that says why; a forward under jit and
  a gradient that does not reach the FP8 op are fine."""
  rng = np.random.default_rng(3)
  gs = jnp.asarray([20, 0, 12], jnp.int32)
  w = random_fp8(rng, (3, 128, 128), (128, 128))
  x = jnp.asarray(rng.standard_normal((32, 128)), jnp.float32)
  r = jnp.arange(32, dtype=jnp.int32)
  with pytest.raises(ValueError, match="gmm with FP8 weights .* no gradient"):
    jax.grad(lambda x: gmm(x, w, gs, CFG).sum())(x)
  with pytest.raises(ValueError, match="gmm_glu with FP8 weights .* no gradient"):
    jax.grad(lambda x: gmm_glu(x, r, None, w, w, gs, CFG).sum())(x)
  with pytest.raises(ValueError, match="no gradient"):
    jax.grad(lambda x: grouped_matmul(x, w, gs, impl="interpret", config=CFG).sum())(x)
  out = jax.jit(lambda x, w: gmm(x, w, gs, CFG))(x, w)  # Fp8Weight is a pytree: jit takes it
  assert rel(out, np_grouped(x, np_weight(w), [20, 0, 12])) < 1e-6
  c = jnp.float32(2.0)
  dc = jax.grad(lambda c: (c * gmm(x, w, gs, CFG)).sum())(c)
  assert rel(dc, out.sum()) < 1e-5


def test_bad_fp8_weights_are_refused():
  rng = np.random.default_rng(4)
  gs = jnp.asarray([8, 8], jnp.int32)
  x = jnp.ones((16, 128), jnp.bfloat16)
  w = random_fp8(rng, (2, 128, 256), (128, 128))
  ch = random_fp8(rng, (2, 128, 256), None)
  bf = jnp.ones((2, 128, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"scale is float32\[2, 256\].* must be float \[2, 1, 2\]"):
    gmm_pallas(x, Fp8Weight(w.values, ch.scale, (128, 128)), gs, CFG)
  with pytest.raises(ValueError, match=r"channel-wise: \[G, N\]\) it must be float \[2, 256\]"):
    gmm_pallas(x, Fp8Weight(w.values, w.scale, None), gs, CFG)
  with pytest.raises(ValueError, match="values is bfloat16.* must be float8_e4m3fn"):
    gmm_pallas(x, Fp8Weight(bf, ch.scale, None), gs, CFG)
  with pytest.raises(ValueError, match="block is 128"):
    gmm_pallas(x, Fp8Weight(w.values, ch.scale, 128), gs, CFG)
  with pytest.raises(ValueError, match="weight 1 is not FP8"):
    gmm_glu_pallas(x, w, bf, gs, CFG)
  with pytest.raises(ValueError, match=r"weight 1 is FP8 with block None"):
    gmm_glu_pallas(x, w, ch, gs, CFG)
  with pytest.raises(ValueError, match="untransposed only"):
    gmm_pallas(jnp.ones((16, 256), jnp.bfloat16), w, gs, CFG, transpose_rhs=True)
  # a 32-row scale block under the default 64-row contraction tile of bf16 operands
  small = Fp8Weight(w.values, jnp.ones((2, 4, 2), jnp.float32), (32, 128))
  with pytest.raises(ValueError, match="tile of 64 rows .* does not divide .* 32 rows"):
    gmm_pallas(x, small, gs, CFG)
  out = gmm_pallas(x, small, gs, CFG._replace(block_k=32))  # a 32-row tile fits
  assert rel(out, np_grouped(x, np_weight(small), [8, 8])) < 5e-3


def test_the_benchmark_runs_tiny_in_interpret_mode():
  """benchmarks/fp8_experts.py --tiny: the same code the GPU runs, at a toy shape, on the CPU."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
  res = subprocess.run([sys.executable, "-m", "benchmarks.fp8_experts", "--tiny"], cwd=root,
                       env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [l for l in res.stdout.splitlines() if l.startswith("| ") and "tokens" not in l]
  assert len(rows) == 3 and all("nan" not in l for l in rows), res.stdout


# ----------------------------------------------------------------------------- on the GPU


@gpu
def test_gpu_every_fp8_value_converts_exactly_in_a_triton_kernel():
  """All 256 e4m3 bit patterns cast to bf16 and to fp32 inside a compiled Triton kernel equal
  XLA's casts (every e4m3 value, subnormals included, is exact in both; NaN stays NaN). The
  channel-wise kernels convert their fp8 tiles before the dot, the block-scaled ones to fp32
  for the scale: this isolates the cast from the matmuls."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plt
  v = jax.lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8), jnp.float8_e4m3fn)

  def kernel(v_ref, b_ref, f_ref):
    b_ref[...] = v_ref[...].astype(jnp.bfloat16)
    f_ref[...] = v_ref[...].astype(jnp.float32)

  b, f = pl.pallas_call(kernel, out_shape=[jax.ShapeDtypeStruct((256,), jnp.bfloat16),
                                           jax.ShapeDtypeStruct((256,), jnp.float32)],
                        compiler_params=plt.CompilerParams(num_warps=4))(v)
  np.testing.assert_array_equal(np.asarray(f), np.asarray(v.astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(b, np.float32),
                                np.asarray(v.astype(jnp.bfloat16), np.float32))


@gpu
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("widths", ["flash", "small"])
def test_gpu_fp8_experts_match_the_dequantised_bf16_kernels(scheme, widths):
  """Compiled at Ling-2.6-flash's expert widths (D 4096, F 1024; 8 experts, top-8) and at
  ling_small's (D 1024, F 576; 32 experts, top-4), under the decode tiles and the default ones:
  gate/up and down with FP8 weights against float64 and against the bf16 kernels on the
  dequantised weights."""
  from pallas_kernels.grouped_matmul import tuned_config
  rng = np.random.default_rng(12)
  T, X, K, F, G = (256, 8, 4096, 1024, 8) if widths == "flash" else (1024, 4, 1024, 576, 32)
  M = T * X
  sizes = routing(rng, M, G, past=0)
  gs = jnp.asarray(sizes, jnp.int32)
  rows = jnp.asarray(rng.integers(0, T, M), jnp.int32)
  wg, wu = (random_fp8(rng, (G, K, F), SCHEMES[scheme]) for _ in range(2))
  wd = random_fp8(rng, (G, F, K), SCHEMES[scheme])
  x = jnp.asarray(rng.standard_normal((T, K)) * 0.1, jnp.bfloat16)
  for cfg in (tuned_config(K, F, 8), tuned_config(K, F, M / G)):
    fwd = jax.jit(lambda x, a, b, d: gmm(gmm_glu(x, rows, None, a, b, gs, cfg), d, gs, cfg))
    out = fwd(x, wg, wu, wd)
    deq = [dequantize(w, jnp.bfloat16) for w in (wg, wu, wd)]
    plain = fwd(x, *deq)
    xs = np.asarray(x, np.float64)[np.asarray(rows)]
    g, u = (np_grouped(xs, np_weight(w), sizes) for w in (wg, wu))
    h_want = g / (1 + np.exp(-g)) * u
    h = jax.jit(lambda x, a, b: gmm_glu(x, rows, None, a, b, gs, cfg))(x, wg, wu)
    want = np_grouped(h_want, np_weight(wd), sizes)
    # the gate/up half alone first, so that a failure says which kernel
    assert rel(h, h_want) < 2e-2, (cfg, rel(h, h_want))
    assert rel(out, want) < 2e-2 and rel(out, plain) < 2e-2, (cfg, rel(out, want), rel(out, plain))
