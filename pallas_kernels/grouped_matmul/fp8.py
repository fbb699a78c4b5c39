"""FP8 expert weights for the grouped matmul: the stored form, its dequantisation, and how a kernel
reads one tile of it (docs/kernels.md#grouped_matmul, "FP8 weights").

An `Fp8Weight` is float8_e4m3fn values [G, K, N] (the model's [in, out] layout: a PyTorch
[out, in] weight transposed per group) and fp32 scales in one of the FP8 releases' two schemes
(docs/checkpoints.md, "FP8"):
  block-scaled (`block=(bk, bn)`, the "fp8" scheme's 128 x 128): scale [G, ceil(K / bk),
      ceil(N / bn)], W[g, k, n] = values[g, k, n] * scale[g, k // bk, n // bn];
  channel-wise (`block=None`, compressed-tensors' channel strategy): scale [G, N],
      W[g, k, n] = values[g, k, n] * scale[g, n].
The product is taken in fp32 and rounded once to the compute dtype, as the checkpoints'
dequantisation does. `block` is in our [K, N] layout: the release's [out, in] block (128, 128)
transposed.

How the kernels apply the scale (kernel.py's `_gmm_kernel`; the choice is about accuracy):
* block-scaled: each fp8 [bk, bn] weight tile is converted and multiplied by its blocks' scales
  in fp32, then rounded to the compute dtype before the dot (`scale_tile`). The scale varies
  along the contraction, so it cannot move past the dot; and this rounding is exactly the
  dequantised bf16 checkpoint's, so the kernel matches the bf16 kernel on dequantised weights
  bit for bit. A K-tile must lie inside one scale block (bk divides the block's rows); along N
  each column reads its own block's factor, so bn is free.
* channel-wise: the scale is constant along the contraction, so the fp8 tile enters the dot
  unscaled (fp8 -> bf16 is exact) and the fp32 accumulator's columns are scaled once after the
  loop (`scale_columns`): no per-weight rounding (closer to the fp8 model than the dequantised
  bf16 one is) and bm x bn multiplies per output tile instead of bk x bn per contraction step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

FP8_DTYPE = jnp.dtype(jnp.float8_e4m3fn)
ZERO = np.zeros((), FP8_DTYPE)  # a masked load's fill (the Triton lowering casts no int to fp8)


@dataclasses.dataclass(frozen=True)
class Fp8Weight:
  """FP8 values [G, K, N] with their scales (module docstring); a pytree whose leaves are values
  and scale, `block` static. Use it where an expert weight array would go."""
  values: jax.Array
  scale: jax.Array
  block: tuple[int, int] | None = None

  def __post_init__(self):
    if isinstance(self.block, list):  # (from JSON) a static field must hash
      object.__setattr__(self, "block", tuple(self.block))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def ndim(self) -> int:
    return len(self.values.shape)


jax.tree_util.register_dataclass(Fp8Weight, data_fields=["values", "scale"], meta_fields=["block"])


def scale_shape(shape, block) -> tuple[int, ...]:
  """The scale shape a [G, K, N] weight needs under `block` ((bk, bn) or None: channel-wise)."""
  G, K, N = shape
  if block is None:
    return (G, N)
  return (G, -(-K // block[0]), -(-N // block[1]))


def check(w: Fp8Weight, where: str = "rhs") -> None:
  """Refuse a malformed Fp8Weight, naming the field, what it holds and what it must hold."""
  if w.values.dtype != FP8_DTYPE or w.values.ndim != 3:
    raise ValueError(f"{where}.values is {w.values.dtype}{list(w.values.shape)}; it must be "
                     f"float8_e4m3fn [G, K, N]")
  b = w.block
  if b is not None and not (isinstance(b, tuple) and len(b) == 2
                            and all(isinstance(i, int) and i > 0 for i in b)):
    raise ValueError(f"{where}.block is {b!r}; it must be None (channel-wise) or (rows, cols) of "
                     f"one scale block in the [K, N] layout, e.g. (128, 128)")
  want = scale_shape(w.values.shape, b)
  if tuple(w.scale.shape) != want or not jnp.issubdtype(w.scale.dtype, jnp.floating):
    scheme = ("channel-wise: [G, N]" if b is None
              else f"{b} blocks: [G, ceil(K/{b[0]}), ceil(N/{b[1]})]")
    raise ValueError(f"{where}.scale is {w.scale.dtype}{list(w.scale.shape)}; for values "
                     f"{list(w.values.shape)} ({scheme}) it must be float {list(want)}")


def check_k_tile(block: tuple[int, int], bk: int) -> None:
  """A block-scaled weight's K-tiles must each lie inside one scale block."""
  if block[0] % bk:
    raise ValueError(f"the kernel's contraction tile of {bk} rows (from Config.block_k) does not "
                     f"divide the FP8 scale block's {block[0]} rows (block {block}); lower block_k")


