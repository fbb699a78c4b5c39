"""The fused QK norm + partial NeoX RoPE (pallas_kernels/qk_norm_rope) against its reference.

The reference is the Lightning layer's own math (rms_norm_reference, then rope.apply_neox), which
the first test pins bitwise. The kernel (Pallas interpret mode on the CPU) must give the same
q, k, v and d qkv as autodiff of the reference up to its own roundings, and dw_q, dw_k as the
float64 sums of the reference's own products (the reference sums them in bf16). The `gpu` test
runs the compiled kernels at ling_small's shape.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.config import ling_small, ling_tiny
from ling_jax.model import rope
from pallas_kernels.qk_norm_rope import Config, qk_norm_rope, qk_norm_rope_reference
from pallas_kernels.rms_norm.reference import rms_norm_reference, rms_normalize
from testing import export_for_cuda, gpu, rel_max

EPS = 1e-6


def packed_positions(B, T, seed):
  """Positions [B, T] that restart at random document boundaries (packed sequences)."""
  rng = np.random.default_rng(seed)
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    starts = np.sort(rng.choice(np.arange(1, T), size=min(3, T - 1), replace=False))
    start = np.maximum.accumulate(np.where(np.isin(np.arange(T), starts), np.arange(T), 0))
    pos[b] = np.arange(T) - start + (0 if b == 0 else rng.integers(0, 1000))
  return jnp.asarray(pos)


def make(seed, B, T, H, K, R, dtype, w_dtype=jnp.float32, theta=10000.0):
  rng = np.random.default_rng(seed)  # NumPy draws: eager jax.random costs a compile per shape
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  qkv = jnp.asarray(1.0 + 2.0 * normal(B, T, 3, H, K), dtype)  # nonzero mean
  wq, wk = (jnp.asarray(1.0 + 0.3 * normal(K), w_dtype) for _ in range(2))
  cos, sin = rope.cos_sin(packed_positions(B, T, seed), R, theta, None)
  cts = tuple(jnp.asarray(normal(B, T, H, K), dtype) for _ in range(3))
  return qkv, wq, wk, cos, sin, cts


# XLA may drop an fp32 -> bf16 -> fp32 round trip (xla_allow_excess_precision), and did in the
# interpreted kernel at some shapes (dw 1.6e-3 off); compiled without that licence, the kernel's
# roundings are the ones it states.
EXACT = {"xla_allow_excess_precision": False, "xla_backend_optimization_level": 0}


def run(f, qkv, wq, wk, cts, options=EXACT):
  """(q, k, v), (d qkv, dwq, dwk) of f(qkv, wq, wk) for the cotangents cts."""
  def fwd_bwd(qkv, wq, wk, cts):
    out, vjp = jax.vjp(f, qkv, wq, wk)
    return out, vjp(cts)
  return jax.jit(fwd_bwd, compiler_options=options)(qkv, wq, wk, cts)


def qkv_ref(qkv, wq, wk, cos, sin, dtype):
  return qk_norm_rope_reference(qkv, wq, wk, cos, sin, eps=EPS, dtype=dtype)


def lightning_math(qkv, wq, wk, cos, sin, dtype):
  """Lightning's lines before the fused op, verbatim (the semantics)."""
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  q = rms_norm_reference(q, wq, eps=EPS, dtype=dtype)
  k = rms_norm_reference(k, wk, eps=EPS, dtype=dtype)
  return rope.apply_neox(q, cos, sin), rope.apply_neox(k, cos, sin), v


def dw_float64(x, w, cos, sin, dout, dtype, options=EXACT):
  """sum over tokens and heads of dy * dtype(x / rms(x)) in float64, with dy the reference's own
  (bf16) cotangent at the norm's output."""
  def parts(x, w, dout):
    y, rope_vjp = jax.vjp(lambda y: rope.apply_neox(y, cos, sin),
                          rms_norm_reference(x, w, eps=EPS, dtype=dtype))
    return rope_vjp(dout)[0], rms_normalize(x.astype(dtype), EPS)
  dy, n = jax.jit(parts, compiler_options=options)(x, w, dout)
  return (np.asarray(dy, np.float64) * np.asarray(n, np.float64)).sum((0, 1, 2))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_reference_is_the_lightning_math_bitwise(dtype):
  qkv, wq, wk, cos, sin, cts = make(0, 2, 24, 4, 16, 8, dtype)
  got = run(lambda *a: qkv_ref(*a, cos, sin, dtype), qkv, wq, wk, cts)
  want = run(lambda *a: lightning_math(*a, cos, sin, dtype), qkv, wq, wk, cts)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


