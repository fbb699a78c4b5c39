"""The simple-GLA reference op (pallas_kernels/simple_gla) against an independent float64 form.

The NumPy form is the quadratic closed form, not the recurrence:
  o_t = scale * sum_{u <= t, same segment} exp(L_t - L_u) (q_t . k_u) v_u
        + scale * [t in the first segment] exp(L_t) q_t S_0,          L_t = g_0 + ... + g_t.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.simple_gla import (IMPLS, simple_gla, simple_gla_chunked,
                                       simple_gla_recurrent, simple_gla_step)
from testing import rel

chunked = jax.jit(simple_gla_chunked, static_argnames=("chunk_size",))
recurrent = jax.jit(simple_gla_recurrent)
step = jax.jit(simple_gla_step)


# ----------------------------------------------------------------------------- float64 NumPy form


def doc_index(seg, B, T):
  """[B, T] index of each token's segment within its row (0 = the segment of the initial state)."""
  if seg is None:
    return np.zeros((B, T), int)
  seg = np.asarray(seg)
  return np.concatenate([np.zeros((B, 1), int), np.cumsum(seg[:, 1:] != seg[:, :-1], axis=1)], 1)


def gla64(q, k, v, g, scale=None, h0=None, seg=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, K = q.shape
  scale = K ** -0.5 if scale is None else scale
  g = np.asarray(g, np.float64)
  L = np.cumsum(np.broadcast_to(g, (B, T, H)) if g.ndim == 1 else g, axis=1)  # [B, T, H]
  doc = doc_index(seg, B, T)
  t = np.arange(T)
  ok = ((t[:, None] >= t[None, :]) & (doc[:, :, None] == doc[:, None, :]))[:, None]  # [B, 1, T, T]
  Lh = L.transpose(0, 2, 1)  # [B, H, T]
  w = np.where(ok, np.exp(np.where(ok, Lh[..., :, None] - Lh[..., None, :], 0.0)), 0.0)
  o = scale * np.einsum("bhtu,buhv->bthv", np.einsum("bthk,buhk->bhtu", q, k) * w, v)
  last = doc[:, -1:]
  w_end = np.where((doc == last)[..., None], np.exp(L[:, -1:] - L), 0.0)  # [B, T, H]
  S = np.einsum("buh,buhk,buhv->bhkv", w_end, k, v)
  if h0 is not None:
    h0 = np.asarray(h0, np.float64)
    w_h0 = (doc == 0)[..., None] * np.exp(L)  # [B, T, H]
    o += scale * np.einsum("bth,bthk,bhkv->bthv", w_h0, q, h0)
    S += ((last[:, 0] == 0)[:, None] * np.exp(L[:, -1]))[..., None, None] * h0
  return o, S


# ----------------------------------------------------------------------------- helpers


def inputs(seed, B, T, H, K, V, *, h0=True, g="head", slope_scale=8.0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v = f(B, T, H, K), f(B, T, H, K), f(B, T, H, V)
  if g == "head":  # Ling's ALiBi slopes: -2^(-8 (h+1) / H) (steepest 0.84 / step at H = 32)
    gg = -jnp.asarray(2.0 ** (-slope_scale * (np.arange(H) + 1) / H), jnp.float32)
  else:  # fla-style per-token gates: log-sigmoid, down to about -3.5 per step
    gg = jnp.asarray(-np.logaddexp(0.0, -rng.normal(1.0, 1.5, (B, T, H))), jnp.float32)
  return q, k, v, gg, (f(B, H, K, V) if h0 else None)


def segments(B, T, lengths_ids):
  rows = [np.repeat(ids, lens) for lens, ids in lengths_ids]
  assert all(len(r) == T for r in rows) and len(rows) == B
  return jnp.asarray(np.stack(rows), jnp.int32)


# Docs incl. length-1 ones, one at a chunk start, boundaries on chunk edges (16, 64), a reused id
# (row 1: 5, 2, 5 are three segments) and a row that is a single segment (h0 reaches the end).
SEG_100 = [([10, 1, 37, 16, 36], [0, 1, 2, 3, 4]), ([1, 15, 1, 50, 33], [5, 2, 5, 7, 2]),
           ([100], [9])]


# ----------------------------------------------------------------------------- forward


CASES = [(T, C) for T in (1, 5, 64, 100, 130) for C in (16, 64, 128)]


@pytest.mark.parametrize("T,C", CASES)
def test_forward_matches_float64(T, C):
  i = CASES.index((T, C))
  K, V = (64, 32) if i % 2 else (128, 128)
  has_h0 = i % 3 != 0
  q, k, v, g, h0 = inputs(i, 1, T, 2, K, V, h0=has_h0)
  o_ref, s_ref = gla64(q, k, v, g, h0=h0)
  for o, s in (recurrent(q, k, v, g, initial_state=h0),
               chunked(q, k, v, g, initial_state=h0, chunk_size=C)):
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32 and s.shape == (1, 2, K, V)
    assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5


@pytest.mark.parametrize("C", [16, 64, 128])
@pytest.mark.parametrize("g_kind", ["head", "token"])
def test_segments_match_float64(C, g_kind):
  q, k, v, g, h0 = inputs(C + (g_kind == "token"), 3, 100, 2, 64, 64, g=g_kind)
  seg = segments(3, 100, SEG_100)
  o_ref, s_ref = gla64(q, k, v, g, h0=h0, seg=seg, scale=0.3)
  for o, s in (recurrent(q, k, v, g, initial_state=h0, segment_ids=seg, scale=0.3),
               chunked(q, k, v, g, initial_state=h0, segment_ids=seg, scale=0.3, chunk_size=C)):
    assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5


@pytest.mark.parametrize("T,C,h0", [(77, 16, False), (130, 64, True), (200, 128, True)])
def test_per_token_g_matches_float64(T, C, h0):
  q, k, v, g, h0 = inputs(T, 2, T, 2, 64, 64, g="token", h0=h0)
  o_ref, s_ref = gla64(q, k, v, g, h0=h0)
  for o, s in (recurrent(q, k, v, g, initial_state=h0),
               chunked(q, k, v, g, initial_state=h0, chunk_size=C)):
    assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5


@pytest.mark.parametrize("H", [8, 32])
def test_steep_ling_slopes_chunk_128(H):
  # H = 32: g_0 = -2^(-1/4) = -0.84 per step; exp(0.84 * 127) overflows fp32 if split.
  T = 260
  q, k, v, g, h0 = inputs(H, 1, T, H, 64, 64)
  seg = jnp.asarray(np.repeat([[0, 1, 2]], [130, 1, 129], axis=1), jnp.int32)
  for s_ids in (None, seg):
    o_ref, s_ref = gla64(q, k, v, g, h0=h0, seg=s_ids)
    o, s = chunked(q, k, v, g, initial_state=h0, segment_ids=s_ids, chunk_size=128)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(s)).all()
    assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5
  if H != 32:
    return
  # The backward goes through the masked exps too: no NaN, and it agrees with the recurrence.
  chunked_128 = lambda *a, **kw: simple_gla_chunked(*a, **kw, chunk_size=128)
  d_chk = _loss(chunked_128, 5, 1, T, H, 64, 64)(q, k, v, g, h0, seg)
  d_rec = _loss(simple_gla_recurrent, 5, 1, T, H, 64, 64)(q, k, v, g, h0, seg)
  for name, a, b in zip("q k v g h0".split(), d_chk, d_rec):
    assert np.isfinite(np.asarray(a)).all() and rel(a, b) < 1e-4, name


@pytest.mark.parametrize("form", ["reference", "xla"])
def test_bf16_inputs(form):
  q, k, v, g, h0 = inputs(7, 2, 100, 2, 64, 64)
  seg = segments(2, 100, SEG_100[:2])
  o_ref, s_ref = gla64(q, k, v, g, h0=h0, seg=seg)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  o, s = simple_gla(qb, kb, vb, g, initial_state=h0, segment_ids=seg, chunk_size=32, impl=form)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert np.isfinite(np.asarray(o, np.float32)).all()
  assert rel(o, o_ref) < 2e-2 and rel(s, s_ref) < 2e-2


# ----------------------------------------------------------------------------- segments: no leakage


@pytest.mark.parametrize("g_kind", ["head", "token"])
def test_no_leakage_across_documents(g_kind):
  q, k, v, g, h0 = inputs(11, 3, 100, 2, 64, 64, g=g_kind)
  seg = segments(3, 100, SEG_100)
  doc = doc_index(seg, 3, 100)
  hit = jnp.asarray(doc == 1)[..., None, None]  # perturb the second document of each row
  rng = np.random.default_rng(12)
  noise = lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)
  q2, k2, v2 = (jnp.where(hit, x + noise(x), x) for x in (q, k, v))
  g2 = g if g_kind == "head" else jnp.where(hit[..., 0], g - 1.0, g)
  after = doc > 1
  for fn in (recurrent, lambda *a, **kw: chunked(*a, **kw, chunk_size=16)):
    o, s = fn(q, k, v, g, initial_state=h0, segment_ids=seg)
    o2, s2 = fn(q2, k2, v2, g2, initial_state=h0, segment_ids=seg)
    assert not np.allclose(np.asarray(o)[doc == 1], np.asarray(o2)[doc == 1])
    # Earlier and later documents and the final state (rows 0 and 1 end in doc 4) are untouched:
    # exactly, when only q, k, v move; up to rounding of the in-chunk cumsum when g moves.
    tol = dict(rtol=0, atol=0) if g_kind == "head" else dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(o2)[after], np.asarray(o)[after], **tol)
    np.testing.assert_allclose(np.asarray(o2)[doc == 0], np.asarray(o)[doc == 0], **tol)
    np.testing.assert_allclose(np.asarray(s2)[:2], np.asarray(s)[:2], **tol)


