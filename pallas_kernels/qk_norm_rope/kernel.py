"""QK norm + partial NeoX RoPE in Pallas (Triton lowering): one read of qkv, one write of q, k, v.

XLA spreads the Lightning layer's cut of qkv, the two per-head RMSNorms and the RoPE (and far
more so their autodiff: the norms' reductions, RoPE's transpose, the re-concatenation of dq, dk,
dv into d qkv) over many memory-bound fusions. Here a program owns a block of tokens (block_t,
block_t_bwd) with all H heads and the whole head dim K of q, k and v:
  forward:  qkv -> q = rope(w_q * dtype(x_q r_q)), k likewise, v = dtype(qkv[:, 2])
            with r = rsqrt(mean(x^2) + eps) per (token, head), in fp32;
  backward: qkv, dq, dk, dv -> d qkv (recomputing r: nothing but qkv is saved), and this block's
            sums over its tokens and heads of dy * dtype(x r) for dw_q, dw_k ([blocks, K] fp32,
            summed in XLA), where dy is the cotangent at the norm's output (RoPE transposed).
Same roundings as autodiff of reference.py: x cast to dtype, the normalised x cast to dtype
before the weight, the norm's output in dtype, RoPE in fp32 then cast; in the backward the RoPE
cotangent cast to dtype, dy * w cast to dtype, dx cast to dtype and then to qkv's dtype.

Gather-free rotate-half: the head dim is handled as static slices of the refs, each a power of
two wide (Triton's tensors must be): the rotated first half [0, R/2) and second half
[R/2, R) are cut into the same power-of-two pieces (R/2 = 32: one piece each; R/2 = 24: 16 + 8),
so x[j] and its partner x[j + R/2] sit at the same position of two loaded tensors; the
pass-through dims [R, K) are cut into powers of two too (K - R = 96: 64 + 32). Row statistics
sum over the pieces. Any even R <= K works; H must be a power of two (a block dim).
Tail tokens (N not a multiple of the block) are masked loads (as zeros, which add nothing to dw)
and masked stores.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


class Config(NamedTuple):
  eps: float
  dtype: jnp.dtype          # compute dtype (q, k, v's)
  # 0: auto. From the H100 sweep at ling_small's shape (BENCHMARKS.md#qk_norm_rope): 8K elements
  # of each part a program (8 tokens at H K = 1024), forward and backward, at 4 warps; 16K
  # (8 warps) was 0.230 / 0.719 ms forward / forward+backward against 0.205 / 0.618.
  block_t: int = 0          # forward: tokens a program
  block_t_bwd: int = 0      # backward: tokens a program
  num_warps: int = 0
  num_warps_bwd: int = 0
  interpret: bool = False


def _pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


def _pow2_floor(n: int) -> int:
  return 1 << (max(1, n).bit_length() - 1)


def launch(cfg: Config, n_tokens: int, heads: int, head_dim: int, bwd: bool) -> tuple[int, int]:
  """(tokens a program, warps) of the forward or the backward kernel."""
  bt, warps = (cfg.block_t_bwd, cfg.num_warps_bwd) if bwd else (cfg.block_t, cfg.num_warps)
  if not bt:
    bt = min(64, _pow2_floor(8192 // (heads * head_dim)))
    bt = max(1, min(bt, 1 << max(0, n_tokens - 1).bit_length()))  # no bigger than N needs
  return bt, warps or 4


def check_config(cfg: Config):
  for name in ("block_t", "block_t_bwd", "num_warps", "num_warps_bwd"):
    v = getattr(cfg, name)
    if v < 0 or (v and not _pow2(v)):
      raise ValueError(f"{name}={v} must be a power of two (or 0: auto)")


def unsupported(heads: int, head_dim: int, rotary_dim: int) -> str | None:
  """Why the kernel cannot run this shape, or None."""
  if not _pow2(heads):
    return f"heads={heads} is not a power of two (a Triton block dim)"
  if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
    return f"rotary dim {rotary_dim} must be even and in (0, head_dim={head_dim}]"
  return None


def _pow2_pieces(start: int, width: int) -> list[tuple[int, int]]:
  """[start, start + width) as (offset, size) runs of power-of-two sizes, largest first."""
  out = []
  for bit in reversed(range(width.bit_length())):
    if width >> bit & 1:
      out.append((start, 1 << bit))
      start += 1 << bit
  return out


def _f32(x, dtype):
  """Round to `dtype`, then compute in fp32 (exact: every dtype here fits in fp32)."""
  return x.astype(dtype).astype(jnp.float32)


class _Block:
  """A program's tokens: masked loads and stores of [BT, H, size] slices of the head dim."""

  def __init__(self, cfg: Config, bt: int, n_tokens: int):
    t = pl.program_id(0) * bt + jnp.arange(bt, dtype=jnp.int32)
    self.valid = t < n_tokens  # [BT]
    self.cfg = cfg

  @staticmethod
  def _at(ref, part, a, size):
    """ref[:, part, :, a:a+size] of qkv-shaped refs ([BT, 3, H, K]), ref[:, :, a:a+size] of
    q-shaped ones (part None)."""
    if part is None:
      return ref.at[:, :, pl.ds(a, size)]
    return ref.at[:, jnp.int32(part), :, pl.ds(a, size)]  # a jnp index: interpret mode needs it

  def load(self, ref, part, a, size):
    return plt.load(self._at(ref, part, a, size), mask=self.valid[:, None, None], other=0)

  def store(self, ref, part, a, val):
    plt.store(self._at(ref, part, a, val.shape[-1]), val.astype(ref.dtype),
              mask=self.valid[:, None, None])

  def cos_sin(self, cos_ref, sin_ref, a, size):
    m = self.valid[:, None]
    c = plt.load(cos_ref.at[:, pl.ds(a, size)], mask=m, other=0)
    s = plt.load(sin_ref.at[:, pl.ds(a, size)], mask=m, other=0)
    return c[:, None, :], s[:, None, :]  # [BT, 1, size]

  def layout(self, cos_ref, sin_ref, K: int, half: int):
    """(rot: rotation pieces (a, size) of [0, R/2), each with its partner at a + R/2; pieces:
    rot, the partners, then the pass-through pieces of [R, K); cs: each rot piece's (cos, sin))."""
    rot = _pow2_pieces(0, half)
    pieces = rot + [(half + a, size) for a, size in rot] + _pow2_pieces(2 * half, K - 2 * half)
    return rot, pieces, [self.cos_sin(cos_ref, sin_ref, a, size) for a, size in rot]

  def normalise(self, qkv_ref, part, pieces, K):
    """x pieces (dtype-rounded, fp32) and r = rsqrt(mean(x^2) + eps) [BT, H, 1]."""
    xs = [_f32(self.load(qkv_ref, part, a, size), self.cfg.dtype) for a, size in pieces]
    ss = sum(jnp.sum(x * x, axis=-1) for x in xs)
    return xs, jax.lax.rsqrt(ss / K + self.cfg.eps)[:, :, None]


