"""Cross-entropy through the LM head without materialising [tokens, vocab] logits.

`head_ce(h, w, targets, mask, chunk=c)` = sum_n mask_n * CE(h_n @ w, targets_n), with the logits
computed `c` tokens at a time in fp32 (as `LingForCausalLM._head` computes them: compute-dtype
operands, fp32 accumulation). Under differentiation the forward pass also forms the gradient
(the "fused linear cross-entropy" of Liger/Apple CCE): per chunk, g = softmax - onehot, then
dh = g W^T and dW += h^T g; the backward pass only scales them by the incoming cotangent. So the
largest temporaries are one chunk's [c, V] logits (nothing [tokens, V] is ever built; dW is
[D, V] fp32), with no recomputation of the head matmul.

g is cast to the compute dtype for the two gradient matmuls, as Liger does (with fp32 compute it
is exact; in bf16 the head's gradients move by ~0.3% relative, where autodiff of the full logits
would run those two matmuls in fp32), and dW accumulates over chunks in fp32.

Between the head matmul and the gradient matmuls, `impl` picks how a chunk's fp32 logits become
(ce, g): "xla" reads them twice (the one-pass logsumexp below, then the fusion that writes g);
"pallas" (the default on a GPU) is `pallas_kernels.cross_entropy`'s kernel, one read of the
logits and one write of g; "interpret" runs that kernel on the CPU (tests); "reference" is the
op's reference. At chunk 8192
and vocab 32768 each read is 1 GiB: on an H100 the kernel takes a chunk's (ce, g) in 0.654 ms
against XLA's 0.887, and small_pretrain's head value + gradient in 12.47 ms against 13.43
(BENCHMARKS.md#cross_entropy).

Under a mesh of several devices (`jax.set_mesh`) the head is vocabulary-parallel, in a shard_map
island (docs/parallelism.md §4): each device takes its rows of h and its V / tensor columns of
the head, forms its [c, V / tensor] logits, and the log-sum-exp comes from a pmax and a psum of
the devices' partial ones over `tensor`, the target's logit from the device that owns its
column; dh is psummed over `tensor`, dW reduced over the rows' axes (scattered over fsdp, as
the head is stored). With tensor = 1 each device runs the single-device chunk on its rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ling_jax.parallel import islands
from pallas_kernels.cross_entropy import Config as KernelConfig, cross_entropy, resolve_impl


def _chunked(h, targets, mask, chunk):
  N, D = h.shape
  n = -(-N // chunk)
  pad = n * chunk - N
  h = jnp.pad(h, ((0, pad), (0, 0))).reshape(n, chunk, D)
  targets = jnp.pad(targets, (0, pad)).reshape(n, chunk)
  mask = jnp.pad(mask.astype(jnp.float32), (0, pad)).reshape(n, chunk)
  return h, targets, mask


def _lse_combine(a, b):
  """Merge two (max, sum of exp(x - max)) partials with one exp: the larger max stays, the other
  partial's sum is rescaled by exp(-|difference|)."""
  (ma, sa), (mb, sb) = a, b
  e = jnp.exp(-jnp.abs(ma - mb))
  e = jnp.where(jnp.isnan(e), 1.0, e)  # both -inf (the reduction's start): nothing to rescale
  return jnp.maximum(ma, mb), jnp.where(ma >= mb, sa + sb * e, sa * e + sb)


def logsumexp_one_pass(x: jax.Array) -> jax.Array:
  """logsumexp over the last axis in one read of x (an online max-and-sum reduction). XLA's
  logsumexp reads x twice, for the max and then the sum; for the head's fp32 logits chunks, each
  read is a full pass over [chunk, vocab]."""
  start = (jnp.array(-jnp.inf, x.dtype), jnp.array(0, x.dtype))
  m, s = jax.lax.reduce((x, jnp.ones_like(x)), start, _lse_combine, (x.ndim - 1,))
  return m + jnp.log(s)


def _logits_lse_ce(h, w, t, m):
  logits = jnp.einsum("nd,dv->nv", h, w, preferred_element_type=jnp.float32)
  lse = logsumexp_one_pass(logits)
  tgt = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
  return logits, lse, (lse - tgt) * m


