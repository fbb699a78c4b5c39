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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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
