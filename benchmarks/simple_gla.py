"""Simple GLA side by side: ours (Pallas: Mosaic GPU forward, Triton backward), fla (Triton), XLA.

  python -m benchmarks.simple_gla [--quick] [--sweep]

On a GPU one run first checks correctness on a small case (ours and fla against the XLA chunked
reference: output, final state and gradients), then times forward and forward+backward on Ling's
shapes (bf16, Ling's layer-0 decays g_h = -slope_h) and decode steps at batch 1, 16, 64, and prints
one markdown table; raw numbers go to $OUT/simple_gla_bench.json when OUT is set. fla is optional
(`fla.ops.simple_gla`, from the fla-core wheel). Without a GPU it runs a tiny interpret-mode
smoke pass of the same code. Floors (BENCHMARKS.md#simple_gla): forward bytes = q, k, v read once and
o written once; forward+backward adds do, q, k, v read and dq, dk, dv written.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for PyTorch

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import guarded, time_jax, time_torch
from pallas_kernels.simple_gla.chunk import simple_gla_pallas
from pallas_kernels.simple_gla.decode import simple_gla_step_pallas

HBM_BYTES_PER_S = 3.35e12   # H100 SXM HBM3
BF16_FLOPS_PER_S = 990e12   # H100 SXM dense bf16
SHAPES = [(4, 4096, 32, 128), (1, 16384, 32, 128), (8, 2048, 16, 128), (1, 65536, 32, 128)]
DECODE_BATCHES = [1, 16, 64]
FWD_CONFIGS = [dict(), dict(fwd_kernel="triton"), dict(splits=1), dict(fwd_kernel="triton", block_v=128, num_warps=8)]
BWD_CONFIGS = [dict(), dict(bwd_kernel="triton"), dict(bwd_kernel="triton", num_warps_bwd=8),
               dict(bwd_kernel="triton", block_k_bwd=128, block_v_bwd=128, num_warps_bwd=8)]
SWEEP_FWD = [dict(chunk_size=c, block_v=bv, num_warps=w, num_stages=s)
             for c in (64, 128) for bv in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
SWEEP_BWD = [dict(block_k_bwd=b, block_v_bwd=b, num_warps_bwd=w) for b in (32, 64, 128)
             for w in (4, 8)]


def ling_decay(H):
  """Layer-0 log-decays: -ALiBi slopes 2^(-8(h+1)/H) (docs/architecture.md §3.4.4); head 0 is the
  steepest."""
  return -np.array([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], np.float32)


def floors(B, T, H, D, chunk=64):
  """Bytes (bf16) and chunked-algorithm FLOPs of forward and forward+backward."""
  n = B * T * H
  fwd_bytes, bwd_bytes = 4 * n * D * 2, 7 * n * D * 2
  fwd_flops = n * (4 * chunk * D + 4 * D * D)     # q k^T, A v on C x C tiles; q S, k^T v
  bwd_flops = n * (12 * chunk * D + 10 * D * D)   # the dq pass plus the dk/dv/dS pass
  return dict(fwd_bytes=fwd_bytes, fwdbwd_bytes=fwd_bytes + bwd_bytes, fwd_flops=fwd_flops,
              fwdbwd_flops=fwd_flops + bwd_flops)


# ----------------------------------------------------------------------------- the contenders


def xla_ops():
  """The pure-jnp reference op (another module; absent until it lands)."""
  try:
    from pallas_kernels.simple_gla import simple_gla, simple_gla_step
  except ImportError as e:
    print(f"# XLA reference unavailable: {e}")
    return None, None
  return functools.partial(simple_gla, impl="xla"), simple_gla_step


def fla_ops():
  try:
    import torch
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
  except ImportError as e:
    print(f"# fla unavailable: {e}")
    return None
  ops = dict(torch=torch, chunk=chunk_simple_gla, recurrent=fused_recurrent_simple_gla)
  try:
    from fla.ops.simple_gla import fused_chunk_simple_gla
    ops["fused_chunk"] = fused_chunk_simple_gla
  except ImportError:
    pass
  return ops


def ours_fwd(cfg, interpret):
  return jax.jit(lambda q, k, v, g: simple_gla_pallas(q, k, v, g, interpret=interpret, **cfg)[0])


def jax_fwdbwd(op):
  """o and dq, dk, dv for a fixed cotangent (o is returned so the forward cannot be dropped)."""
  def f(q, k, v, g, do):
    o, vjp = jax.vjp(lambda q, k, v: op(q, k, v, g)[0], q, k, v)
    return o, vjp(do)
  return jax.jit(f)


def to_torch(torch, x, grad=False):
  t = torch.from_numpy(np.asarray(jnp.asarray(x, jnp.float32))).cuda()
  t = t.to(torch.bfloat16) if x.dtype == jnp.bfloat16 else t
  return t.requires_grad_(grad)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- correctness


def check(fla, xla, interpret):
  """Ours and fla against the XLA reference (fed fp32 copies of the same bf16 inputs)."""
  cases = [dict(B=2, T=1000, H=8, D=128, segments=False),   # one piece, Triton forward (tail)
           dict(B=2, T=1024, H=8, D=128, segments=False),   # one piece, Mosaic forward
           dict(B=1, T=4096, H=4, D=128, segments=False),   # auto splits: 4 pieces, Mosaic
           dict(B=1, T=4096, H=4, D=128, segments=True)]    # 4 pieces, packed: Triton
  if interpret:
    cases = [dict(B=1, T=130, H=2, D=64, segments=False)]
  out = {}
  names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
  for case in cases:
    B, T, H, D = case["B"], case["T"], case["H"], case["D"]
    tag = f"B{B}_T{T}_H{H}_D{D}" + ("_packed" if case["segments"] else "")
    rng = np.random.default_rng(0)
    q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16) for _ in range(4))
    h0 = jnp.asarray(rng.standard_normal((B, H, D, D)), jnp.float32)
    seg = jnp.asarray(np.sort(rng.integers(0, 5, (B, T)), 1), jnp.int32) if case["segments"] else None
    g = jnp.asarray(ling_decay(H))

    def run(op, q, k, v, do):
      f = lambda q, k, v, h0: op(q, k, v, g, initial_state=h0, segment_ids=seg)
      (o, ht), vjp = jax.vjp(f, q, k, v, h0)
      return [o, ht, *vjp((do.astype(o.dtype), jnp.zeros_like(ht)))]

    ours = guarded(jax.jit(functools.partial(
        run, functools.partial(simple_gla_pallas, interpret=interpret))), q, k, v, do)
    if isinstance(ours, str):
      out[f"ours_{tag}"] = {"error": ours}
      print(f"# check ours_{tag} [FAIL]: {ours}")
      continue
    if xla is not None:
      f32 = lambda x: x.astype(jnp.float32)
      ref = jax.jit(functools.partial(run, xla))(f32(q), f32(k), f32(v), f32(do))
      out[f"ours_vs_xla_{tag}"] = {n: rel(a, b) for n, a, b in zip(names, ours, ref)}
    if fla is not None and seg is None:
      torch = fla["torch"]
      tq, tk, tv = (to_torch(torch, x, grad=True) for x in (q, k, v))
      th0 = to_torch(torch, h0, grad=True)
      o, ht = fla["chunk"](tq, tk, tv, g_gamma=torch.from_numpy(np.asarray(g)).cuda(),
                           scale=D ** -0.5, initial_state=th0, output_final_state=True)
      grads = torch.autograd.grad(o, (tq, tk, tv, th0), to_torch(torch, do))
      fl = [x.detach().float().cpu().numpy() for x in (o, ht, *grads)]
      out[f"fla_vs_ours_{tag}"] = {n: rel(a, b) for n, a, b in zip(names, fl, ours)}
      if xla is not None:
        out[f"fla_vs_xla_{tag}"] = {n: rel(a, b) for n, a, b in zip(names, fl, ref)}
  for key, errs in out.items():
    if "error" in errs:
      continue
    flag = "ok" if max(errs.values()) < 1e-2 else "FAIL"
    print(f"# check {key} [{flag}]: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))
  return out


# ----------------------------------------------------------------------------- timings


def bench_shape(shape, fla, xla, interpret, fwd_configs, bwd_configs):
  B, T, H, D = shape
  key = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in key)
  g = jnp.asarray(ling_decay(H))
  row = dict(shape=shape, **floors(*shape))
  budget = 0.05 if interpret else 0.4

  fwd = {json.dumps(c): guarded(time_jax, ours_fwd(c, interpret), q, k, v, g, budget_s=budget)
         for c in fwd_configs}
  row["ours_fwd_configs"] = fwd
  best_fwd = min((c for c in fwd if isinstance(fwd[c], float)), key=fwd.get, default=None)
  row["ours_fwd"] = fwd.get(best_fwd)
  row["ours_fwd_config"] = best_fwd
  fb = {}
  for c in bwd_configs:
    cfg = {**(json.loads(best_fwd) if best_fwd else {}), **c}
    op = functools.partial(simple_gla_pallas, interpret=interpret, **cfg)
    fb[json.dumps(cfg)] = guarded(time_jax, jax_fwdbwd(op), q, k, v, g, do, budget_s=budget)
  row["ours_fwdbwd_configs"] = fb
  best_fb = min((c for c in fb if isinstance(fb[c], float)), key=fb.get, default=None)
  row["ours_fwdbwd"] = fb.get(best_fb)
  row["ours_fwdbwd_config"] = best_fb

  if xla is not None:
    row["xla_fwd"] = guarded(time_jax, jax.jit(lambda q, k, v, g: xla(q, k, v, g)[0]), q, k, v, g,
                             budget_s=budget)
    row["xla_fwdbwd"] = guarded(time_jax, jax_fwdbwd(xla), q, k, v, g, do, budget_s=budget)
  if fla is not None:
    torch = fla["torch"]
    tq, tk, tv, tdo = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for t in (tq, tk, tv):
      t.requires_grad_(True)
    gg = torch.from_numpy(np.asarray(g)).cuda()
    for name in ("chunk", "fused_chunk"):
      if name not in fla:
        continue
      op = functools.partial(fla[name], g_gamma=gg, scale=D ** -0.5)
      with torch.no_grad():
        row[f"fla_{name}_fwd"] = guarded(time_torch, lambda: op(tq, tk, tv))

      def fwdbwd(op=op):
        o, _ = op(tq, tk, tv)
        return torch.autograd.grad(o, (tq, tk, tv), tdo)
      row[f"fla_{name}_fwdbwd"] = guarded(time_torch, fwdbwd)
  return row


def bench_decode(batch, fla, xla_step, interpret, H=32, D=128, steps=64):
  """Per-step time of `steps` chained decode steps inside one jit (the state stays on device)."""
  if interpret:
    H, D, steps = 2, 64, 2
  key = jax.random.split(jax.random.key(1), 4)
  q, k, v = (jax.random.normal(kk, (batch, H, D), jnp.bfloat16) for kk in key[:3])
  S = jax.random.normal(key[3], (batch, H, D, D), jnp.float32)
  g = jnp.asarray(ling_decay(H))
  row = dict(batch=batch, H=H, D=D, state_bytes=2 * batch * H * D * D * 4)

  def chained(step):
    @functools.partial(jax.jit, donate_argnums=4)
    def f(q, k, v, g, S):
      def body(_, carry):
        S, acc = carry
        o, S = step(q, k, v, g, S)
        return S, acc + o.astype(jnp.float32)
      return jax.lax.fori_loop(0, steps, body, (S, jnp.zeros(v.shape, jnp.float32)))
    return f

  def timed(step):
    f = chained(step)
    state = [S.copy()]

    def call(q, k, v, g):
      state[0], acc = f(q, k, v, g, state[0])
      return acc
    return time_jax(call, q, k, v, g, budget_s=0.05 if interpret else 0.3) / steps

  row["ours"] = guarded(timed, functools.partial(simple_gla_step_pallas, interpret=interpret))
  if xla_step is not None:
    row["xla"] = guarded(timed, xla_step)
  if fla is not None and "recurrent" in fla:
    torch = fla["torch"]
    tq, tk, tv = (torch.randn(batch, 1, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    th = torch.randn(batch, H, D, D, device="cuda", dtype=torch.float32)
    gg = torch.from_numpy(np.asarray(g)).cuda()

    def fla_steps():
      h = th
      for _ in range(steps):
        _, h = fla["recurrent"](tq, tk, tv, g_gamma=gg, scale=D ** -0.5, initial_state=h,
                                output_final_state=True)
      return h
    with torch.no_grad():
      row["fla_recurrent"] = guarded(lambda: time_torch(fla_steps, budget_s=0.3) / steps)
  return row


# ----------------------------------------------------------------------------- report


def us(x, digits=0):
  return f"{x * 1e6:.{digits}f}" if isinstance(x, float) else "err" if isinstance(x, str) else "-"


def ratio(a, b):
  return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) else "-"


def table(rows, decode_rows):
  out = ["| B, T, H, D | fwd ours µs | fwd fla µs | fwd fla fused µs | fwd XLA µs | ours GB/s "
         "(% floor) | fla/ours | f+b ours µs | f+b fla µs | f+b XLA µs | f+b ours % floor | "
         "fla/ours |", "|" + "---|" * 12]
  for r in rows:
    o, ofb = r["ours_fwd"], r["ours_fwdbwd"]
    gbs = f"{r['fwd_bytes'] / o / 1e9:.0f} ({100 * r['fwd_bytes'] / HBM_BYTES_PER_S / o:.0f}%)" \
        if isinstance(o, float) else "-"
    fb_floor = f"{100 * r['fwdbwd_bytes'] / HBM_BYTES_PER_S / ofb:.0f}%" \
        if isinstance(ofb, float) else "-"
    out.append(f"| {', '.join(map(str, r['shape']))} | {us(o)} | {us(r.get('fla_chunk_fwd'))} | "
               f"{us(r.get('fla_fused_chunk_fwd'))} | {us(r.get('xla_fwd'))} | {gbs} | "
               f"{ratio(r.get('fla_chunk_fwd'), o)} | {us(ofb)} | {us(r.get('fla_chunk_fwdbwd'))} | "
               f"{us(r.get('xla_fwdbwd'))} | {fb_floor} | {ratio(r.get('fla_chunk_fwdbwd'), ofb)} |")
  out += ["", "| decode batch (H=32, D=128) | ours µs/step | fla µs/step | XLA µs/step | "
          "ours state GB/s | fla/ours |", "|---|---|---|---|---|---|"]
  for r in decode_rows:
    o = r["ours"]
    gbs = f"{r['state_bytes'] / o / 1e9:.0f}" if isinstance(o, float) else "-"
    out.append(f"| {r['batch']} | {us(o, 1)} | {us(r.get('fla_recurrent'), 1)} | "
               f"{us(r.get('xla'), 1)} | {gbs} | "
               f"{ratio(r.get('fla_recurrent'), o)} |")
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="first shape and batch 16 only")
  ap.add_argument("--sweep", action="store_true", help="the full block-size sweep on every shape")
  ap.add_argument("--default-only", action="store_true",
                  help="time only the default kernel configuration (fewer compiles)")
  ap.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES")
  ap.add_argument("--no-decode", action="store_true")
  ap.add_argument("--no-check", action="store_true", help="skip the correctness pass")
  ap.add_argument("--fwd-configs", default=None,
                  help='JSON list of forward kernel configurations, e.g. \'[{"splits": 8}]\'')
  ap.add_argument("--bwd-configs", default=None,
                  help="JSON list of forward+backward configurations (each overrides the best "
                       "forward's), e.g. '[{\"splits\": 1}, {\"splits\": 4}]'")
  ap.add_argument("--shape", default=None,
                  help="one extra B,T,H,D shape instead of SHAPES, e.g. 8,4096,8,128 (ling_small)")
  ap.add_argument("--fwd-only", action="store_true", help="time only our forward kernel")
  ap.add_argument("--no-fused", action="store_true", help="skip fla's fused_chunk variant")
  args = ap.parse_args()
  on_gpu = jax.devices()[0].platform == "gpu"
  interpret = not on_gpu
  print(f"# device: {jax.devices()[0].device_kind} ({'compiled' if on_gpu else 'interpret smoke'})")
  fla = fla_ops() if on_gpu else None
  if fla is not None and args.no_fused:
    fla.pop("fused_chunk", None)
  xla, xla_step = xla_ops()
  shapes = SHAPES[:1] if args.quick else SHAPES
  batches = [16] if args.quick else DECODE_BATCHES
  fwd_cfg, bwd_cfg = (SWEEP_FWD, SWEEP_BWD) if args.sweep else (FWD_CONFIGS, BWD_CONFIGS)
  if args.default_only:
    fwd_cfg, bwd_cfg = fwd_cfg[:1], bwd_cfg[:1]
  if args.fwd_configs:
    fwd_cfg = json.loads(args.fwd_configs)
  if args.bwd_configs:
    bwd_cfg = json.loads(args.bwd_configs)
  if args.fwd_only:
    bwd_cfg, fla, xla = [], None, None
  if args.shapes:
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
  if args.shape:
    shapes = [tuple(int(n) for n in args.shape.split(","))]
  if args.no_decode:
    batches = []
  if interpret:
    shapes, batches, fwd_cfg, bwd_cfg = [(1, 130, 2, 64)], [2], FWD_CONFIGS[:2], BWD_CONFIGS[:1]

  rows, decode_rows = [], []
  result = dict(device=jax.devices()[0].device_kind, check={} if args.no_check else check(fla, xla, interpret),
                prefill=rows, decode=decode_rows)

  def save(row, rows):  # after every row, so a run cut short still reports what it measured
    rows.append(row)
    print("# " + json.dumps(row), flush=True)
    if os.environ.get("OUT"):
      with open(os.path.join(os.environ["OUT"], "simple_gla_bench.json"), "w") as f:
        json.dump(result, f, indent=1)

  for b in batches:
    save(bench_decode(b, fla, xla_step, interpret), decode_rows)
  for shape in shapes:
    save(bench_shape(shape, fla, xla, interpret, fwd_cfg, bwd_cfg), rows)
  print(table(rows, decode_rows))


if __name__ == "__main__":
  main()
