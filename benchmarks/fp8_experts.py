"""The routed experts' forward with FP8 weights against bf16 ones, at decode and prefill sizes.

  python -m benchmarks.fp8_experts [--tokens 1,16,64,1024] [--configs '[{}, {"block_k": 128}]']
      [--hbm 3.35e12] [--tiny]

At Ling-2.6-flash's expert shape (256 experts, D 4096, F 1024, top-8) and random top-8 routings
of N tokens, it times the experts' two grouped matmuls (the fused gate/up + SwiGLU `gmm_glu` on
the token rows, then the down `gmm`; no sort or combine) with three kinds of weights:
  bf16            the weights dequantised from the block-scaled FP8 ones;
  fp8 block       float8_e4m3fn with a 128 x 128 block scale (the "fp8" release scheme);
  fp8 channel     float8_e4m3fn with one scale per output channel (compressed-tensors).
Each row is the best of --configs (fields replacing `tuned_config`'s choice for the shape and
rows per expert). At these sizes the layer reads weights: the floor is the bytes of the experts
that got tokens (values and scales) over the HBM bandwidth (--hbm; by default 3.35 TB/s, 4.8 on
an H200), and the table gives the achieved weight-read rate against it. On the GPU the time is
device time from a profiler trace (a decode call is tens of microseconds, where wall time also
measures the host); elsewhere wall time. The fp8 block row also gives its largest relative
difference from the bf16 row's output (both read the same dequantised weights: ~0).

--tiny runs a toy shape in interpret mode on the CPU (a test runs it). Raw rows go to
$OUT/fp8_experts.json when OUT is set.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import guarded, time_jax
from pallas_kernels.grouped_matmul import Fp8Weight, dequantize, gmm, gmm_glu, tuned_config

FLASH = dict(E=256, D=4096, F=1024, X=8)
TINY = dict(E=8, D=256, F=128, X=2)
BLOCK = (128, 128)


def fp8_weights(E, D, F, seed=0):
  """(gate, up, down) as block-scaled Fp8Weights and the same values channel-scaled, drawn on
  the device: values N(0, 1) x 16 in e4m3, scales log-uniform around D^-1/2 / 16."""
  keys = iter(jax.random.split(jax.random.key(seed), 9))
  scale = lambda shape: 2.0 ** jax.random.uniform(next(keys), shape, minval=-1, maxval=1) / (
      16 * D ** 0.5)
  block, channel = [], []
  for K, N in ((D, F), (D, F), (F, D)):
    v = (jax.random.normal(next(keys), (E, K, N), jnp.bfloat16) * 16).astype(jnp.float8_e4m3fn)
    block.append(Fp8Weight(v, scale((E, -(-K // BLOCK[0]), -(-N // BLOCK[1]))), BLOCK))
    channel.append(Fp8Weight(v, scale((E, N))))
  return block, channel


def routing(E, D, X, N, seed=0):
  """x [N, D] bf16 and a random top-X routing sorted by expert: (rows [N X] token of each sorted
  row, sizes [E])."""
  rng = np.random.default_rng(seed)
  idx = np.argsort(rng.random((N, E)), axis=1)[:, :X].ravel()  # distinct experts per token
  order = np.argsort(idx, kind="stable")
  x = jax.random.normal(jax.random.key(seed + 1), (N, D), jnp.bfloat16)
  return (x, jnp.asarray(order // X, jnp.int32),
          jnp.asarray(np.bincount(idx, minlength=E), jnp.int32))


def experts(cfg):
  """The routed experts' matmuls: [N X, D] rows of each expert's down(silu(gate) * up)."""
  def f(x, rows, sizes, wg, wu, wd):
    return gmm(gmm_glu(x, rows, None, wg, wu, sizes, cfg), wd, sizes, cfg)
  return jax.jit(f)


def weight_bytes(w) -> int:
  """Bytes of one expert's weight (values and scale)."""
  if isinstance(w, Fp8Weight):
    return (w.values.size * w.values.dtype.itemsize + w.scale.size * 4) // w.shape[0]
  return w.size * w.dtype.itemsize // w.shape[0]


def seconds(fn, args, on_gpu, tiny):
  if tiny:  # interpret mode: one timed call after the compile
    return time_jax(fn, *args, budget_s=0.0, trials=1)
  if on_gpu:
    from benchmarks.moe_parts import per_op
    return sum(t for t, *_ in per_op(fn, args, calls=20)) / 1e6
  return time_jax(fn, *args)


