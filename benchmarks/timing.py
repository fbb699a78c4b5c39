"""Timing helpers shared by the benchmarks: median of back-to-back calls, one sync per trial."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np


def time_jax(fn, *args, budget_s=0.4, trials=7):
  """Median seconds per call: back-to-back calls (async dispatch), one sync per trial."""
  jax.block_until_ready(fn(*args))  # compile
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - t0
  reps = int(np.clip(budget_s / trials / max(once, 1e-6), 1, 200))
  samples = []
  for _ in range(trials):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / reps)
  return statistics.median(samples)


def time_torch(fn, budget_s=0.4, trials=7):
  """Median seconds per call from CUDA events around back-to-back calls."""
  import torch
  fn()
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  fn()
  torch.cuda.synchronize()
  once = time.perf_counter() - t0
  reps = int(np.clip(budget_s / trials / max(once, 1e-6), 1, 200))
  samples = []
  for _ in range(trials):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
      fn()
    end.record()
    end.synchronize()
    samples.append(start.elapsed_time(end) / 1e3 / reps)
  return statistics.median(samples)


def guarded(f, *a, **kw):
  try:
    return f(*a, **kw)
  except Exception as e:  # a config that fails to compile is a result, not a crash
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
