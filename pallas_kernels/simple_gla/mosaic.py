"""Chunked simple GLA in Pallas Mosaic GPU (Hopper: TMA, wgmma, warp specialisation).

`forward` is the forward scan (the GPU default in chunk.py); `backward_kv` is the reverse scan
of the backward (dv and the d state; chunk.py gets dk and dq from the same two kernels, see
there). Both are the Hopper default in chunk.py (fwd_kernel / bwd_kernel "auto").

Same op and numerics as chunk.py's forward scan ("o"): per (b, h), state S [K, V] in fp32,
  o   = scale ((q k^T * D) v + (q * a) S),   S <- exp(g C) S + (k * b)^T v
per chunk of C tokens (D_ij = exp(g (i - j)) for i >= j, a_i = exp(g (i + 1)),
b_j = exp(g (C - 1 - j))). Decays are exps of non-positive numbers only; D is selected with a
where, never split into exp(g i) exp(-g j).

Layout of one CTA, one (b, h) pair:
  * V / 64 compute warpgroups, each owning a 64-wide column block of the state (S [K, 64], fp32,
    a wgmma accumulator held in registers for the whole sequence), and one memory warpgroup
    that streams q, k [C, K] and v [C, V] chunks through a ring of SMEM slots with TMA.
  * q and k are loaded once per CTA and shared by the compute warpgroups (each computes
    q k^T itself: C x C x K, the cheapest product).
  * Per chunk a compute warpgroup writes S (bf16) and v * b (bf16) to its SMEM scratch, then
    issues q k^T and q S together, builds P = q k^T * D (registers), then P v and the state
    update k^T (v * b) together (k read transposed from SMEM), and stores its o block with TMA.
  * Matmul operands are bf16 with fp32 accumulation, as in the Triton kernel.

States only (q None: the pre-pass of sequence splits): no q loads, no q k^T, q S or o; each
chunk is just the state update.

Packed sequences: per chunk the memory warpgroup also loads five rows derived from the reset
counter (_segment_rows) that mask D, a, b and the carried decay as in chunk.py.

Limits (the wrapper falls back to chunk.py otherwise): bf16 inputs, K and V in (64, 128),
T a multiple of C = 64, per-head constant decay.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mosaic import interpret_kwargs

CHUNK = 64
COLS = 64  # state columns per compute warpgroup
WGMMA = plgpu.Layout.WGMMA          # wgmma accumulator layout
ROW = plgpu.Layout.WGMMA.reduce(1)  # a vector indexed by the accumulator's rows


def on_hopper() -> bool:
  """Whether the default device is a compute-capability 9.0 GPU (wgmma and this TMA usage)."""
  d = jax.devices()[0]
  return d.platform == "gpu" and getattr(d, "compute_capability", None) == "9.0"


def supported(k, v, chunk_size) -> bool:
  B, T, H, K = k.shape
  V = v.shape[-1]
  return (k.dtype == jnp.bfloat16 and v.dtype == jnp.bfloat16 and K in (64, 128)
          and V in (64, 128) and chunk_size == CHUNK and T % CHUNK == 0 and T > 0)


def _decay_rows(g, scale, K):
  """[H, 4, W] fp32 per-head rows (W = max(C, K)): g, scale a, b, and exp(g C)."""
  W = max(CHUNK, K)
  i = jnp.arange(W, dtype=jnp.float32)
  g = g.astype(jnp.float32)[:, None]
  rows = [jnp.broadcast_to(g, (g.shape[0], W)),
          scale * jnp.exp(g * (i + 1)),
          jnp.exp(g * jnp.maximum(CHUNK - 1 - i, 0)),
          jnp.broadcast_to(jnp.exp(g * CHUNK), (g.shape[0], W))]
  return jnp.stack(rows, 1)


def _segment_rows(r, K):
  """[B, T/C, 5, W] fp32 per-chunk rows from the reset counter r [B, T] (W = max(C, K)).

  0: r itself (D keeps the pairs with equal r); 1: r == r_prev (a: the incoming state reaches
  the chunk's first segment only); 2: r == r_last (b: only the last segment enters the state);
  3: r_last == r_prev, broadcast (the carried state survives the chunk); 4: r again, for the
  load in the column layout (Mosaic's layout inference fails when one SMEM row is loaded in
  both layouts). r_prev is the counter of the token before the chunk (0 before the first: the
  initial state's segment).
  """
  B, T = r.shape
  W = max(CHUNK, K)
  rc = r.reshape(B, T // CHUNK, CHUNK)
  r_last = rc[:, :, -1]
  r_prev = jnp.concatenate([jnp.zeros((B, 1), r.dtype), r_last[:, :-1]], axis=1)
  row = lambda x: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 0), (0, W - CHUNK)))
  carried = jnp.broadcast_to((r_last == r_prev)[..., None], (B, T // CHUNK, W))
  rows = [row(rc), row(rc == r_prev[..., None]), row(rc == r_last[..., None]),
          carried.astype(jnp.float32), row(rc)]
  return jnp.stack(rows, 2)


def _mma(inits, issue, interpret):
  """Runs `issue(acc_refs)` (wgmma calls) on accumulators starting at `inits`; their values.

  On the GPU this is pl.run_state over ACC.init (one wait for all the products). jax 0.11.2's
  GPU interpreter has no run_state, so there the accumulators start at zero (run_scoped) and
  the initial values are added after: the same sums.
  """
  if not interpret:
    return pl.run_state(issue)(tuple(plgpu.ACC.init(x) for x in inits))

  def scoped(*refs):
    issue(refs)
    return tuple(r[...] for r in refs)
  outs = pl.run_scoped(scoped, *[plgpu.ACC(x.shape, jnp.float32) for x in inits])
  return tuple(o + x for o, x in zip(outs, inits))


def _stream(load, n_chunks, stages, consumed, reverse=False):
  """The memory warpgroup: `load(chunk, slot)` for every chunk in order, `stages` ahead."""
  chunk = (lambda n: n_chunks - 1 - n) if reverse else (lambda n: n)
  for n in range(min(stages, n_chunks)):
    load(chunk(n), n)

  @pl.loop(stages, n_chunks)
  def _(n):
    slot = lax.rem(n, stages)
    plgpu.barrier_wait(consumed.at[slot])
    load(chunk(n), slot)

  @pl.loop(max(n_chunks - stages, 0), n_chunks)
  def _(n):  # observe the last consumptions too (every barrier phase is waited on)
    plgpu.barrier_wait(consumed.at[lax.rem(n, stages)])


def _chunk_constants(dec_ref, dec_s, bar, state_ref, b, h, wg, cols, K, scale, transposed):
  """A compute warpgroup's start: (initial state [K, 64], decays, zero accumulators).

  Copies the head's decay rows to SMEM, loads its 64 columns of `state_ref` (or zeros) into the
  accumulator layout, and forms the loop-invariant D (D^T if `transposed`: rows are keys),
  scale a, b and the carried decay in registers. Decays: exp of non-positive numbers only.
  """
  plgpu.copy_gmem_to_smem(dec_ref.at[h], dec_s.at[wg], bar.at[wg])
  plgpu.barrier_wait(bar.at[wg])
  if state_ref is not None:  # straight from GMEM into the accumulator layout (no SMEM staging)
    S = plgpu.load(state_ref.at[b, h, :, cols], layout=WGMMA, optimized=False)
  else:
    S = plgpu.layout_cast(jnp.zeros((K, COLS), jnp.float32), WGMMA)
  row = lambda i, width: plgpu.load(dec_s.at[wg, i, pl.ds(0, width)], layout=ROW)
  gv = _rows(row(0, CHUNK), CHUNK)
  i = plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0, layout=WGMMA)
  j = plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1, layout=WGMMA)
  diff = j - i if transposed else i - j  # query minus key
  D = jnp.where(diff >= 0, scale * jnp.exp(gv * jnp.maximum(diff, 0).astype(jnp.float32)), 0.0)
  decays = (D, _rows(row(1, CHUNK)), _rows(row(2, CHUNK)), _rows(row(3, K)))
  zeros = tuple(plgpu.layout_cast(jnp.zeros((CHUNK, n), jnp.float32), WGMMA)
                for n in (CHUNK, COLS))
  return S, decays, zeros


def _rows(x, width=COLS):
  """A row-indexed vector broadcast along a `width`-wide second axis."""
  return lax.broadcast_in_dim(x, (x.shape[0], width), [0])


def _segment_masked(seg_s, slot, K, decays):
  """The chunk's (D, a, b, carry) masked by its segment rows (see _segment_rows)."""
  D, a, bv, carry = decays
  seg = lambda i, width, layout=ROW: plgpu.load(seg_s.at[slot, i, pl.ds(0, width)],
                                                layout=layout)
  r_row = _rows(seg(0, CHUNK), CHUNK)
  r_col = lax.broadcast_in_dim(seg(4, CHUNK, WGMMA.reduce(0)), (CHUNK, CHUNK), [1])
  return (jnp.where(r_row == r_col, D, 0.0), a * _rows(seg(1, CHUNK)),
          bv * _rows(seg(2, CHUNK)), carry * _rows(seg(3, K)))


def _stage_p(P, p_smem, wg):
  """P as a wgmma A operand: in registers, or via SMEM for the interpreter (p_smem not None)."""
  if p_smem is None:
    return P
  p_smem.at[wg][...] = P
  plgpu.commit_smem()
  return p_smem.at[wg]


def _scan_call(a, b, c, g, state, r, *, scale, stages, reverse, interpret):
  """The CTA of both scans, one per (b, h): the memory warpgroup streams a, b [B, T, H, K] and
  the 64-column blocks of c [B, T, H, V] through the TMA ring; each compute warpgroup carries
  its 64 columns of the fp32 state from `state` (or zeros) over the chunks (last to first if
  `reverse`) and writes its block of the output [B, T, H, V] per chunk.

  One of a, b may be None (a states-only pass: no output); the state is then all the kernel
  returns. `_scan_chunk` is the per-chunk arithmetic; `refs` holds the chunk's SMEM operands (a, b, c; the first two None when absent)
  and the warpgroup's scratch (st16: the state in bf16, op: the scaled c operand, p: P staging).
  Returns (output, final state), or the final state alone.
  """
  x = a if a is not None else b
  B, T, H, K = x.shape
  V = c.shape[-1]
  n_wg, n_chunks = V // COLS, T // CHUNK
  emit = a is not None and b is not None
  stages = max(1, min(stages, n_chunks))
  dtype = x.dtype
  dec = _decay_rows(g, scale, K)
  has_a, has_b, has_state, has_r = a is not None, b is not None, state is not None, r is not None
  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))

  def body(*refs):
    refs = list(refs)
    if not has_a:
      refs.insert(0, None)
    if not has_b:
      refs.insert(1, None)
    if not emit:
      refs.insert(4 + has_state + has_r, None)  # the output
    a_ref, b_ref, c_ref, dec_ref = refs[:4]
    state_ref = refs[4] if has_state else None
    seg_ref = refs[4 + has_state] if has_r else None
    n_in = 4 + has_state + has_r
    out_ref, final_ref = refs[n_in:n_in + 2]
    (a_s, b_s, c_s, st16, op_s, out_s, dec_s, seg_s, p_smem), bars = refs[n_in + 2:]
    a_bar, b_bar, c_bar, seg_bar, consumed, misc_bar = bars
    bi, h, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")

    @pl.when(wg < n_wg)
    def _compute():
      plgpu.set_max_registers(232 if n_wg == 2 else 240, action="increase")
      cols = pl.ds(wg * COLS, COLS)
      S, decays, zeros = _chunk_constants(dec_ref, dec_s, misc_bar, state_ref, bi, h, wg, cols,
                                          K, scale, transposed=reverse)  # D^T: rows are keys

      def step(m, S):
        n = n_chunks - 1 - m if reverse else m
        slot = lax.rem(m, stages)
        if has_a:
          plgpu.barrier_wait(a_bar.at[slot])
        if has_b:
          plgpu.barrier_wait(b_bar.at[slot])
        plgpu.barrier_wait(c_bar.at[slot * n_wg + wg])
        chunk_refs = dict(a=a_s.at[slot] if has_a else None, b=b_s.at[slot] if has_b else None,
                          c=c_s.at[slot * n_wg + wg], st16=st16, op=op_s, p=p_smem, wg=wg,
                          zeros=zeros, dtype=dtype, interpret=interpret)
        if has_r:
          plgpu.barrier_wait(seg_bar.at[slot])
        masked = _segment_masked(seg_s, slot, K, decays) if has_r else decays
        S, out = _scan_chunk(S, masked, chunk_refs, reverse)
        plgpu.barrier_arrive(consumed.at[slot])
        if emit:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous block has left out_s
          out_s.at[wg][...] = out.astype(dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(out_s.at[wg], out_ref.at[bi, pl.ds(n * CHUNK, CHUNK), h, cols])
        return S

      S = lax.fori_loop(0, n_chunks, step, S)
      final_ref.at[bi, h, :, cols][...] = S
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == n_wg)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def load(n, slot):
        rows = pl.ds(n * CHUNK, CHUNK)
        if has_a:
          plgpu.copy_gmem_to_smem(a_ref.at[bi, rows, h], a_s.at[slot], a_bar.at[slot])
        if has_b:
          plgpu.copy_gmem_to_smem(b_ref.at[bi, rows, h], b_s.at[slot], b_bar.at[slot])
        for w in range(n_wg):
          plgpu.copy_gmem_to_smem(c_ref.at[bi, rows, h, pl.ds(w * COLS, COLS)],
                                  c_s.at[slot * n_wg + w], c_bar.at[slot * n_wg + w])
        if has_r:
          plgpu.copy_gmem_to_smem(seg_ref.at[bi, n], seg_s.at[slot], seg_bar.at[slot])

      _stream(load, n_chunks, stages, consumed, reverse=reverse)

  if_emit = lambda x: x if emit else None
  scratch = [
      plgpu.SMEM((stages, CHUNK, K), dtype, **tiled) if has_a else None,
      plgpu.SMEM((stages, CHUNK, K), dtype, **tiled) if has_b else None,
      plgpu.SMEM((stages * n_wg, CHUNK, COLS), dtype, **tiled),  # c column blocks
      if_emit(plgpu.SMEM((n_wg, K, COLS), dtype, **tiled)),    # the state in bf16
      plgpu.SMEM((n_wg, CHUNK, COLS), dtype, **tiled),         # the scaled c operand
      if_emit(plgpu.SMEM((n_wg, CHUNK, COLS), dtype, **tiled)),  # output block on its way out
      plgpu.SMEM((n_wg, 4, max(CHUNK, K)), jnp.float32),       # decay rows
      # segment rows (_segment_rows), one per ring slot
      plgpu.SMEM((stages, 5, max(CHUNK, K)), jnp.float32) if has_r else None,
      # P: the interpreter's wgmma takes its A operand from SMEM only
      plgpu.SMEM((n_wg, CHUNK, CHUNK), dtype, **tiled) if interpret and emit else None,
  ]
  barriers = (
      plgpu.Barrier(num_barriers=stages) if has_a else None,
      plgpu.Barrier(num_barriers=stages) if has_b else None,
      plgpu.Barrier(num_barriers=stages * n_wg),
      plgpu.Barrier(num_barriers=stages) if has_r else None,
      plgpu.Barrier(num_arrivals=n_wg, num_barriers=stages),
      plgpu.Barrier(num_barriers=n_wg),
  )
  call = plgpu.kernel(
      body,
      out_type=((jax.ShapeDtypeStruct((B, T, H, V), dtype),) if emit else ())
      + (jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),),
      scratch_types=(scratch, barriers),
      grid=(B, H), grid_names=("b", "h"),
      num_threads=n_wg + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=False),
      **interpret_kwargs(interpret))
  args = (tuple(x for x in (a, b) if x is not None) + (c, dec)
          + ((state.astype(jnp.float32),) if has_state else ())
          + ((_segment_rows(r, K),) if has_r else ()))
  out = call(*args)
  return tuple(out) if emit else out[0]


