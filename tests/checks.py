"""What the test files share: relative errors, the GPU-only marker, and a deadline."""

import contextlib
import signal

import jax
import numpy as np
import pytest

ON_GPU = jax.devices()[0].platform == "gpu"
# Tests named *gpu* compile the kernels for real (benchmarks/gpu_run.sh tests runs them there).
gpu = pytest.mark.skipif(not ON_GPU, reason="compiled Triton kernels need a GPU")


def rel(a, b):
  """||a - b|| / ||b|| in float64 (Frobenius norms)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def rel_max(a, b):
  """max |a - b| / max |b| in float64: the worst element against the largest magnitude."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@contextlib.contextmanager
def deadline(seconds: int, what: str):
  """Raise TimeoutError in the main thread if the block runs longer: a hang fails the test."""
  def hung(*_):
    raise TimeoutError(f"{what} ran for more than {seconds} s")
  previous = signal.signal(signal.SIGALRM, hung)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
