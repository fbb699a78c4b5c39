"""Pallas grouped matmul (gmm, tgmm, the custom_vjp op) and the routed-experts op on it.

The independent reference is a float64 NumPy loop over groups. On CPU the kernels run in Pallas
interpret mode; the `gpu` tests run the compiled Triton kernels (skipped without a GPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.model import router
from pallas_kernels.grouped_matmul import (Config, gmm_glu, gmm_glu_pallas, gmm_glu_reference,
                                           gmm_pallas, gmm_reference, gmm_sum_pallas,
                                           grouped_matmul, sort_by_group, tgmm_pallas,
                                           tuned_config, visit_table, visits)
from pallas_kernels.moe import (resolve_impl, routed_experts, routed_experts_grouped,
                                routed_experts_reference, sort_by_expert)
from testing import ON_GPU, gpu, np_gmm, np_tgmm, random_sizes, rel

SMALL = Config(block_m=32, block_n=16, block_k=32, block_n_glu=16, block_n_sum=16, block_m_t=16,
               block_k_t=32, block_n_t=16, block_n_t2=16, interpret=True)


CASES = [  # (M, K, N, G, kind, rows past the groups)
    (150, 64, 32, 5, "uniform", 7),
    (96, 32, 48, 8, "skewed", 0),
    (64, 32, 16, 6, "one_group", 0),
    (20, 64, 32, 9, "uniform", 3),   # fewer rows than a tile, groups of 0-5 rows
    (130, 48, 40, 6, "skewed", 4),   # K and N tails: 48 = 1.5 K-tiles, 40 = 2.5 N-tiles
    (70, 24, 9, 4, "uniform", 2),    # dims below one 16-wide tile, neither a multiple of 16
    (10, 32, 16, 24, "uniform", 2),  # decode: fewer rows than groups (visits.pieces < G)
]


def piece_table(sizes, M: int, bm: int):
  """[4, V] (tile, group, lo, hi) of the group-piece layout: `visits.piece` at every slot, as
  the kernels decode it from their program ids."""
  G = len(sizes)
  padded = np.zeros(visits.padded_groups(G), np.int32)
  padded[:G] = sizes
  grp, lo, hi = jax.vmap(lambda v: visits.piece(jnp.asarray(padded), v, G=G, m=M, bm=bm))(
      jnp.arange(visits.pieces(M, bm, G), dtype=jnp.int32))
  return np.stack([np.asarray(lo) // bm, grp, lo, hi])


@pytest.mark.parametrize("group_rows", [False, True])
@pytest.mark.parametrize("M,K,N,G,kind,extra", CASES)
def test_visit_layouts_cover_every_row_once(M, K, N, G, kind, extra, group_rows):
  """Aligned tiles (`visit_table`) and group pieces (`visits.piece`, decoded per program)."""
  rng = np.random.default_rng(M + G)
  sizes = random_sizes(rng, G, M - extra, kind)
  tile, grp, lo, hi = (piece_table(sizes, M, 32) if group_rows
                       else np.asarray(visit_table(jnp.asarray(sizes), M, 32)))
  cover = np.zeros(M, int)
  owner = np.repeat(np.arange(G + 1), list(sizes) + [extra])
  starts = np.r_[0, np.cumsum(list(sizes) + [extra])]
  for t, g, a, b in zip(tile, grp, lo, hi):
    if b > a:
      if group_rows:  # pieces of 32 rows from the group's first row
        assert b - a <= 32 and (a - starts[g]) % 32 == 0 and t == a // 32
      else:
        assert t * 32 <= a < b <= t * 32 + 32
      assert (owner[a:b] == g).all()
      cover[a:b] += 1
  assert (cover == 1).all()
  # group pieces: one visit per started 32 rows of each group (the pseudo-group included)
  pieces = -(-np.r_[sizes, extra] // 32)
  assert not group_rows or ((hi > lo).sum() == pieces.sum() and len(lo) >= pieces.sum())


@pytest.mark.parametrize("group_rows", [False, True])
@pytest.mark.parametrize("M,K,N,G,kind,extra", CASES[:4])
def test_both_visit_layouts_match_float64(M, K, N, G, kind, extra, group_rows):
  """Config.group_rows (visits from each group's own first row, the default) and aligned row
  tiles: gmm plain, transposed and on gathered rows, and the fused gate/up kernel with its saved
  rows, against float64."""
  rng = np.random.default_rng(M * G + 1)
  cfg = SMALL._replace(group_rows=group_rows)
  sizes = random_sizes(rng, G, M - extra, kind)
  gs = jnp.asarray(sizes, jnp.int32)
  x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
  w, w2 = (jnp.asarray(rng.standard_normal((G, K, N)) * 0.3, jnp.float32) for _ in range(2))
  out = gmm_pallas(x, w, gs, cfg)
  assert rel(out, np_gmm(x, w, sizes)) < 1e-5
  assert (np.asarray(out[M - extra:]) == 0).all()
  dy = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
  assert rel(gmm_pallas(dy, w, gs, cfg, transpose_rhs=True), np_gmm(dy, w, sizes, True)) < 1e-5
  rows = rng.integers(0, 11, M)  # row r of the product reads token rows[r] of 11
  t = jnp.asarray(rng.standard_normal((11, K)), jnp.float32)
  xs = np.asarray(t, np.float64)[rows]
  g, u = np_gmm(xs, w, sizes), np_gmm(xs, w2, sizes)
  h, xr = gmm_glu_pallas(t, w, w2, gs, cfg, lhs_rows=jnp.asarray(rows, jnp.int32), save_rows=True)
  assert rel(h, g / (1 + np.exp(-g)) * u) < 1e-5
  used = int(sizes.sum())
  np.testing.assert_array_equal(np.asarray(xr)[:used], np.asarray(t)[rows[:used]])


@pytest.mark.parametrize("M,K,N,G,kind,extra", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_and_tgmm_match_float64(M, K, N, G, kind, extra, dtype):
  rng = np.random.default_rng(M * G)
  sizes = random_sizes(rng, G, M - extra, kind)
  x = jnp.asarray(rng.standard_normal((M, K)), dtype)
  w = jnp.asarray(rng.standard_normal((G, K, N)), dtype)
  dy = jnp.asarray(rng.standard_normal((M, N)), dtype)
  wt = jnp.asarray(rng.standard_normal((G, K, N)), dtype)  # dy [M, N] @ wt[g].T -> [M, K]
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  gs = jnp.asarray(sizes, jnp.int32)
  out = gmm_pallas(x, w, gs, SMALL)
  assert out.dtype == dtype and not np.isnan(np.asarray(out, np.float32)).any()
  assert rel(out, np_gmm(x, w, sizes)) < tol
  assert (np.asarray(out[M - extra:], np.float32) == 0).all()  # rows of no group: zeros
  assert rel(gmm_pallas(dy, wt, gs, SMALL, transpose_rhs=True), np_gmm(dy, wt, sizes, True)) < tol
  dw = tgmm_pallas(x, dy, gs, SMALL)
  want = np_tgmm(x, dy, sizes)
  assert rel(dw, want) < tol
  assert (np.asarray(dw, np.float32)[sizes == 0] == 0).all()  # empty groups: zero gradient


@pytest.mark.parametrize("kind", ["uniform", "one_group", "skewed"])
def test_grouped_matmul_gradients(kind):
  rng = np.random.default_rng(7)
  M, K, N, G = 120, 32, 48, 6
  sizes = jnp.asarray(random_sizes(rng, G, M - 5, kind), jnp.int32)
  x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((G, K, N)), jnp.float32)
  proj = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)

  def loss(impl, x, w):
    return jnp.sum(jnp.tanh(grouped_matmul(x, w, sizes, impl=impl, config=SMALL)) * proj)

  got = jax.value_and_grad(lambda *a: loss("interpret", *a), argnums=(0, 1))(x, w)
  want = jax.value_and_grad(lambda *a: loss("reference", *a), argnums=(0, 1))(x, w)
  assert rel(got[0], want[0]) < 1e-5
  for a, b in zip(got[1], want[1]):
    assert rel(a, b) < 1e-5


def test_gmm_reference_matches_float64():
  rng = np.random.default_rng(3)
  sizes = np.array([5, 0, 11, 2])
  x, w = rng.standard_normal((20, 16)), rng.standard_normal((4, 16, 8))
  got = gmm_reference(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(sizes))
  assert rel(got, np_gmm(x, w, sizes)) < 1e-6


def test_bad_shapes_are_refused():
  x, w = jnp.ones((8, 16)), jnp.ones((2, 16, 16))
  with pytest.raises(ValueError, match="group_sizes"):
    grouped_matmul(x, w, jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match="disagree on K"):
    grouped_matmul(jnp.ones((8, 32)), w, jnp.ones((2,), jnp.int32))
  with pytest.raises(ValueError, match="disagree on the contraction"):
    gmm_pallas(jnp.ones((8, 24)), w, jnp.ones((2,), jnp.int32), SMALL)
  with pytest.raises(ValueError, match="lhs_rows must be a 1-D integer"):
    gmm_pallas(x, w, jnp.ones((2,), jnp.int32), SMALL, lhs_rows=jnp.zeros((4, 2), jnp.int32))
  with pytest.raises(ValueError, match="dout shapes"):
    tgmm_pallas(x, (jnp.ones((8, 16)), jnp.ones((8, 8))), jnp.ones((2,), jnp.int32), SMALL)
  with pytest.raises(ValueError, match="impl"):
    grouped_matmul(x, w, jnp.ones((2,), jnp.int32), impl="cuda")


# ----------------------------------------------------------------------------- gathers, fusions


def routed_rows(rng, n_tokens, top_k, G, kind):
  """A routing in the MoE's layout: (rows [A] token of each sorted row, token_rows [N, X] the
  sorted rows of each token, group sizes [G]) for A = N X assignments sorted by group."""
  A = n_tokens * top_k
  sizes = random_sizes(rng, G, A, kind)
  group_of = rng.permutation(np.repeat(np.arange(G), sizes))  # assignment a -> group
  order = np.argsort(group_of, kind="stable")
  inverse = np.empty(A, np.int64)
  inverse[order] = np.arange(A)
  return order // top_k, inverse.reshape(n_tokens, top_k), sizes


def glu_case(rng, N, X, K, F, G):
  """A skewed routing of N tokens (rows, sizes and both as int32 device arrays with token_rows),
  float64 x [N, K] and gate / up weights [G, K, F]."""
  rows, token_rows, sizes = routed_rows(rng, N, X, G, "skewed")
  ints = tuple(jnp.asarray(a, jnp.int32) for a in (sizes, rows, token_rows))
  x = rng.standard_normal((N, K))
  wg, wu = (rng.standard_normal((G, K, F)) * 0.1 for _ in range(2))
  return rows, sizes, ints, x, wg, wu


@pytest.mark.parametrize("kind", ["uniform", "skewed", "one_group"])
def test_gathered_rows_match_float64(kind):
  """lhs_rows: gmm and tgmm read row r as x[rows[r]] (x has fewer rows than the groups)."""
  rng = np.random.default_rng(21)
  N, X, K, F, G = 37, 3, 48, 40, 5
  rows, _, sizes = routed_rows(rng, N, X, G, kind)
  x = jnp.asarray(rng.standard_normal((N, K)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((G, K, F)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((N * X, F)), jnp.float32)
  dy2 = jnp.asarray(rng.standard_normal((N * X, F)), jnp.float32)
  gs, r = jnp.asarray(sizes, jnp.int32), jnp.asarray(rows, jnp.int32)
  xs = np.asarray(x)[rows]
  assert rel(gmm_pallas(x, w, gs, SMALL, lhs_rows=r), np_gmm(xs, w, sizes)) < 1e-5
  dw, dw2 = tgmm_pallas(x, (dy, dy2), gs, SMALL, lhs_rows=r)
  assert rel(dw, np_tgmm(xs, dy, sizes)) < 1e-5
  assert rel(dw2, np_tgmm(xs, dy2, sizes)) < 1e-5


def test_gmm_sum_matches_float64():
  rng = np.random.default_rng(22)
  M, K, N, G = 90, 40, 48, 4
  sizes = random_sizes(rng, G, M - 6, "skewed")
  gs = jnp.asarray(sizes, jnp.int32)
  a, b = (jnp.asarray(rng.standard_normal((M, N)), jnp.float32) for _ in range(2))
  wa, wb = (jnp.asarray(rng.standard_normal((G, K, N)), jnp.float32) for _ in range(2))
  got = gmm_sum_pallas(a, b, wa, wb, gs, SMALL, transpose_rhs=True)
  want = np_gmm(a, wa, sizes, True) + np_gmm(b, wb, sizes, True)
  assert rel(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_glu_forward_matches_float64(dtype):
  rng = np.random.default_rng(23)
  N, X, K, F, G = 30, 4, 32, 40, 6
  rows, _, sizes = routed_rows(rng, N, X, G, "skewed")
  rows = np.concatenate([rows, rng.integers(0, N, 7)])  # 7 rows past the groups: h = 0 there
  x = jnp.asarray(rng.standard_normal((N, K)), dtype)
  wg, wu = (jnp.asarray(rng.standard_normal((G, K, F)) * 0.3, dtype) for _ in range(2))
  gs, r = jnp.asarray(sizes, jnp.int32), jnp.asarray(rows, jnp.int32)
  xs = np.asarray(x, np.float64)[rows]
  g, u = np_gmm(xs, wg, sizes), np_gmm(xs, wu, sizes)
  want = g / (1 + np.exp(-g)) * u
  assert (want[-7:] == 0).all()  # the float64 reference leaves rows of no group at zero
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  h, gate, up = gmm_glu_pallas(x, wg, wu, gs, SMALL, lhs_rows=r, save_gate_up=True)
  assert h.dtype == dtype
  assert rel(h, want) < tol and rel(gate, g) < tol and rel(up, u) < tol
  # save_rows: the gathered rows as loaded (K = 32 is one 32-wide block at fp32, two at bf16)
  *same, xr = gmm_glu_pallas(x, wg, wu, gs, SMALL, lhs_rows=r, save_gate_up=True, save_rows=True)
  for a, b in zip(same, (h, gate, up)):
    np.testing.assert_array_equal(a, b)
  M = int(sizes.sum())
  np.testing.assert_array_equal(np.asarray(xr)[:M], np.asarray(x)[rows[:M]])
  with pytest.raises(ValueError, match="lhs_rows"):
    gmm_glu_pallas(x[rows], wg, wu, gs, SMALL, save_rows=True)
  assert rel(gmm_glu_pallas(x, wg, wu, gs, SMALL, lhs_rows=r), want) < tol
  assert rel(gmm_glu_reference(x, r, wg, wu, gs), want) < tol
  assert (np.asarray(h, np.float32)[-7:] == 0).all()


@pytest.mark.parametrize("with_token_rows,fused_backward", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("kind", ["uniform", "one_group"])
def test_gmm_glu_gradients(kind, with_token_rows, fused_backward):
  rng = np.random.default_rng(24)
  N, X, K, F, G = 26, 3, 32, 24, 5
  rows, token_rows, sizes = routed_rows(rng, N, X, G, kind)
  gs, r = jnp.asarray(sizes, jnp.int32), jnp.asarray(rows, jnp.int32)
  tr = jnp.asarray(token_rows, jnp.int32) if with_token_rows else None
  x = jnp.asarray(rng.standard_normal((N, K)), jnp.float32)
  wg, wu = (jnp.asarray(rng.standard_normal((G, K, F)) * 0.3, jnp.float32) for _ in range(2))
  proj = jnp.asarray(rng.standard_normal((N * X, F)), jnp.float32)
  cfg = SMALL._replace(fused_backward=fused_backward)
  fused = lambda x, wg, wu: jnp.sum(gmm_glu(x, r, tr, wg, wu, gs, cfg) * proj)
  ref = lambda x, wg, wu: jnp.sum(gmm_glu_reference(x, r, wg, wu, gs) * proj)
  got = jax.value_and_grad(fused, argnums=(0, 1, 2))(x, wg, wu)
  want = jax.value_and_grad(ref, argnums=(0, 1, 2))(x, wg, wu)
  assert rel(got[0], want[0]) < 1e-5
  for a, b in zip(got[1], want[1]):
    assert rel(a, b) < 1e-5


@pytest.mark.parametrize("F,mosaic_tgmm", [(64, False), (128, True)])
def test_gmm_glu_backward_on_the_mosaic_kernel(F, mosaic_tgmm):
  """gmm_glu's backward with Config(mosaic=True, stacked_backward=True) (interpreted): d x from
  the Mosaic kernel over [d gate, d up] against the concatenated weights, the weight gradients
  from one Triton tgmm or (mosaic_tgmm) two Mosaic ones over x's gathered rows, all against
  float64 (bf16 operands). The jaxpr names the kernels, so a silent fallback fails."""
  rng = np.random.default_rng(25)
  N, X, K, G = 96, 3, 256, 5
  rows, sizes, (gs, r, tr), x, wg, wu = glu_case(rng, N, X, K, F, G)
  proj = rng.standard_normal((N * X, F))
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  cfg = SMALL._replace(mosaic=True, stacked_backward=True, mosaic_tgmm=mosaic_tgmm,
                       interpret=True)
  loss = lambda x, a, b: jnp.sum(gmm_glu(x, r, tr, a, b, gs, cfg).astype(jnp.float32) * proj)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(bf(x), bf(wg), bf(wu)))
  assert jaxpr.count("wgmma_wait") == (3 if mosaic_tgmm else 1)
  assert ("name=tgmm" in jaxpr) != mosaic_tgmm
  got = jax.grad(loss, argnums=(0, 1, 2))(bf(x), bf(wg), bf(wu))
  f64 = lambda a: np.asarray(bf(a), np.float64)
  with jax.enable_x64():
    ref = lambda x, a, b: jnp.sum(gmm_glu_reference(x, r, a, b, gs) * proj)
    want = jax.grad(ref, argnums=(0, 1, 2))(*(jnp.asarray(f64(a)) for a in (x, wg, wu)))
  for a, b in zip(got, want):
    assert rel(a, np.asarray(b)) < 2e-2


# ----------------------------------------------------------------------------- MoE wiring


@pytest.mark.parametrize("sort_kernel", [False, True])
@pytest.mark.parametrize("skew", [0.0, 10.0])
def test_moe_gmm_dispatch_matches_dense_with_grads(skew, sort_kernel):
  """The layer with the XLA counting sort and with the Pallas sort kernel (GPU's default)."""
  rng = np.random.default_rng(11)
  N, D, F, E, X = 40, 32, 16, 8, 2
  x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
  wr = jnp.asarray(rng.standard_normal((D, E)) * 0.3, jnp.float32)
  bias = jnp.asarray(np.r_[skew, skew, np.zeros(E - 2)], jnp.float32)
  wts = tuple(jnp.asarray(rng.standard_normal(s) * 0.2, jnp.float32)
              for s in ((E, D, F), (E, D, F), (E, F, D)))
  idx, w = router.route(x, wr, bias, top_k=X, n_group=1, topk_group=1, scale=2.5)
  if skew:  # every token on experts 0 and 1, six empty experts
    assert (np.bincount(np.asarray(idx).ravel(), minlength=E) == 0).sum() == E - 2

  def loss(fn, x, w, wts):
    y = fn(x, idx, w, *wts)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

  cfg = SMALL._replace(group_rows=bool(skew))
  grouped = lambda *a: routed_experts_grouped(*a, config=cfg, interpret=True,
                                              sort_kernel=sort_kernel)
  assert ("name=sort_by_group" in str(jax.make_jaxpr(grouped)(x, idx, w, *wts))) == sort_kernel
  np.testing.assert_allclose(grouped(x, idx, w, *wts), routed_experts_reference(x, idx, w, *wts),
                             rtol=1e-5, atol=1e-5)
  gd = jax.grad(lambda *a: loss(routed_experts_reference, *a), argnums=(0, 1, 2))(x, w, wts)
  gg = jax.grad(lambda *a: loss(grouped, *a), argnums=(0, 1, 2))(x, w, wts)
  for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gd)):
    assert rel(a, b) < 1e-5


