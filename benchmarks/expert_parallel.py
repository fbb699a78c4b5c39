"""Expert-parallel routed experts (ling_jax/parallel/expert.py): each exchange strategy timed on
the devices present, with the bytes it moves and its agreement with "all_gather".

  python -m benchmarks.expert_parallel [--shape flash|small|tiny] [--tokens 8192,32768]
      [--expert 8] [--strategies all_gather,all_to_all,ragged_all_to_all] [--local auto]
      [--routing grouped|uniform] [--dtype bfloat16|float32] [--decomposer] [--cpu-devices 8]

A mesh of `--expert` devices on the expert axis (default: all), the rest on `data`; N tokens
(global) of random routing, bf16 (or fp32) tokens and experts: "grouped" as the model's router
(each token's X distinct experts among K of the G expert groups, all chosen uniformly: with
ep <= G each token reaches at most K ep / G devices), or "uniform" (any X experts). For each
strategy: forward, and forward + backward (d x, d routing weights, d every expert weight), median
wall time of back-to-back calls; the routed rows that leave each device per direction (mean over
devices, forward; the backward moves as much again) and their bytes (tokens in bf16 and their
ids and weights out, fp32 partial outputs back); the relative error of the output and of every
gradient against "all_gather" from the same run (the ragged collective's default GPU lowering is
reported to corrupt gradients; `--decomposer` sets XLA's
--xla_gpu_unsupported_enable_ragged_all_to_all_decomposer=true). The row "ep=1" runs the same
tokens with every expert on every device (no exchange) where `--baseline` asks for it and the
layer fits.

On CPU, `--cpu-devices 8 --shape tiny` runs on 8 fake devices (ragged_all_to_all's row says why
it cannot run there: XLA:CPU has no ragged all-to-all; its rows and bytes are still counted). Raw rows go to $OUT/expert_parallel.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks import device_flags

# Expert shapes with the routing's groups: G = n_group, K = topk_group (config.py's presets).
SHAPES = {"flash": dict(E=256, D=4096, F=1024, X=8, G=8, K=4),
          "small": dict(E=32, D=1024, F=576, X=4, G=4, K=2),
          "tiny": dict(E=16, D=64, F=32, X=4, G=4, K=2)}
STRATEGIES = ("all_gather", "all_to_all", "ragged_all_to_all")


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="small", choices=sorted(SHAPES))
  p.add_argument("--tokens", default="", help="global token counts, comma-separated")
  p.add_argument("--expert", type=int, default=0, help="expert-axis size (0: all devices)")
  p.add_argument("--strategies", default=",".join(STRATEGIES))
  p.add_argument("--local", default="auto", choices=("auto", "grouped", "sorted", "dense"))
  p.add_argument("--routing", default="grouped", choices=("grouped", "uniform"))
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--baseline", action="store_true", help="also every expert on every device")
  device_flags.add_arguments(p)
  return p.parse_args(argv)


args = parse(sys.argv[1:]) if __name__ == "__main__" else None
if args is not None:  # XLA flags before jax starts
  device_flags.apply(args)
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import guarded, time_jax
from ling_jax import axes as ax
from ling_jax.parallel.expert import expert_parallel_experts, fill_empty
from pallas_kernels.moe import (routed_experts_blocked, routed_experts_grouped,
                                routed_experts_reference)


def local_fn(name):
  if name == "auto":
    name = "grouped" if jax.default_backend() == "gpu" else "sorted"
  interpret = jax.default_backend() != "gpu"  # the kernels interpreted: a CPU run of the script
  grouped = lambda *a: routed_experts_grouped(*a, interpret=interpret)
  return name, fill_empty({"grouped": grouped, "sorted": routed_experts_blocked,
                           "dense": routed_experts_reference}[name])


def problem(E, D, F, X, G, K, N, routing, dtype, seed=0):
  rng = np.random.default_rng(seed)
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], (N, D), dtype)
  score = rng.random((N, E))
  if routing == "grouped":  # experts outside K random groups of each token never chosen
    kept = np.argsort(rng.random((N, G)), axis=1)[:, :K]  # [N, K]
    in_kept = (np.arange(E) // (E // G) == kept[:, :, None]).any(1)  # [N, E]
    score = np.where(in_kept, score, -1.0)
  ids = jnp.asarray(np.argsort(-score, axis=1)[:, :X], jnp.int32)
  w = jnp.asarray(rng.random((N, X)), jnp.float32)
  ws = tuple((jax.random.normal(k, s, jnp.float32) * s[1] ** -0.5).astype(dtype)
             for k, s in zip(keys[1:], ((E, D, F), (E, D, F), (E, F, D))))
  return x, ids, w, ws


def moved_rows(strategy, ids, ep, E, groups):
  """Rows one device sends off-device per direction (mean over devices), forward."""
  N, X = ids.shape
  n = N // (groups * ep)
  if strategy != "ragged_all_to_all":  # gathers / padded blocks: every peer's n rows
    return (ep - 1) * n
  owner = np.asarray(ids).reshape(groups, ep, n, X) // (E // ep)  # [group, sender, token, X]
  needs = owner[..., None] == np.arange(ep)  # [..., X, receiver]
  rows = needs.any(3).sum(2)  # [group, sender, receiver]
  return float((rows.sum((1, 2)) - np.trace(rows, axis1=1, axis2=2)).mean() / ep)


def run(shape, tokens, ep, strategies, local_name, baseline, routing, dtype):
  E, D, F, X, G, K = (SHAPES[shape][k] for k in "EDFXGK")
  devices = jax.device_count()
  groups = devices // ep
  name, local = local_fn(local_name)
  x, ids, w, ws = problem(E, D, F, X, G, K, tokens, routing, dtype)
  b = jnp.dtype(dtype).itemsize
  rows = []
  results = {}
  cases = [(s, ep) for s in strategies] + ([("all_gather", 1)] if baseline else [])
  for strategy, e in cases:
    mesh = ax.make_mesh({"expert": e})
    fn = lambda x, ids, w, wg, wu, wd: expert_parallel_experts(
        x, ids, w, wg, wu, wd, mesh=mesh, strategy=strategy, local=local)[0]

    def loss(x, w, ws, ids):  # cotangent = the output itself: nothing for XLA to simplify away
      return 0.5 * jnp.sum(jnp.square(fn(x, ids, w, *ws)))

    fwd = jax.jit(fn)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    row = dict(strategy=strategy if e == ep else "ep=1 (replicated experts)", shape=shape,
               local=name, routing=routing, dtype=str(jnp.dtype(dtype)), devices=devices,
               expert=e, tokens=tokens,
               fwd_s=guarded(time_jax, fwd, x, ids, w, *ws),
               fwdbwd_s=guarded(time_jax, grad, x, w, ws, ids))
    n_moved = moved_rows(strategy, ids, e, E, devices // e) if e > 1 else 0
    row["rows_out"] = n_moved
    row["bytes_out"] = n_moved * (D * b + 2 * X * 4)  # a token, its ids and weights (fp32)
    row["bytes_back"] = n_moved * D * 4  # fp32 partial outputs
    if isinstance(row["fwdbwd_s"], float):
      results[(strategy, e)] = (fwd(x, ids, w, *ws), grad(x, w, ws, ids))
      ref = results.get(("all_gather", ep))
      if ref is not None and (strategy, e) != ("all_gather", ep):
        row["rel_err"] = max(_rel(a, b) for a, b in zip(jax.tree.leaves(results[(strategy, e)]),
                                                       jax.tree.leaves(ref)))
    rows.append(row)
  return rows


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def table(rows):
  out = ["| strategy | local | devices | expert | tokens | fwd ms | fwd+bwd ms | rows out/dev | "
         "MB out+back/dev | rel err vs all_gather |", "|" + "---|" * 10]
  ms = lambda t: f"{t * 1e3:.3f}" if isinstance(t, float) else str(t)
  for r in rows:
    err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
    out.append(f"| {r['strategy']} | {r['local']} | {r['devices']} | {r['expert']} | {r['tokens']} "
               f"| {ms(r['fwd_s'])} | {ms(r['fwdbwd_s'])} | {r['rows_out']:.0f} | "
               f"{(r['bytes_out'] + r['bytes_back']) / 1e6:.2f} | {err} |")
  return "\n".join(out)


def main():
  ep = args.expert or jax.device_count()
  strategies = [s for s in args.strategies.split(",") if s]
  tokens = [int(t) for t in args.tokens.split(",") if t] or (
      [256] if args.shape == "tiny" else [8192, 32768])
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, shape {args.shape} "
        f"{SHAPES[args.shape]}, {args.routing} routing, {args.dtype}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if args.dtype == "float32":  # fp32 dots, not TF32, so that the strategies agree to ~1e-6
    jax.config.update("jax_default_matmul_precision", "highest")
  rows = [r for n in tokens for r in run(args.shape, n, ep, strategies, args.local, args.baseline,
                                         args.routing, jnp.dtype(args.dtype))]
  print(table(rows))
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "expert_parallel.json"), "w") as f:
      json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
  main()
