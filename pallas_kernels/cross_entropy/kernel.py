"""Softmax cross-entropy and its gradient from fp32 logits in Pallas (Triton lowering): one HBM
read of the logits, one write of the gradient.

The chunked LM head (`ling_jax/train/loss.py`) forms per chunk fp32 logits x [C, V] with cuBLAS
and then needs lse, the target's cross-entropy and g = m (softmax(x) - onehot(t)) in bf16 for the
two gradient matmuls. In XLA that is two full reads of x (the one-pass logsumexp, then the fusion
that writes g): at C = 8192, V = 32768 each read is 1 GiB; in small_pretrain's step on an H100
the two were 1.5 + 2.07 ms per head (BENCHMARKS.md, the training step's profile). This kernel reads each
row once from HBM and writes g once (1 GiB + 0.5 GiB a chunk, ~0.5 ms at 3 TB/s):

  pass 1  over the row's V in blocks of BV: a running row max of y = x log2(e) and elementwise
          partial sums of 2^(y - max) (rescaled when the max moves; only the max is reduced
          across the block each step, the sums once at the end). lse = ln2 (max + log2 sum).
  pass 2  over the same blocks in *reverse* order: g = m (2^(y - lse log2 e) - [v == t]),
          written in the output dtype. The re-read is meant to hit L2: a program holds a few
          rows (BR x V x 4 bytes, 128 KiB a row at V = 32768), and going backwards it first
          re-reads the blocks it read last.
  one block (BV >= V): the row stays in registers, g = m (p / sum p - onehot): no second read.

The target's logit is one gathered element per row (no compare over V in pass 1). exp2 with
the log2(e) scale folded into one multiply is a single MUFU op per element (`jnp.exp` lowers to
libdevice's accurate expf); the rounding of x log2(e) moves 2^y by ~1e-7 |x| relative, far
below g's bf16 rounding and a few fp32 ulps of lse for the head's logits.

Grid: one program per row block by default. On an H100 at C = 8192, V = 32768 (BENCHMARKS.md#cross_entropy) that ran a chunk in 0.654 ms (2.46 TB/s of one read + one write; XLA's one-pass
logsumexp + g fusion: 0.887 ms), so most of pass 2 does hit L2. A persistent grid
(`programs_per_sm` programs per SM, each striding over the row blocks, to bound the rows in
flight) measured 0.753 / 0.676 / 0.669 ms at 1 / 2 / 4 per SM. The L2 hints (pass 1's loads
evict_last, pass 2's loads and g's stores evict_first) are worth ~10% (0.748 ms without them, at
2 per SM).

Rows need not fill the row block and V need not fill the vocab block: loads and stores are
masked (masked logits read as -inf, so they add nothing to the sums). fp32 throughout; the
gradient is rounded once, when stored.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


class Config(NamedTuple):
  block_rows: int = 1       # rows per program step (a power of two)
  block_v: int = 8192       # vocab columns per load (a power of two; capped at V's next power of
                            # two, so block_v >= V is the one-read, row-in-registers variant)
  num_warps: int = 8        # 32 fp32 a thread for an 8192-wide block (~100 registers: two
                            # programs of 256 threads fit an SM's 64K registers)
  num_stages: int = 1       # no software pipelining: other programs on the SM hide the latency
  programs_per_sm: int = 0  # persistent grid size per SM (0: one program per row block)
  l2_hints: bool = True     # evict_last on pass 1's loads, evict_first on pass 2's and on g
  interpret: bool = False


def _pow2(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def _block_v(V: int, cfg: Config) -> int:
  return min(cfg.block_v, 1 << (V - 1).bit_length())


def _sm_count() -> int:
  """The GPU's SMs (132 on an H100 SXM); 1 where the device does not say (CPU: interpret mode
  and the lowering tests, where the grid's size only sets how many programs stride)."""
  return getattr(jax.devices()[0], "core_count", None) or 1


def _num_programs(n_blocks: int, cfg: Config) -> int:
  """The grid: at most programs_per_sm x SMs programs, then as few as give every program the
  same number of row blocks (or one fewer), so none waits on a last straggling step."""
  if cfg.programs_per_sm == 0:
    return n_blocks
  p = min(n_blocks, cfg.programs_per_sm * _sm_count())
  return pl.cdiv(n_blocks, pl.cdiv(n_blocks, p))


def _mask2(rows, cols):
  """Row mask [a] and column mask [b], either None (all in bounds) -> [a, b] mask or None."""
  if rows is None or cols is None:
    return None if rows is None and cols is None else (
        rows[:, None] if cols is None else cols[None, :])
  return rows[:, None] & cols[None, :]


def _load(ref, mask, other, evict=None):
  """A load, masked (`other` outside) when there is a mask."""
  return plt.load(ref, mask=mask, other=None if mask is None else other, eviction_policy=evict)