def _chunk_ce(hb, wd, t, m, dtype, impl, kernel, grad: bool):
  """One chunk's (mask-weighted ce [c], g = d ce.sum() / d logits [c, V] in dtype, or None)."""
  if impl != "xla":
    logits = jnp.einsum("nd,dv->nv", hb, wd, preferred_element_type=jnp.float32)
    g, _, ce = cross_entropy(logits, t, m, grad_dtype=dtype if grad else None, impl=impl,
                             config=kernel)
    return ce, g
  logits, lse, ce = _logits_lse_ce(hb, wd, t, m)
  if not grad:
    return ce, None
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  g = ((jnp.exp(logits - lse[:, None]) - (vocab == t[:, None])) * m[:, None]).astype(dtype)
  return ce, g


def head_ce(h, w, targets, mask, chunk: int, dtype, impl: str = "auto",
            kernel: KernelConfig | None = None):
  """h [N, D], w [D, V] (cast to `dtype` for the matmul), targets [N] int, mask [N] -> the
  mask-weighted sum of the fp32 cross-entropies (a scalar). impl: one of
  `pallas_kernels.cross_entropy.IMPLS` ("auto": "pallas" on a GPU, else "xla"); `kernel`
  overrides the kernel's `pallas_kernels.cross_entropy.Config` (benchmarks)."""
  mesh = islands.active_mesh()
  if mesh is not None:
    rows = 1
    for a in islands.ROWS:
      rows *= mesh.shape[a]
    if h.shape[0] % rows:
      raise ValueError(f"{h.shape[0]} tokens do not split over the mesh's batch axes "
                       f"({rows} ways)")
    chunk = min(chunk, h.shape[0] // rows)
    return _head_ce_sharded(h, w, targets, mask, chunk, dtype, resolve_impl(impl), kernel)
  return _head_ce(h, w, targets, mask, chunk, dtype, resolve_impl(impl), kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _head_ce(h, w, targets, mask, chunk: int, dtype, impl: str, kernel):
  hc, tc, mc = _chunked(h.astype(dtype), targets, mask, chunk)
  wd = w.astype(dtype)

  def body(total, x):
    return total + _chunk_ce(x[0], wd, x[1], x[2], dtype, impl, kernel, grad=False)[0].sum(), None

  return jax.lax.scan(body, jnp.zeros((), jnp.float32), (hc, tc, mc))[0]


def _fwd(h, w, targets, mask, chunk, dtype, impl, kernel):
  N, D = h.shape
  hc, tc, mc = _chunked(h.astype(dtype), targets, mask, chunk)
  wd = w.astype(dtype)

  def body(carry, x):
    total, dw = carry
    hb, t, m = x
    ce, g = _chunk_ce(hb, wd, t, m, dtype, impl, kernel, grad=True)
    dh = jnp.einsum("nv,dv->nd", g, wd, preferred_element_type=jnp.float32)
    dw = dw + jnp.einsum("nd,nv->dv", hb, g, preferred_element_type=jnp.float32)
    return (total + ce.sum(), dw), dh

  init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32))
  (total, dw), dh = jax.lax.scan(body, init, (hc, tc, mc))
  dh = dh.reshape(-1, D)[:N]
  # Empty arrays carry the primal dtypes (residuals must be arrays).
  return total, (dh, dw, jnp.zeros((0,), h.dtype), jnp.zeros((0,), w.dtype))


def _bwd(chunk, dtype, impl, kernel, res, ct):
  dh, dw, h0, w0 = res
  return (ct * dh).astype(h0.dtype), (ct * dw).astype(w0.dtype), None, None


_head_ce.defvjp(_fwd, _bwd)


