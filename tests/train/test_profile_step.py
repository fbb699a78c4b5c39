"""ling_jax.profiling's trace and HLO parsing (benchmarks/profile_step.py's table), on a real CPU
trace (the GPU run uses the same code): device time must land on the source lines that produced
it."""

import os

import jax
import jax.numpy as jnp

from ling_jax.profiling import device_ops, hlo_sources, summarise


def _model(a, b):
  h = jnp.tanh(a @ b)  # the matmul line
  return (h @ b.T).sum()


def test_trace_time_maps_to_source_lines(tmp_path):
  a = jax.random.normal(jax.random.key(0), (512, 512))
  f = jax.jit(_model)
  sources = hlo_sources(f.lower(a, a).compile().as_text())
  here = os.path.relpath(__file__)
  lines = {where for where, _ in sources.values()}
  assert any(w.startswith(here + ":") for w in lines), lines
  f(a, a).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      f(a, a).block_until_ready()
  ops = device_ops(str(tmp_path))
  assert ops and all(us >= 0 for _, _, us in ops)
  by_file, by_op, names = summarise(ops, sources, steps=3)
  ours = sum(us for (path, _), us in by_file.items() if path == here)
  assert ours > 0.5 * sum(by_file.values())  # the two matmuls dominate