def _scan_chunk(S, decays, refs, reverse: bool):
  """One chunk of either scan, for one compute warpgroup's 64 state columns.

  Forward, (x, y, z) = (q, k, v) and M = scale D:
    o = P z + (x * a) S,      S <- exp(g C) S + (y * b)^T z,      P = x y^T * M.
  Reverse (backward_kv), (x, y, z) = (k, q, do), M = scale D^T, and a and b trade places:
    dv = P z + (x * b) dS',   dS = exp(g C) dS' + (y * a)^T z.
  (a carries the scale too.) With x absent (a states-only pass) only the state update runs.
  """
  M, a, b, carry = decays
  z_scale, out_scale = (a, b) if reverse else (b, a)
  x, y = (refs["b"], refs["a"]) if reverse else (refs["a"], refs["b"])
  zs, wg, dtype, interpret = (refs[k] for k in ("c", "wg", "dtype", "interpret"))
  s16, zb = refs["st16"], refs["op"]
  if x is not None:
    s16.at[wg][...] = S.astype(dtype)
  zb.at[wg][...] = (plgpu.load(zs, layout=WGMMA).astype(jnp.float32) * z_scale).astype(dtype)
  plgpu.commit_smem()
  state = lambda acc: plgpu.wgmma(acc, y.transpose((1, 0)), zb.at[wg])
  if x is None:
    S, = _mma((S * carry,), lambda accs: state(accs[0]), interpret)
    return S, None

  def products(accs):
    xy_acc, xS_acc = accs
    plgpu.wgmma(xy_acc, x, y.transpose((1, 0)))
    plgpu.wgmma(xS_acc, x, s16.at[wg])
  xy, xS = _mma(refs["zeros"], products, interpret)
  P = _stage_p((xy * M).astype(dtype), refs["p"], wg)

  def update(accs):
    out_acc, S_acc = accs
    plgpu.wgmma(out_acc, P, zs)
    state(S_acc)
  out, S = _mma((xS * out_scale, S * carry), update, interpret)
  return S, out