def bench(E, D, F, X, N, kinds, configs, hbm, on_gpu, tiny):
  x, rows, sizes = routing(E, D, X, N)
  active = int((np.asarray(sizes) > 0).sum())
  out, results = [], {}
  for name, ws in kinds.items():
    # tuned_config's choice for these weights (the kind's name: "bf16", "fp8 block", ...)
    base = tuned_config(D, F, rows_per_group=N * X / E, weights=name.replace(" ", "-"))._replace(
        interpret=not on_gpu)
    times, fns = {}, {}
    for over in configs:
      key = json.dumps(over)
      fns[key] = experts(base._replace(**over))
      times[key] = guarded(seconds, fns[key], (x, rows, sizes, *ws), on_gpu, tiny)
    ok = {k: t for k, t in times.items() if isinstance(t, float)}
    best = min(ok, key=ok.get) if ok else None
    if best is not None:
      results[name] = fns[best](x, rows, sizes, *ws)
    nbytes = active * sum(weight_bytes(w) for w in ws)
    out.append(dict(tokens=N, weights=name, active_experts=active, weight_bytes=nbytes,
                    floor_s=nbytes / hbm, config=best, seconds=ok.get(best), all=times))
  if "bf16" in results and "fp8 block" in results:
    a, b = (np.asarray(results[k], np.float32) for k in ("fp8 block", "bf16"))
    out[[r["weights"] for r in out].index("fp8 block")]["max_rel_vs_bf16"] = float(
        np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
  return out


def table(rows) -> str:
  lines = ["| tokens | weights | active experts | weight MB | time us | weight GB/s | floor us "
           "| floor / time | vs bf16 | config |", "|" + "---|" * 10]
  bf16 = {r["tokens"]: r["seconds"] for r in rows if r["weights"] == "bf16"}
  for r in rows:
    t = r["seconds"]
    cells = [f"{r['tokens']}", r["weights"], f"{r['active_experts']}",
             f"{r['weight_bytes'] / 1e6:.1f}"]
    if t is None:
      cells += ["err"] * 4 + ["-"]
    else:
      ref = bf16.get(r["tokens"])
      cells += [f"{t * 1e6:.1f}", f"{r['weight_bytes'] / t / 1e9:.0f}", f"{r['floor_s'] * 1e6:.1f}",
                f"{r['floor_s'] / t:.2f}", f"{ref / t:.2f}x" if ref else "-"]
    extra = f" (max rel diff {r['max_rel_vs_bf16']:.1e})" if "max_rel_vs_bf16" in r else ""
    lines.append("| " + " | ".join(cells) + f" | {r['config']}{extra} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--tokens", default="1,16,64,1024", help="token counts, comma-separated")
  ap.add_argument("--configs", default='[{}, {"block_k": 128}]',
                  help="JSON list of Config field overrides of tuned_config's choice; best kept")
  ap.add_argument("--hbm", type=float, default=None, help="HBM bytes/s for the floor")
  ap.add_argument("--tiny", action="store_true", help="toy shape, interpret mode (CPU smoke test)")
  args = ap.parse_args()
  on_gpu = jax.devices()[0].platform == "gpu" and not args.tiny
  kind = jax.devices()[0].device_kind
  hbm = args.hbm or (4.8e12 if "H200" in kind else 3.35e12)
  shape, tokens, configs = FLASH, [int(t) for t in args.tokens.split(",")], json.loads(args.configs)
  if args.tiny:
    shape, tokens, configs = TINY, [4], [{}]
  elif not on_gpu:
    raise SystemExit("the Triton kernels need a GPU; --tiny runs a toy shape in interpret mode")
  print(f"# device: {kind}; HBM {hbm / 1e12:.2f} TB/s; shape {shape}", flush=True)
  block, channel = fp8_weights(shape["E"], shape["D"], shape["F"])
  kinds = {"bf16": [dequantize(w, jnp.bfloat16) for w in block], "fp8 block": block,
           "fp8 channel": channel}
  rows = []
  for n in tokens:
    rows += bench(**shape, N=n, kinds=kinds, configs=configs, hbm=hbm, on_gpu=on_gpu,
                  tiny=args.tiny)
    print("# " + json.dumps(rows[-3:]), flush=True)
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "fp8_experts.json"), "w") as f:
      json.dump(dict(device=kind, hbm=hbm, shape=shape, rows=rows), f, indent=1)
  print(table(rows))


if __name__ == "__main__":
  main()
