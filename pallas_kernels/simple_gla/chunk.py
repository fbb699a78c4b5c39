"""Chunked simple GLA in Pallas (Triton lowering): forward, backward and the custom_vjp op.

On a Hopper GPU the forward (its o pass and the sequence splits' states-only pre-pass) and the
backward (dq as the o pass of (do, v, k); dv, dk and the splits' d-state pre-pass from its
reverse scan) run the Mosaic GPU kernels of mosaic.py where they apply (bf16, T a multiple of 64;
forward 1.4-1.5x, forward+backward 1.25x faster than the Triton code, BENCHMARKS.md). Elsewhere
(tails, fp32, other GPUs, interpret mode) it is the Triton code below.

The op (docs/architecture.md §3.4.5), per batch b and head h, with a per-head constant log-decay
g_h < 0:
  S_t = exp(g_h) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t   (state S [K, V] in fp32).

Design (one pass over the sequence, state on chip):
  * Two kernels, each on the grid (B, H, j). A program owns a block of the fp32 state of one
    (b, h) and walks that sequence's chunks of C tokens in order, so the state never goes to
    HBM except the final state. The forward scan (j over V-blocks, S [K, block_v]) does, per
    chunk (local index i, j in [0, C)):
      o   = scale * ((q k^T * D) v + (q * a) S),  D_ij = exp(g (i - j)) for i >= j, a_i = exp(g (i+1))
      S  <- exp(g L) S + (k * b)^T v,             b_j = exp(g (L-1-j)), L = valid rows of the chunk.
  * The backward stores no states: dq is the same forward scan with j over K-blocks
    (S [block_k, V], recomputed on the fly); dk and dv come from the reverse scan carrying dS:
      dq = scale * ((do v^T * D) k + (do S^T) * a)
      dk = scale * (do v^T * D)^T q + (v dS'^T) * b     (dS' = dS after the chunk)
      dv = scale * (q k^T * D)^T do + (k * b) dS'
      dS = exp(g L) dS' + scale * (q * a)^T do.
    dq and dk contract over V, dv over K, so dq and dk are blocked over K and dv over V: every
    output block is exact (no partial sums). dk and dv share one reverse scan (dS [K, V]) when
    block_k_bwd >= K and block_v_bwd >= V, else they are two launches (dS [block_k, V] and
    dS [K, block_v]), trading a second read of q, do for half the registers and 2x the width.
  * Sequence splits, for few (b, h) pairs (B H V/block_v well under two waves of SMs): the
    sequence is cut into P equal pieces run as P times the batch (a free reshape). A states-only
    pass gives each piece's state from zero, a P-step scan in XLA gives the state entering each
    piece, and the full kernel runs with those as initial states. The backward does the same
    with dS (a dS-only pass, a reverse scan, then the dk/dv kernel), and dq reuses the saved
    piece-start states. Costs one extra read of k, v (q, do in the backward) for P-fold width.
  * Packed sequences: segment ids become a non-decreasing reset counter r (cumsum of
    boundaries), so "same segment" is r_i == r_j; D, a, b and the carried decay are masked with
    it, and the initial state only reaches tokens in the segment of r == 0.

Numerics: decays are only ever exp of a non-positive number (exp(g (i - j)) is selected by a
where on i >= j, never formed as exp(g i) * exp(-g j), which overflows for steep heads); masks
are applied with jnp.where, never multiplied into a possibly infinite value. Tail rows of the
last chunk are loaded as zeros and get a zero key decay, so they neither decay nor enter the
state. Matmul operands are in the input dtype (bf16 in production) with fp32 accumulation; fp32
inputs use full-precision dots (no TF32).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.simple_gla import mosaic

TARGET_PROGRAMS = 256  # ~2 waves on an H100's 132 SMs; fewer (b, h, v-block) programs -> split T


class Config(NamedTuple):
  """Static kernel parameters (hashable, so they can ride in custom_vjp's nondiff args)."""
  scale: float
  chunk: int = 64
  block_v: int = 64            # V-block of the forward (o) scan
  block_k_bwd: int = 64        # K-block of the dq and dk scans
  block_v_bwd: int = 64        # V-block of the dv scan (both >= K, V: one fused dk/dv scan)
  num_warps: int = 4
  num_warps_bwd: int = 4
  num_stages: int = 2
  splits: int = 1              # sequence pieces (see the module docstring)
  fwd_kernel: str = "auto"     # the forward's scans (o, the splits' states): "triton" (this
                               # file), "mosaic" (mosaic.py), or "auto": mosaic where it applies
                               # on a Hopper GPU (wgmma is sm_90 only), never in interpret mode
  bwd_kernel: str = "auto"     # the backward's scans (dq, dk/dv, the splits' d states): the
                               # same three choices as fwd_kernel
  mosaic_stages: int = 2       # TMA ring depth of the Mosaic forward
  interpret: bool = False


# ----------------------------------------------------------------------------- shared pieces


def _dot(a, b, *, ta=False, tb=False):
  # HIGHEST keeps fp32 operands out of TF32; bf16 operands are unaffected.
  return plt.dot(a, b, trans_a=ta, trans_b=tb, precision=lax.Precision.HIGHEST)


def _decays(g, n_valid, chunk, r=None, r_prev=None):
  """Decay factors of one chunk: D [C, C], a [C], b [C] and the carried decay (scalar).

  g: fp32 scalar log-decay; n_valid: rows of this chunk inside the sequence (1..C);
  r: [C] reset counter of the chunk's tokens; r_prev: reset counter of the token before it.
  """
  i = jnp.arange(chunk, dtype=jnp.int32)
  diff = i[:, None] - i[None, :]  # [C, C]
  causal = diff >= 0
  # exp of the clamped (non-positive) exponent, then select: no overflow, no inf * 0.
  D = jnp.exp(g * jnp.where(causal, diff, 0).astype(jnp.float32))
  a = jnp.exp(g * (i + 1).astype(jnp.float32))
  tail = n_valid - 1 - i
  in_chunk = tail >= 0
  b = jnp.exp(g * jnp.maximum(tail, 0).astype(jnp.float32))
  carry = jnp.exp(g * n_valid.astype(jnp.float32))
  if r is None:
    return jnp.where(causal, D, 0.0), a, jnp.where(in_chunk, b, 0.0), carry
  r_last = jnp.max(jnp.where(in_chunk, r, 0))  # r is non-decreasing
  D = jnp.where(causal & (r[:, None] == r[None, :]), D, 0.0)
  a = jnp.where(r == r_prev, a, 0.0)
  b = jnp.where(in_chunk & (r == r_last), b, 0.0)
  carry = jnp.where(r_last == r_prev, carry, 0.0)
  return D, a, b, carry


def _rows(n, chunk, T):
  start = n * chunk
  valid = (start + jnp.arange(chunk, dtype=jnp.int32)) < T
  n_valid = jnp.minimum(T - start, chunk).astype(jnp.int32)
  return pl.ds(start, chunk), valid, n_valid


def _load(ref, sl, valid):
  return plt.load(ref.at[sl, :], mask=valid[:, None], other=0)


def _load_r(r_ref, sl, valid):
  return plt.load(r_ref.at[sl], mask=valid, other=0)


def _r_before(r_ref, n, chunk):
  # Reset counter of the token before chunk n; the initial state is segment 0.
  return jnp.where(n == 0, 0, r_ref[jnp.maximum(n * chunk - 1, 0)])


def _take(refs, *flags):
  """Pops one ref per flag (None where the flag is off), in order."""
  return [refs.pop(0) if f else None for f in flags]


# ----------------------------------------------------------------------------- kernels


def _scan_kernel(g_ref, *refs, cfg: Config, emit: str, has_h0: bool, has_r: bool):
  """Forward in time over the state block S [BK, BV], one chunk at a time.

  emit="o":     q, k [T, K], v [T, BV] -> o [T, BV] and the final state (BK = K).
  emit="dq":    k [T, BK], v, do [T, V] -> dq [T, BK] (BV = V).
  emit="state": k [T, K], v [T, BV] -> the final state only.
  """
  refs = list(refs)
  q_ref, k_ref, v_ref, do_ref, r_ref, h0_ref = _take(
      refs, emit == "o", 1, 1, emit == "dq", has_r, has_h0)
  out_ref, ht_ref = _take(refs, emit != "state", emit != "dq")
  T, BK = k_ref.shape
  BV = v_ref.shape[-1]
  C = cfg.chunk
  g = g_ref[0]
  S = h0_ref[...].astype(jnp.float32) if has_h0 else jnp.zeros((BK, BV), jnp.float32)

  def body(n, carry):
    S, r_prev = carry
    sl, valid, n_valid = _rows(n, C, T)
    k, v = _load(k_ref, sl, valid), _load(v_ref, sl, valid)
    r = _load_r(r_ref, sl, valid) if has_r else None
    D, a, b, decay = _decays(g, n_valid, C, r, r_prev)
    Sc = S.astype(k.dtype)
    if emit == "o":
      q = _load(q_ref, sl, valid)
      A = _dot(q, k, tb=True) * D  # [C, C]
      out = _dot(A.astype(v.dtype), v) + _dot((q * a[:, None]).astype(q.dtype), Sc)  # [C, BV]
    elif emit == "dq":
      do = _load(do_ref, sl, valid)
      dA = _dot(do, v, tb=True) * D  # [C, C]
      out = _dot(dA.astype(k.dtype), k) + a[:, None] * _dot(do, Sc, tb=True)  # [C, BK]
    if emit != "state":
      plt.store(out_ref.at[sl, :], (cfg.scale * out).astype(out_ref.dtype), mask=valid[:, None])
    S = decay * S + _dot((k * b[:, None]).astype(k.dtype), v, ta=True)  # [BK, BV]
    if has_r:
      r_prev = jnp.max(jnp.where(valid, r, 0))
    return S, r_prev

  S, _ = lax.fori_loop(0, pl.cdiv(T, C), body, (S, jnp.int32(0)))
  if ht_ref is not None:
    ht_ref[...] = S


def _rscan_kernel(g_ref, *refs, cfg: Config, emit_dk: bool, emit_dv: bool, has_r: bool):
  """Backward in time over the state-gradient block dS [BK, BV], one chunk at a time.

  Always q [T, BK], do [T, BV] -> dS at the sequence start (d initial state).
  emit_dv (BK = K): also k [T, K] -> dv [T, BV].  emit_dk (BV = V): also v [T, V] -> dk [T, BK].
  Neither: dS from a zero final-state gradient (the dS-only pass of sequence splits).
  """
  refs = list(refs)
  full = emit_dk or emit_dv
  q_ref, k_ref, v_ref, do_ref, dht_ref, r_ref = _take(refs, 1, emit_dv, emit_dk, 1, full, has_r)
  dk_ref, dv_ref, dh0_ref = _take(refs, emit_dk, emit_dv, 1)
  T, BK = q_ref.shape
  BV = do_ref.shape[-1]
  C = cfg.chunk
  g = g_ref[0]
  nc = pl.cdiv(T, C)

  def body(m, dS):
    n = nc - 1 - m
    sl, valid, n_valid = _rows(n, C, T)
    q, do = _load(q_ref, sl, valid), _load(do_ref, sl, valid)
    r = _load_r(r_ref, sl, valid) if has_r else None
    r_prev = _r_before(r_ref, n, C) if has_r else None
    D, a, b, decay = _decays(g, n_valid, C, r, r_prev)
    dSc = dS.astype(q.dtype)
    if emit_dv:
      k = _load(k_ref, sl, valid)
      A = _dot(q, k, tb=True) * D  # [C, C]
      dv = cfg.scale * _dot(A.astype(do.dtype), do, ta=True)
      dv += _dot((k * b[:, None]).astype(k.dtype), dSc)  # [C, BV]
      plt.store(dv_ref.at[sl, :], dv.astype(dv_ref.dtype), mask=valid[:, None])
    if emit_dk:
      v = _load(v_ref, sl, valid)
      dA = _dot(do, v, tb=True) * D  # [C, C]
      dk = cfg.scale * _dot(dA.astype(q.dtype), q, ta=True)
      dk += b[:, None] * _dot(v, dSc, tb=True)  # [C, BK]
      plt.store(dk_ref.at[sl, :], dk.astype(dk_ref.dtype), mask=valid[:, None])
    qa = (q * a[:, None]).astype(q.dtype)
    return decay * dS + cfg.scale * _dot(qa, do, ta=True)  # [BK, BV]

  dS = dht_ref[...].astype(jnp.float32) if full else jnp.zeros((BK, BV), jnp.float32)
  dh0_ref[...] = lax.fori_loop(0, nc, body, dS)


# ----------------------------------------------------------------------------- pallas_calls


def _opt(flag, *xs):
  return list(xs) if flag else []


def _block(n, bn, what):
  bn = min(bn, n)
  if n % bn or bn < 16 or bn & (bn - 1):
    raise ValueError(f"{what}={bn} must be a power of two >= 16 dividing {n}")
  return bn


def _call(kernel, args, in_specs, outs, out_shapes, grid, cfg, name, num_warps):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=outs, out_shape=out_shapes,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name=name)(*args)


