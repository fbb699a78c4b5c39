"""The Pallas RMSNorm (pallas_kernels/rms_norm) against float64 NumPy and the XLA reference.

y and dx must match autodiff of the reference to about its own rounding; dw is checked against
float64, where the kernel's fp32 accumulation beats the reference's bf16 one. Interpret mode on
the CPU; the `gpu` tests run the compiled kernels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rms_norm import Config, rms_norm, supported
from testing import gpu, random_model, random_tokens, rel_max

EPS = 1e-6


def make(seed, lead, D, G, x_dtype, dtype):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = (2.0 + 3.0 * jax.random.normal(k[0], (*lead, D))).astype(x_dtype)  # nonzero mean
  w = 1.0 + 0.5 * jax.random.normal(k[1], (G, D // G) if G > 1 else (D,))
  dy = jax.random.normal(k[2], (*lead, D)).astype(dtype)
  return x, w, dy


def numpy_norm(x, w, dy, G):
  """float64 y and the exact grads of y = w * x / rms(x) per slice (no roundings)."""
  *lead, D = x.shape
  x = np.asarray(x, np.float64).reshape(-1, G, D // G)
  w = np.asarray(w, np.float64).reshape(G, D // G)
  dy = np.asarray(dy, np.float64).reshape(-1, G, D // G)
  r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)
  xhat = x * r
  d = dy * w
  dx = r * (d - xhat * (d * xhat).mean(-1, keepdims=True))
  return ((w * xhat).reshape(*lead, D), dx.reshape(*lead, D),
          (dy * xhat).sum(0).reshape((G, D // G) if G > 1 else (D,)))


def run(impl, x, w, dy, G, dtype):
  f = lambda x, w: rms_norm(x, w, eps=EPS, dtype=dtype, groups=G, impl=impl)
  y, vjp = jax.vjp(f, x, w)
  return (y, *vjp(dy))


CASES = [  # lead, D, groups, x dtype, compute dtype
    ((2, 64), 256, 1, jnp.float32, jnp.bfloat16),    # fp32 residual stream, bf16 compute
    ((128,), 512, 2, jnp.bfloat16, jnp.bfloat16),    # GroupRMSNorm: two 256-wide slices
    ((2, 32, 4), 128, 1, jnp.bfloat16, jnp.bfloat16),  # per-head QK norm
    ((64,), 64, 1, jnp.float32, jnp.float32),
]


@pytest.mark.parametrize("lead,D,G,x_dtype,dtype", CASES)
def test_rms_norm_kernel_interpreted(lead, D, G, x_dtype, dtype):
  x, w, dy = make(D + G, lead, D, G, x_dtype, dtype)
  y, dx, dw = run("interpret", x, w, dy, G, dtype)
  y_ref, dx_ref, dw_ref = run("xla", x, w, dy, G, dtype)
  assert y.dtype == dtype and dx.dtype == x_dtype and dw.dtype == w.dtype and dw.shape == w.shape
  # the same roundings as the reference: at most an ulp apart where fp32 sums differ in order
  assert rel_max(y, y_ref) < (1e-6 if dtype == jnp.float32 else 4e-3)
  assert rel_max(dx, dx_ref) < (1e-6 if dtype == jnp.float32 else 1e-2)
  y64, dx64, dw64 = numpy_norm(x.astype(dtype), w.astype(dtype), dy, G)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  assert rel_max(y, y64) < tol and rel_max(dx, dx64) < tol
  # dw: fp32 sums of dy * (x / rms) rounded to the compute dtype (XLA may keep that rounding or
  # not); the reference's bf16 autodiff is 0.8-1.2e-2 off here
  assert rel_max(dw, dw64) < (1e-5 if dtype == jnp.float32 else 4e-3)


def test_rms_norm_falls_back_where_the_kernel_does_not_apply():
  """A width that is not a power of two (MLA's q_lora_rank 384) or rows that do not fill a block
  run the reference; the results agree either way."""
  for lead, D in (((64,), 384), ((5,), 256)):
    x, w, dy = make(1, lead, D, 1, jnp.bfloat16, jnp.bfloat16)
    assert not supported(int(np.prod(lead)), D, Config(eps=EPS, dtype=jnp.bfloat16))
    for a, b in zip(run("interpret", x, w, dy, 1, jnp.bfloat16),
                    run("xla", x, w, dy, 1, jnp.bfloat16)):
      assert rel_max(a, b) == 0.0


def test_rms_norm_rejects_bad_input():
  x = jnp.ones((4, 96))
  with pytest.raises(ValueError, match="impl"):
    rms_norm(x, jnp.ones(96), eps=EPS, dtype=jnp.float32, impl="triton")
  with pytest.raises(ValueError, match="groups"):
    rms_norm(x, jnp.ones(96), eps=EPS, dtype=jnp.float32, groups=5)
  with pytest.raises(ValueError, match="weight"):
    rms_norm(x, jnp.ones(48), eps=EPS, dtype=jnp.float32)


@gpu
@pytest.mark.parametrize("lead,D,G,x_dtype,dtype", CASES + [((8, 4096), 1024, 1, jnp.float32,
                                                             jnp.bfloat16)])
def test_gpu_rms_norm(lead, D, G, x_dtype, dtype):
  x, w, dy = make(D, lead, D, G, x_dtype, dtype)
  got = jax.jit(lambda *a: run("pallas", *a, G, dtype))(x, w, dy)
  want = jax.jit(lambda *a: run("xla", *a, G, dtype))(x, w, dy)
  assert rel_max(got[0], want[0]) < 1e-2 and rel_max(got[1], want[1]) < 1e-2
  tol = 1e-5 if dtype == jnp.float32 else 4e-3
  assert rel_max(got[2], numpy_norm(x.astype(dtype), w.astype(dtype), dy, G)[2]) < tol


def test_model_with_pallas_norms_matches_xla():
  """Every RMSNorm / GroupRMSNorm of a tiny Ling switched to the interpreted kernels: the same
  logits and parameter gradients as the default XLA norms (bf16 compute)."""
  from flax import nnx

  from ling_jax.config import ling_tiny
  from ling_jax.model import Kernels
  from ling_jax.model.common import GroupRMSNorm, RMSNorm

  cfg = ling_tiny(num_hidden_layers=2)  # one hybrid group: every kind of norm
  model = random_model(cfg, seed=3, dtype=jnp.bfloat16, kernels=Kernels(lightning="xla"))
  tokens = random_tokens(cfg, (2, 64), seed=4)

  def loss_and_grads(impl):
    norms = [m for _, m in model.iter_modules() if isinstance(m, (RMSNorm, GroupRMSNorm))]
    for m in norms:
      m.impl = impl
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      logits = nnx.merge(graphdef, params, rest)(tokens)[0]
      return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0]), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return len(norms), logits, jax.tree.leaves(grads)

  n, logits, grads = loss_and_grads("interpret")
  n_ref, logits_ref, grads_ref = loss_and_grads("xla")
  assert n == n_ref > 10
  assert rel_max(logits, logits_ref) < 2e-2
  checked = 0
  for g, g_ref in zip(grads, grads_ref):
    if np.abs(np.asarray(g_ref)).max() == 0:  # parameters this loss does not reach (MTP)
      assert np.abs(np.asarray(g)).max() == 0
      continue
    assert rel_max(g, g_ref) < 5e-2
    checked += 1
  assert checked > 20
