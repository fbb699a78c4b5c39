"""Routed-expert MoE layer side by side: ours (Pallas grouped matmul), padded einsum, dense.

  python -m benchmarks.moe [--quick] [--tokens 256,1024] [--shapes flash,small] [--no-mgpu]

At Ling-2.6-flash's expert shape (256 experts, hidden 4096, width 1024, top-8) and ling_small's
(32 experts, hidden 1024, width 576, top-4), bf16, random top-k routings, for 256 .. 16384
tokens, forward and forward+backward (d x and d weights), it times:
* ours: `pallas_kernels.moe.routed_experts_grouped`: sort by expert, the fused gather + gate/up +
  SwiGLU kernel, the down grouped matmul, inverse gather, weighted combine (the whole routed
  path; a few kernel configurations, best kept);
* einsum: the capacity-padded batched einsum [E, C, D] x [E, D, F] with C = N X / E (capacity
  factor 1.0, a perfectly balanced routing; expert matmuls only, no dispatch or combine: the
  best case of the XLA token-dropping path);
* dense: plain [N X, D] x [D, F] matmuls of the same FLOPs (the roofline XLA reaches);
* mgpu: jax's own Mosaic GPU `ragged_dot` (jax.experimental.pallas.ops.gpu) for the three
  matmuls, forward only (a peer, when it compiles).
The weight floor is the time to read the distinct active experts' weights once at 3.35 TB/s.
Prints one markdown table of wall times (median of back-to-back calls), then the forwards of ours
and dense again by device time from a profiler trace (at ling_small's few-token calls the wall
time also measures the host); raw rows go to $OUT/moe_bench.json when OUT is set.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import guarded, time_jax
from pallas_kernels.grouped_matmul import Config, tuned_config
from pallas_kernels.moe import routed_experts_grouped

HBM_BYTES_PER_S = 3.35e12
SHAPES = {"flash": dict(E=256, D=4096, F=1024, X=8), "small": dict(E=32, D=1024, F=576, X=4)}
TOKENS = [256, 1024, 4096, 16384]
INTERPRET = jax.default_backend() != "gpu"  # no GPU: the kernels interpreted (a smoke run)

def configs_for(D, F, rows_per_group):
  """The model's choice for the shape and routed rows (`tuned_config`); the same with the other
  Triton visits (`Config.group_rows`); with the Triton tgmm where it uses the Mosaic one; with
  the Triton kernels alone where it uses the Mosaic GPU ones; with the other backward; the other
  row tiling (64 or 128 rows)."""
  tuned = tuned_config(D, F, rows_per_group)
  other = (dict(block_m=128, block_n=Config().block_n, num_warps=Config().num_warps)
           if tuned.block_m == 64 else dict(block_m=64, block_n=128, num_warps=4))
  triton = [tuned._replace(mosaic=False)] if tuned.mosaic is not False else []
  tgmm = [tuned._replace(mosaic_tgmm=False)] if tuned.mosaic_tgmm else []
  return [tuned, tuned._replace(group_rows=not tuned.group_rows), *tgmm, *triton,
          tuned._replace(fused_backward=not tuned.fused_backward), tuned._replace(**other)]


@functools.lru_cache(maxsize=1)
def weights(E, D, F, seed=0):
  """Expert weights drawn on the device (numpy float64 draws of 0.8 G values took minutes)."""
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, s, jnp.bfloat16) * D ** -0.5
               for k, s in zip(keys, ((E, D, F), (E, D, F), (E, F, D))))


def case(E, D, F, X, N, seed=0):
  rng = np.random.default_rng(seed)
  x = jax.random.normal(jax.random.key(seed + 1), (N, D), jnp.bfloat16)
  idx = jnp.asarray(np.argsort(rng.random((N, E)), axis=1)[:, :X], jnp.int32)  # distinct experts
  w = jnp.asarray(rng.random((N, X)), jnp.float32)
  return x, idx, w, weights(E, D, F)


def fwd_and_fwdbwd(fn):
  """jit(fn) and a jit of fn's value with the gradients wrt x and the weights."""
  fwd = jax.jit(fn)

  def loss(x, ws, *rest):  # cotangent = the output itself: nothing for XLA to simplify away
    return 0.5 * jnp.sum(jnp.square(fn(x, *rest, *ws).astype(jnp.float32)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return fwd, grad


def ours(cfg):
  return lambda x, idx, w, wg, wu, wd: routed_experts_grouped(x, idx, w, wg, wu, wd, config=cfg,
                                                              interpret=INTERPRET)


def padded_einsum(x, idx, w, wg, wu, wd):
  """Capacity-padded experts: tokens in expert-major buffers [E, C, D], C = N X / E."""
  N, D = x.shape
  E, X = wg.shape[0], idx.shape[1]
  C = (N * X) // E
  xs = jnp.tile(x, (X, 1))[: E * C].reshape(E, C, D)  # stands in for the dispatch (one copy)
  h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xs, wg)) * jnp.einsum("ecd,edf->ecf", xs, wu)
  return jnp.einsum("ecf,efd->ecd", h, wd).reshape(-1, D)