def _kernel(x_ref, t_ref, m_ref, *out_refs, C: int, V: int, BR: int, BV: int, P: int,
            grad: bool, hints: bool):
  g_ref, lse_ref, ce_ref = out_refs if grad else (None, *out_refs)
  nv, nb = pl.cdiv(V, BV), pl.cdiv(C, BR)
  pid = pl.program_id(0)

  def row_block(k, carry):
    r0 = (pid + k * P) * BR
    rows = r0 + jnp.arange(BR, dtype=jnp.int32)
    rmask = rows < C if C % BR else None
    t = _load(t_ref.at[pl.ds(r0, BR)], rmask, 0)
    m = _load(m_ref.at[pl.ds(r0, BR)], rmask, 0.0)
    # a target outside [0, V) would address another row: it reads as logit 0 and no one-hot
    valid_t = (t >= 0) & (t < V)
    tmask = valid_t if rmask is None else valid_t & rmask
    x_t = plt.load(x_ref.at[rows, jnp.clip(t, 0, V - 1)], mask=tmask, other=0.0)

    def cols_of(j):
      return j * BV + jnp.arange(BV, dtype=jnp.int32)

    def mask_of(j):
      return _mask2(rmask, cols_of(j) < V if V % BV else None)

    def load_y(j, evict):  # [BR, BV] logits in log2 units; -inf where out of bounds
      x = _load(x_ref.at[pl.ds(r0, BR), pl.ds(j * BV, BV)], mask_of(j), -jnp.inf,
                evict if hints else None)
      return x.astype(jnp.float32) * LOG2E

    def store_g(j, p):  # p = softmax of the block -> m (p - onehot) in the output dtype
      hit = cols_of(j)[None, :] == t[:, None]
      g = jnp.where(hit, p - 1.0, p) * m[:, None]
      plt.store(g_ref.at[pl.ds(r0, BR), pl.ds(j * BV, BV)], g.astype(g_ref.dtype),
                mask=mask_of(j), eviction_policy="evict_first" if hints else None)

    if nv == 1:  # the whole row in registers: one read
      y = load_y(0, "evict_first")
      top = y.max(axis=1)
      top = jnp.where(top == -jnp.inf, 0.0, top)  # an all -inf row: no nan from -inf - -inf
      p = jnp.exp2(y - top[:, None])
      s = p.sum(axis=1)
      lse2 = top + jnp.log2(s)
      if grad:
        store_g(0, p * (1.0 / s)[:, None])
    else:
      def pass1(j, carry):
        mx, s = carry  # running row max [BR]; per-column partial sums of 2^(y - mx) [BR, BV]
        y = load_y(j, "evict_last")  # pass 2 reads it again
        new = jnp.maximum(mx, y.max(axis=1))
        safe = jnp.where(new == -jnp.inf, 0.0, new)  # rows all -inf so far stay at s = 0
        s = s * jnp.exp2(mx - safe)[:, None] + jnp.exp2(y - safe[:, None])
        return new, s

      mx, s = lax.fori_loop(0, nv, pass1, (jnp.full((BR,), -jnp.inf, jnp.float32),
                                           jnp.zeros((BR, BV), jnp.float32)))
      lse2 = jnp.where(mx == -jnp.inf, 0.0, mx) + jnp.log2(s.sum(axis=1))
      if grad:
        def pass2(i, carry):
          j = nv - 1 - i  # backwards: the blocks pass 1 read last are the likeliest in L2
          store_g(j, jnp.exp2(load_y(j, "evict_first") - lse2[:, None]))
          return carry

        lax.fori_loop(0, nv, pass2, 0)

    lse = lse2 * LN2
    plt.store(lse_ref.at[pl.ds(r0, BR)], lse, mask=rmask)
    plt.store(ce_ref.at[pl.ds(r0, BR)], (lse - x_t.astype(jnp.float32)) * m, mask=rmask)
    return carry

  # this program's row blocks: pid, pid + P, ... < nb
  lax.fori_loop(0, lax.div(nb - 1 - pid, P) + 1, row_block, 0)


def cross_entropy_pallas(logits, targets, mask, cfg: Config = Config(), *,
                         grad_dtype=jnp.bfloat16):
  """logits [C, V] (fp32; other floats are upcast), targets [C] int in [0, V), mask [C] ->
  (g [C, V] in grad_dtype, or None when grad_dtype is None, lse [C] fp32, ce [C] fp32):
  reference.py's values. Not differentiable: g is the gradient of ce.sum() in logits."""
  if logits.ndim != 2 or targets.shape != logits.shape[:1] or mask.shape != logits.shape[:1]:
    raise ValueError(f"want logits [C, V], targets [C], mask [C]; got {logits.shape}, "
                     f"{targets.shape}, {mask.shape}")
  C, V = logits.shape
  BR, BV = cfg.block_rows, _block_v(V, cfg)
  if not (_pow2(BR) and _pow2(cfg.block_v)):
    raise ValueError(f"block_rows {BR} and block_v {cfg.block_v} must be powers of two")
  nb = pl.cdiv(C, BR)
  P = _num_programs(nb, cfg)
  grad = grad_dtype is not None
  out_shape = [jax.ShapeDtypeStruct((C,), jnp.float32)] * 2
  if grad:
    out_shape.insert(0, jax.ShapeDtypeStruct((C, V), grad_dtype))
  kernel = functools.partial(_kernel, C=C, V=V, BR=BR, BV=BV, P=P, grad=grad,
                             hints=cfg.l2_hints)
  out = pl.pallas_call(
      kernel, grid=(P,), out_shape=out_shape,
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name="cross_entropy" if grad else "cross_entropy_value",
  )(logits, targets.astype(jnp.int32), mask.astype(jnp.float32))
  return tuple(out) if grad else (None, *out)
