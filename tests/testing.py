"""What the test files share: relative errors, the GPU-only marker, a deadline, the XLA flags of
the processes tests start, random tiny models, float64 grouped-matmul references and the H100
lowering check. (The float64 spec of the model layers is numpy_reference.py; the HF checkpoint
fixtures are hf_fixtures.py.)"""

import contextlib
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ling_jax.model import LingForCausalLM
from ling_jax.model.common import CHECKPOINTED

ON_GPU = jax.devices()[0].platform == "gpu"
# Tests named *gpu* compile the kernels for real (benchmarks/gpu_run.sh tests runs them there).
gpu = pytest.mark.skipif(not ON_GPU, reason="compiled Triton kernels need a GPU")


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a process a test starts: `devices` fake CPU devices and the suite's own flags
  otherwise (conftest.py: quick compiles on the CPU)."""
  keep = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(keep + [f"--xla_force_host_platform_device_count={devices}"])


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


# ----------------------------------------------------------------------------- random tiny models
def random_model(cfg, seed=0, **kwargs) -> LingForCausalLM:
  """A model with every checkpointed variable drawn fresh (norm weights near 1, nonzero expert
  biases); kwargs go to LingForCausalLM (dtype, kernels)."""
  model = LingForCausalLM(cfg, rngs=nnx.Rngs(seed), **kwargs)
  flat = list(nnx.to_flat_state(nnx.state(model, CHECKPOINTED)))
  keys = jax.random.split(jax.random.key(seed + 1), len(flat))

  def perturb(path, x, k):
    # The noise only where it is used: drawing it eagerly for every variable compiled a
    # random-normal program for each parameter shape.
    noise = lambda: jax.random.normal(k, x.shape, jnp.float32)
    name = path[-1] if path[-1] != "weight" else path[-2]
    if "norm" in str(name) or name in ("enorm", "hnorm", "final_layernorm", "g_norm"):
      return (1.0 + 0.1 * noise()).astype(x.dtype)
    if name == "expert_bias":
      return (0.05 * noise()).astype(x.dtype)
    return x

  for (path, var), k in zip(flat, keys):
    var.set_value(perturb(path, var.get_value(), k))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def random_tokens(cfg, shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, dtype=jnp.int32)


# ----------------------------------------------------------------------------- grouped matmuls
def np_gmm(x, w, sizes, transpose_rhs=False):
  """Float64 grouped matmul: rows of group g times w[g] (w[g].T with transpose_rhs)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  out, start = np.zeros((x.shape[0], w.shape[1] if transpose_rhs else w.shape[2])), 0
  for g, n in enumerate(np.asarray(sizes)):
    out[start:start + n] = x[start:start + n] @ (w[g].T if transpose_rhs else w[g])
    start += n
  return out  # rows past sum(sizes) stay zero


def np_tgmm(x, dy, sizes):
  """Float64 per-group weight gradient: x[rows of g].T @ dy[rows of g]."""
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  out, start = np.zeros((len(sizes), x.shape[1], dy.shape[1])), 0
  for g, n in enumerate(np.asarray(sizes)):
    out[g] = x[start:start + n].T @ dy[start:start + n]
    start += n
  return out


def random_sizes(rng, G, total, kind):
  """G group sizes summing to `total`: "uniform", "one_group" (one holds all) or "skewed"."""
  if kind == "uniform":
    return np.bincount(rng.integers(0, G, total), minlength=G)
  if kind == "one_group":  # everything in one group, every other group empty
    s = np.zeros(G, int)
    s[rng.integers(G)] = total
    return s
  if kind == "skewed":  # zipf-like, several empty groups
    p = 1.0 / np.arange(1, G + 1) ** 2
    s = np.bincount(rng.choice(G, total, p=p / p.sum()), minlength=G)
    return rng.permutation(s)
  raise ValueError(kind)


# ----------------------------------------------------------------------------- Triton lowering
@contextlib.contextmanager
def lowering_for_sm90(verified):
  """Pallas's Triton lowering pinned to an H100 (sm_90), each module verified and appended to
  `verified`. Uses two private JAX hooks; skips the test (never passes vacuously) if they move."""
  try:
    from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg
  except ImportError as e:
    pytest.skip(f"jax internals moved: {e}")
  get_info, lower = reg.gpu_info_lib.get_gpu_info, reg.lowering.lower_jaxpr_to_triton_module

  def lower_and_verify(*a, **k):
    result = lower(*a, **k)
    assert result.module.operation.verify()
    verified.append(result)
    return result

  reg.gpu_info_lib.get_gpu_info = lambda: gpu_info.GpuInfo(
      gpu_version=None, arch_name="9.0", compute_capability=90)
  reg.lowering.lower_jaxpr_to_triton_module = lower_and_verify
  try:
    yield
  finally:
    reg.gpu_info_lib.get_gpu_info, reg.lowering.lower_jaxpr_to_triton_module = get_info, lower


def export_for_cuda(f, *args):
  """Export jit(f) at `args` (ShapeDtypeStructs) for CUDA: the number of verified Triton modules."""
  verified = []
  with lowering_for_sm90(verified):
    jax.export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args)
  return len(verified)
