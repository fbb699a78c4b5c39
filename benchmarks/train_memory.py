"""Compile-time memory of the train step: XLA's temp bytes per setting, without running it.

  python -m benchmarks.train_memory [--seq 4096] [--batch 4] [--remat none full dots]
                                    [--scope layer group] [--ce-chunk 0 4096] [--no-mtp]
                                    [--gla xla] [--moe xla] [--model small]

Builds the same jitted step as `ling_jax.train.loop.run` on abstract arguments
(`jax.ShapeDtypeStruct`s from `nnx.eval_shape` / `jax.eval_shape`), lowers and compiles it for
the local backend and prints `memory_analysis()` (temp = XLA's scratch for the whole step:
activations saved for the backward pass, their gradients, fusion temporaries). Nothing of the
model's size is allocated, so a CPU estimates what an 80 GB GPU needs. On CPU the estimate is a
proxy: the fusions differ, and Lightning layers run the chunked jnp reference, which saves more
than the GPU's Pallas kernel (which keeps only q, k, v).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.config import ling_small, ling_tiny
from ling_jax.model import Kernels, LingForCausalLM, Remat
from ling_jax.model.ling import build_constants
from ling_jax.train.config import TrainConfig
from ling_jax.train.loop import train_step
from ling_jax.train.optim import optimizer
from ling_jax.train.step import init_state, split_model

GiB = 2.0 ** 30
# XLA:CPU's default (concurrency-optimised) scheduler hoists some big buffers far ahead of their
# use: e.g. the zero-initialised stacks of a lax.map's residuals (sorted MoE) are copied at the top
# of the program and so stay live through the whole forward pass, even under per-layer remat.
# The memory-optimised scheduler is the better proxy for a GPU, whose scheduler tracks memory.
CPU_SCHEDULERS = {"memory": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                  "default": "CPU_SCHEDULER_TYPE_DEFAULT",
                  "concurrency": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}


def abstract_step(cfg, t: TrainConfig, batch: int, seq: int, *, mtp: bool = True):
  """(jitted train step, abstract state, abstract batch) for `cfg` under `t`."""
  def make():
    return LingForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(t.compute_dtype),
                           param_dtype=jnp.float32, kernels=t.kernels)

  graphdef, params, bias, _ = split_model(nnx.eval_shape(make))
  tx = optimizer(t)
  state = jax.eval_shape(lambda p, b: init_state(p, b, tx), params, bias)
  step = train_step(cfg, dataclasses.replace(t, mtp=mtp), graphdef, build_constants(make), tx)
  i32 = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  return step, state, {"tokens": i32, "positions": i32, "segment_ids": i32}


def measure(cfg, t: TrainConfig, batch: int, seq: int, compiler_options=None, **kw) -> dict:
  step, state, b = abstract_step(cfg, t, batch, seq, **kw)
  t0 = time.perf_counter()
  m = step.lower(state, b).compile(compiler_options).memory_analysis()
  return {"temp": m.temp_size_in_bytes / GiB, "args": m.argument_size_in_bytes / GiB,
          "out": m.output_size_in_bytes / GiB, "alias": m.alias_size_in_bytes / GiB,
          "compile_s": time.perf_counter() - t0}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="small", choices=("small", "tiny"))
  p.add_argument("--seq", type=int, nargs="+", default=[4096])
  p.add_argument("--batch", type=int, nargs="+", default=[4])
  p.add_argument("--remat", nargs="+", default=["none", "full", "dots"])
  p.add_argument("--gla", default="xla", help="the Lightning layers' impl (Kernels.lightning)")
  p.add_argument("--moe", default="xla", help="the routed experts' impl (Kernels.moe)")
  p.add_argument("--scope", nargs="+", default=["layer"], help="remat scope: layer, group")
  p.add_argument("--ce-chunk", type=int, nargs="+", default=[4096], help="0: full logits")
  p.add_argument("--no-mtp", action="store_true")
  p.add_argument("--cpu-scheduler", default="memory",
                 choices=("memory", "default", "concurrency"),
                 help="XLA:CPU's instruction scheduler (xla_cpu_scheduler_type)")
  a = p.parse_args()
  cfg = ling_small() if a.model == "small" else ling_tiny()
  opts = None
  if jax.default_backend() == "cpu":
    opts = {"xla_cpu_scheduler_type": CPU_SCHEDULERS[a.cpu_scheduler]}
  print(f"| {'remat':>13} | {'scope':>5} | {'batch':>5} | {'seq':>5} | {'ce_chunk':>8} |"
        f" {'temp GiB':>8} | {'args GiB':>8} | {'compile s':>9} |", flush=True)
  for remat, scope, seq, batch, ce in itertools.product(a.remat, a.scope, a.seq, a.batch,
                                                        a.ce_chunk):
    t = dataclasses.replace(TrainConfig(), remat=Remat(remat, scope), ce_chunk=ce,
                            kernels=Kernels(lightning=a.gla, moe=a.moe, qk_norm_rope="xla"),
                            compute_dtype="bfloat16")
    r = measure(cfg, t, batch, seq, mtp=not a.no_mtp, compiler_options=opts)
    print(f"| {remat:>13} | {scope:>5} | {batch:>5} | {seq:>5} | {ce:>8} | {r['temp']:>8.2f} |"
          f" {r['args']:>8.2f} | {r['compile_s']:>9.1f} |", flush=True)


if __name__ == "__main__":
  main()