class _Tiles:
  """BlockSpecs of one launch whose grid is (B, H, j): j walks K-blocks or V-blocks."""

  def __init__(self, T, BK, BV, k_blocked):
    self.T, self.BK, self.BV, self.kb = T, BK, BV, k_blocked
    self.head = pl.BlockSpec((1,), lambda b, h, j: (h,))
    self.r = pl.BlockSpec((None, T), lambda b, h, j: (b, 0))
    st = (lambda b, h, j: (b, h, j, 0)) if k_blocked else (lambda b, h, j: (b, h, 0, j))
    self.state = pl.BlockSpec((None, None, BK, BV), st)

  def seq(self, blocked, width):  # a [B, T, H, width or its j-th block] activation
    return pl.BlockSpec((None, self.T, None, width),
                        (lambda b, h, j: (b, 0, h, j)) if blocked else (lambda b, h, j: (b, 0, h, 0)))

  @property
  def k(self):  # q / k tiles: [T, BK]
    return self.seq(self.kb, self.BK)

  @property
  def v(self):  # v / do / o tiles: [T, BV]
    return self.seq(not self.kb, self.BV)


def _scan_call(emit, q, k, v, do, g, h0, r, cfg: Config):
  """emit "o": (o, final state); "state": final state; "dq": dq. See _scan_kernel."""
  B, T, H, K = k.shape
  V = v.shape[-1]
  if emit == "dq":
    BK, BV = _block(K, cfg.block_k_bwd, "block_k_bwd"), V
  else:
    BK, BV = K, _block(V, cfg.block_v, "block_v")
  nj = K // BK if emit == "dq" else V // BV
  t = _Tiles(T, BK, BV, k_blocked=emit == "dq")
  has_r, has_h0 = r is not None, h0 is not None
  args = [g, *_opt(emit == "o", q), k, v, *_opt(emit == "dq", do), *_opt(has_r, r),
          *_opt(has_h0, h0)]
  specs = [t.head, *_opt(emit == "o", t.k), t.k, t.v, *_opt(emit == "dq", t.v),
           *_opt(has_r, t.r), *_opt(has_h0, t.state)]
  state = jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)
  if emit == "o":
    outs, shapes = [t.v, t.state], [jax.ShapeDtypeStruct(v.shape, q.dtype), state]
  elif emit == "dq":
    outs, shapes = t.k, jax.ShapeDtypeStruct(k.shape, k.dtype)
  else:
    outs, shapes = t.state, state
  kernel = functools.partial(_scan_kernel, cfg=cfg, emit=emit, has_h0=has_h0, has_r=has_r)
  return _call(kernel, args, specs, outs, shapes, (B, H, nj), cfg, f"simple_gla_scan_{emit}",
               cfg.num_warps_bwd if emit == "dq" else cfg.num_warps)


