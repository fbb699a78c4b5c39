"""Pure-jnp simple GLA (Lightning attention): the spec that every kernel is tested against.

Simple gated linear attention with a scalar log-decay g <= 0 per head (Ling) or per token and
head (fla's simple_gla). Per batch row b and head h, with a state S [K, V]:
  S_t = exp(g_t) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t   (the current token included).
Sources: Lightning Attention-2 (Qin et al. 2024, arXiv 2401.04658) for the chunked algorithm
(intra-chunk attention as matmuls, inter-chunk state carried across chunks); fla's
`fla/ops/simple_gla` (flash-linear-attention) for the per-token gate and the API.

Packed documents (segment_ids [B, T]): the state is reset to zero before every token t > 0
with segment_ids[t] != segment_ids[t-1], so tokens of different segments never interact (two
runs of the same id separated by another id are two segments). initial_state feeds only the
first segment of each row; final_state is the state after the last token, i.e. it holds only
the last segment (plus initial_state if the row is a single segment).

Layout [B, T, H, K] throughout; states [B, H, K, V]. Compute is fp32 (bf16 inputs are upcast;
float64 inputs stay float64, for the x64 tests); o is returned in q.dtype, states in fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# fp32 contractions at full precision: on GPU the default would be TF32 (10-bit mantissa),
# which would make the spec itself off by ~1e-3.
_einsum = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)


def _compute_dtype(*xs) -> jnp.dtype:
  return functools.reduce(jnp.promote_types, [x.dtype for x in xs], jnp.dtype(jnp.float32))


def _scale(scale, K: int) -> float:
  return K ** -0.5 if scale is None else scale


def _boundaries(segment_ids: jax.Array) -> jax.Array:
  """[B, T] bool: token t > 0 starts a new segment (t = 0 continues the initial state)."""
  seg = segment_ids
  first = jnp.zeros_like(seg[:, :1], dtype=bool)
  return jnp.concatenate([first, seg[:, 1:] != seg[:, :-1]], axis=1)


# ----------------------------------------------------------------------------- decode step


def simple_gla_step(q, k, v, g, state, *, scale=None):
  """One decode step of simple GLA for a batch of single tokens.

  q, k [B, H, K], v [B, H, V], g [H] or [B, H] (log-decay <= 0), state [B, H, K, V] fp32.
  Returns (o [B, H, V] in q.dtype, new_state [B, H, K, V] fp32):
    new_state = exp(g) state + k^T v,   o = scale * q new_state.
  """
  B, H, K = q.shape
  dt = _compute_dtype(q, k, v, state)
  q32, k32, v32 = q.astype(dt), k.astype(dt), v.astype(dt)
  decay = jnp.broadcast_to(jnp.exp(jnp.asarray(g, dt)), (B, H))
  S = decay[..., None, None] * state.astype(dt) + k32[..., :, None] * v32[..., None, :]
  o = _scale(scale, K) * _einsum("bhk,bhkv->bhv", q32, S)
  return o.astype(q.dtype), S


def simple_gla_prefix_state(k, v, g, state, lengths):
  """The state after each row's first `lengths[b]` tokens of a call, from the state before it.

  k [B, T, H, K], v [B, T, H, V], g [H] (a per-head constant log-decay <= 0), state [B, H, K, V]
  fp32, lengths [B] int in [0, T]. Returns [B, H, K, V] fp32:
    S_n = exp(n g) S_0 + sum_{j < n} exp((n - 1 - j) g) k_j^T v_j.
  What a cached call keeps when only a prefix of its tokens is real: a ragged prompt chunk
  (padding after a row's end) or a speculative step whose later drafts were rejected. Every
  exponent is <= 0 (the weights of tokens past n are selected out before the exp).
  """
  B, T, H, K = k.shape
  dt = _compute_dtype(k, v, state)
  n = jnp.asarray(lengths, jnp.int32)[:, None]  # [B, 1]
  steps = (n - 1 - jnp.arange(T)).astype(dt)  # [B, T]: tokens after j up to the row's end
  keep = steps >= 0
  g = jnp.asarray(g, dt)
  w = jnp.where(keep[..., None], jnp.exp(jnp.where(keep, steps, 0.0)[..., None] * g), 0.0)
  carried = jnp.exp(n.astype(dt) * g)[..., None, None]  # [B, H, 1, 1]
  added = _einsum("bth,bthk,bthv->bhkv", w, k.astype(dt), v.astype(dt))
  return carried * state.astype(dt) + added


# ----------------------------------------------------------------------------- recurrent form


def simple_gla_recurrent(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None):
  """Simple GLA as the literal recurrence: `lax.scan` over T with an fp32 state.

  q, k [B, T, H, K], v [B, T, H, V], g [H] or [B, T, H], initial_state [B, H, K, V] or None,
  segment_ids [B, T] int or None. Returns (o [B, T, H, V] in q.dtype, final_state [B, H, K, V]).
  """
  B, T, H, K = q.shape
  V = v.shape[-1]
  dt = _compute_dtype(q, k, v)
  g = jnp.asarray(g, dt)
  g = jnp.broadcast_to(g, (B, T, H)) if g.ndim == 1 else g
  S0 = jnp.zeros((B, H, K, V), dt) if initial_state is None else initial_state.astype(dt)
  reset = jnp.zeros((B, T), bool) if segment_ids is None else _boundaries(segment_ids)

  def step(S, x):
    q_t, k_t, v_t, g_t, r_t = x
    # A reset selects a zero state (where), rather than scaling by 0: no 0 * inf if S overflowed.
    S = jnp.where(r_t[:, None, None, None], 0.0, S)
    o_t, S = simple_gla_step(q_t, k_t, v_t, g_t, S, scale=scale)
    return S, o_t

  xs = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (q, k, v, g, reset))  # [T, B, ...]
  S, o = lax.scan(step, S0, xs)
  return jnp.moveaxis(o, 0, 1).astype(q.dtype), S  # [B, T, H, V]


# ----------------------------------------------------------------------------- chunked form


def _chunk_log_decays(g, B: int, T: int, N: int, C: int, dt):
  """Log-decays inside each chunk of C tokens (the tail chunk zero-padded to N * C tokens).

  Returns, with G_i the summed log-decay from the chunk start through token i:
    G     [B|1, N, C, H]     G_i                   (chunk start -> i, queries of the carried state)
    diff  [B|1, N, H, C, C]  G_i - G_j             (j -> i, intra-chunk pairs; > 0 where j > i)
    tail  [B|1, N, C, H]     G_last - G_j          (j -> chunk end, keys entering the state)
    total [B|1, N, H]        G_last                (decay of the carried state over the chunk)
  Padding tokens have log-decay 0, so they neither decay the state nor shift G.
  """
  if g.ndim == 1:
    # Constant g: G_i = g * c_i with c_i an exact integer count of real tokens, so every
    # difference is g * (c_i - c_j): one rounding, no cancellation of two large G's.
    real = (jnp.arange(N * C) < T).reshape(N, C)
    c = jnp.cumsum(real, axis=1).astype(dt)  # [N, C]
    G = c[None, :, :, None] * g  # [1, N, C, H]
    dc = c[:, :, None] - c[:, None, :]  # [N, C, C]
    diff = dc[None, :, None] * g[None, None, :, None, None]  # [1, N, H, C, C]
    tail = (c[:, -1:] - c)[None, :, :, None] * g  # [1, N, C, H]
  else:
    gp = jnp.pad(g, [(0, 0), (0, N * C - T), (0, 0)]).reshape(B, N, C, -1)  # [B, N, C, H]
    G = jnp.cumsum(gp, axis=2)
    Gh = jnp.swapaxes(G, 2, 3)  # [B, N, H, C]
    diff = Gh[..., :, None] - Gh[..., None, :]  # [B, N, H, C, C]
    tail = G[:, :, -1:] - G
  return G, diff, tail, G[:, :, -1]


def _chunk_masks(segment_ids, B: int, T: int, N: int, C: int):
  """Which interactions survive within and across chunks.

  Returns pair [B|1, N, 1, C, C] (causal and same segment), start [B|1, N, C, 1] (token i is in
  the segment of the carried state), end [B|1, N, C, 1] (token j is in the segment that
  reaches the chunk end) and carry [B|1, N, 1] (the carried state survives the chunk).
  Without segment_ids, pair is the causal [C, C] mask and the others are all true.
  """
  i = jnp.arange(C)
  causal = i[:, None] >= i[None, :]  # [C, C]
  if segment_ids is None:
    true = jnp.ones((1, N, 1), bool)
    return causal, true[..., None], true[..., None], true
  # Padding repeats the last id, so it starts no segment and joins the row's last one.
  seg = jnp.pad(segment_ids, [(0, 0), (0, N * C - T)], mode="edge")
  r = jnp.cumsum(_boundaries(seg), axis=1, dtype=jnp.int32).reshape(B, N, C)  # [B, N, C]
  # Segment counter of the token before each chunk; 0 (the initial state's) before chunk 0.
  r_prev = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), r[:, :-1, -1]], axis=1)  # [B, N]
  r_last = r[:, :, -1]
  pair = causal & (r[..., :, None] == r[..., None, :])  # [B, N, C, C]
  start = r == r_prev[..., None]
  end = r == r_last[..., None]
  return pair[:, :, None], start[..., None], end[..., None], (r_last == r_prev)[..., None]


def simple_gla_chunked(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None,
                       chunk_size=64):
  """Simple GLA in the chunked form of Lightning Attention-2 (arXiv 2401.04658, Alg. 1).

  Per chunk of C tokens: intra-chunk causal attention (q k^T * D) v with the decay matrix
  D_ij = exp(G_i - G_j) (i >= j, same segment), plus the carried state seen through
  (q * exp(G)) S; then S <- exp(G_last) S + (k * exp(G_last - G))^T v, by `lax.scan` over
  chunks. Same arguments and results as `simple_gla_recurrent`; any T (the tail chunk is
  zero-padded internally and padding neither enters nor decays the state).
  """
  B, T, H, K = q.shape
  V = v.shape[-1]
  C = int(chunk_size)
  N = -(-T // C)
  dt = _compute_dtype(q, k, v)

  def chunks(x):  # [B, T, H, D] -> [B, N, C, H, D], zero tail
    x = jnp.pad(x.astype(dt), [(0, 0), (0, N * C - T), (0, 0), (0, 0)])
    return x.reshape(B, N, C, H, x.shape[-1])

  qc, kc, vc = chunks(q) * _scale(scale, K), chunks(k), chunks(v)
  G, diff, tail, total = _chunk_log_decays(jnp.asarray(g, dt), B, T, N, C, dt)
  pair, start, end, carry = _chunk_masks(segment_ids, B, T, N, C)

  # exp(G_i - G_j) overflows fp32 for j > i on steep heads (slope 0.84, C >= 128), and even an
  # unselected inf turns the gradient of a where into 0 * inf = NaN, so the exponent is zeroed
  # outside the mask before the exp, and the result selected again. D is never built as
  # exp(G_i) * exp(-G_j) for the same reason. G, tail and total are <= 0: exp is safe.
  D = jnp.where(pair, jnp.exp(jnp.where(pair, diff, 0.0)), 0.0)  # [B, N, H, C, C]
  A = _einsum("bnihk,bnjhk->bnhij", qc, kc) * D
  o_intra = _einsum("bnhij,bnjhv->bnihv", A, vc)  # [B, N, C, H, V]

  q_in = qc * jnp.where(start, jnp.exp(G), 0.0)[..., None]  # [B, N, C, H, K]
  k_out = kc * jnp.where(end, jnp.exp(tail), 0.0)[..., None]  # [B, N, C, H, K]
  decay = jnp.broadcast_to(jnp.where(carry, jnp.exp(total), 0.0), (B, N, H))

  def body(S, x):
    q_n, k_n, v_n, d_n = x
    o_n = _einsum("bihk,bhkv->bihv", q_n, S)
    S = d_n[..., None, None] * S + _einsum("bjhk,bjhv->bhkv", k_n, v_n)
    return S, o_n

  S0 = jnp.zeros((B, H, K, V), dt) if initial_state is None else initial_state.astype(dt)
  xs = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (q_in, k_out, vc, decay))  # [N, B, ...]
  S, o_inter = lax.scan(body, S0, xs)
  o = o_intra + jnp.moveaxis(o_inter, 0, 1)  # [B, N, C, H, V]
  return o.reshape(B, N * C, H, V)[:, :T].astype(q.dtype), S