def dequantize(w: Fp8Weight, dtype=jnp.float32) -> jax.Array:
  """The weight [G, K, N] in `dtype`: values x scale in fp32, rounded once."""
  check(w)
  s = w.scale.astype(jnp.float32)
  if w.block is None:
    s = s[:, None, :]
  else:
    K, N = w.values.shape[1:]
    s = jnp.repeat(jnp.repeat(s, w.block[0], axis=1)[:, :K], w.block[1], axis=2)[:, :, :N]
  return (w.values.astype(jnp.float32) * s).astype(dtype)


def quantize(w: jax.Array, block: tuple[int, int] | None = None) -> Fp8Weight:
  """A weight [..., K, N] as e4m3 values and fp32 scales (the inverse of `dequantize`, for tests
  and benchmarks): each (bk, bn) block's (block) or each column's (None) largest magnitude over
  448, e4m3's largest finite value; scales [..., ceil(K / bk), ceil(N / bn)] or [..., N]."""
  w = jnp.asarray(w, jnp.float32)
  fmax = float(jnp.finfo(FP8_DTYPE).max)
  if block is None:
    s = jnp.maximum(jnp.abs(w).max(axis=-2), 1e-12) / fmax  # [..., N]
    return Fp8Weight((w / s[..., None, :]).astype(FP8_DTYPE), s)
  *lead, K, N = w.shape
  bk, bn = block
  Kb, Nb = -(-K // bk), -(-N // bn)
  pad = [(0, 0)] * len(lead) + [(0, Kb * bk - K), (0, Nb * bn - N)]
  blocks = jnp.pad(w, pad).reshape(*lead, Kb, bk, Nb, bn)
  s = jnp.maximum(jnp.abs(blocks).max(axis=(-3, -1)), 1e-12) / fmax  # [..., Kb, Nb]
  v = (blocks / s[..., :, None, :, None]).reshape(*lead, Kb * bk, Nb * bn)[..., :K, :N]
  return Fp8Weight(v.astype(FP8_DTYPE), s, tuple(block))


def as_f32(w) -> jax.Array:
  """An expert weight in fp32: an Fp8Weight dequantised, an array cast."""
  return dequantize(w) if isinstance(w, Fp8Weight) else w.astype(jnp.float32)


# ----------------------------------------------------------------------------- inside the kernels


def scale_tile(w, s_ref, g, k0, cols, cmask, block, dtype):
  """A block-scaled fp8 tile w [bk, bn] of group g at rows k0.. and columns `cols` [bn]: times
  each column's block factor (the tile's rows share one block row), rounded once to dtype."""
  s = _load(s_ref.at[g, k0 // block[0], cols // block[1]], cmask)  # [bn]
  return (w.astype(jnp.float32) * s[None, :]).astype(dtype)


def scale_columns(acc, s_ref, g, n0, bn: int, cmask):
  """The fp32 accumulator [bm, bn] of a channel-wise weight's group g, columns n0..: scaled."""
  s = _load(s_ref.at[g, pl.ds(n0, bn)], cmask)  # [bn]
  return acc * s[None, :]


def _load(ref, mask):
  return plt.load(ref, mask=mask, other=None if mask is None else 0)

