"""FP8 checkpoints (docs/architecture.md §4.4): which scale scheme config.json declares, and
dequantisation.

Two schemes exist in the wild for the Ling FP8 releases and are told apart by
`quantization_config.quant_method`:
  "compressed-tensors" (strategy "channel", as Ling-2.6-1T): `weight` float8_e4m3fn [out, in] and
      `weight_scale` [out, 1]; W = W_q * scale, row by row ("tensor" strategy: one scale).
  "fp8" with `weight_block_size` [128, 128] (DeepSeek style): `weight_scale_inv` fp32
      [ceil(out/128), ceil(in/128)]; W = W_q * scale_inv, one factor per 128x128 block.
The product is taken in fp32 and rounded once to the target dtype, as the reference
dequantisation kernels do. Routers, norms, biases, embeddings and lm_head are not quantised.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
_SCALE_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


@dataclasses.dataclass(frozen=True)
class QuantScheme:
  kind: str                               # "channel" (compressed-tensors) or "block" (fp8)
  block: tuple[int, int] | None = None    # rows, cols of one scale block

  @property
  def scale_suffix(self) -> str:
    return "weight_scale" if self.kind == "channel" else "weight_scale_inv"

  @property
  def description(self) -> str:
    if self.kind == "channel":
      return "compressed-tensors, per-channel weight_scale"
    return f"fp8, {self.block[0]}x{self.block[1]} block weight_scale_inv"

  def check_scale(self, weight_shape, scale_shape, scale_dtype, where: str) -> None:
    out, inp = weight_shape
    if np.dtype(scale_dtype) not in _SCALE_DTYPES:
      raise ValueError(f"{where} has dtype {np.dtype(scale_dtype).name}; a scale must be float")
    if self.kind == "channel":
      ok = tuple(scale_shape) in ((out, 1), (out,), (1,), (), (1, 1))
      want = [out, 1]
    else:
      want = [-(-out // self.block[0]), -(-inp // self.block[1])]
      ok = list(scale_shape) == want
    if not ok:
      raise ValueError(f"{where} has shape {list(scale_shape)}; for a [{out}, {inp}] weight "
                       f"({self.description}) it must be {want}")


def _mapping(value, where: str) -> dict:
  if not isinstance(value, dict):
    raise ValueError(f"{where} must be a JSON object, got {value!r}")
  return value


def quant_scheme(qc: dict | None) -> QuantScheme | None:
  """The scheme declared by config.json's `quantization_config` (None: not quantised)."""
  if qc is None:
    return None
  method = _mapping(qc, "quantization_config").get("quant_method")
  if method == "fp8":
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
      raise ValueError(f"quantization_config.weight_block_size must be [rows, cols], got {block!r}"
                       " (only block-scaled fp8 is supported)")
    if qc.get("fmt", "e4m3") != "e4m3":
      raise ValueError(f"quantization_config.fmt {qc.get('fmt')!r} not supported (only e4m3)")
    return QuantScheme("block", tuple(block))
  if method == "compressed-tensors":
    groups = _mapping(qc.get("config_groups") or {}, "quantization_config.config_groups")
    if not groups:
      raise ValueError("quantization_config (compressed-tensors) has no config_groups")
    for name, g in groups.items():
      where = f"quantization_config.config_groups.{name}"
      w = _mapping(_mapping(g, where).get("weights") or {}, f"{where}.weights")
      if (w.get("num_bits"), w.get("type"), w.get("strategy")) not in (
          (8, "float", "channel"), (8, "float", "tensor")):
        raise ValueError(f"quantization_config.config_groups.{name}.weights = {w!r}: only 8-bit "
                         f"float weights with channel or tensor strategy are supported")
      if w.get("symmetric") is False:
        raise ValueError(f"quantization_config.config_groups.{name}: asymmetric weights are not "
                         f"supported")
    if qc.get("format") not in (None, "float-quantized", "naive-quantized"):
      raise ValueError(f"quantization_config.format {qc.get('format')!r} not supported")
    return QuantScheme("channel")
  raise ValueError(f"quantization_config.quant_method {method!r} not supported "
                   "(supported: 'compressed-tensors' per-channel fp8, 'fp8' block-scaled)")


def dequantize_rows(scheme: QuantScheme, w: np.ndarray, scale: np.ndarray, row0: int
                    ) -> np.ndarray:
  """fp32 W for rows [row0, row0 + len(w)) of a quantised [out, in] weight."""
  rows, cols = w.shape
  x = w.astype(np.float32)
  s = np.asarray(scale, np.float32)
  if scheme.kind == "channel":
    s = s.reshape(-1)
    return x * (s[0] if s.size == 1 else s[row0:row0 + rows, None])
  b0, b1 = scheme.block
  r = np.arange(row0, row0 + rows) // b0
  per_row = s[r]                                              # [rows, ceil(in / b1)]
  return x * np.repeat(per_row, b1, axis=1)[:, :cols]


def quantize(w: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
  """(float8_e4m3fn weight, fp32 scale) of an [out, in] weight: the inverse, for test fixtures."""
  w = np.asarray(w, np.float32)
  fmax = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
  if scheme.kind == "channel":
    s = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / fmax      # [out, 1]
    return (w / s).astype(ml_dtypes.float8_e4m3fn), s.astype(np.float32)
  b0, b1 = scheme.block
  out, inp = w.shape
  s = np.zeros((-(-out // b0), -(-inp // b1)), np.float32)
  q = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
  for i in range(s.shape[0]):
    for j in range(s.shape[1]):
      blk = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1]
      s[i, j] = max(float(np.abs(blk).max()), 1e-12) / fmax
      q[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (blk / s[i, j]).astype(q.dtype)
  return q, s
