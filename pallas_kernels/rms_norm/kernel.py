"""RMSNorm in Pallas (Triton lowering): one read and one write forward, one pass backward.

XLA splits an RMSNorm and its autodiff backward into several fusions that each re-read x (and dy)
from HBM; at ling_small's training shape the norms were 26 ms of a 205 ms step. These kernels
take 14 ms for the same norms, but the step is no faster: XLA then cannot fuse the residual adds,
gradient sums, RoPE and gates into the norms (BENCHMARKS.md), so the model keeps "xla" by default.
A fused residual-add + norm kernel is the next step. A program owns a block of rows of one group
slice:
  forward:  x -> y = w * dtype(x r),   r = rsqrt(mean(x^2) + eps) kept per row (fp32, [G, N])
  backward: x, dy, r -> dx = r (d - x r mean(d x r)),  d = fp32(dtype(dy w)),
            and this block's column sums of dy * dtype(x r) for dw (summed over blocks outside).
Same roundings as autodiff of reference.py (the cast of dy w to the compute dtype included), fp32
statistics and accumulations.
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
  dtype: jnp.dtype             # compute dtype (the output's)
  groups: int = 1              # independent slices of the last axis, each with its own weight
  block_rows: int = 0          # 0: auto (block_elems // slice width, at most 64)
  num_warps: int = 4
  interpret: bool = False


def _block_rows(cfg: Config, width: int) -> int:
  return cfg.block_rows or max(1, min(64, 16384 // width))


def supported(n_rows: int, width: int, cfg: Config) -> bool:
  """Triton blocks: the slice width a power of two >= 16, the row count a multiple of the
  row block."""
  return width >= 16 and not width & (width - 1) and n_rows % _block_rows(cfg, width) == 0


def _fwd_kernel(x_ref, w_ref, y_ref, r_ref, *, cfg: Config):
  x = x_ref[...].astype(cfg.dtype).astype(jnp.float32)  # [BR, W]
  r = jax.lax.rsqrt(jnp.mean(x * x, axis=1) + cfg.eps)
  xhat = (x * r[:, None]).astype(cfg.dtype).astype(jnp.float32)
  w = w_ref[...].astype(cfg.dtype).astype(jnp.float32)
  y_ref[...] = (w[None, :] * xhat).astype(y_ref.dtype)
  r_ref[...] = r


def _bwd_kernel(x_ref, w_ref, r_ref, dy_ref, dx_ref, dw_ref, *, cfg: Config):
  x = x_ref[...].astype(cfg.dtype).astype(jnp.float32)
  r = r_ref[...]
  dy = dy_ref[...].astype(jnp.float32)
  w = w_ref[...].astype(cfg.dtype).astype(jnp.float32)
  d = (dy * w[None, :]).astype(cfg.dtype).astype(jnp.float32)
  xr = x * r[:, None]
  c = jnp.mean(d * xr, axis=1)
  dx = r[:, None] * (d - xr * c[:, None])
  dx_ref[...] = dx.astype(cfg.dtype).astype(dx_ref.dtype)
  dw_ref[...] = jnp.sum(dy * xr.astype(cfg.dtype).astype(jnp.float32), axis=0)


def _specs(N, G, W, cfg: Config):
  BR = _block_rows(cfg, W)
  rows = pl.BlockSpec((BR, W), lambda i, g: (i, g))
  weight = pl.BlockSpec((None, W), lambda i, g: (g, 0))
  stats = pl.BlockSpec((None, BR), lambda i, g: (g, i))
  return (N // BR, G), rows, weight, stats


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, name):
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, compiler_params=plt.CompilerParams(num_warps=cfg.num_warps,
                                                              num_stages=1),
      interpret=cfg.interpret, name=name)


def _forward(x, w, cfg: Config):
  N, D = x.shape
  G, W = cfg.groups, D // cfg.groups
  grid, rows, weight, stats = _specs(N, G, W, cfg)
  return _call(_fwd_kernel, cfg, grid, [rows, weight], [rows, stats],
               [jax.ShapeDtypeStruct((N, D), cfg.dtype),
                jax.ShapeDtypeStruct((G, N), jnp.float32)], "rms_norm_fwd")(x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, w, cfg: Config):
  return _forward(x, w, cfg)[0]


def _rms_norm_fwd(x, w, cfg):
  y, r = _forward(x, w, cfg)
  return y, (x, w, r)


def _rms_norm_bwd(cfg, res, dy):
  x, w, r = res
  N, D = x.shape
  G, W = cfg.groups, D // cfg.groups
  grid, rows, weight, stats = _specs(N, G, W, cfg)
  nb = grid[0]
  partial = pl.BlockSpec((None, None, W), lambda i, g: (i, g, 0))
  dx, dw = _call(_bwd_kernel, cfg, grid, [rows, weight, stats, rows], [rows, partial],
                 [jax.ShapeDtypeStruct((N, D), x.dtype),
                  jax.ShapeDtypeStruct((nb, G, W), jnp.float32)], "rms_norm_bwd")(x, w, r, dy)
  return dx, dw.sum(0).astype(w.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm_pallas(x, w, cfg: Config):
  """x [N, D] (any float dtype), w [groups, D / groups] -> y [N, D] in cfg.dtype;
  differentiable in x and w."""
  N, D = x.shape
  if D % cfg.groups or w.shape != (cfg.groups, D // cfg.groups):
    raise ValueError(f"x {x.shape} in {cfg.groups} groups needs w [{cfg.groups}, "
                     f"{D // cfg.groups}], got {w.shape}")
  if not supported(N, D // cfg.groups, cfg):
    raise ValueError(f"rms_norm_pallas: {N} rows of slices {D // cfg.groups} wide are not "
                     f"supported (width a power of two >= 16, rows a multiple of "
                     f"{_block_rows(cfg, D // cfg.groups)})")
  return _rms_norm(x, w, cfg)