CASES = [  # B, T, H, K, R, dtype, block_t; T * B never a multiple of block_t (a masked tail)
    (2, 37, 4, 16, 8, jnp.bfloat16, 16),     # ling_tiny: R < K
    (1, 45, 8, 128, 64, jnp.bfloat16, 16),   # ling_small's heads: R < K
    (2, 19, 2, 32, 32, jnp.float32, 8),      # R == K, fp32
    (1, 29, 2, 64, 48, jnp.bfloat16, 8),     # R/2 = 24 and K - R = 16: pieces 16 + 8, 16
    (1, 21, 4, 64, 40, jnp.float32, 0),      # R/2 = 20, K - R = 24; the default block
]


@pytest.mark.parametrize("B,T,H,K,R,dtype,bt", CASES)
def test_kernel_interpreted_matches_reference(B, T, H, K, R, dtype, bt):
  qkv, wq, wk, cos, sin, cts = make(K + R + T, B, T, H, K, R, dtype)
  cfg = Config(eps=0.0, dtype=dtype, block_t=bt)
  (q, k, v), (dqkv, dwq, dwk) = run(
      lambda *a: qk_norm_rope(*a, cos, sin, eps=EPS, dtype=dtype, impl="interpret",
                              config=cfg), qkv, wq, wk, cts)
  (q_r, k_r, v_r), (dqkv_r, dwq_r, dwk_r) = run(lambda *a: qkv_ref(*a, cos, sin, dtype),
                                                qkv, wq, wk, cts)
  for a, b in ((q, q_r), (k, k_r), (v, v_r), (dqkv, dqkv_r), (dwq, dwq_r), (dwk, dwk_r)):
    assert a.dtype == b.dtype and a.shape == b.shape
  # the reference's roundings: at most an ulp apart where fp32 sums differ in order
  tol = 1e-6 if dtype == jnp.float32 else 8e-3
  for a, b in ((q, q_r), (k, k_r), (dqkv, dqkv_r)):
    assert rel_max(a, b) < tol
  np.testing.assert_array_equal(np.asarray(v, np.float32), np.asarray(v_r, np.float32))
  # dw: fp32 sums of the same products; the bf16 reference's own sums are ~1e-2 off them
  assert rel_max(dwq, dw_float64(qkv[:, :, 0], wq, cos, sin, cts[0], dtype)) < 1e-5
  assert rel_max(dwk, dw_float64(qkv[:, :, 1], wk, cos, sin, cts[1], dtype)) < 1e-5
  assert rel_max(dwq, dwq_r) < (1e-5 if dtype == jnp.float32 else 4e-2)


def test_kernel_with_fp32_qkv_and_bf16_weights_under_bf16_compute():
  qkv, wq, wk, cos, sin, cts = make(5, 1, 13, 4, 16, 8, jnp.float32, w_dtype=jnp.bfloat16)
  cts = tuple(c.astype(jnp.bfloat16) for c in cts)
  f = lambda impl: lambda *a: qk_norm_rope(*a, cos, sin, eps=EPS, dtype=jnp.bfloat16, impl=impl)
  got, want = run(f("interpret"), qkv, wq, wk, cts), run(f("xla"), qkv, wq, wk, cts)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
  assert all(rel_max(a, b) < 8e-3 for a, b in zip(jax.tree.leaves(got)[:4], jax.tree.leaves(want)[:4]))