def _fwd_kernel(qkv_ref, wq_ref, wk_ref, cos_ref, sin_ref, q_ref, k_ref, v_ref, *,
                cfg: Config, bt: int, n_tokens: int, half: int):
  K = v_ref.shape[-1]
  blk, dt = _Block(cfg, bt, n_tokens), cfg.dtype
  rot, pieces, cs = blk.layout(cos_ref, sin_ref, K, half)
  n = len(rot)
  for part, w_ref, o_ref in ((0, wq_ref, q_ref), (1, wk_ref, k_ref)):
    xs, r = blk.normalise(qkv_ref, part, pieces, K)
    # the norm's output in dtype: w * dtype(x r), the product rounded to dtype
    ys = [_f32(_f32(w_ref[pl.ds(a, size)], dt)[None, None, :] * _f32(x * r, dt), dt)
          for (a, size), x in zip(pieces, xs)]
    for j, ((a, _), (c, s)) in enumerate(zip(rot, cs)):
      y1, y2 = ys[j], ys[n + j]
      blk.store(o_ref, None, a, (y1 * c - y2 * s).astype(dt))
      blk.store(o_ref, None, half + a, (y2 * c + y1 * s).astype(dt))
    for (a, _), y in zip(pieces[2 * n:], ys[2 * n:]):
      blk.store(o_ref, None, a, y.astype(dt))
  for a, size in _pow2_pieces(0, K):
    blk.store(v_ref, None, a, blk.load(qkv_ref, 2, a, size).astype(dt))


def _bwd_kernel(qkv_ref, wq_ref, wk_ref, cos_ref, sin_ref, dq_ref, dk_ref, dv_ref,
                dqkv_ref, dwq_ref, dwk_ref, *, cfg: Config, bt: int, n_tokens: int, half: int):
  K = dv_ref.shape[-1]
  blk, dt = _Block(cfg, bt, n_tokens), cfg.dtype
  rot, pieces, cs = blk.layout(cos_ref, sin_ref, K, half)
  n = len(rot)
  for part, w_ref, do_ref, dw_ref in ((0, wq_ref, dq_ref, dwq_ref),
                                      (1, wk_ref, dk_ref, dwk_ref)):
    xs, r = blk.normalise(qkv_ref, part, pieces, K)
    xrs = [x * r for x in xs]
    gs = [blk.load(do_ref, None, a, size).astype(jnp.float32) for a, size in pieces]
    # dy: the cotangent at the norm's output, in dtype (RoPE's transpose, cast like autodiff's)
    dys = [None] * len(pieces)
    for j, (c, s) in enumerate(cs):
      g1, g2 = gs[j], gs[n + j]
      dys[j], dys[n + j] = _f32(g1 * c + g2 * s, dt), _f32(g2 * c - g1 * s, dt)
    dys[2 * n:] = [_f32(g, dt) for g in gs[2 * n:]]
    # dw first, so that only x r and dn stay live (registers) for dx; masked (zero) tokens add
    # 0 here: x = 0 gives x r = 0, and dy = 0
    dns = []
    for (a, size), dy, xr in zip(pieces, dys, xrs):
      dw_ref[pl.ds(a, size)] = jnp.sum(dy * _f32(xr, dt), axis=(0, 1))
      dns.append(_f32(dy * _f32(w_ref[pl.ds(a, size)], dt)[None, None, :], dt))
    c_row = sum(jnp.sum(dn * xr, axis=-1) for dn, xr in zip(dns, xrs))[:, :, None] / K
    for (a, _), dn, xr in zip(pieces, dns, xrs):
      blk.store(dqkv_ref, part, a, (r * (dn - xr * c_row)).astype(dt))
  for a, size in _pow2_pieces(0, K):
    blk.store(dqkv_ref, 2, a, blk.load(dv_ref, None, a, size).astype(dt))


