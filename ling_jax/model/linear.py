"""The dense Linears: their variables, the one product every site runs (docs/inference.md,
"FP8 weights"), and the SwiGLU MLP made of three of them.

Every Linear kernel is PyTorch's [out, in] transposed and split into named axes, [in..., out...]
(common.py). With FP8 weights (`ExpertWeights.linears`) a Linear `name` is float8_e4m3fn values
of the kernel's shape plus `<name>_scale` in fp32 over its 2-D view [K, N] = [prod(in axes),
prod(out axes)]: [ceil(K / bk), ceil(N / bn)] per (bk, bn) block, or [1, N] per output column
(the checkpoint's [out blocks, in blocks] and [out, 1] transposed, as the routed experts' are).

A module with Linears holds `dtype` (compute), `weights` (its `ExpertWeights`) and `linear_impl`
(`Kernels.linear`), and calls `linear(self, name, spec, x)` where it would call
`jnp.einsum(spec, x, kernel)`. On FP8 weights the impl picks:
  "xla" / "reference"     dequantise (values x scale in fp32, rounded once to the compute dtype:
                          the importer's dequantisation, so the model gives the logits of a
                          dequantised import bit for bit), then the same einsum;
  "pallas" / "interpret"  x as [M, K] through the grouped-matmul kernel with one group, which
                          reads the FP8 tiles itself (pallas_kernels/grouped_matmul/fp8.py);
  "auto"                  "pallas" on a GPU outside a mesh (the kernel is a single-device call),
                          else "xla".
Weights in the parameter dtype always run the einsum. FP8 products are forward only: the kernel
raises on differentiation, and training needs dense weights (as for the routed experts).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax import axes as ax
from ling_jax.model.common import param
from ling_jax.model.settings import ExpertWeights
from ling_jax.parallel import islands
from pallas_kernels.grouped_matmul import Fp8Weight, dequantize, grouped_matmul, tuned_config


def add_linear(module: nnx.Module, name: str, rngs: nnx.Rngs, shape: Sequence[int],
               axes: Sequence[str], param_dtype, *, n_in: int, weights: ExpertWeights) -> None:
  """module.<name>: a Linear kernel of `shape` whose first n_in axes are its inputs, N(0, 1 / K)
  in param_dtype; with FP8 linears N(0, 1) float8 values and module.<name>_scale = K^-1/2 (a
  checkpoint overwrites both), as the routed experts draw theirs."""
  K = math.prod(shape[:n_in])
  if not weights.linears:
    setattr(module, name, param(rngs, shape, axes, param_dtype, fan_in=K))
    return
  # Which of the module's variables are FP8 kernels and their input axes, for whatever takes the
  # state apart (ling.py's with_fp8_experts / with_dense_experts).
  module.fp8_linears = getattr(module, "fp8_linears", ()) + ((name, n_in),)
  setattr(module, name, param(rngs, shape, axes, jnp.float8_e4m3fn))
  # Replicated: a few blocks need not divide the mesh axes their kernel's axes map to.
  setattr(module, f"{name}_scale",
          nnx.Param(jnp.full(scale_shape(shape, n_in, weights), K ** -0.5, jnp.float32),
                    out_sharding=(ax.NORM, ax.NORM), eager_sharding=False))


def scale_shape(shape: Sequence[int], n_in: int, weights: ExpertWeights) -> tuple[int, int]:
  """The scale of an FP8 kernel of `shape` with n_in input axes (module docstring)."""
  K, N = math.prod(shape[:n_in]), math.prod(shape[n_in:])
  if weights.format == "fp8-channel":
    return (1, N)
  bk, bn = weights.block
  return (-(-K // bk), -(-N // bn))


def linear(module: nnx.Module, name: str, spec: str, x: jax.Array) -> jax.Array:
  """jnp.einsum(spec, x, module.<name>) with the kernel in module.dtype, or on FP8 weights by
  module.linear_impl (module docstring). `spec` contracts x's last axes with the kernel's input
  axes, which lead it, and appends its output axes: "btd,dshk->btshk", "...d,df->...f"."""
  w = getattr(module, name)[...]
  if not module.weights.linears:
    return jnp.einsum(spec, x, w.astype(module.dtype))
  n_in = _inputs(spec)
  if n_in != dict(module.fp8_linears)[name]:
    raise ValueError(f"linear spec {spec!r} contracts {n_in} axes of {type(module).__name__}."
                     f"{name}, which has {dict(module.fp8_linears)[name]} input axes")
  impl = _resolve(module.linear_impl)
  if impl in ("xla", "reference"):
    return jnp.einsum(spec, x, _dequantized(module, name, w, n_in))
  lead = x.shape[:x.ndim - n_in]
  fw = _fp8(module, name, w, n_in)
  y = fp8_matmul(x.reshape(math.prod(lead), fw.shape[1]).astype(module.dtype), fw, impl)
  return y.reshape(*lead, *w.shape[n_in:])


def fp8_matmul(x: jax.Array, w: Fp8Weight, impl: str) -> jax.Array:
  """x [M, K] @ a one-group FP8 kernel w [1, K, N] -> [M, N] in x's dtype, through the
  grouped-matmul kernel (impl "pallas" or "interpret"; "xla": its reference) on `tuned_config`'s
  tiles for M rows of one group."""
  M, (_, K, N) = x.shape[0], w.shape
  fmt = "fp8-channel" if w.block is None else "fp8-block"
  cfg = tuned_config(K, N, rows_per_group=M, weights=fmt)
  if w.block is not None:  # a contraction tile must lie inside one scale block (fp8.py)
    cfg = cfg._replace(block_k=math.gcd(cfg.block_k, w.block[0]))
  return grouped_matmul(x, w, jnp.full((1,), M, jnp.int32), impl=impl, config=cfg)


def dense_kernel(module: nnx.Module, name: str) -> jax.Array:
  """module.<name> as an array in module.dtype, FP8 weights dequantised (for the few sites that
  take the kernel apart: MLA's absorbed decode splits kv_b_proj into W_UK and W_UV)."""
  w = getattr(module, name)[...]
  if not module.weights.linears:
    return w.astype(module.dtype)
  return _dequantized(module, name, w, dict(module.fp8_linears)[name])


def fp8_weight(values: jax.Array, scale: jax.Array, n_in: int, weights: ExpertWeights,
               name: str = "kernel") -> Fp8Weight:
  """An FP8 kernel and its scale as a one-group Fp8Weight [1, K, N]; a scale of the wrong shape
  is refused by the variable's `name`."""
  want = scale_shape(values.shape, n_in, weights)
  if tuple(scale.shape) != want:
    raise ValueError(f"{name}_scale has shape {list(scale.shape)}; for the {weights.format} "
                     f"kernel {name} {list(values.shape)} ({n_in} input axes) it must be "
                     f"{list(want)}")
  K = math.prod(values.shape[:n_in])
  block = weights.block if weights.format == "fp8-block" else None
  return Fp8Weight(values.reshape(1, K, -1), scale if block is None else scale[None], block)


def dequantize_linear(values: jax.Array, scale: jax.Array, n_in: int, weights: ExpertWeights,
                      dtype, name: str = "kernel") -> jax.Array:
  """An FP8 kernel in `dtype`, of its own shape: values x scale in fp32, rounded once."""
  return dequantize(fp8_weight(values, scale, n_in, weights, name), dtype).reshape(values.shape)


def _fp8(module, name: str, w: jax.Array, n_in: int) -> Fp8Weight:
  return fp8_weight(w, getattr(module, f"{name}_scale")[...], n_in, module.weights,
                    f"{type(module).__name__}.{name}")


def _dequantized(module, name: str, w: jax.Array, n_in: int) -> jax.Array:
  return dequantize_linear(w, getattr(module, f"{name}_scale")[...], n_in, module.weights,
                           module.dtype, f"{type(module).__name__}.{name}")


def _inputs(spec: str) -> int:
  """How many leading kernel axes `spec` contracts (all of them x's trailing axes, in order)."""
  ins, out = spec.replace("...", "").split("->")
  xs, ws = ins.split(",")
  n_in = sum(c in xs for c in ws)
  if not (ws[:n_in] == xs[len(xs) - n_in:] and out == xs[:len(xs) - n_in] + ws[n_in:]):
    raise ValueError(f"linear spec {spec!r} must contract x's last axes with the kernel's "
                     "leading ones and append the kernel's other axes")
  return n_in


def _resolve(impl: str) -> str:
  if impl == "auto":
    return ("pallas" if jax.default_backend() == "gpu" and islands.active_mesh() is None
            else "xla")
  return impl


class SwiGLU(nnx.Module):
  """W_down(silu(W_gate x) * W_up x): the dense MLP, the shared expert (docs/architecture.md §3.6).
  Called as every MLP is, x -> (y, aux); its aux is None (SparseMoE's is the expert load).
  weights, linear_impl: how its Linears are held and run (module docstring)."""

  def __init__(self, hidden: int, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, weights: ExpertWeights = ExpertWeights(),
               linear_impl: str = "auto"):
    self.dtype, self.weights, self.linear_impl = dtype, weights, linear_impl
    for name, shape, axes in (("gate_proj", (hidden, width), (ax.EMBED, ax.MLP)),
                              ("up_proj", (hidden, width), (ax.EMBED, ax.MLP)),
                              ("down_proj", (width, hidden), (ax.MLP, ax.EMBED))):
      add_linear(self, name, rngs, shape, axes, param_dtype, n_in=1, weights=weights)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
    x = x.astype(self.dtype)
    g = linear(self, "gate_proj", "...d,df->...f", x)
    u = linear(self, "up_proj", "...d,df->...f", x)
    return linear(self, "down_proj", "...f,fd->...d", jax.nn.silu(g) * u), None