@pytest.mark.parametrize("A,E,block,kind", [(1000, 32, 128, "uniform"), (777, 256, 64, "skewed"),
                                             (300, 8, 128, "one_group"), (5, 4, 128, "uniform")])
def test_sort_by_expert_is_a_stable_argsort(A, E, block, kind):
  """The counting sort against NumPy's stable argsort: blocks that end mid-array, empty experts,
  every assignment on one expert, fewer assignments than a block."""
  rng = np.random.default_rng(A)
  ids = rng.permutation(np.repeat(np.arange(E), random_sizes(rng, E, A, kind)))
  order, inverse, sizes = jax.jit(sort_by_expert, static_argnums=1, static_argnames="block")(
      jnp.asarray(ids), E, block=block)
  want = np.argsort(ids, kind="stable")
  np.testing.assert_array_equal(order, want)
  np.testing.assert_array_equal(np.asarray(inverse)[want], np.arange(A))
  np.testing.assert_array_equal(sizes, np.bincount(ids, minlength=E))


@pytest.mark.parametrize("A,E,chunk,kind", [(1000, 32, 256, "uniform"), (777, 256, 1024, "skewed"),
                                             (300, 8, 64, "one_group"), (5, 4, 1024, "uniform"),
                                             (4100, 16, 1024, "skewed")])