def _call(kernel, cfg, N, H, K, half, bwd, in_specs, out_specs, out_shape, name):
  bt, warps = launch(cfg, N, H, K, bwd)
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg, bt=bt, n_tokens=N, half=half),
      grid=(pl.cdiv(N, bt),), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1),
      interpret=cfg.interpret, name=name)


def _specs(cfg, N, H, K, half, bwd):
  bt, _ = launch(cfg, N, H, K, bwd)
  qkv = pl.BlockSpec((bt, 3, H, K), lambda i: (i, 0, 0, 0))
  heads = pl.BlockSpec((bt, H, K), lambda i: (i, 0, 0))
  weight = pl.BlockSpec((K,), lambda i: (0,))
  rope = pl.BlockSpec((bt, half), lambda i: (i, 0))
  partial = pl.BlockSpec((None, K), lambda i: (i, 0))
  return pl.cdiv(N, bt), qkv, heads, weight, rope, partial


def _forward(qkv, wq, wk, cos, sin, cfg: Config):
  N, _, H, K = qkv.shape
  half = cos.shape[-1]
  _, qkv_s, heads, weight, rope, _ = _specs(cfg, N, H, K, half, bwd=False)
  out = jax.ShapeDtypeStruct((N, H, K), cfg.dtype)
  return _call(_fwd_kernel, cfg, N, H, K, half, False, [qkv_s, weight, weight, rope, rope],
               [heads] * 3, [out] * 3, "qk_norm_rope_fwd")(qkv, wq, wk, cos, sin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _qk_norm_rope(qkv, wq, wk, cos, sin, cfg: Config):
  return tuple(_forward(qkv, wq, wk, cos, sin, cfg))


def _qk_norm_rope_fwd(qkv, wq, wk, cos, sin, cfg):
  return tuple(_forward(qkv, wq, wk, cos, sin, cfg)), (qkv, wq, wk, cos, sin)


def _qk_norm_rope_bwd(cfg, res, cotangents):
  qkv, wq, wk, cos, sin = res
  dq, dk, dv = cotangents
  N, _, H, K = qkv.shape
  half = cos.shape[-1]
  nb, qkv_s, heads, weight, rope, partial = _specs(cfg, N, H, K, half, bwd=True)
  partials = jax.ShapeDtypeStruct((nb, K), jnp.float32)
  dqkv, dwq, dwk = _call(
      _bwd_kernel, cfg, N, H, K, half, True,
      [qkv_s, weight, weight, rope, rope, heads, heads, heads], [qkv_s, partial, partial],
      [jax.ShapeDtypeStruct(qkv.shape, qkv.dtype), partials, partials],
      "qk_norm_rope_bwd")(qkv, wq, wk, cos, sin, dq, dk, dv)
  # cos and sin come from integer positions: no gradient
  return dqkv, dwq.sum(0).astype(wq.dtype), dwk.sum(0).astype(wk.dtype), None, None


_qk_norm_rope.defvjp(_qk_norm_rope_fwd, _qk_norm_rope_bwd)


def qk_norm_rope_pallas(qkv, wq, wk, cos, sin, cfg: Config):
  """qkv [N, 3, H, K] (any float dtype), wq, wk [K], cos, sin [N, R/2] fp32 -> (q, k, v), each
  [N, H, K] in cfg.dtype; differentiable in qkv, wq and wk."""
  N, three, H, K = qkv.shape
  check_config(cfg)
  reason = unsupported(H, K, 2 * cos.shape[-1])
  if three != 3 or reason:
    raise ValueError(f"qk_norm_rope_pallas: qkv {qkv.shape}: {reason or 'needs [N, 3, H, K]'}")
  if wq.shape != (K,) or wk.shape != (K,) or cos.ndim != 2 or cos.shape[0] != N or (
      sin.shape != cos.shape):
    raise ValueError(f"qk_norm_rope_pallas: wq {wq.shape}, wk {wk.shape}, cos {cos.shape}, "
                     f"sin {sin.shape} do not fit qkv {qkv.shape}")
  return _qk_norm_rope(qkv, wq, wk, cos.astype(jnp.float32), sin.astype(jnp.float32), cfg)
