"""Pallas simple GLA kernels (chunked forward/backward and decode step) against docs/architecture.md
§3.4.5.

Two independent references live here: a float64 NumPy recurrence (the spec, token by token) and
an fp32 quadratic "attention" form M_ts = exp(g (t - s)) [s <= t, same segment], differentiable
with jax.vjp, which gives the reference gradients. On CPU the kernels run in Pallas interpret
mode; the `gpu` tests run the compiled Triton kernels and are skipped without a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.simple_gla.chunk import simple_gla_pallas
from pallas_kernels.simple_gla.decode import simple_gla_step_pallas
from pallas_kernels.simple_gla import mosaic
from testing import gpu, rel

SLOPES = np.array([0.84, 0.0039, 0.3, 0.05])  # Ling's steepest and shallowest heads first


def reset_counter(seg, B, T):
  if seg is None:
    return jnp.zeros((B, T), jnp.int32)
  step = (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)
  return jnp.cumsum(jnp.concatenate([jnp.zeros((B, 1), jnp.int32), step], 1), 1)  # [B, T]


def quadratic_reference(q, k, v, g, h0=None, seg=None, scale=None):
  """fp32 parallel form: o_t = s sum_{u<=t, same seg} exp(g (t-u)) (q_t.k_u) v_u + s q_t e^{g(t+1)} h0."""
  B, T, H, K = q.shape
  scale = K ** -0.5 if scale is None else scale
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  hp = jax.lax.Precision.HIGHEST
  t = jnp.arange(T)
  diff = t[:, None] - t[None, :]  # [T, T]
  r = reset_counter(seg, B, T)
  mask = (diff >= 0)[None] & (r[:, :, None] == r[:, None, :])  # [B, T, T]
  # exp of a clamped non-positive exponent, then select: steep heads never overflow.
  decay = jnp.exp(g[:, None, None] * jnp.maximum(diff, 0)[None].astype(jnp.float32))  # [H, T, T]
  M = jnp.where(mask[:, None], decay[None], 0.0)  # [B, H, T, T]
  o = jnp.einsum("bhts,bshv->bthv", jnp.einsum("bthk,bshk->bhts", q, k, precision=hp) * M, v,
                 precision=hp)
  last = r == r[:, -1:]  # tokens of the last segment build the final state
  b_dec = jnp.where(last[..., None], jnp.exp(g * (T - 1 - t)[:, None].astype(jnp.float32)), 0.0)
  ht = jnp.einsum("bthk,bthv->bhkv", k * b_dec[..., None], v, precision=hp)
  if h0 is not None:
    a_dec = jnp.where((r == 0)[..., None], jnp.exp(g * (t + 1)[:, None].astype(jnp.float32)), 0.0)
    o = o + jnp.einsum("bthk,bhkv->bthv", q * a_dec[..., None], h0, precision=hp)
    ht = ht + jnp.where(r[:, -1] == 0, 1.0, 0.0)[:, None, None, None] * jnp.exp(g * T)[
        None, :, None, None] * h0
  return (scale * o).astype(q.dtype), ht


def numpy_recurrence(q, k, v, g, h0=None, seg=None):
  """The spec literally, in float64: S_t = e^g S_{t-1} + k_t^T v_t, o_t = s q_t S_t."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  B, T, H, K = q.shape
  S = np.zeros((B, H, K, v.shape[-1])) if h0 is None else np.array(h0, np.float64)
  o = np.zeros(v.shape)
  for t in range(T):
    if seg is not None and t > 0:
      S[np.asarray(seg)[:, t] != np.asarray(seg)[:, t - 1]] = 0.0
    S = np.exp(g)[None, :, None, None] * S + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
    o[:, t] = K ** -0.5 * np.einsum("bhk,bhkv->bhv", q[:, t], S)
  return o, S