def test_sort_kernel_is_a_stable_argsort(A, E, chunk, kind):
  """The one-kernel sort (interpret mode) against NumPy's stable argsort: chunks that end
  mid-array (1000 ids in 256s, 4100 in 1024s), empty groups, one group holding every id, fewer
  ids than a chunk."""
  rng = np.random.default_rng(A + 1)
  ids = rng.permutation(np.repeat(np.arange(E), random_sizes(rng, E, A, kind)))
  order, inverse, sizes = sort_by_group(jnp.asarray(ids), E, chunk=chunk, interpret=True)
  want = np.argsort(ids, kind="stable")
  np.testing.assert_array_equal(order, want)
  np.testing.assert_array_equal(np.asarray(inverse)[want], np.arange(A))
  np.testing.assert_array_equal(sizes, np.bincount(ids, minlength=E))


@gpu
@pytest.mark.parametrize("A,E,kind", [(2048, 256, "uniform"), (65536, 32, "skewed"),
                                      (1000, 32, "one_group")])
def test_gpu_sort_kernel_is_a_stable_argsort(A, E, kind):
  """The compiled sort kernel: the flash shape at 256 tokens, ling_small's at 16384 (16 chunks)."""
  rng = np.random.default_rng(A)
  ids = rng.permutation(np.repeat(np.arange(E), random_sizes(rng, E, A, kind)))
  order, inverse, sizes = sort_by_group(jnp.asarray(ids), E)
  want = np.argsort(ids, kind="stable")
  np.testing.assert_array_equal(order, want)
  np.testing.assert_array_equal(np.asarray(inverse)[want], np.arange(A))
  np.testing.assert_array_equal(sizes, np.bincount(ids, minlength=E))


