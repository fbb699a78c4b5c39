"""The Mosaic GPU weight-gradient kernel (pallas_kernels/grouped_matmul/mosaic_tgmm.py) on CPU.

The kernel runs in jax's Mosaic GPU interpreter (race detector on) against the float64 NumPy
reference of testing.py; its lowering for an H100 is checked with jax.export.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul.mosaic_tgmm import tgmm
from testing import np_tgmm, random_sizes, rel

CASES = [  # (M, K, N, group sizes: a random_sizes kind with G or a list; rows past them; tiles)
    # uniform groups; 2 x 2 output tiles a group, so the K- and N-block offsets matter
    (300, 256, 256, ("uniform", 5), 20, {}),
    # skewed: several empty groups; consumers split the columns of a [64, 256] tile
    (200, 64, 256, ("skewed", 6), 0, dict(split="n", block_k=64, block_n=256)),
    # one heavy group among tiny and empty ones; 128-row steps, a 2-slot ring
    (272, 128, 128, [2, 0, 237, 5, 0, 9], 19, dict(block_m=128, stages=2)),
    # every row in one group, the others empty
    (256, 128, 128, ("one_group", 4), 0, dict(stages=3)),
    # fewer rows than block_m (padded), groups of 0-5 rows
    (40, 128, 128, ("uniform", 9), 3, {}),
    # boundaries on no multiple of 8 or 64, one-row groups; M not a multiple of 8 (padded);
    # three wgmma row tiles a consumer (block_k 192, split "n")
    (293, 192, 128, [3, 61, 1, 0, 77, 1, 130], 20, dict(split="n", block_k=192, block_n=128)),
]


def case_inputs(seed, M, K, N, sizes, extra):
  """bf16 lhs [M, K] and dout [M, N] (random; NaN / inf in the rows past the groups, which the
  kernel must ignore) and the group sizes."""
  rng = np.random.default_rng(seed)
  if isinstance(sizes, tuple):
    kind, G = sizes
    sizes = random_sizes(rng, G, M - extra, kind)
  sizes = np.asarray(sizes)
  assert sizes.sum() == M - extra
  x = rng.standard_normal((M, K)).astype(np.float32)
  dy = rng.standard_normal((M, N)).astype(np.float32)
  x[M - extra:], dy[M - extra:] = np.nan, np.inf
  return jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16), sizes


def check_tgmm(out, x, dy, sizes, tol):
  """Each group's gradient against float64 (of the bf16 inputs); empty groups exactly zero."""
  want = np_tgmm(x[:sizes.sum()], dy[:sizes.sum()], sizes)  # rows past the groups: NaN
  out = np.asarray(out, np.float64)
  assert out.shape == want.shape and np.isfinite(out).all()
  for g, n in enumerate(sizes):
    if n == 0:
      assert (out[g] == 0).all(), g
    else:
      assert rel(out[g], want[g]) < tol, (g, n, rel(out[g], want[g]))


def interpret_with_races():
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams(detect_races=True)


def races_found():
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
  return ipc.get_races().races_found


@pytest.mark.parametrize("i", range(len(CASES)))
def test_mosaic_tgmm_interpreted(i):
  """fp32 output (so the tolerance sees any leaked or dropped row): group boundaries inside row
  blocks at both ends, empty / tiny / dominant groups, rows past the groups (NaN, ignored), both
  consumer splits, several tile and ring settings."""
  M, K, N, sizes, extra, tiles = CASES[i]
  x, dy, sizes = case_inputs(100 + i, M, K, N, sizes, extra)
  out = tgmm(x, dy, jnp.asarray(sizes, jnp.int32), out_dtype=jnp.float32,
             interpret=interpret_with_races(), **tiles)
  assert out.dtype == jnp.float32
  check_tgmm(out, x, dy, sizes, 1e-5)
  assert not races_found()


def test_mosaic_tgmm_reads_a_column_window_in_place():
  """cols=(start, width): the gradient against dout[:, start:start + width] (as gmm_glu's
  backward takes d gate and d up out of one [M, 2F] array), the same as on the sliced copy."""
  x, dy, sizes = case_inputs(11, 200, 128, 384, ("skewed", 5), 9)
  gs = jnp.asarray(sizes, jnp.int32)
  out = tgmm(x, dy, gs, out_dtype=jnp.float32, cols=(128, 256), interpret=interpret_with_races())
  assert out.shape == (5, 128, 256)
  check_tgmm(out, x, dy[:, 128:], sizes, 1e-5)
  assert not races_found()