# ----------------------------------------------------------------------------- gradients


def _loss(fn, seed, B, T, H, V, K):
  rng = np.random.default_rng(seed)
  Ro = jnp.asarray(rng.standard_normal((B, T, H, V)))
  Rs = jnp.asarray(rng.standard_normal((B, H, K, V)))

  def loss(q, k, v, g, h0, seg):
    o, s = fn(q, k, v, g, initial_state=h0, segment_ids=seg)
    return jnp.sum(o * Ro.astype(o.dtype)) + jnp.sum(s * Rs.astype(s.dtype))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


@pytest.mark.parametrize("g_kind,use_seg", [("head", False), ("head", True), ("token", True)])
def test_gradients_chunked_vs_recurrent_vs_float64(g_kind, use_seg):
  B, T, H, K, V = 2, 100, 2, 64, 64
  q, k, v, g, h0 = inputs(21, B, T, H, K, V, g=g_kind)
  seg = segments(B, T, SEG_100[:2]) if use_seg else None
  d_rec = _loss(simple_gla_recurrent, 3, B, T, H, V, K)(q, k, v, g, h0, seg)
  d_chk = _loss(lambda *a, **kw: simple_gla_chunked(*a, **kw, chunk_size=32), 3, B, T, H, V, K)(
      q, k, v, g, h0, seg)
  with jax.enable_x64(True):
    a64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, g, h0)]
    d64 = _loss(simple_gla_recurrent, 3, B, T, H, V, K)(*a64, seg)
    d64 = [np.asarray(d) for d in d64]
  for name, a, b, c in zip("q k v g h0".split(), d_chk, d_rec, d64):
    assert a.dtype == jnp.float32 and c.dtype == np.float64, name
    assert rel(a, b) < 1e-4 and rel(a, c) < 1e-4 and rel(b, c) < 1e-4, name