def test_sort_kernel_refuses_bad_input():
  with pytest.raises(ValueError, match="1-D integer"):
    sort_by_group(jnp.zeros((4, 2), jnp.int32), 8, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    sort_by_group(jnp.zeros((40,), jnp.int32), 8, chunk=48, interpret=True)


def test_tuned_config_tiles_by_rows_per_expert():
  """64-row tiles when groups are short (decode, short prefills), the 128-row default otherwise;
  the expert shape picks the fused kernels' widths either way."""
  assert tuned_config(1024, 576, rows_per_group=32).block_m == 64
  assert tuned_config(1024, 576, rows_per_group=512).block_m == 128
  assert tuned_config(4096, 1024).block_m == 128
  assert tuned_config(4096, 1024, 8).block_n_glu == 128
  assert tuned_config(4096, 1024).block_n_glu == 128
  # The Mosaic kernel at ling_small's shape and 513+ rows per expert; the stacked glu backward
  # from 2048 rows per expert; neither at the flash shape.
  assert [tuned_config(1024, 576, r).mosaic for r in (32, 512, 1024)] == [False, False, None]
  assert [tuned_config(1024, 576, r).stacked_backward for r in (512, 4096)] == [False, True]
  flash = tuned_config(4096, 1024, 4096)
  assert (flash.mosaic, flash.stacked_backward, flash.mosaic_tgmm) == (False, False, False)
  assert [tuned_config(1024, 576, r).mosaic_tgmm for r in (512, 4096)] == [False, True]
  # Visits as group pieces except where the stacked backward runs (aligned tiles measured better)
  assert [tuned_config(1024, 576, r).group_rows for r in (32, 512, 4096)] == [True, True, False]
  assert flash.group_rows


def test_tuned_config_decode_tiles_by_weight_format():
  """Decode sizes (<= 16 rows per expert) get the H200 sweep's tiles per weight format: 16-row
  tiles, 128-deep steps for bf16; FP8 from 0.5 rows per expert 16-row tiles (128-deep for block
  scales, 64 for channel scales), below that 64-row tiles with 128-deep steps."""
  tiles = lambda r, w: (lambda c: (c.block_m, c.block_k))(tuned_config(4096, 1024, r, w))
  assert tiles(0.03, "bf16") == tiles(2.0, "bf16") == (16, 128)
  assert tiles(0.03, "fp8-block") == tiles(0.03, "fp8-channel") == (64, 128)
  assert tiles(0.5, "fp8-block") == tiles(2.0, "fp8-block") == (16, 128)
  assert tiles(0.5, "fp8-channel") == tiles(2.0, "fp8-channel") == (16, 64)
  assert tiles(32, "fp8-block") == tiles(32, "bf16") == (64, 64)  # short prefills: unchanged
  assert not tuned_config(4096, 1024, 1.0, "fp8-block").swap_ab
  with pytest.raises(ValueError, match="'fp8'"):
    tuned_config(4096, 1024, 1.0, "fp8")


def test_moe_impl_switch():
  assert resolve_impl("auto") == ("pallas" if ON_GPU else "xla")
  x, idx, w, wts = moe_case(np.random.default_rng(12), 6, 8, 4, 4, 2, jnp.float32)
  want = routed_experts(x, idx, w, *wts, impl="reference")
  for impl in ("auto", "xla", "interpret"):
    np.testing.assert_allclose(routed_experts(x, idx, w, *wts, impl=impl), want, rtol=1e-5,
                               atol=1e-6, err_msg=impl)
  with pytest.raises(ValueError, match="unknown MoE impl 'gmm'"):
    routed_experts(x, idx, w, *wts, impl="gmm")
  with pytest.raises(ValueError, match=r"expert_ids \(6, 2\) and weights \(6, 1\)"):
    routed_experts(x, idx, w[:, :1], *wts)
  with pytest.raises(ValueError, match=r"w_down \(4, 8, 4\)"):
    routed_experts(x, idx, w, wts[0], wts[1], wts[1])


def test_empty_slots_contribute_nothing():
  """`empty=True` (the expert-parallel layer's slots of other devices' experts: id E, any
  weight): every impl gives the value and gradients of the same routing with those slots'
  weights zeroed; the grouped path sorts them past the groups (E + 1 sort groups)."""
  rng = np.random.default_rng(13)
  N, D, F, E, X = 24, 16, 8, 4, 2
  x, idx, w, wts = moe_case(rng, N, D, F, E, X, jnp.float32)
  none = jnp.asarray(rng.random((N, X)) < 0.4)
  assert 0 < int(none.sum()) < N * X
  ids = jnp.where(none, E, idx)

  def loss(x, w, wts, impl, ids, empty):
    if not empty:  # the reading `empty` must match: the slots on expert 0 with weight 0
      ids, w = jnp.where(none, 0, ids), jnp.where(none, 0.0, w)
    y = routed_experts(x, ids, w, *wts, impl=impl, empty=empty)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
  want = grad(x, w, wts, "reference", idx, False)
  for impl in ("reference", "xla", "interpret"):
    got = grad(x, w, wts, impl, ids, True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert rel(a, b) < 1e-5, impl


# ----------------------------------------------------------------------------- on the GPU


@gpu
@pytest.mark.parametrize("kind", ["uniform", "skewed", "one_group"])
def test_gpu_kernels_match_reference_bf16(kind):
  rng = np.random.default_rng(5)
  M, K, N, G = 4096, 512, 256, 32
  sizes = random_sizes(rng, G, M - 100, kind)
  gs = jnp.asarray(sizes, jnp.int32)
  x, dy = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((M, K), (M, N)))
  w = jnp.asarray(rng.standard_normal((G, K, N)), jnp.bfloat16)
  cfg = Config()
  assert rel(jax.jit(lambda *a: gmm_pallas(*a, cfg))(x, w, gs), np_gmm(x, w, sizes)) < 1e-2
  dx = jax.jit(lambda *a: gmm_pallas(*a, cfg, transpose_rhs=True))(dy, w, gs)
  assert rel(dx, np_gmm(dy, np.swapaxes(np.asarray(w, np.float32), 1, 2), sizes)) < 1e-2
  assert rel(jax.jit(lambda *a: tgmm_pallas(*a, cfg))(x, dy, gs), np_tgmm(x, dy, sizes)) < 1e-2
  pieces = cfg._replace(group_rows=True, block_m=64, block_n=128, num_warps=4)
  out = jax.jit(lambda *a: gmm_pallas(*a, pieces))(x, w, gs)
  assert rel(out, np_gmm(x, w, sizes)) < 1e-2 and (np.asarray(out, np.float32)[M - 100:] == 0).all()
  from pallas_kernels.grouped_matmul import mosaic
  wt = jnp.swapaxes(w, 1, 2)  # [G, N, K]
  for split, in_flight in (("n", 0), ("m", 1)):
    f = lambda *a, **k: jax.jit(lambda *a: mosaic.gmm(*a, split=split, in_flight=in_flight, **k))
    out = f()(x, w, gs)
    assert rel(out, np_gmm(x, w, sizes)) < 1e-2, split
    assert (np.asarray(out, np.float32)[M - 100:] == 0).all(), split
    assert rel(f(transpose_rhs=True)(x, wt, gs), np_gmm(x, w, sizes)) < 1e-2, split


def moe_case(rng, N, D, F, E, X, dtype):
  """x [N, D], a top-X routing over E experts (ids, weights), expert weights (gate, up, down)."""
  x = jnp.asarray(rng.standard_normal((N, D)), dtype)
  idx = jnp.asarray(np.stack([rng.choice(E, X, replace=False) for _ in range(N)]), jnp.int32)
  w = jnp.asarray(rng.random((N, X)), jnp.float32)
  wts = tuple(jnp.asarray(rng.standard_normal(s) * 0.1, dtype)
              for s in ((E, D, F), (E, D, F), (E, F, D)))
  return x, idx, w, wts


@gpu
def test_gpu_moe_gmm_matches_dense_with_grads():
  x, idx, w, wts = moe_case(np.random.default_rng(6), 512, 256, 128, 16, 4, jnp.float32)
  loss = lambda fn, x, wts: jnp.sum(jnp.sin(fn(x, idx, w, *wts)))
  with jax.default_matmul_precision("highest"):  # XLA's fp32 GPU default is TF32-like (~1e-3)
    gg = jax.jit(jax.grad(lambda *a: loss(routed_experts_grouped, *a), argnums=(0, 1)))(x, wts)
    assert "name=sort_by_group" in str(jax.make_jaxpr(routed_experts_grouped)(x, idx, w, *wts))
    gd = jax.jit(jax.grad(lambda *a: loss(routed_experts_reference, *a), argnums=(0, 1)))(x, wts)
  for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gd)):
    assert rel(a, b) < 1e-4