def test_mosaic_tgmm_default_dtype_under_jit():
  """bf16 in, bf16 out (the default), group sizes traced under jit."""
  x, dy, sizes = case_inputs(7, 136, 128, 256, [50, 0, 13, 66], 7)
  f = jax.jit(lambda *a: tgmm(*a, interpret=interpret_with_races()))
  out = f(x, dy, jnp.asarray(sizes, jnp.int32))
  assert out.dtype == jnp.bfloat16
  check_tgmm(out, x, dy, sizes, 1e-2)
  assert not races_found()


def test_mosaic_tgmm_refuses_bad_arguments():
  x, dy, s = jnp.ones((64, 128), jnp.bfloat16), jnp.ones((64, 128), jnp.bfloat16), jnp.ones(2)
  for kwargs, args in [({}, (x.astype(jnp.float32), dy.astype(jnp.float32), s)),
                       ({}, (x, dy[:32], s)),
                       ({"split": "m"}, (x, dy, s)),
                       ({"block_k": 256}, (x, dy, s)),       # K = 128
                       ({"block_m": 32}, (x, dy, s)),
                       ({"split": "n", "block_n": 64}, (x, dy, s)),  # 32-column halves
                       ({"cols": (64, 128)}, (x, dy, s)),      # past dout's columns
                       ({"cols": (32, 64), "block_n": 64}, (x, dy, s))]:  # start off a block
    with pytest.raises(ValueError):
      tgmm(*args, interpret=True, **kwargs)


@pytest.mark.parametrize("M,K,N,tiles", [
    (4096, 1024, 1152, {}),                                            # defaults
    (4096, 576, 1024, dict(split="n", block_k=64, block_n=256, stages=3)),
    (4096, 576, 1024, dict(split="n", block_k=192, block_n=128)),
    (4096, 1024, 1024, dict(block_m=128, stages=3)),
    (4099, 1024, 1024, dict(out_dtype=jnp.float32)),                   # padded rows, fp32 out
    (4096, 1024, 576, "tiles_for"),                                    # the model's choices
    (4096, 576, 1024, "tiles_for"),
])
def test_mosaic_tgmm_lowers_for_the_gpu(M, K, N, tiles):
  """Lowering to Mosaic GPU on the CPU (layouts, wgmma operands, TMA tiling, the SMEM budget)
  at the model's expert shapes (K = 576, N = 1024; K = 1024, N = 1152) and others."""
  from pallas_kernels.grouped_matmul.mosaic_tgmm import tiles_for
  S = jax.ShapeDtypeStruct
  tiles = tiles_for(K, N) if tiles == "tiles_for" else tiles
  f = lambda x, dy, s: tgmm(x, dy, s, num_sms=132, **tiles)
  exported = jax.export.export(jax.jit(f), platforms=["cuda"])(
      S((M, K), jnp.bfloat16), S((M, N), jnp.bfloat16), S((32,), jnp.int32))
  assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="compiled kernels need a GPU")
@pytest.mark.parametrize("K,N,tiles", [(576, 1024, dict(split="n", block_k=64, block_n=256)),
                                       (1024, 1152, {})])
@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_gpu_tgmm_matches_triton_at_model_shapes(K, N, tiles, kind):
  """Compiled on the H100 at ling_small's weight-gradient shapes (32 experts, 32768 rows)
  against the Triton tgmm_pallas (fp32 out, so the two differ only in summation order)."""
  from pallas_kernels.grouped_matmul import tgmm_pallas
  rng = np.random.default_rng(K + N)
  M, G = 32768, 32
  sizes = jnp.asarray(random_sizes(rng, G, M - 100, kind), jnp.int32)
  lhs = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
  dout = jnp.asarray(rng.standard_normal((M, N)), jnp.bfloat16)
  got = jax.jit(lambda a, b, s: tgmm(a, b, s, out_dtype=jnp.float32, **tiles))(lhs, dout, sizes)
  want = jax.jit(lambda a, b, s: tgmm_pallas(a, b, s, out_dtype=jnp.float32))(lhs, dout, sizes)
  assert rel(got, want) < 1e-5
