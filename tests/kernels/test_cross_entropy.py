"""The fused cross-entropy kernel (pallas_kernels/cross_entropy) against float64 NumPy and its
jnp reference, and the chunked LM-head loss (train/loss.py) with the kernel against its XLA path.

Interpret mode on the CPU (small shapes: tails in V and in the rows, masked rows, targets at the
first and last column); the lowering test exports the kernels for sm_90 here; the `gpu` tests run
the compiled kernel at the head's vocabulary.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.train.loss import head_ce
from pallas_kernels.cross_entropy import (Config, cross_entropy, cross_entropy_pallas,
                                          cross_entropy_reference)
from testing import export_for_cuda, gpu


def make(seed, C, V, scale=4.0):
  """Random logits (offset and spread so that lse is far from the max and from 0), targets with
  the first row at column 0 and the second at V - 1, a mask with zeros and one weight of 0.5."""
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = 3.0 + scale * jax.random.normal(k[0], (C, V), jnp.float32)
  t = jax.random.randint(k[1], (C,), 0, V).at[0].set(0).at[1].set(V - 1)
  m = (jax.random.uniform(k[2], (C,)) > 0.3).astype(jnp.float32).at[:2].set(1.0).at[2].set(0.5)
  return x, t, m


def numpy_ce(x, t, m):
  """float64 (g, lse, ce) of reference.py's formulas."""
  x, t, m = np.asarray(x, np.float64), np.asarray(t), np.asarray(m, np.float64)
  top = x.max(1, keepdims=True)
  lse = np.log(np.exp(x - top).sum(1)) + top[:, 0]
  onehot = np.arange(x.shape[1])[None, :] == t[:, None]
  g = (np.exp(x - lse[:, None]) - onehot) * m[:, None]
  return g, lse, (lse - x[np.arange(len(t)), t]) * m


def close(got, want, rtol, atol):
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                             rtol=rtol, atol=atol)


def check(got, x, t, m, grad_dtype, lse_tol=2e-6):
  g, lse, ce = got
  g64, lse64, ce64 = numpy_ce(x, t, m)
  close(lse, lse64, 0, lse_tol * np.abs(lse64).max())
  close(ce, ce64, 0, lse_tol * np.abs(lse64).max())
  if grad_dtype is None:
    assert g is None
    return
  assert g.dtype == grad_dtype and g.shape == x.shape
  # one rounding to bf16 (2^-9 relative; 2^-8 leaves room for fp32's exp error before it)
  rtol, atol = (2e-5, 1e-7) if grad_dtype == jnp.float32 else (2.0 ** -8, 1e-7)
  close(g, g64, rtol, atol)
  assert not np.asarray(g, np.float32)[np.asarray(m) == 0].any()  # masked rows: g is exactly 0


CASES = [  # rows, vocab, kernel config, gradient dtype
    (37, 200, Config(block_rows=2, block_v=64), jnp.bfloat16),  # tails in rows and in V
    (13, 300, Config(block_rows=4, block_v=32, programs_per_sm=0), jnp.float32),  # grid = blocks
    (24, 256, Config(block_rows=2, block_v=64, l2_hints=False), jnp.bfloat16),  # no tails
    (11, 100, Config(block_v=128), jnp.bfloat16),  # one block covers V: the one-read path
    (9, 1, Config(), jnp.float32),  # V = 1: lse is the logit, ce and g are 0
    (37, 200, Config(block_rows=2, block_v=64), None),  # the value alone
]


@pytest.mark.parametrize("C,V,cfg,grad_dtype", CASES)
def test_cross_entropy_kernel_interpreted(C, V, cfg, grad_dtype):
  x, t, m = make(C + V, C, V)
  got, want = jax.jit(lambda *a: (
      cross_entropy_pallas(*a, cfg._replace(interpret=True), grad_dtype=grad_dtype),
      cross_entropy_reference(*a, grad_dtype=grad_dtype)))(x, t, m)
  check(got, x, t, m, grad_dtype)
  for a, b in zip(got[1:], want[1:]):  # fp32 sums in another order: a few ulps of lse
    close(a, b, 0, 4e-6 * np.abs(want[1]).max())
  if grad_dtype is not None:  # the same formula rounded once: at most an ulp apart
    close(got[0], want[0], 2.0 ** -7 if grad_dtype == jnp.bfloat16 else 2e-5, 1e-7)