@gpu
@pytest.mark.parametrize("mosaic_tgmm", [False, True])
def test_gpu_moe_on_the_mosaic_kernel_matches_triton_bf16(mosaic_tgmm):
  """The bf16 expert layer with the down projection's forward and d input (both splits of the
  Mosaic kernel: N = 256 and 192) and the stacked gate/up d input on the Mosaic kernel, and
  (mosaic_tgmm) the three weight gradients on the Mosaic tgmm (both of its splits), against the
  same layer on Triton kernels alone."""
  rng = np.random.default_rng(9)
  N, D, F, E, X = 2048, 256, 192, 16, 4
  x, idx, w, wts = moe_case(rng, N, D, F, E, X, jnp.bfloat16)
  proj = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
  loss = lambda cfg, x, wts: jnp.sum(routed_experts_grouped(x, idx, w, *wts, config=cfg) * proj)
  from pallas_kernels.grouped_matmul import mosaic
  assert mosaic.tiles_for(F, D) and mosaic.tiles_for(D, F)  # down's forward; its d input
  cfg = Config(block_n_glu=64, stacked_backward=True, mosaic_tgmm=mosaic_tgmm)
  got = jax.jit(jax.value_and_grad(lambda *a: loss(cfg, *a), argnums=(0, 1)))(x, wts)
  want = jax.jit(jax.value_and_grad(lambda *a: loss(cfg._replace(mosaic=False), *a),
                                    argnums=(0, 1)))(x, wts)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel(a, b) < 1e-2


