"""Where the routed-expert layer's time goes: device time per op, plus the costs it is bounded by.

  python -m benchmarks.moe_parts [--shapes small,flash] [--tokens 256,4096] [--grad]
      [--config '{"mosaic_tgmm": false}'] [--no-refs] [--router]

For each shape and token count (benchmarks.moe's shapes and random routings) it traces
`routed_experts_grouped` (the forward; with --grad the forward+backward too) with `jax.profiler` and
prints each device op's microseconds per call with the source line that produced it, next to the
time of the whole call; --config replaces fields of the layer's kernel Config (`tuned_config`'s
choice for the shape) for an A/B. Then two references (--no-refs skips them):
* sort: ordering the N X assignments by expert (device time from the trace): the Pallas sort
  kernel the layer uses where it fits (a few chunk sizes), XLA's counting sort (used past that)
  and the stable argsort it replaced;
* HBM: the achievable read rate (XLA summing the flash experts' 6.4 GB of weights, and
  ling_small's 113 MB, wall and device time), which bounds the layer at small token counts.
--router times only the router and the expert load (router.route and expert_load against
`router.route_reference`, the lax.top_k form they replaced, and bincount). Raw rows go to $OUT/moe_parts_N.json when OUT is set.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import collections
import json
import tempfile

import jax
import jax.numpy as jnp

from benchmarks.moe import INTERPRET, SHAPES, case, fwd_and_fwdbwd, weights
from benchmarks.timing import time_jax
from ling_jax.model import router as moe_router
from ling_jax.profiling import device_ops, hlo_sources
from pallas_kernels.grouped_matmul import sort_by_group, tuned_config
from pallas_kernels.moe import routed_experts_grouped, sort_by_expert


def per_op(fn, args, calls: int = 5):
  """[(us per call, op, kernel name, source line)] of one jitted fn, heaviest first."""
  sources = hlo_sources(fn.lower(*args).compile().as_text())
  jax.block_until_ready(fn(*args))
  trace_dir = tempfile.mkdtemp(prefix="moe_parts_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
  us, names = collections.Counter(), {}
  for op, kernel, t in device_ops(trace_dir):
    us[op] += t / calls
    names[op] = (kernel, sources.get(op, ("?:?", ""))[0])
  return [(t, op, *names[op]) for op, t in us.most_common()]


def show(title, total_s, ops):
  busy = sum(t for t, *_ in ops)
  print(f"\n### {title}: {total_s * 1e6:.1f} us per call (timed), device busy {busy:.1f} us\n")
  print("| us | op | kernel | line |\n|---|---|---|---|")
  for t, op, kernel, line in ops:
    if t >= 0.5:
      print(f"| {t:.1f} | {op} | {kernel[:48]} | {line} |")


def argsort_routing(e, E):
  """The routing's bookkeeping before `sort_by_expert`: stable argsort, inverse, bincount."""
  order = jnp.argsort(e, stable=True).astype(jnp.int32)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(e.shape[0], dtype=jnp.int32))
  return order, inverse, jnp.bincount(e, length=E).astype(jnp.int32)


SORTS = {"argsort + scatter + bincount": argsort_routing,
         "XLA counting sort (block 64)": sort_by_expert,
         "XLA counting sort, block 256": lambda e, E: sort_by_expert(e, E, block=256),
         "kernel (chunk 4096, 8 warps)": sort_by_group,
         "kernel, chunk 1024, 4 warps": lambda e, E: sort_by_group(e, E, chunk=1024, num_warps=4),
         "kernel, chunk 8192": lambda e, E: sort_by_group(e, E, chunk=8192)}


def sorts(n: int, E: int):
  """Device microseconds (trace) to order n random expert ids in [0, E), per method."""
  ids = jax.random.randint(jax.random.key(0), (n,), 0, E, jnp.int32)
  return {k: sum(t for t, *_ in per_op(jax.jit(lambda e, f=f: f(e, E)), (ids,)))
          for k, f in SORTS.items()}


ROUTER = {"flash": dict(n_group=8, topk_group=4), "small": dict(n_group=4, topk_group=2)}


def router(name: str, n: int, ranked: bool) -> float:
  """Device microseconds (trace) of the router and the expert load for n tokens: router.route
  and `expert_load`, or `route_reference` and bincount (the code they replaced)."""
  s = SHAPES[name]
  k = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(k[0], (n, s["D"]), jnp.bfloat16)
  wr = jax.random.normal(k[1], (s["D"], s["E"]), jnp.float32) * s["D"] ** -0.5
  bias = 0.01 * jax.random.normal(k[2], (s["E"],), jnp.float32)

  def fn(x, wr, bias):
    route = moe_router.route if ranked else moe_router.route_reference
    idx, w = route(x, wr, bias, top_k=s["X"], scale=2.5, **ROUTER[name])
    load = moe_router.expert_load(idx, s["E"]) if ranked else jnp.bincount(idx.reshape(-1), length=s["E"])
    return idx, w, load
  return sum(t for t, *_ in per_op(jax.jit(fn), (x, wr, bias)))