# ----------------------------------------------------------------------------- decode step


@pytest.mark.parametrize("g_kind", ["head", "token"])
def test_step_matches_recurrent(g_kind):
  B, T, H, K, V = 2, 20, 2, 64, 32
  q, k, v, g, h0 = inputs(31, B, T, H, K, V, g=g_kind)
  o_rec, s_rec = recurrent(q, k, v, g, initial_state=h0)
  o_ref, s_ref = gla64(q, k, v, g, h0=h0)
  s, outs = h0, []
  for t in range(T):
    o_t, s = step(q[:, t], k[:, t], v[:, t], g if g_kind == "head" else g[:, t], s)
    outs.append(o_t)
  o = jnp.stack(outs, axis=1)
  assert rel(o, o_rec) < 1e-6 and rel(s, s_rec) < 1e-6
  assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5


# ----------------------------------------------------------------------------- dispatch, validation


def test_dispatch_and_validation():
  q, k, v, g, h0 = inputs(41, 1, 10, 2, 16, 8)
  o, s = simple_gla(q, k, v, g, initial_state=h0, impl="reference")
  o2, s2 = simple_gla_recurrent(q, k, v, g, initial_state=h0)
  np.testing.assert_array_equal(o, o2)
  assert IMPLS == ("auto", "reference", "xla", "pallas", "interpret")
  with pytest.raises(ValueError, match="unknown simple_gla impl 'triton'"):
    simple_gla(q, k, v, g, impl="triton")
  bad = [dict(k=k[..., :8]), dict(v=v[:, :5]), dict(g=g[:1]), dict(g=g[None]),
         dict(initial_state=h0[..., :4]), dict(segment_ids=jnp.zeros((1, 9), jnp.int32)),
         dict(chunk_size=0)]
  for kw in bad:
    args = dict(q=q, k=k, v=v, g=g) | {a: kw.pop(a) for a in list(kw) if a in "qkvg"}
    with pytest.raises(ValueError):
      simple_gla(**args, **kw)
  with pytest.raises(ValueError, match="g must be"):
    simple_gla_step(q[:, 0], k[:, 0], v[:, 0], g[None, None], h0)
  with pytest.raises(ValueError, match="state must be"):
    simple_gla_step(q[:, 0], k[:, 0], v[:, 0], g, h0[..., :4])