@gpu
def test_gpu_fused_glu_matches_reference():
  """The fused gate/up kernel compiled, at a width with a masked N tail (96 in 128-wide tiles):
  bf16 forward against float64, fp32 gradients against the reference at full precision."""
  rng = np.random.default_rng(8)
  N, X, K, F, G = 1024, 4, 256, 96, 16
  rows, sizes, (gs, r, tr), x, wg, wu = glu_case(rng, N, X, K, F, G)
  xs = x[rows]
  g, u = np_gmm(xs, wg, sizes), np_gmm(xs, wu, sizes)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  h = jax.jit(lambda *a: gmm_glu_pallas(*a, Config(), lhs_rows=r))(bf(x), bf(wg), bf(wu), gs)
  assert rel(h, g / (1 + np.exp(-g)) * u) < 2e-2
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  proj = f32(rng.standard_normal((N * X, F)))
  fused = lambda x, a, b: jnp.sum(gmm_glu(x, r, tr, a, b, gs, Config()) * proj)
  ref = lambda x, a, b: jnp.sum(gmm_glu_reference(x, r, a, b, gs) * proj)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(f32(x), f32(wg), f32(wu))
    want = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(f32(x), f32(wg), f32(wu))
  for a, b in zip(got, want):
    assert rel(a, b) < 1e-4


