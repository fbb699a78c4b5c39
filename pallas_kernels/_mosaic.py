"""Shared by the Mosaic GPU kernels (simple_gla/mosaic.py, grouped_matmul/mosaic.py)."""

from __future__ import annotations


def interpret_kwargs(interpret) -> dict:
  """`plgpu.kernel`'s interpret argument: none when False; True or the interpreter's
  InterpretGPUParams (e.g. detect_races=True) run the kernel in jax's GPU interpreter."""
  if not interpret:
    return {}
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return {"interpret": InterpretGPUParams() if interpret is True else interpret}