def _rscan_call(q, k, v, do, g, dht, r, cfg: Config, emit_dk: bool, emit_dv: bool):
  """[dk if emit_dk] + [dv if emit_dv] + [d initial state]. See _rscan_kernel."""
  B, T, H, K = q.shape
  V = do.shape[-1]
  BK = _block(K, cfg.block_k_bwd, "block_k_bwd") if emit_dk and not emit_dv else K
  BV = V if emit_dk else _block(V, cfg.block_v_bwd, "block_v_bwd")
  k_blocked = BK < K
  t = _Tiles(T, BK, BV, k_blocked)
  full, has_r = emit_dk or emit_dv, r is not None
  args = [g, q, *_opt(emit_dv, k), *_opt(emit_dk, v), do, *_opt(full, dht), *_opt(has_r, r)]
  specs = [t.head, t.k, *_opt(emit_dv, t.seq(False, K)), *_opt(emit_dk, t.seq(False, V)), t.v,
           *_opt(full, t.state), *_opt(has_r, t.r)]
  outs = [*_opt(emit_dk, t.k), *_opt(emit_dv, t.v), t.state]
  shapes = [*_opt(emit_dk, jax.ShapeDtypeStruct(q.shape, q.dtype)),
            *_opt(emit_dv, jax.ShapeDtypeStruct(do.shape, do.dtype)),
            jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
  kernel = functools.partial(_rscan_kernel, cfg=cfg, emit_dk=emit_dk, emit_dv=emit_dv, has_r=has_r)
  name = "simple_gla_rscan_" + ("dk" * emit_dk + "dv" * emit_dv or "state")
  return _call(kernel, args, specs, outs, shapes, (B, H, K // BK if k_blocked else V // BV), cfg,
               name, cfg.num_warps_bwd)


def _grads(q, k, v, do, g, h0, dht, r, cfg: Config):
  """(dq, dk, dv, d initial state) of one piece; dk and dv share a launch if both fit one block."""
  K, V = q.shape[-1], v.shape[-1]
  if _use_mosaic_bwd(k, v, cfg):
    # dq = scale ((do v^T * D) k + (do S^T) * a) is the forward's o with (q, k, v) = (do, v, k):
    # the state built from keys v and values k is S^T, starting at h0^T. dk is dv's reverse scan
    # with (q, k, do) = (do, v, q), whose state is dS^T.
    tr = lambda x: None if x is None else jnp.swapaxes(x, -1, -2)
    kw = dict(scale=cfg.scale, stages=cfg.mosaic_stages, interpret=cfg.interpret)
    dq, _ = mosaic.forward(do, v, k, g, tr(h0), r, **kw)
    dv, dh0 = mosaic.backward_kv(q, k, do, g, dht, r, **kw)
    dk, _ = mosaic.backward_kv(do, v, q, g, tr(dht), r, **kw)
    return dq, dk, dv, dh0
  dq = _scan_call("dq", None, k, v, do, g, h0, r, cfg)
  if cfg.block_k_bwd >= K and cfg.block_v_bwd >= V:
    dk, dv, dh0 = _rscan_call(q, k, v, do, g, dht, r, cfg, emit_dk=True, emit_dv=True)
  else:
    dk, dh0 = _rscan_call(q, k, v, do, g, dht, r, cfg, emit_dk=True, emit_dv=False)
    dv, _ = _rscan_call(q, k, v, do, g, dht, r, cfg, emit_dk=False, emit_dv=True)
  return dq, dk, dv, dh0


# ----------------------------------------------------------------------------- sequence splits


def _split(x, P):
  return x.reshape(x.shape[0] * P, x.shape[1] // P, *x.shape[2:])  # [B P, T / P, ...]


def _merge(x, P):
  return x.reshape(x.shape[0] // P, x.shape[1] * P, *x.shape[2:])  # [B, T, ...]


def _split_r(r, P):
  """Per-piece reset counters, rebased so 0 means "the segment of the token before the piece"."""
  B, T = r.shape
  pieces = r.reshape(B, P, T // P)
  before = jnp.concatenate([jnp.zeros((B, 1), r.dtype), pieces[:, :-1, -1]], axis=1)  # [B, P]
  return (pieces - before[..., None]).reshape(B * P, T // P)


def _piece_decay(g, r_split, B, P, Tp):
  """[B, P, H, 1, 1] decay across a whole piece: exp(g Tp), or 0 if the piece holds a reset."""
  d = jnp.broadcast_to(jnp.exp(g * Tp), (B, P, g.shape[0]))
  if r_split is not None:
    d = jnp.where((r_split.reshape(B, P, Tp)[..., -1] == 0)[..., None], d, 0.0)
  return d[..., None, None]


def _o_pass(q, k, v, g, h0, r, cfg: Config):
  """(o, final state) of each row: the Mosaic GPU kernel where it applies, else the Triton scan."""
  if _use_mosaic(k, v, cfg):
    return mosaic.forward(q, k, v, g, h0, r, scale=cfg.scale, stages=cfg.mosaic_stages,
                          interpret=cfg.interpret)
  return _scan_call("o", q, k, v, None, g, h0, r, cfg)


def _state_pass(k, v, g, r, cfg: Config):
  """Final state of each row from a zero state (the pieces' pre-pass): Mosaic or Triton."""
  if _use_mosaic(k, v, cfg):
    return mosaic.forward(None, k, v, g, None, r, scale=cfg.scale, stages=cfg.mosaic_stages,
                          interpret=cfg.interpret)
  return _scan_call("state", None, k, v, None, g, None, r, cfg)


def _mosaic_applies(kernel, k, v, cfg: Config):
  want = kernel == "mosaic" or (kernel == "auto" and not cfg.interpret and mosaic.on_hopper())
  return want and mosaic.supported(k, v, cfg.chunk)


def _use_mosaic(k, v, cfg: Config):
  return _mosaic_applies(cfg.fwd_kernel, k, v, cfg)


def _use_mosaic_bwd(k, v, cfg: Config):
  return _mosaic_applies(cfg.bwd_kernel, k, v, cfg)


def _forward(q, k, v, g, h0, r, cfg: Config):
  """(o, final state, piece-start states [B P, H, K, V] or None)."""
  P = cfg.splits
  if P == 1:
    return (*_o_pass(q, k, v, g, h0, r, cfg), None)
  B, T, H, K = q.shape
  ks, vs = _split(k, P), _split(v, P)
  rs = None if r is None else _split_r(r, P)
  local = _state_pass(ks, vs, g, rs, cfg).reshape(B, P, H, K, -1)
  decay = _piece_decay(g, rs, B, P, T // P)
  S = jnp.zeros_like(local[:, 0]) if h0 is None else h0.astype(jnp.float32)
  starts = []
  for p in range(P):
    starts.append(S)
    S = decay[:, p] * S + local[:, p]
  starts = jnp.stack(starts, 1).reshape(B * P, H, K, -1)
  o, _ = _o_pass(_split(q, P), ks, vs, g, starts, rs, cfg)
  return _merge(o, P), S, starts


def _backward(q, k, v, g, h0, r, starts, do, dht, cfg: Config):
  P = cfg.splits
  if P == 1:
    return _grads(q, k, v, do, g, h0, dht, r, cfg)
  B, T, H, K = q.shape
  qs, ks, vs, dos = (_split(x, P) for x in (q, k, v, do))
  rs = None if r is None else _split_r(r, P)
  if _use_mosaic_bwd(ks, vs, cfg):
    local = mosaic.backward_kv(qs, None, dos, g, None, rs, scale=cfg.scale,
                               stages=cfg.mosaic_stages, interpret=cfg.interpret)
  else:
    local, = _rscan_call(qs, None, None, dos, g, None, rs, cfg, emit_dk=False, emit_dv=False)
  local = local.reshape(B, P, H, K, -1)
  decay = _piece_decay(g, rs, B, P, T // P)
  dS, ends = dht, [None] * P
  for p in reversed(range(P)):
    ends[p] = dS
    dS = decay[:, p] * dS + local[:, p]
  ends = jnp.stack(ends, 1).reshape(B * P, H, K, -1)
  dq, dk, dv, _ = _grads(qs, ks, vs, dos, g, starts, ends, rs, cfg)
  return _merge(dq, P), _merge(dk, P), _merge(dv, P), dS


# ----------------------------------------------------------------------------- custom_vjp op


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _simple_gla(q, k, v, g, h0, r, cfg):
  return _forward(q, k, v, g, h0, r, cfg)[:2]


def _simple_gla_fwd(q, k, v, g, h0, r, cfg):
  o, ht, starts = _forward(q, k, v, g, h0, r, cfg)
  return (o, ht), (q, k, v, g, h0, r, starts)


def _simple_gla_bwd(cfg, res, cts):
  q, k, v, g, h0, r, starts = res
  do, dht = cts
  dq, dk, dv, dh0 = _backward(q, k, v, g, h0, r, starts, do.astype(q.dtype),
                              dht.astype(jnp.float32), cfg)
  dh0 = None if h0 is None else dh0.astype(h0.dtype)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), jnp.zeros_like(g), dh0, None


_simple_gla.defvjp(_simple_gla_fwd, _simple_gla_bwd)


def auto_splits(B, T, H, V, chunk=64, block_v=64, min_piece=1024):
  """Sequence pieces so that B H V/block_v programs reach TARGET_PROGRAMS (powers of two)."""
  P, programs = 1, B * H * max(1, V // block_v)
  while programs * P < TARGET_PROGRAMS and T % (2 * P * chunk) == 0 and T // (2 * P) >= min_piece:
    P *= 2
  return P


def simple_gla_pallas(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None,
                      chunk_size=64, block_v=64, block_k_bwd=64, block_v_bwd=64, num_warps=4,
                      num_warps_bwd=4, num_stages=2, splits=None, fwd_kernel="auto",
                      bwd_kernel="auto", mosaic_stages=2, interpret=False):
  """Chunked simple GLA: q, k [B, T, H, K], v [B, T, H, V], g [H] (log-decay < 0).

  Returns (o [B, T, H, V] in q.dtype, final_state [B, H, K, V] fp32). initial_state
  [B, H, K, V] feeds the first segment only; segment_ids [B, T] resets the state where it
  changes. Differentiable in q, k, v and initial_state (g gets a zero gradient).
  K, V and chunk_size must be powers of two >= 16 (Triton tile sizes); T is arbitrary.
  splits: sequence pieces run in parallel (None: auto_splits; needs T % (splits C) == 0).
  fwd_kernel: the forward's scans (o, the splits' states pre-pass): "auto" (the Mosaic GPU kernel
  of mosaic.py where it applies: a Hopper GPU, bf16, K and V in (64, 128), C = 64, T a multiple
  of 64; not in interpret mode), "mosaic" (the same, also interpreted) or "triton".
  bwd_kernel: the same choices for the backward's scans (dq, dk and dv, the splits' d-state
  pre-pass); chosen independently of fwd_kernel.
  """
  if fwd_kernel not in ("auto", "mosaic", "triton"):
    raise ValueError(f"fwd_kernel must be 'auto', 'mosaic' or 'triton', got {fwd_kernel!r}")
  if bwd_kernel not in ("auto", "mosaic", "triton"):
    raise ValueError(f"bwd_kernel must be 'auto', 'mosaic' or 'triton', got {bwd_kernel!r}")
  B, T, H, K = q.shape
  V = v.shape[-1]
  for name, n in (("K", K), ("V", V), ("chunk_size", chunk_size)):
    if n < 16 or n & (n - 1):
      raise ValueError(f"{name}={n} must be a power of two >= 16")
  if jnp.shape(g) != (H,):
    raise ValueError(f"the Pallas kernel takes a per-head decay g [H] = [{H}], got {jnp.shape(g)}")
  if splits is None:
    splits = auto_splits(B, T, H, V, chunk_size, block_v)
  if splits > 1 and T % (splits * chunk_size):
    raise ValueError(f"splits={splits} needs T={T} to be a multiple of splits * chunk_size")
  cfg = Config(scale=float(K ** -0.5 if scale is None else scale), chunk=chunk_size,
               block_v=block_v, block_k_bwd=block_k_bwd, block_v_bwd=block_v_bwd,
               num_warps=num_warps, num_warps_bwd=num_warps_bwd, num_stages=num_stages,
               splits=splits, fwd_kernel=fwd_kernel, bwd_kernel=bwd_kernel,
               mosaic_stages=mosaic_stages,
               interpret=interpret)
  r = None
  if segment_ids is not None:
    seg = segment_ids.astype(jnp.int32)
    step = (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)
    r = jnp.cumsum(jnp.concatenate([jnp.zeros_like(seg[:, :1]), step], 1), axis=1)  # [B, T]
  return _simple_gla(q, k, v, jnp.asarray(g, jnp.float32), initial_state, r, cfg)