# ----------------------------------------------------------------------------- Mosaic GPU gmm


@pytest.mark.parametrize("M,G,kind,extra,tiles", [
    (300, 5, "uniform", 20, (64, 128, 2, "n", 0, False)),   # 20 rows past the groups; a partial
    (200, 6, "skewed", 0, (128, 128, 3, "m", 1, True)),     # last tile / empty groups, rhs
                                                            # [G, N, K]
    (130, 4, "one_group", 3, (128, 256, 2, "n", 1, True)),  # one group; fewer rows than two tiles
    (300, 5, "uniform", 20, (128, 128, 2, "m", 0, False)),  # a boundary in one consumer's rows
])
def test_mosaic_gmm_interpreted(M, G, kind, extra, tiles):
  """The Mosaic GPU gmm under jax's GPU interpreter (race detector on) against float64: group
  boundaries inside tiles (the row-ladder stores), empty groups, zeros past the groups; the
  consumers splitting rows or columns, one wgmma left in flight or none, rhs transposed."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  from pallas_kernels.grouped_matmul import mosaic
  rng = np.random.default_rng(M)
  K, N = 128, 256
  sizes = random_sizes(rng, G, M - extra, kind)
  x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((G, K, N)) * 0.1, jnp.bfloat16)
  bm, bn, stages, split, in_flight, transpose = tiles
  out = mosaic.gmm(x, jnp.swapaxes(w, 1, 2) if transpose else w, jnp.asarray(sizes, jnp.int32),
                   transpose_rhs=transpose, block_m=bm, block_n=bn, stages=stages, split=split,
                   in_flight=in_flight, interpret=InterpretGPUParams(detect_races=True))
  want = np_gmm(x, w, sizes)
  assert rel(out, want) < 1e-2
  assert (np.asarray(out, np.float32)[M - extra:] == 0).all()
  assert not ipc.get_races().races_found


@pytest.mark.parametrize("mosaic_tgmm", [False, True])
def test_gmm_op_runs_its_products_on_the_mosaic_kernel(mosaic_tgmm):
  """`gmm` with Config(mosaic=True) (interpreted): the forward on the Mosaic kernel's column
  split (N = 256), d lhs on its row split (N = 192, rhs transposed), d rhs on the Triton tgmm or
  (mosaic_tgmm) the Mosaic one's [192, 128] tiles split by N; value and gradients against
  float64. The jaxpr names the kernels, so a silent fallback to a Triton kernel fails."""
  from pallas_kernels.grouped_matmul import gmm
  rng = np.random.default_rng(11)
  M, K, N, G = 300, 192, 256, 5
  sizes = random_sizes(rng, G, M - 7, "skewed")
  gs = jnp.asarray(sizes, jnp.int32)
  x, w = rng.standard_normal((M, K)), rng.standard_normal((G, K, N)) * 0.1
  proj = rng.standard_normal((M, N))
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  cfg = Config(mosaic=True, mosaic_tgmm=mosaic_tgmm, interpret=True)
  loss = lambda x, w: jnp.sum(gmm(x, w, gs, cfg).astype(jnp.float32) * bf(proj))
  jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(bf(x), bf(w)))
  assert jaxpr.count("wgmma_wait") == (3 if mosaic_tgmm else 2), jaxpr[:2000]
  assert "name=gmm" not in jaxpr and ("name=tgmm" in jaxpr) != mosaic_tgmm
  val, (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1))(bf(x), bf(w))
  xb, wb, pb = (np.asarray(bf(a), np.float64) for a in (x, w, proj))
  assert rel(val, np.sum(np_gmm(xb, wb, sizes) * pb)) < 2e-2
  assert rel(dx, np_gmm(pb, np.swapaxes(wb, 1, 2), sizes)) < 2e-2
  assert rel(dw, np_tgmm(xb, pb, sizes)) < 2e-2


@pytest.mark.parametrize("bm,bn,stages,split,in_flight", [
    (128, 256, 3, "n", 0), (128, 256, 3, "m", 0), (128, 128, 4, "m", 0), (64, 128, 6, "n", 0),
    (128, 192, 4, "m", 1)])
def test_mosaic_gmm_lowers_for_the_gpu(bm, bn, stages, split, in_flight):
  """Lowering to Mosaic GPU on the CPU: layouts, wgmma operands and the SMEM budget."""
  from pallas_kernels.grouped_matmul import mosaic
  S = jax.ShapeDtypeStruct
  f = lambda x, w, s: mosaic.gmm(x, w, s, block_m=bm, block_n=bn, stages=stages, split=split,
                                 in_flight=in_flight, num_sms=132)
  exported = jax.export.export(jax.jit(f), platforms=["cuda"])(
      S((4096, 1024), jnp.bfloat16), S((32, 1024, 576 if bn == 192 else 512), jnp.bfloat16),
      S((32,), jnp.int32))
  assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("bm,bn,split", [(64, 64, "n"), (64, 128, "m"), (128, 96, "n")])
def test_mosaic_gmm_refuses_tiles_below_a_wgmma_half(bm, bn, split):
  """A consumer's half-tile under 64 x 64 is refused before it reaches the GPU (64 x 32 faulted
  there with a misaligned address, taking the process's CUDA context with it)."""
  from pallas_kernels.grouped_matmul import mosaic
  x, w = jnp.ones((256, 128), jnp.bfloat16), jnp.ones((2, 128, 384), jnp.bfloat16)
  with pytest.raises(ValueError, match="multiples of 64"):
    mosaic.gmm(x, w, jnp.array([100, 100], jnp.int32), block_m=bm, block_n=bn, split=split,
               num_sms=2)