# ------------------------------------------------------------------ vocabulary-parallel
def _vp_chunk(hb, wd, t, m, dtype, impl, kernel, grad: bool):
  """`_chunk_ce` of one device's chunk against its V / tensor head columns: (ce [c], g [c, V_l]
  or None). t: the targets less this device's first column (outside [0, V_l): another's)."""
  if jax.lax.axis_size(islands.TENSOR) == 1:
    return _chunk_ce(hb, wd, t, m, dtype, impl, kernel, grad)
  logits = jnp.einsum("nd,dv->nv", hb, wd, preferred_element_type=jnp.float32)
  if impl == "xla":
    part = logsumexp_one_pass(logits)
  else:  # the kernel's one read for the partial log-sum-exp (a target outside adds no one-hot)
    part = cross_entropy(logits, t, m, grad_dtype=None, impl=impl, config=kernel)[1]
  top = jax.lax.pmax(part, islands.TENSOR)
  lse = top + jnp.log(jax.lax.psum(jnp.exp(part - top), islands.TENSOR))
  mine = (t >= 0) & (t < logits.shape[1])
  tgt = jnp.take_along_axis(logits, jnp.where(mine, t, 0)[:, None], axis=-1)[:, 0]
  tgt = jax.lax.psum(jnp.where(mine, tgt, 0.0), islands.TENSOR)  # from the column's owner
  ce = (lse - tgt) * m
  if not grad:
    return ce, None
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  g = ((jnp.exp(logits - lse[:, None]) - (vocab == t[:, None])) * m[:, None]).astype(dtype)
  return ce, g


def _vp_device(h, w, targets, mask, chunk, dtype, impl, kernel, grad: bool):
  """One device's part: its rows, its head columns. Returns the total over every row (summed
  over the rows' axes), and with `grad` this device's dh rows (summed over `tensor`) and its
  dW block (summed over the rows' axes, scattered over fsdp)."""
  hc, tc, mc = _chunked(h.astype(dtype), targets, mask, chunk)
  wd = w.astype(dtype)
  tc = tc - jax.lax.axis_index(islands.TENSOR) * w.shape[1]
  others = tuple(a for a in islands.ROWS if a != "fsdp")

  def body(carry, x):
    total, dw = carry
    hb, t, m = x
    ce, g = _vp_chunk(hb, wd, t, m, dtype, impl, kernel, grad)
    if not grad:
      return (total + ce.sum(), dw), None
    dh = jnp.einsum("nv,dv->nd", g, wd, preferred_element_type=jnp.float32)
    dw = dw + jnp.einsum("nd,nv->dv", hb, g, preferred_element_type=jnp.float32)
    return (total + ce.sum(), dw), dh

  init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape if grad else (), jnp.float32))
  (total, dw), dh = jax.lax.scan(body, init, (hc, tc, mc))
  total = jax.lax.psum(total, islands.ROWS)
  if not grad:
    return total
  dh = jax.lax.psum(dh.reshape(-1, h.shape[1])[:h.shape[0]], islands.TENSOR)
  dw = jax.lax.psum_scatter(jax.lax.psum(dw, others), "fsdp", scatter_dimension=0, tiled=True)
  return total, dh, dw


def _vp_island(h, w, targets, mask, chunk, dtype, impl, kernel, grad: bool):
  rows, cols = P(islands.ROWS), P(None, islands.TENSOR)
  out = (P(), P(islands.ROWS, None), P("fsdp", islands.TENSOR)) if grad else P()
  fn = functools.partial(_vp_device, chunk=chunk, dtype=dtype, impl=impl, kernel=kernel,
                         grad=grad)
  return jax.shard_map(fn, mesh=islands.active_mesh(), in_specs=(P(islands.ROWS, None), cols,
                                                                 rows, rows),
                       out_specs=out, check_vma=False)(h, w, targets, mask.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _head_ce_sharded(h, w, targets, mask, chunk: int, dtype, impl: str, kernel):
  return _vp_island(h, w, targets, mask, chunk, dtype, impl, kernel, grad=False)


def _vp_fwd(h, w, targets, mask, chunk, dtype, impl, kernel):
  total, dh, dw = _vp_island(h, w, targets, mask, chunk, dtype, impl, kernel, grad=True)
  return total, (dh, dw, jnp.zeros((0,), h.dtype), jnp.zeros((0,), w.dtype))


_head_ce_sharded.defvjp(_vp_fwd, _bwd)