def dense(x, idx, w, wg, wu, wd):
  """The same FLOPs as plain matmuls against one expert's weights."""
  xs = jnp.tile(x, (idx.shape[1], 1))
  h = jax.nn.silu(xs @ wg[0]) * (xs @ wu[0])
  return h @ wd[0]


def mgpu_layer():
  """`routed_experts_grouped` with jax's Mosaic GPU ragged_dot as the grouped matmul."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rd

  mm = lambda a, b, s: rd.ragged_dot(a, b, group_sizes=s, block_m=128, block_n=128, block_k=64,
                                     max_concurrent_steps=4, grid_block_n=1)
  return functools.partial(routed_experts_grouped, matmul=mm)


def bench(name, E, D, F, X, N, use_mgpu, configs):
  x, idx, w, ws = case(E, D, F, X, N)
  flops = 3 * 2 * N * X * D * F
  active = len(np.unique(np.asarray(idx)))
  floor_s = active * 3 * D * F * 2 / HBM_BYTES_PER_S
  row = dict(shape=name, E=E, D=D, F=F, X=X, tokens=N, flops=flops, active_experts=active,
             weight_floor_s=floor_s)

  def timed(fn, grad_too=True):
    fwd, grad = fwd_and_fwdbwd(fn)
    f = guarded(time_jax, fwd, x, idx, w, *ws)
    b = guarded(time_jax, grad, x, ws, idx, w) if grad_too else None
    return f, b

  cfg_times = {}
  for cfg in configs:
    cfg_times[repr(tuple(cfg))] = (cfg, guarded(time_jax, jax.jit(ours(cfg)), x, idx, w, *ws))
  ok = {k: v for k, v in cfg_times.items() if isinstance(v[1], float)}
  row["ours_fwd_configs"] = {k: v[1] for k, v in cfg_times.items()}
  if ok:  # forward: the best configuration; forward+backward: the best of every configuration's
    best = min(ok, key=lambda k: ok[k][1])
    row["ours_config"], row["ours_fwd"] = best, ok[best][1]
    row["ours_fwdbwd_configs"] = {k: timed(ours(v[0]))[1] for k, v in ok.items()}
    fb = {k: t for k, t in row["ours_fwdbwd_configs"].items() if isinstance(t, float)}
    if fb:
      row["ours_fwdbwd_config"] = min(fb, key=fb.get)
      row["ours_fwdbwd"] = fb[row["ours_fwdbwd_config"]]
  row["einsum_fwd"], row["einsum_fwdbwd"] = timed(padded_einsum)
  row["dense_fwd"], row["dense_fwdbwd"] = timed(dense)
  # The forwards again by device time (profiler trace): below ~100 us a call, back-to-back wall
  # time also measures the host (ling_small's dense matmul at 1024 tokens timed 0.050-0.097 ms).
  if ok:
    row["ours_fwd_device"] = guarded(_device_seconds, jax.jit(ours(ok[best][0])), x, idx, w, *ws)
  row["dense_fwd_device"] = guarded(_device_seconds, jax.jit(dense), x, idx, w, *ws)
  if use_mgpu:
    row["mgpu_fwd"] = guarded(lambda: timed(mgpu_layer(), grad_too=False)[0])
  return row


# Tile sweeps of the raw kernels, in the default launch order (a row tile's N-blocks back to
# back). Each kind lists (block_m, block_n | block_n_glu, block_k, warps, stages) or, for the
# weight-gradient kernels, (block_m_t, block_k_t, block_n_t, warps, stages); _MG below for the
# Mosaic GPU kernel.
_MM = [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4),
       (64, 256, 64, 4, 3), (128, 128, 32, 4, 4), (128, 256, 32, 8, 3)]
_GLU = [(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 4), (128, 128, 32, 8, 4)]
_TG = [(64, 128, 128, 8, 3), (64, 128, 64, 8, 3), (64, 64, 128, 4, 3), (32, 128, 128, 8, 3),
       (128, 128, 128, 8, 2)]
# A sixth entry, if any, is Config.group_rows (visits from each group's first row).
mm_cfg = lambda bm, bn, bk, w, st, gr=False: Config(
    block_m=bm, block_n=bn, block_n_sum=bn, block_k=bk, num_warps=w, num_stages=st,
    group_rows=bool(gr))
glu_cfg = lambda bm, bn, bk, w, st, gr=False: Config(
    block_m=bm, block_n_glu=bn, block_k=bk, num_warps=w, num_stages=st, group_rows=bool(gr))
tg_cfg = lambda bm, bk, bn, w, st: Config(block_m_t=bm, block_k_t=bk, block_n_t=bn, block_n_t2=bn,
                                          num_warps_t=w, num_stages=st)
# The Mosaic GPU gmm (pallas_kernels/grouped_matmul/mosaic.py): (block_m, block_n, block_k,
# stages, split, in_flight); two consumer warpgroups split the tile's rows ("m") or columns ("n").
_MG = [(128, 256, 64, 3, "n", 0), (128, 256, 64, 3, "n", 1), (128, 256, 64, 3, "m", 1),
       (128, 192, 64, 4, "m", 0), (128, 192, 64, 4, "m", 1), (128, 128, 64, 5, "n", 1),
       (64, 256, 64, 4, "n", 1), (64, 128, 64, 6, "n", 1)]
mg_cfg = lambda bm, bn, bk, st, split, fl: dict(block_m=bm, block_n=bn, block_k=bk, stages=st,
                                                split=split, in_flight=fl)
# The Mosaic GPU tgmm (mosaic_tgmm.py): (block_m, block_k, block_n,
# stages, split). Tiles must divide the shapes: at ling_small, d w_gate (1024 x 576) takes the
# 192-wide ones, d w_down (576 x 1024) block_k 64 or 192 split "n", [d w_gate | d w_up] the rest.
_MT = [(64, 128, 128, 4, "k"), (128, 128, 128, 3, "k"), (64, 128, 192, 4, "k"),
       (64, 128, 192, 3, "k"), (64, 64, 256, 4, "n"), (64, 192, 128, 4, "n"),
       (64, 192, 256, 2, "n"), (128, 64, 256, 2, "n")]
mt_cfg = lambda bm, bk, bn, st, split: dict(block_m=bm, block_k=bk, block_n=bn, stages=st,
                                            split=split)
SWEEP_KINDS = ("glu", "gmm", "down", "down_dx", "gmm_sum", "tgmm2", "tgmm_g", "tgmm_down", "mgmm",
               "mdown", "mdown_dx", "mtgmm_g", "mtgmm_down", "mtgmm_gu")


def sweep(name, E, D, F, X, N, kinds=SWEEP_KINDS, tiles=None, device_time=False):
  """Raw kernels at one expert shape, M = N X routed rows in uniform random groups:
    glu       fused gate/up + SwiGLU, rows gathered from the [N, D] tokens (the forward's first half)
    gmm       one x @ w_gate [M, D] x [D, F] (the unfused kernel, for comparison)
    down      h @ w_down [M, F] x [F, D]
    down_dx   dy @ w_down^T [M, D] x [D, F] (the down projection's d input)
    gmm_sum   dg @ w_gate^T + du @ w_up^T (the gate/up backward's d input)
    tgmm2     d w_gate and d w_up together, rows of x gathered
    tgmm_g    d w_gate alone, rows of x gathered
    tgmm_down d w_down = h^T dy
    mgmm      gmm's product with the Mosaic GPU kernel (tiles _MG; N must divide by block_n)
    mdown     down's product with the Mosaic GPU kernel
    mdown_dx  down_dx's product with the Mosaic GPU kernel
    mtgmm_g   d w_gate on the Mosaic GPU tgmm, x's rows materialised (tiles _MT)
    mtgmm_down d w_down on the Mosaic GPU tgmm
    mtgmm_gu  d w_gate and d w_up as one [M, 2F] product on the Mosaic GPU tgmm
  tiles: {kind: [tile tuple, ...]} replacing a kind's list above (--tiles).
  device_time: seconds of device time per call from a profiler trace (--device-time) instead of
  the wall time of back-to-back calls, which below ~40 us a call measures the host's dispatch
  (a [1024, 1024] x [1024, 576] matmul timed 39 us that way on an H100)."""
  from pallas_kernels.grouped_matmul import gmm_glu_pallas, gmm_pallas, gmm_sum_pallas, tgmm_pallas
  from pallas_kernels.grouped_matmul import mosaic, mosaic_tgmm
  rng = np.random.default_rng(0)
  M = N * X
  sizes = jnp.asarray(np.bincount(rng.integers(0, E, M), minlength=E), jnp.int32)
  rows_ = jnp.asarray(rng.integers(0, N, M), jnp.int32)
  k = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(k[0], (N, D), jnp.bfloat16)
  xs = x[rows_]
  dh, dh2 = (jax.random.normal(kk, (M, F), jnp.bfloat16) for kk in k[1:3])
  dy = jax.random.normal(k[3], (M, D), jnp.bfloat16)
  wg, wu, wd = weights(E, D, F)
  f1 = 2 * M * D * F
  plan = {
      "glu": (_GLU, glu_cfg, 2 * f1, lambda c: (lambda x, r, a, b, s: gmm_glu_pallas(x, a, b, s, c, lhs_rows=r)),
              (x, rows_, wg, wu, sizes)),
      "gmm": (_MM, mm_cfg, f1, lambda c: (lambda x, w, s: gmm_pallas(x, w, s, c)), (xs, wg, sizes)),
      "down": (_MM, mm_cfg, f1, lambda c: (lambda h, w, s: gmm_pallas(h, w, s, c)), (dh, wd, sizes)),
      "gmm_sum": (_MM, mm_cfg, 2 * f1, lambda c: (lambda a, b, u, v, s: gmm_sum_pallas(
          a, b, u, v, s, c, transpose_rhs=True)), (dh, dh2, wg, wu, sizes)),
      "tgmm2": (_TG, tg_cfg, 2 * f1, lambda c: (lambda x, r, a, b, s: tgmm_pallas(
          x, (a, b), s, c, lhs_rows=r)), (x, rows_, dh, dh2, sizes)),
      "tgmm_g": (_TG, tg_cfg, f1, lambda c: (lambda x, r, a, s: tgmm_pallas(x, a, s, c, lhs_rows=r)),
                 (x, rows_, dh, sizes)),
      "tgmm_down": (_TG, tg_cfg, f1, lambda c: (lambda h, d, s: tgmm_pallas(h, d, s, c)), (dh, dy, sizes)),
      "mgmm": (_MG, mg_cfg, f1, lambda c: (lambda x, w, s: mosaic.gmm(x, w, s, **c)), (xs, wg, sizes)),
      "mdown": (_MG, mg_cfg, f1, lambda c: (lambda h, w, s: mosaic.gmm(h, w, s, **c)), (dh, wd, sizes)),
      "down_dx": (_MM, mm_cfg, f1, lambda c: (
          lambda d, w, s: gmm_pallas(d, w, s, c, transpose_rhs=True)), (dy, wd, sizes)),
      "mdown_dx": (_MG, mg_cfg, f1, lambda c: (
          lambda d, w, s: mosaic.gmm(d, w, s, transpose_rhs=True, **c)), (dy, wd, sizes)),
      "mtgmm_g": (_MT, mt_cfg, f1, lambda c: (lambda x, a, s: mosaic_tgmm.tgmm(x, a, s, **c)),
                  (xs, dh, sizes)),
      "mtgmm_down": (_MT, mt_cfg, f1, lambda c: (lambda h, d, s: mosaic_tgmm.tgmm(h, d, s, **c)),
                     (dh, dy, sizes)),
      "mtgmm_gu": (_MT, mt_cfg, 2 * f1, lambda c: (lambda x, a, b, s: mosaic_tgmm.tgmm(
          x, jnp.concatenate([a, b], axis=1), s, **c)), (xs, dh, dh2, sizes)),
  }
  timer = _device_seconds if device_time else time_jax
  rows = []
  for kind in kinds:
    kind_tiles, make_cfg, flops, make_fn, args = plan[kind]
    for tile in (tiles or {}).get(kind, kind_tiles):
      cfg = make_cfg(*tile)
      t = guarded(timer, jax.jit(make_fn(cfg)), *args)
      rows.append(dict(shape=name, tokens=N, kernel=kind, tiles=tile, seconds=t,
                       tflops=flops / t / 1e12 if isinstance(t, float) else None))
      print("# " + json.dumps(rows[-1]), flush=True)
      if os.environ.get("OUT"):  # as we go: a call cut short by its time limit keeps its rows
        with open(os.path.join(os.environ["OUT"], f"moe_sweep_{name}_{N}.json"), "w") as f:
          json.dump(rows, f, indent=1)
  dense = guarded(timer, jax.jit(lambda a, b: a @ b), xs, wg[0])
  print(f"# dense [{M}, {D}] x [{D}, {F}]: {dense}")
  for kind in kinds:
    ok = [r for r in rows if r["kernel"] == kind and r["tflops"]]
    best = max(ok, key=lambda r: r["tflops"], default=None)
    if best:
      print(f"| {name} {N} | {kind} | best {best['tiles']} | {best['seconds'] * 1e3:.3f} ms | "
            f"{best['tflops']:.0f} TFLOP/s | dense {f1 / dense / 1e12 if isinstance(dense, float) else 0:.0f} |")
  return rows


def _device_seconds(fn, *args):
  from benchmarks.moe_parts import per_op  # (it imports this module)
  return sum(t for t, *_ in per_op(fn, args, calls=20)) / 1e6


def tflops(flops, t, mult=1):
  return f"{mult * flops / t / 1e12:.0f}" if isinstance(t, float) else "err" if isinstance(t, str) else "-"


def ms(t):
  return f"{t * 1e3:.3f}" if isinstance(t, float) else "err" if isinstance(t, str) else "-"


def table(rows):
  out = ["| shape | tokens | ours fwd ms (TFLOP/s) | einsum fwd ms (TFLOP/s) | dense fwd ms (TFLOP/s) "
         "| mgpu fwd ms | ours/dense rate | weight floor ms | ours/floor | ours f+b ms (TFLOP/s) "
         "| einsum f+b ms | dense f+b ms (TFLOP/s) |", "|" + "---|" * 12]
  for r in rows:
    f, fb = r.get("ours_fwd"), r.get("ours_fwdbwd")
    rate = f"{r['dense_fwd'] / f:.2f}" if isinstance(f, float) and isinstance(r["dense_fwd"], float) else "-"
    flo = f"{f / r['weight_floor_s']:.2f}" if isinstance(f, float) else "-"
    out.append(
        f"| {r['shape']} | {r['tokens']} | {ms(f)} ({tflops(r['flops'], f)}) | "
        f"{ms(r['einsum_fwd'])} ({tflops(r['flops'], r['einsum_fwd'])}) | "
        f"{ms(r['dense_fwd'])} ({tflops(r['flops'], r['dense_fwd'])}) | {ms(r.get('mgpu_fwd'))} | "
        f"{rate} | {r['weight_floor_s'] * 1e3:.3f} | {flo} | {ms(fb)} ({tflops(r['flops'], fb, 3)}) | "
        f"{ms(r['einsum_fwdbwd'])} | {ms(r['dense_fwdbwd'])} ({tflops(r['flops'], r['dense_fwdbwd'], 3)}) |")
  out += ["", "Forward by device time (profiler):", "",
          "| shape | tokens | ours fwd ms | dense fwd ms | ours/dense rate | ours/floor |",
          "|---|---|---|---|---|---|"]
  for r in rows:
    f, d = r.get("ours_fwd_device"), r.get("dense_fwd_device")
    rate = f"{d / f:.2f}" if isinstance(f, float) and isinstance(d, float) else "-"
    flo = f"{f / r['weight_floor_s']:.2f}" if isinstance(f, float) else "-"
    out.append(f"| {r['shape']} | {r['tokens']} | {ms(f)} | {ms(d)} | {rate} | {flo} |")
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="small shape, 256 and 1024 tokens")
  ap.add_argument("--tokens", default=None, help="comma-separated token counts")
  ap.add_argument("--shapes", default="flash,small")
  ap.add_argument("--no-mgpu", action="store_true", help="skip jax's Mosaic GPU ragged_dot")
  ap.add_argument("--default-only", action="store_true", help="one kernel configuration")
  ap.add_argument("--configs", type=int, default=3,
                  help="the first this many of `configs_for`'s kernel configurations")
  ap.add_argument("--extra-config", default=None,
                  help="JSON of Config fields: also time the model's configuration with these replaced")
  ap.add_argument("--sweep", action="store_true",
                  help="time the raw kernels (see `sweep`) over tile configurations")
  ap.add_argument("--kernels", default=",".join(SWEEP_KINDS), help="kernels for --sweep")
  ap.add_argument("--device-time", action="store_true",
                  help="--sweep times device ops from a profiler trace (for kernels of < 40 us)")
  ap.add_argument("--tiles", default=None, help="JSON {kind: [[tile...], ...]}: --sweep's tile "
                  "lists for those kinds instead of the built-in ones")
  args = ap.parse_args()
  on_gpu = jax.devices()[0].platform == "gpu"
  print(f"# device: {jax.devices()[0].device_kind}")
  shapes = args.shapes.split(",")
  tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else TOKENS
  n_configs = 1 if args.default_only else args.configs
  interpret = False
  if args.quick:
    shapes, tokens = ["small"], [256, 1024]
  if not on_gpu:  # interpret-mode smoke run of the same code at toy sizes
    SHAPES["toy"] = dict(E=4, D=64, F=32, X=2)
    shapes, tokens = ["toy"], [16]
    n_configs, interpret = 1, True
  rows = []
  if args.sweep and on_gpu:
    for name in shapes:
      for n in tokens:
        rows += sweep(name, **SHAPES[name], N=n, kinds=args.kernels.split(","),
                      tiles={k: [tuple(t) for t in v]
                             for k, v in json.loads(args.tiles or "{}").items()},
                      device_time=args.device_time)
    if os.environ.get("OUT"):
      with open(os.path.join(os.environ["OUT"], "moe_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return
  for name in shapes:
    for n in tokens:
      s = SHAPES[name]
      cfgs = configs_for(s["D"], s["F"], n * s["X"] / s["E"])[:n_configs]
      if args.extra_config:
        cfgs.append(cfgs[0]._replace(**json.loads(args.extra_config)))
      rows.append(bench(name, **s, N=n, use_mgpu=on_gpu and not args.no_mgpu,
                        configs=[c._replace(interpret=interpret) for c in cfgs]))
      print("# " + json.dumps(rows[-1]), flush=True)
      if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "moe_bench.json"), "w") as f:
          json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f, indent=1)
  print(table(rows))


if __name__ == "__main__":
  main()