def forward(q, k, v, g, h0, r=None, *, scale: float, stages: int = 2, interpret=False):
  """(o [B, T, H, V] bf16, final state [B, H, K, V] fp32); with q None the final state only.

  h0 [B, H, K, V] fp32 or None; r [B, T] int32 or None: the non-decreasing reset counter of
  packed sequences (chunk.py's r), so that "same segment" is r_i == r_j and the initial state
  feeds the tokens with r == 0.
  """
  return _scan_call(q, k, v, g, h0, r, scale=scale, stages=stages,
                    reverse=False, interpret=interpret)


def backward_kv(q, k, do, g, dht, r=None, *, scale: float, stages: int = 2, interpret=False):
  """The reverse scan: (dv [B, T, H, V] bf16, d initial state [B, H, K, V] fp32).

  Per chunk, last to first, with dS' the state cotangent after the chunk (dht at the end):
    dv = scale (q k^T * D)^T do + (k * b) dS',   dS = exp(g C) dS' + scale (q * a)^T do.
  dk is the same scan with (q, k, do) = (do, v, q) from dht^T (its state is dS^T), so chunk.py
  gets dq, dk and dv from three launches of this file's two kernels. With k None the d state
  only (the sequence splits' pre-pass of the backward).

  Same CTA as `forward` (_scan_call): the compute warpgroups own 64 columns of dS and of
  do / dv and share q, k; k q^T is formed directly (the transposed scores, masked by D^T), so
  P^T is a register operand; (k * b) dS' is b times the rows of k dS'; q^T enters from SMEM
  transposed.
  """
  return _scan_call(q, k, do, g, dht, r, scale=scale, stages=stages,
                    reverse=True, interpret=interpret)
