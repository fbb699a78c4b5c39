"""A whole train step on a mesh (docs/parallelism.md): tokens/s, per-device memory and the loss
for each mesh and expert-exchange strategy, side by side, on the devices present.

  python -m benchmarks.multi_gpu [--model small|tiny] [--meshes "data=-1;fsdp=-1;expert=-1"]
      [--exchanges all_gather,all_to_all,ragged_all_to_all] [--batch 0] [--seq 4096]
      [--grad-accum 1] [--steps 5] [--decomposer] [--cpu-devices 0]

Each mesh (`;`-separated MeshConfig overrides, -1 taking the devices left) trains
experiments/small_pretrain.py's model and numerics (bf16 compute over fp32 masters, the GPU
kernels inside the shard_map islands) through ling_jax/train/sharding.py, the code path of
`python -m experiments.small_pretrain mesh.fsdp=-1 ...`: the state initialised in place, the
step jitted with its shardings. Per row: the median step time after the first (compiling) one,
tokens/s in all and per device, the per-device bytes of parameters + AdamW state known before
compiling (ling_jax.parallel.memory) and XLA's temporaries (`compiled.memory_analysis()`), and
the first step's loss (every row starts from the same weights and batch: the rows agree up to
bf16 rounding). The exchange only matters where the mesh
has an `expert` axis (elsewhere its rows are the same program; only all_gather is run there).

On one GPU every mesh is the one-device mesh: the script runs as a dry run of the multi-GPU
one (one row). `--cpu-devices 8 --model tiny --seq 64` runs it on fake CPU devices (the
ragged_all_to_all rows say why they cannot run there). Rows go to $OUT/multi_gpu.json when OUT
is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

from benchmarks import device_flags

STRATEGIES = ("all_gather", "all_to_all", "ragged_all_to_all")


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="small", choices=("small", "tiny"))
  p.add_argument("--meshes", default="data=-1;fsdp=-1;expert=-1;fsdp=-1,expert=2")
  p.add_argument("--exchanges", default=",".join(STRATEGIES))
  p.add_argument("--batch", type=int, default=0, help="global rows (0: 8 per device)")
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--grad-accum", type=int, default=1)
  p.add_argument("--steps", type=int, default=5, help="timed steps after the compiling one")
  device_flags.add_arguments(p)
  return p.parse_args(argv)


args = parse(sys.argv[1:]) if __name__ == "__main__" else None
if args is not None:  # XLA flags before jax starts
  device_flags.apply(args)

import jax
import numpy as np

from experiments import small_pretrain
from ling_jax.config import ling_small, ling_tiny
from ling_jax.data import DataConfig, SyntheticIterator
from ling_jax.model.settings import Parallel
from ling_jax.parallel import memory
from ling_jax.parallel.mesh import MeshConfig
from ling_jax.train import loop, sharding
from ling_jax.train.errors import RunRefused


def mesh_config(text: str) -> MeshConfig:
  """"fsdp=-1,expert=2" -> MeshConfig(data=1, fsdp=-1, expert=2) (data=1 unless given)."""
  sizes = dict(kv.split("=") for kv in text.split(",") if kv)
  return MeshConfig(**{"data": 1, **{k: int(v) for k, v in sizes.items()}})


def experiment(mesh: MeshConfig, exchange: str):
  base = small_pretrain.config()
  model = ling_small() if args.model == "small" else ling_tiny()
  batch = args.batch or 8 * jax.device_count()
  train = dataclasses.replace(base.train, parallel=Parallel(exchange), grad_accum=args.grad_accum,
                              sample_tokens=0)
  return dataclasses.replace(base, model=model, train=train, mesh=mesh,
                             data=DataConfig(source="synthetic", seq_len=args.seq,
                                             batch_size=batch))


def bench(exp) -> dict:
  """One row: build the run's state on its mesh, compile and time its step."""
  mesh = sharding.mesh_for(exp)
  tx = loop.optimizer(exp.train)
  lay = sharding.layout(exp, mesh, tx)
  est = memory.estimate(lay.abstract[0], lay.model[0], tx=tx)
  params, bias, constants = sharding.init_model_state(exp, lay, loop.build_model)
  state = sharding.init_train_state(params, bias, tx, lay)
  it = SyntheticIterator(batch_size=exp.data.batch_size, seq_len=exp.data.seq_len,
                         vocab_size=exp.model.vocab_size, seed=0)
  with jax.set_mesh(mesh):
    step = loop.train_step(exp.model, exp.train, lay.graphdef, constants, tx, lay)
    batch = sharding.put_batch(next(it), lay, exp.data.batch_size)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    temp = compiled.memory_analysis().temp_size_in_bytes
    state, metrics = compiled(state, batch)
    first_loss = float(metrics["loss"])
    times = []
    for _ in range(args.steps):
      batch = sharding.put_batch(next(it), lay, exp.data.batch_size)
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  tokens = exp.data.batch_size * exp.data.seq_len
  step_s = statistics.median(times)
  return dict(mesh=dict(mesh.shape), devices=mesh.size, compile_s=compile_s, step_s=step_s,
              tokens_per_s=tokens / step_s, tokens_per_s_per_device=tokens / step_s / mesh.size,
              state_bytes=est.params + est.opt_state, temp_bytes=temp,
              loss=first_loss)


def main():
  n = jax.device_count()
  print(f"{n} x {jax.devices()[0].device_kind}, model {args.model}, {args.seq} tokens a row, "
        f"grad_accum {args.grad_accum}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  meshes = [m for m in args.meshes.split(";") if m] if n > 1 else ["data=-1"]
  exchanges = [s for s in args.exchanges.split(",") if s]
  rows, seen = [], set()
  for text in meshes:
    mesh = mesh_config(text)
    try:
      sizes = mesh.resolve(n)
    except ValueError as e:  # more devices than present, or some left idle
      rows.append(dict(mesh_arg=text, exchange="-", error=str(e)[:120]))
      continue
    for exchange in exchanges if sizes["expert"] > 1 else exchanges[:1]:
      key = (str(sizes), exchange)
      if key in seen:
        continue
      seen.add(key)
      row = dict(mesh_arg=text, exchange=exchange)
      try:
        row.update(bench(experiment(mesh, exchange)))
      except (RunRefused, ValueError) as e:  # a mesh the devices or model do not fit; no lowering
        row["error"] = str(e).splitlines()[0][:120]
      except Exception as e:  # noqa: BLE001 (out of memory, a failed compile: reported, not fatal)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
      rows.append(row)
      print(json.dumps(row, default=str), flush=True)
  print(table(rows))
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "multi_gpu.json"), "w") as f:
      json.dump(rows, f, indent=1, default=str)


def table(rows) -> str:
  gib = lambda b: f"{b / 2**30:.2f}"
  out = ["| mesh | exchange | step ms | tokens/s | tokens/s/device | state GiB/device | "
         "XLA temp GiB | step-1 loss | compile s |", "|" + "---|" * 9]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['mesh_arg']} | {r['exchange']} | {r['error']} |" + " |" * 6)
      continue
    mesh = " ".join(f"{a}={s}" for a, s in r["mesh"].items() if s > 1) or "one device"
    out.append(f"| {mesh} | {r['exchange']} | {r['step_s'] * 1e3:.1f} | "
               f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | "
               f"{gib(r['state_bytes'])} | {gib(r['temp_bytes'])} | {r['loss']:.4f} | "
               f"{r['compile_s']:.0f} |")
  return "\n".join(out)


if __name__ == "__main__":
  main()