def test_cross_entropy_op_dispatch():
  x, t, m = make(0, 10, 70)
  got, want = jax.jit(lambda *a: (cross_entropy(*a, impl="interpret",
                                                 config=Config(block_v=32)),
                                   cross_entropy(*a, impl="xla")))(x, t, m)
  for a, b in zip(got, want):
    close(a, b, 2.0 ** -7, 1e-5)
  with pytest.raises(ValueError, match="impl"):
    cross_entropy(x, t, m, impl="triton")
  with pytest.raises(ValueError, match="powers of two"):
    cross_entropy_pallas(x, t, m, Config(block_v=48, interpret=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_ce_kernel_matches_xla(dtype):
  """head_ce's value (primal, no gradient) and its gradients with the interpreted kernel against
  the XLA path: 45 tokens in 16-token chunks (a padded last chunk), vocab 200 in 64-wide blocks."""
  k = jax.random.split(jax.random.PRNGKey(7), 2)
  N, D, V = 45, 32, 200
  h = jax.random.normal(k[0], (N, D))
  w = 3.0 * D ** -0.5 * jax.random.normal(k[1], (D, V))
  _, t, m = make(1, N, V)
  kernel = Config(block_rows=2, block_v=64)

  def run(impl):
    f = lambda h, w: head_ce(h, w, t, m, 16, dtype, impl, kernel)
    value, (value_g, grads) = jax.jit(
        lambda h, w: (f(h, w), jax.value_and_grad(f, argnums=(0, 1))(h, w)))(h, w)
    return value, value_g, *grads

  got, want = run("interpret"), run("xla")
  close(got[0], got[1], 1e-6, 0)
  close(got[0], want[0], 1e-6, 0)
  close(got[1], want[1], 1e-6, 0)
  # g is rounded to dtype before the gradient matmuls: bf16 roundings of equal fp32 values
  # can differ by an ulp where the two paths' exps differ in the last bit
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for a, b in zip(got[2:], want[2:]):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol


def test_cross_entropy_kernel_lowers_for_sm90():
  """The Triton lowering (not run by interpret mode) at the head's shape with the default config
  and with the one-read config, the value-only kernel, and tails in rows and V."""
  S = jax.ShapeDtypeStruct
  for C, V, cfg, grad_dtype in [
      (8192, 32768, Config(), jnp.bfloat16),
      (8192, 32768, Config(block_v=32768, num_warps=32), jnp.bfloat16),
      (8192, 32768, Config(), None),
      (37, 200, Config(block_rows=2, block_v=64, num_stages=2), jnp.float32)]:
    f = lambda x, t, m: cross_entropy_pallas(x, t, m, cfg, grad_dtype=grad_dtype)
    assert export_for_cuda(f, S((C, V), jnp.float32), S((C,), jnp.int32),
                           S((C,), jnp.float32)) == 1


@gpu
@pytest.mark.parametrize("C,V,cfg", [
    (1000, 32768, Config()),
    (1000, 32768, Config(block_v=32768, num_warps=32)),
    (1000, 32768, Config(block_rows=2, block_v=4096, num_warps=8, programs_per_sm=0)),
    (300, 50257, Config()),
])
def test_gpu_cross_entropy(C, V, cfg):
  x, t, m = make(V, C, V)
  got = jax.jit(lambda *a: cross_entropy_pallas(*a, cfg))(x, t, m)
  want = jax.jit(lambda *a: cross_entropy_reference(*a))(x, t, m)
  check(got, x, t, m, jnp.bfloat16, lse_tol=1e-5)  # ex2.approx, lg2 on the GPU
  for a, b in zip(got[1:], want[1:]):
    close(a, b, 0, 1e-5 * np.abs(want[1]).max())
  close(got[0], want[0], 2.0 ** -7, 1e-6)