def stream_read(a: jax.Array, rows: int, warps: int, per_sm: int, stages: int = 3):
  """A Pallas (Triton) kernel that only reads a [R, C] array (R a multiple of `rows`): per_sm
  programs for each SM, each summing every progs-th `rows`-row block. How fast a kernel can
  stream a short read at all: the bound under the layer's weight read at few tokens."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plt
  R, C = a.shape
  if R % rows:
    raise ValueError(f"{R} rows are not a multiple of {rows}")
  nb = R // rows
  progs = min(nb, per_sm * getattr(jax.devices()[0], "core_count", 2))

  def kernel(a_ref, o_ref):
    p = pl.program_id(0)

    def step(i, acc):
      return acc + plt.load(a_ref.at[pl.ds((p + i * progs) * rows, rows), :]).astype(jnp.float32)

    acc = jax.lax.fori_loop(0, pl.cdiv(nb - p, progs), step, jnp.zeros((rows, C), jnp.float32))
    plt.store(o_ref.at[pl.ds(p, 1), :], jnp.sum(acc, axis=0, keepdims=True))

  return pl.pallas_call(
      kernel, grid=(progs,), out_shape=jax.ShapeDtypeStruct((progs, C), jnp.float32),
      compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
      interpret=jax.default_backend() != "gpu")(a)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="small,flash")
  ap.add_argument("--tokens", default="256,4096")
  ap.add_argument("--grad", action="store_true", help="trace forward+backward too")
  ap.add_argument("--config", default="{}", help="JSON of Config fields to replace")
  ap.add_argument("--no-refs", action="store_true", help="skip the sort and HBM references")
  ap.add_argument("--router", action="store_true", help="only time the router, both top-k forms")
  a = ap.parse_args()
  replace = json.loads(a.config)
  print(f"# device: {jax.devices()[0].device_kind}")
  rows = []
  if a.router:
    print("\n| shape | tokens | before (lax.top_k, bincount), us | route + expert_load, us |")
    print("|---|---|---|---|")
    for name in a.shapes.split(","):
      for n in map(int, a.tokens.split(",")):
        t = {r: router(name, n, r) for r in (False, True)}
        print(f"| {name} | {n} | {t[False]:.1f} | {t[True]:.1f} |", flush=True)
        rows.append(dict(shape=name, tokens=n, router_us=t[False], ranked_router_us=t[True]))
    return _save(rows)
  for name in a.shapes.split(","):
    s = SHAPES[name]
    for n in map(int, a.tokens.split(",")):
      x, idx, w, ws = case(s["E"], s["D"], s["F"], s["X"], n)
      cfg = tuned_config(s["D"], s["F"], n * s["X"] / s["E"])._replace(**replace)
      fwd, grad = fwd_and_fwdbwd(lambda *args: routed_experts_grouped(*args, config=cfg,
                                                                      interpret=INTERPRET))
      for kind, fn, args in [("fwd", fwd, (x, idx, w, *ws))] + (
          [("fwd+bwd", grad, (x, ws, idx, w))] if a.grad else []):
        total = time_jax(fn, *args)
        ops = per_op(fn, args)
        show(f"{name} {n} tokens {kind} {replace or ''}", total, ops)
        rows.append(dict(shape=name, tokens=n, kind=kind, config=replace, seconds=total, ops=ops))
  if a.no_refs:
    return _save(rows)
  print("\n| device us to order N X ids | " + " | ".join(SORTS) + " |")
  print("|---|" + "---|" * len(SORTS))
  for name in a.shapes.split(","):
    for n in map(int, a.tokens.split(",")):
      A = n * SHAPES[name]["X"]
      t = sorts(A, SHAPES[name]["E"])
      print(f"| {name} {A} | " + " | ".join(f"{v:.1f}" for v in t.values()) + " |")
      rows.append(dict(shape=name, assignments=A, sorts=t))
  read = jax.jit(lambda a, b, c: sum(jnp.sum(t, dtype=jnp.float32) for t in (a, b, c)))
  for name in ("flash", "small"):  # small: 113 MB, a read as short as the layer's at 256 tokens
    s = SHAPES[name]
    ws = weights(s["E"], s["D"], s["F"])
    nbytes = sum(t.size * t.dtype.itemsize for t in ws)
    t = time_jax(read, *ws)
    dev = sum(u for u, *_ in per_op(read, ws)) / 1e6
    print(f"\n# HBM read: {nbytes / 1e9:.3f} GB of {name} expert weights summed in {t * 1e3:.3f} "
          f"ms = {nbytes / t / 1e12:.2f} TB/s (device time {dev * 1e6:.1f} us = "
          f"{nbytes / dev / 1e12:.2f} TB/s)")
    rows.append(dict(shape=name, hbm_read_bytes=nbytes, hbm_read_s=t, hbm_read_device_s=dev))
    weights.cache_clear()
  # The same 113 MB as one [R, 512] array, streamed by a kernel that only reads it
  a = jax.random.normal(jax.random.key(3), (nbytes // 1024, 512), jnp.bfloat16)
  best = {}
  for r, w, p in [(32, 4, 4), (64, 4, 2), (64, 8, 2), (128, 8, 1), (32, 4, 8), (16, 4, 8)]:
    best[(r, w, p)] = sum(u for u, *_ in per_op(jax.jit(
        lambda a, r=r, w=w, p=p: stream_read(a, r, w, p)), (a,))) / 1e6
  k = min(best, key=best.get)
  print(f"# Pallas stream read of the same bytes: best {best[k] * 1e6:.1f} us device time = "
        f"{nbytes / best[k] / 1e12:.2f} TB/s (rows, warps, programs per SM = {k}; all: "
        + ", ".join(f"{v * 1e6:.1f}" for v in best.values()) + ")")
  rows.append(dict(stream_read_bytes=nbytes,
                   stream_read_device_s={str(k): v for k, v in best.items()}))
  _save(rows)


def _save(rows):
  if os.environ.get("OUT"):
    name = f"moe_parts_{len(os.listdir(os.environ['OUT']))}.json"
    with open(os.path.join(os.environ["OUT"], name), "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
