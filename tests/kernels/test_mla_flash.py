"""The causal attention op (pallas_kernels.attention) that MLA calls: jax's Pallas flash kernel
(`impl="pallas"`) and cuDNN against the materialised reference, and the MLA layer on each.

The independent reference for the forward is a float64 NumPy softmax attention with the position
and segment masks; gradients are checked against the reference ("xla", fp32 at highest
precision), which shares no code with the kernels. On CPU the flash kernel runs in interpret
mode; the `gpu` tests run the compiled Triton and cuDNN kernels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.config import ling_tiny
from ling_jax.model import Kernels
from pallas_kernels.attention import (CUDNN_SEGMENT_LADDER, attention_reference, causal_attention,
                                      cudnn_attention, cudnn_available, flash_attention,
                                      flash_width, ladder_rung, resolve_impl, segment_offsets)
from testing import ON_GPU, gpu, random_model, random_tokens, rel

K, R, V = 16, 8, 16  # nope, rope and value head dims (ling_tiny's)


def packed(rng, B, T, docs=4):
  """Segment ids 1.. of random document lengths and positions restarting per document."""
  seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
  for b in range(B):
    cuts = np.sort(rng.choice(np.arange(1, T), size=docs - 1, replace=False))
    for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, T])):
      seg[b, lo:hi], pos[b, lo:hi] = i + 1, np.arange(hi - lo)
  return jnp.asarray(seg), jnp.asarray(pos)


def inputs(rng, B, T, H, dtype, dims=(K, R, V)):
  k, r, v = dims
  f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  return f(B, T, H, k), f(B, T, H, r), f(B, T, H, k), f(B, T, r), f(B, T, H, v)


def np_attention(qn, qp, kn, kp, v, seg, pos, scale):
  qn, qp, kn, kp, v = (np.asarray(x, np.float64) for x in (qn, qp, kn, kp, v))
  s = np.einsum("bthk,bshk->bhts", qn, kn) + np.einsum("bthr,bsr->bhts", qp, kp)
  seg, pos = np.asarray(seg), np.asarray(pos)
  mask = (pos[:, :, None] >= pos[:, None, :]) & (seg[:, :, None] == seg[:, None, :])
  s = np.where(mask[:, None], s * scale, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhts,bshv->bthv", p / p.sum(-1, keepdims=True), v)


def xla_attention(qn, qp, kn, kp, v, seg, pos, scale):
  return attention_reference(qn, kn, v, scale=scale, q_rope=qp, k_rope=kp, segment_ids=seg,
                             positions=pos)


def flash(qn, qp, kn, kp, v, seg, scale, **kw):
  return flash_attention(qn, kn, v, scale=scale, q_rope=qp, k_rope=kp, segment_ids=seg, **kw)


def cudnn(qn, qp, kn, kp, v, seg, scale, **kw):
  return cudnn_attention(qn, kn, v, scale=scale, q_rope=qp, k_rope=kp, segment_ids=seg, **kw)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_flash_matches_float64_on_packed_rows(dtype, tol):
  rng = np.random.default_rng(0)
  seg, pos = packed(rng, 2, 64)
  args = inputs(rng, 2, 64, 2, dtype)
  got = flash(*args, seg, 0.2, interpret=True)
  assert got.shape == (2, 64, 2, V) and got.dtype == dtype
  assert rel(got, np_attention(*args, seg, pos, 0.2)) < tol


def test_flash_gradients_match_xla_path():
  rng = np.random.default_rng(1)
  seg, pos = packed(rng, 2, 64)
  args = inputs(rng, 2, 64, 2, jnp.float32)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  with jax.default_matmul_precision("highest"):
    want = jax.grad(loss(lambda *a: xla_attention(*a, seg, pos, 0.2)), argnums=range(5))(*args)
    got = jax.grad(loss(lambda *a: flash(*a, seg, 0.2, interpret=True)), argnums=range(5))(*args)
  for name, g, w in zip(("q_nope", "q_pe", "k_nope", "k_pe", "v"), got, want):
    assert np.isfinite(np.asarray(g)).all(), name
    assert rel(g, w) < 1e-5, name


def test_model_with_flash_mla_matches_xla_on_packed_rows():
  cfg = ling_tiny(num_hidden_layers=2, layer_group_size=2, first_k_dense_replace=2)
  B, T = 2, 32
  seg, pos = packed(np.random.default_rng(2), B, T)
  tokens = random_tokens(cfg, (B, T))
  run = lambda impl: random_model(cfg, kernels=Kernels(attention=impl)).forward(
      tokens, positions=pos, segment_ids=seg, scan=False).logits
  assert rel(run("interpret"), run("xla")) < 1e-5


def test_auto_and_bad_input():
  bf16 = jnp.bfloat16
  auto = lambda T, qk, v, dtype: resolve_impl("auto", T, qk, v, dtype)
  assert auto(4096, 24, 16, bf16) == ("cudnn" if ON_GPU and cudnn_available() else
                                      "pallas" if ON_GPU else "xla")
  assert auto(4096, 24, 16, jnp.float32) == ("pallas" if ON_GPU else "xla")
  assert auto(100, 24, 16, bf16) == "xla"
  assert auto(4096, 192, 128, bf16) == ("cudnn" if ON_GPU and cudnn_available() else
                                        "pallas" if ON_GPU else "xla")
  assert auto(4096, 96, 64, jnp.float32) == ("pallas" if ON_GPU else "xla")  # 64-row blocks
  assert auto(4096, 192, 128, jnp.float32) == "xla"  # past the kernel's shared memory in fp32
  assert auto(4096, 320, 128, bf16) == "xla"
  # blocks by bytes: an fp32 head of 96 (padded 128) takes a bf16 head of 256's blocks
  assert [flash_width(96, 64, d) for d in (bf16, jnp.float32)] == [128, 256]
  assert flash_width(24, 16, jnp.float32) == 128 and flash_width(192, 128, bf16) == 256
  with pytest.raises(ValueError, match="bf16 / fp16"):
    cudnn(*inputs(np.random.default_rng(3), 1, 64, 2, jnp.float32), None, 0.2)
  with pytest.raises(ValueError, match="divisible by 128 .*got 96"):
    cudnn(*inputs(np.random.default_rng(3), 1, 96, 2, jnp.bfloat16), jnp.ones((1, 96)), 0.2)
  with pytest.raises(ValueError, match="head dims up to 256"):
    flash(*inputs(np.random.default_rng(3), 1, 64, 2, jnp.float32, (200, 64, 64)), None, 0.2,
          interpret=True)
  with pytest.raises(ValueError, match=r"\(128 in fp32\), got 192 in float32"):
    flash(*inputs(np.random.default_rng(3), 1, 64, 2, jnp.float32, (128, 64, 128)), None, 0.2,
          interpret=True)
  with pytest.raises(ValueError, match="divide the sequence length 48"):
    flash(*inputs(np.random.default_rng(3), 1, 48, 2, jnp.float32), None, 0.2, interpret=True)
  q = jnp.ones((1, 8, 2, 4))
  with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
    causal_attention(q, q, q, scale=1.0, impl="flash")
  with pytest.raises(ValueError, match=r"v must be \[B, T, H, V\]"):
    causal_attention(q, q, q[:, :4], scale=1.0)
  with pytest.raises(ValueError, match="both be given"):
    causal_attention(q, q, q, scale=1.0, q_rope=q)


@gpu
@pytest.mark.parametrize("dims", [(64, 32, 64), (128, 64, 128)])  # ling_small, Ling-2.6-flash
def test_gpu_flash_matches_xla_bf16_with_grads(dims):
  rng = np.random.default_rng(4)
  seg, pos = packed(rng, 2, 1024)
  args = inputs(rng, 2, 1024, 4, jnp.bfloat16, dims)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)
  f_xla = lambda *a: xla_attention(*a, seg, pos, 0.2)
  f_flash = lambda *a: flash(*a, seg, 0.2)
  assert rel(jax.jit(f_flash)(*args), np_attention(*args, seg, pos, 0.2)) < 2e-2
  want = jax.jit(jax.grad(loss(f_xla), argnums=range(5)))(*args)
  got = jax.jit(jax.grad(loss(f_flash), argnums=range(5)))(*args)
  for g, w in zip(got, want):
    assert rel(g, w) < 3e-2


@gpu
def test_gpu_flash_matches_float64_in_fp32_at_ling_small_dims():
  """fp32 picks the blocks of a head twice as wide (flash_width): on 128-row blocks this shape
  asked for more shared memory than an H100 has."""
  rng = np.random.default_rng(5)
  seg, pos = packed(rng, 2, 1024)
  args = inputs(rng, 2, 1024, 4, jnp.float32, (64, 32, 64))
  got = jax.jit(lambda *a: flash(*a, seg, 0.2))(*args)
  assert rel(got, np_attention(*args, seg, pos, 0.2)) < 1e-2  # TF32 dots
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(flash(*a, seg, 0.2) ** 2), argnums=range(5)))(*args)
  with jax.default_matmul_precision("highest"):
    want = jax.grad(lambda *a: jnp.sum(xla_attention(*a, seg, pos, 0.2) ** 2),
                    argnums=range(5))(*args)
  for g, w in zip(grads, want):
    assert rel(g, w) < 2e-2


def test_segment_offsets_against_python_runs():
  rng = np.random.default_rng(5)
  B, T = 3, 50
  seg = np.cumsum(rng.random((B, T)) < 0.2, axis=1) + 7  # random runs, ids not starting at 0
  seg[2] = 3  # one document
  offsets, lengths, count = segment_offsets(jnp.asarray(seg, jnp.int32), 12)
  for b in range(B):
    starts = [t for t in range(T) if t == 0 or seg[b, t] != seg[b, t - 1]]
    runs = [e - s for s, e in zip(starts, [*starts[1:], T])]
    assert count[b] == len(starts)
    n = min(len(starts), 12)
    assert list(offsets[b]) == (starts + [-1] * 13)[:13]
    assert list(lengths[b, :n]) == runs[:n] and (len(starts) > 12 or list(lengths[b, n:]) == [-1] * (12 - n))

  rung = lambda *c: int(ladder_rung(jnp.asarray(c), (8, 16, 32)))
  assert [rung(1, 8), rung(9, 2), rung(3, 16), rung(17), rung(32, 1), rung(33, 1)] == [0, 1, 1, 2, 2, 3]


@gpu
@pytest.mark.parametrize("dims", [(64, 32, 64), (128, 64, 128)])  # ling_small, Ling-2.6-flash
@pytest.mark.parametrize("docs", ["4", "11", "none", "too_many"])
def test_gpu_cudnn_matches_float64_and_xla_grads(dims, docs):
  """cuDNN's packed layout (each document its own causal sequence) at two rungs of the ladder,
  the unsegmented causal call, and more documents than the ladder holds (the flash kernel)."""
  rng = np.random.default_rng(6)
  T = 1024
  seg, pos = packed(rng, 2, T, docs=11 if docs == "11" else 4)
  if docs == "none":
    seg, pos = None, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
  args = inputs(rng, 2, T, 4, jnp.bfloat16, dims)
  ladder = (2,) if docs == "too_many" else CUDNN_SEGMENT_LADDER
  f_cudnn = lambda *a: cudnn(*a, seg, 0.2, ladder=ladder)
  ids = jnp.ones((2, T), jnp.int32) if seg is None else seg
  assert rel(jax.jit(f_cudnn)(*args), np_attention(*args, ids, pos, 0.2)) < 2e-2
  loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)
  want = jax.jit(jax.grad(loss(lambda *a: xla_attention(*a, ids, pos, 0.2)), argnums=range(5)))(*args)
  got = jax.jit(jax.grad(loss(f_cudnn), argnums=range(5)))(*args)
  for g, w in zip(got, want):
    assert rel(g, w) < 3e-2