def make_inputs(seed, B, T, H, K, dtype, *, h0=True, segments=False):
  rng = np.random.default_rng(seed)
  x = lambda *s: rng.standard_normal(s).astype(np.float32)
  q, k, v = (jnp.asarray(x(B, T, H, K), dtype) for _ in range(3))
  g = jnp.asarray(-SLOPES[:H], jnp.float32)
  init = jnp.asarray(x(B, H, K, K)) if h0 else None
  seg = jnp.asarray(np.sort(rng.integers(0, 4, (B, T)), axis=1), jnp.int32) if segments else None
  do = jnp.asarray(x(B, T, H, K), dtype)
  dht = jnp.asarray(x(B, H, K, K))
  return q, k, v, g, init, seg, do, dht


@functools.partial(jax.jit, static_argnames=("kernel", "opts"))
def fwd_and_grads(q, k, v, g, h0, seg, do, dht, kernel: bool, opts=()):
  if kernel:
    f = lambda q, k, v, h0: simple_gla_pallas(q, k, v, g, initial_state=h0, segment_ids=seg,
                                              **dict(opts))
  else:
    f = lambda q, k, v, h0: quadratic_reference(q, k, v, g, h0, seg)
  (o, ht), vjp = jax.vjp(f, q, k, v, h0)
  return o, ht, vjp((do.astype(o.dtype), dht))


def check_against_reference(inputs, tol, **opts):
  q, k, v, g, h0, seg, do, dht = inputs
  got = fwd_and_grads(*inputs, kernel=True, opts=tuple(sorted(opts.items())))
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  want = fwd_and_grads(f32(q), f32(k), f32(v), g, h0, seg, f32(do), dht, kernel=False)
  names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
  got = jax.tree.leaves([got[0], got[1], list(got[2])])
  want = jax.tree.leaves([want[0], want[1], list(want[2])])
  assert len(got) == len(want) == 5 + (h0 is not None)
  for name, a, b in zip(names, got, want):
    assert a.shape == b.shape, name
    assert np.isfinite(np.asarray(a, np.float32)).all(), name
    assert rel(a, b) < tol, (name, rel(a, b))


def test_quadratic_reference_is_the_recurrence():
  q, k, v, g, h0, seg, _, _ = make_inputs(0, 2, 70, 2, 16, jnp.float32, segments=True)
  for s in (None, seg):
    o, ht = quadratic_reference(q, k, v, g, h0, s)
    o_np, ht_np = numpy_recurrence(q, k, v, g, h0, s)
    assert rel(o, o_np) < 1e-5 and rel(ht, ht_np) < 1e-5


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
def test_bf16_any_length(T):
  check_against_reference(make_inputs(T, 2, T, 2, 64, jnp.bfloat16, h0=T % 2 == 1), 1e-2,
                          interpret=True)


@pytest.mark.parametrize("T,K,h0,opts", [
    (65, 64, True, dict()),
    (130, 128, False, dict(block_v=32, block_k_bwd=32)),  # several K- and V-blocks
])
def test_fp32(T, K, h0, opts):
  check_against_reference(make_inputs(7, 1, T, 2, K, jnp.float32, h0=h0), 1e-4,
                          interpret=True, **opts)


def test_steepest_decay_chunk_128():
  # Ling's head 0 decays by e^-0.84 per token: within a 128-chunk exp(+0.84 * 127) would
  # overflow fp32 if any factor were formed with a positive exponent.
  inputs = make_inputs(3, 1, 200, 1, 128, jnp.bfloat16)
  check_against_reference(inputs, 1e-2, chunk_size=128, interpret=True)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)])
def test_packed_segments(dtype, tol):
  inputs = make_inputs(5, 2, 150, 2, 64, dtype, segments=True)
  check_against_reference(inputs, tol, interpret=True, block_v=32)


def test_matches_the_package_reference():
  # The op's own jnp reference (pallas_kernels.simple_gla, impl="xla": the chunked form): same semantics for
  # packed segments and the initial state.
  from pallas_kernels.simple_gla import simple_gla
  q, k, v, g, h0, seg, _, _ = make_inputs(4, 2, 100, 2, 64, jnp.float32, segments=True)
  got = simple_gla_pallas(q, k, v, g, initial_state=h0, segment_ids=seg, interpret=True)
  want = simple_gla(q, k, v, g, initial_state=h0, segment_ids=seg, impl="xla")
  assert rel(got[0], want[0]) < 1e-4 and rel(got[1], want[1]) < 1e-4