def test_without_qk_norm_and_unsupported_heads_use_the_reference():
  qkv, wq, wk, cos, sin, _ = make(1, 1, 9, 4, 16, 8, jnp.bfloat16)
  want = qk_norm_rope_reference(qkv, None, None, cos, sin, eps=EPS, dtype=jnp.bfloat16)
  got = qk_norm_rope(qkv, None, None, cos, sin, eps=EPS, dtype=jnp.bfloat16, impl="pallas")
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  qkv3, wq, wk, cos, sin, _ = make(1, 1, 9, 3, 16, 8, jnp.bfloat16)
  with pytest.warns(UserWarning, match="heads=3"):
    got = qk_norm_rope(qkv3, wq, wk, cos, sin, eps=EPS, dtype=jnp.bfloat16, impl="pallas")
  want = qkv_ref(qkv3, wq, wk, cos, sin, jnp.bfloat16)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # "auto" falls back silently
    qk_norm_rope(qkv3, wq, wk, cos, sin, eps=EPS, dtype=jnp.bfloat16, impl="auto")
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_rejects_bad_input():
  qkv, wq, wk, cos, sin, _ = make(1, 1, 4, 2, 16, 8, jnp.float32)
  kw = dict(eps=EPS, dtype=jnp.float32)
  with pytest.raises(ValueError, match="impl"):
    qk_norm_rope(qkv, wq, wk, cos, sin, impl="triton", **kw)
  with pytest.raises(ValueError, match=r"\[B, T, 3, H, K\]"):
    qk_norm_rope(qkv[:, :, :2], wq, wk, cos, sin, **kw)
  with pytest.raises(ValueError, match="cos"):
    qk_norm_rope(qkv, wq, wk, jnp.concatenate([cos] * 3, -1), jnp.concatenate([sin] * 3, -1), **kw)
  with pytest.raises(ValueError, match="both"):
    qk_norm_rope(qkv, wq, None, cos, sin, **kw)
  with pytest.raises(ValueError, match=r"\[K\]"):
    qk_norm_rope(qkv, wq[:8], wk, cos, sin, **kw)


@pytest.mark.parametrize("cfg", [ling_small(), ling_tiny()], ids=["ling_small", "ling_tiny"])
def test_kernels_lower_to_verified_triton_for_sm90(cfg):
  """Forward and backward at the presets' head shapes (rotary_dim 64 of 128, 8 of 16), a tail."""
  S = jax.ShapeDtypeStruct
  H, K, R, N = cfg.num_attention_heads, cfg.head_dim, cfg.rotary_dim, 1000
  config = Config(EPS, jnp.dtype(jnp.bfloat16))

  def f(qkv, wq, wk, cos, sin):
    out, vjp = jax.vjp(lambda *a: qk_norm_rope(*a, cos, sin, eps=EPS, dtype=jnp.bfloat16,
                                               impl="pallas", config=config),
                       qkv, wq, wk)
    return out, vjp(out)

  assert export_for_cuda(f, S((1, N, 3, H, K), jnp.bfloat16), S((K,), jnp.float32),
                         S((K,), jnp.float32), S((1, N, R // 2), jnp.float32),
                         S((1, N, R // 2), jnp.float32)) == 2


@gpu
def test_gpu_qk_norm_rope_ling_small():
  """The compiled kernels at ling_small's training shape against the reference, both compiled
  as the model would be (XLA's default options)."""
  cfg = ling_small()
  B, T, H, K, R = 8, 4096, cfg.num_attention_heads, cfg.head_dim, cfg.rotary_dim
  qkv, wq, wk, cos, sin, cts = make(7, B, T, H, K, R, jnp.bfloat16, theta=cfg.rope_theta)
  f = lambda impl: run(lambda *a: qk_norm_rope(*a, cos, sin, eps=EPS, dtype=jnp.bfloat16,
                                               impl=impl), qkv, wq, wk, cts, options=None)
  (q, k, v), (dqkv, dwq, dwk) = f("pallas")
  (q_r, k_r, v_r), (dqkv_r, dwq_r, dwk_r) = f("xla")
  for a, b in ((q, q_r), (k, k_r), (dqkv, dqkv_r)):
    assert rel_max(a, b) < 1e-2
  assert rel_max(v, v_r) == 0.0
  # the reference's own products, summed in float64: fp32 sums are ~1e-6 off them; a bf16
  # rounding dropped on the way (as XLA may) would be ~1.5e-3 off; the bf16 reference is ~1e-2
  exact = {"xla_allow_excess_precision": False}
  assert rel_max(dwq, dw_float64(qkv[:, :, 0], wq, cos, sin, cts[0], jnp.bfloat16, exact)) < 1e-3
  assert rel_max(dwk, dw_float64(qkv[:, :, 1], wk, cos, sin, cts[1], jnp.bfloat16, exact)) < 1e-3
  assert rel_max(dwq, dwq_r) < 4e-2