@pytest.mark.parametrize("h0,segments", [(True, True), (False, False)])
def test_sequence_splits(h0, segments):
  # 4 pieces of 48 tokens (3 chunks of 16): the states-only pass, the XLA scans over pieces and
  # the rebased segment counters, forward and backward; segments cross the piece boundaries.
  inputs = make_inputs(9, 2, 192, 2, 64, jnp.float32, h0=h0, segments=segments)
  check_against_reference(inputs, 1e-4, chunk_size=16, splits=4, block_v_bwd=32, interpret=True)


def test_decode_step_continues_the_chunked_scan():
  q, k, v, g, h0, _, _, _ = make_inputs(11, 2, 9, 2, 64, jnp.float32)
  o_np, ht_np = numpy_recurrence(q, k, v, g, h0)
  o8, ht8 = simple_gla_pallas(q[:, :8], k[:, :8], v[:, :8], g, initial_state=h0, interpret=True)
  o9, ht9 = jax.jit(functools.partial(simple_gla_step_pallas, interpret=True),
                    donate_argnums=4)(q[:, 8], k[:, 8], v[:, 8], g, ht8)
  assert rel(o8, o_np[:, :8]) < 1e-5
  assert rel(o9, o_np[:, 8]) < 1e-5 and rel(ht9, ht_np) < 1e-5


def test_decode_step_bf16():
  q, k, v, g, h0, _, _, _ = make_inputs(12, 2, 1, 2, 128, jnp.bfloat16)
  o, ht = simple_gla_step_pallas(q[:, 0], k[:, 0], v[:, 0], g, h0, interpret=True)
  o_np, ht_np = numpy_recurrence(q, k, v, g, h0)
  assert o.dtype == jnp.bfloat16 and rel(o, o_np[:, 0]) < 1e-2 and rel(ht, ht_np) < 1e-5


# ------------------------------------------------------------------ the Mosaic GPU forward


@pytest.mark.parametrize("T,K,h0,splits,segments", [
    (192, 128, True, 1, False), (256, 64, False, 2, False), (256, 128, True, 2, True)])
def test_mosaic_forward_interpreted(T, K, h0, splits, segments):
  """The Mosaic GPU kernels (forward, states pre-passes, dq, dk, dv) under jax's GPU
  interpreter, race detector on."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
  inputs = make_inputs(T + K, 1, T, 2, K, jnp.bfloat16, h0=h0, segments=segments)
  check_against_reference(inputs, 1e-2, fwd_kernel="mosaic", bwd_kernel="mosaic", splits=splits,
                          interpret=True)
  assert not ipc.get_races().races_found


@pytest.mark.parametrize("K,V,stages,packed", [
    (128, 128, 2, False), (128, 128, 3, True), (64, 64, 4, True), (64, 128, 2, True)])
def test_mosaic_forward_lowers_for_the_gpu(K, V, stages, packed):
  """Lowering to Mosaic GPU on the CPU checks layouts, wgmma operands and the SMEM budget."""
  S = jax.ShapeDtypeStruct
  B, T, H = 1, 512, 2
  q, k, v = S((B, T, H, K), jnp.bfloat16), S((B, T, H, K), jnp.bfloat16), S((B, T, H, V), jnp.bfloat16)
  g, state = S((H,), jnp.float32), S((B, H, K, V), jnp.float32)
  r = (S((B, T), jnp.int32),) if packed else ()
  fwd = functools.partial(mosaic.forward, scale=0.1, stages=stages)
  bwd = functools.partial(mosaic.backward_kv, scale=0.1, stages=stages)
  kernels = [
      (fwd, (q, k, v, g, state)),
      (lambda k, v, g, *r: fwd(None, k, v, g, None, *r), (k, v, g)),  # the splits' pre-pass
      (bwd, (q, k, v, g, state)),  # the reverse scan (q, k, do, dht)
      (lambda q, do, g, *r: bwd(q, None, do, g, None, *r), (q, v, g)),  # its d-state pre-pass
  ]
  for f, args in kernels:
    exported = jax.export.export(jax.jit(f), platforms=["cuda"])(*args, *r)
    assert "mosaic_gpu" in exported.mlir_module()


def test_mosaic_forward_falls_back_where_it_does_not_apply():
  """Tails and fp32 go to the Triton scan; the results still match the reference."""
  inputs = make_inputs(5, 1, 100, 2, 64, jnp.bfloat16, segments=True)
  check_against_reference(inputs, 1e-2, fwd_kernel="mosaic", interpret=True)
  assert not mosaic.supported(inputs[0], inputs[2], 64)  # T = 100: a tail chunk
  assert not mosaic.supported(inputs[0].astype(jnp.float32), inputs[2], 64)


def test_mosaic_is_the_default_on_hopper_only():
  """wgmma is sm_90 only: "auto" must not pick the Mosaic kernel on a CPU or another GPU."""
  from pallas_kernels.simple_gla import chunk
  k = jnp.zeros((1, 128, 2, 128), jnp.bfloat16)
  assert mosaic.supported(k, k, 64)
  default = chunk.Config(scale=1.0)
  assert chunk._use_mosaic(k, k, default) == chunk._use_mosaic_bwd(k, k, default) == mosaic.on_hopper()
  assert chunk._use_mosaic(k, k, default._replace(fwd_kernel="mosaic"))
  assert chunk._use_mosaic_bwd(k, k, default._replace(bwd_kernel="mosaic"))
  assert not chunk._use_mosaic_bwd(k, k, default._replace(bwd_kernel="triton", fwd_kernel="mosaic"))


# ------------------------------------------------------------------ compiled kernels (GPU only)


@gpu
@pytest.mark.parametrize("T,K,h0,segments,opts", [
    (1000, 128, True, False, dict()),
    (777, 64, False, True, dict()),
    (1000, 128, True, False, dict(chunk_size=128)),
    (1000, 128, True, False, dict(block_k_bwd=128, block_v_bwd=128, num_warps_bwd=8)),  # fused dk/dv
    # T a multiple of 64: the Triton scans only where asked for
    (4096, 128, False, False, dict(block_v=32, num_warps=8, fwd_kernel="triton",
                                   bwd_kernel="triton")),  # auto splits: 4 pieces
    (2048, 128, True, True, dict(splits=2, fwd_kernel="triton", bwd_kernel="triton")),
])
def test_gpu_compiled(T, K, h0, segments, opts):
  inputs = make_inputs(T, 2, T, 4, K, jnp.bfloat16, h0=h0, segments=segments)
  check_against_reference(inputs, 1e-2, **opts)


@gpu
@pytest.mark.parametrize("T,K,h0,opts", [
    (1024, 128, True, dict(splits=1)),
    (4096, 64, False, dict(splits=4, mosaic_stages=3)),
    (2048, 128, True, dict(splits=2, mosaic_stages=3)),
    (2048, 128, True, dict(splits=2, segments=True)),
    (1024, 64, False, dict(splits=1, segments=True)),
    (2048, 128, True, dict(splits=2, segments=True, bwd_kernel="triton")),  # Mosaic fwd, Triton bwd
    (1024, 64, True, dict(splits=1, bwd_kernel="triton")),
])
def test_gpu_mosaic(T, K, h0, opts):
  """The defaults on a Hopper GPU: the Mosaic forward and backward."""
  opts = dict(opts)
  inputs = make_inputs(T, 2, T, 4, K, jnp.bfloat16, h0=h0, segments=opts.pop("segments", False))
  check_against_reference(inputs, 1e-2, **opts)


@gpu
def test_gpu_compiled_fp32():
  check_against_reference(make_inputs(1, 2, 300, 4, 64, jnp.float32), 1e-4)


@gpu
def test_gpu_decode_step():
  q, k, v, g, h0, _, _, _ = make_inputs(2, 3, 1, 4, 128, jnp.bfloat16)
  o, ht = jax.jit(simple_gla_step_pallas)(q[:, 0], k[:, 0], v[:, 0], g, h0)
  o_np, ht_np = numpy_recurrence(q, k, v, g, h0)
  assert rel(o, o_np[:, 0]) < 1e-2 and rel(ht, ht_np) < 1e-5
