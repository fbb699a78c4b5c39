"""The Lightning layer's QK norm + partial RoPE: XLA's fusions against the fused Pallas kernels.

  python -m benchmarks.qk_norm_rope [--B 8] [--T 4096] [--configs '[{}, {"block_t": 8}]']

At ling_small's training shape (8 x 4096 tokens, H 8, K 128, rotary_dim 64, bf16) it times
`pallas_kernels.qk_norm_rope` with impl="xla" (the reference under autodiff, what the model ran
before) and impl="pallas" under a few kernel configurations (`Config`'s tokens a program and
warps, forward and backward; {} is the default), side by side in one process: the forward
(q, k, v from qkv) and forward+backward (jax.vjp with random cotangents: q, k, v and d qkv,
dw_q, dw_k). GB/s counts the minimal bytes: the forward reads qkv and writes q, k, v
(6 N H K x 2 bytes) plus cos, sin; the backward reads qkv, dq, dk, dv and writes d qkv
(9 N H K x 2 bytes) plus cos, sin again. The last columns are the largest errors against the XLA
path, relative to each output's largest magnitude (dw apart: the XLA path sums it in bf16, the
kernel in fp32, so ~1e-2 there is the reference's error). Prints a markdown table; rows go to
$OUT/qk_norm_rope.json.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import guarded, time_jax
from ling_jax.config import ling_small
from ling_jax.model import rope
from pallas_kernels.qk_norm_rope import Config, qk_norm_rope

CONFIGS = [  # {} is the default: forward 16 tokens, backward 8, 8 warps each (H K = 1024)
    {}, {"block_t": 8, "block_t_bwd": 4}, {"block_t": 32, "block_t_bwd": 16},
    {"num_warps": 4, "num_warps_bwd": 4}, {"block_t": 8, "num_warps": 4, "num_warps_bwd": 4},
    {"block_t_bwd": 16}, {"block_t": 64, "block_t_bwd": 32, "num_warps": 16, "num_warps_bwd": 16},
]


def max_rel(got, want):
  return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                   / jnp.max(jnp.abs(b.astype(jnp.float32))))
             for a, b in zip(got, want))


def main():
  cfg = ling_small()
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--B", type=int, default=8)
  ap.add_argument("--T", type=int, default=4096)
  ap.add_argument("--configs", default=None, help="JSON list of Config overrides (block_t, "
                  "block_t_bwd, num_warps, num_warps_bwd) to time instead of CONFIGS")
  a = ap.parse_args()
  configs = json.loads(a.configs) if a.configs else CONFIGS
  B, T, H, K, R = a.B, a.T, cfg.num_attention_heads, cfg.head_dim, cfg.rotary_dim
  dt, eps = jnp.bfloat16, cfg.rms_norm_eps
  ks = jax.random.split(jax.random.key(0), 4)
  qkv = (1.0 + jax.random.normal(ks[0], (B, T, 3, H, K), jnp.float32)).astype(dt)
  wq, wk = (1.0 + 0.1 * jax.random.normal(k, (K,), jnp.float32) for k in ks[1:3])
  cts = tuple(jax.random.normal(k, (B, T, H, K), dt) for k in jax.random.split(ks[3], 3))
  pos = jnp.asarray(np.tile(np.arange(T // 4), 4)[None].repeat(B, 0), jnp.int32)  # 4 docs a row
  cos, sin = rope.cos_sin(pos, R, cfg.rope_theta, cfg.rope_scaling)

  N = B * T
  fwd_bytes = 6 * N * H * K * 2 + 2 * N * (R // 2) * 4
  bwd_bytes = 9 * N * H * K * 2 + 2 * N * (R // 2) * 4

  def fns(impl, config):
    f = lambda qkv, wq, wk: qk_norm_rope(qkv, wq, wk, cos, sin, eps=eps, dtype=dt, impl=impl,
                                         config=config)

    def fwd_bwd(qkv, wq, wk, cts):
      out, vjp = jax.vjp(f, qkv, wq, wk)
      return out, vjp(cts)

    return jax.jit(f), jax.jit(fwd_bwd)

  print(f"# {jax.devices()[0].device_kind}: B={B} T={T} H={H} K={K} rotary_dim={R}, bf16, "
        f"jax {jax.__version__}")
  print("| impl | config | fwd ms | fwd GB/s | fwd+bwd ms | f+b GB/s | q, k, v, d qkv err "
        "| dw err |")
  print("|---|---|---|---|---|---|---|---|")
  rows, want = [], None
  for impl, over in [("xla", None)] + [("pallas", c) for c in configs]:
    config = None if over is None else Config(eps=eps, dtype=jnp.dtype(dt), **over)
    fwd, fb = fns(impl, config)
    t_f = guarded(time_jax, fwd, qkv, wq, wk)
    t_fb = guarded(time_jax, fb, qkv, wq, wk, cts)
    if isinstance(t_f, str) or isinstance(t_fb, str):
      row = dict(impl=impl, config=over, error=t_f if isinstance(t_f, str) else t_fb)
      print(f"| {impl} | {over} | {row['error']} | | | | | |")
      rows.append(row)
      continue
    got = fb(qkv, wq, wk, cts)
    if want is None:
      want = got
    (q, k, v), (dqkv, dwq, dwk) = got
    (q_r, k_r, v_r), (dqkv_r, dwq_r, dwk_r) = want
    err = max_rel((q, k, v, dqkv), (q_r, k_r, v_r, dqkv_r))
    err_w = max_rel((dwq, dwk), (dwq_r, dwk_r))
    row = dict(impl=impl, config=over, fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3,
               fwd_gbs=fwd_bytes / t_f / 1e9, fwd_bwd_gbs=(fwd_bytes + bwd_bytes) / t_fb / 1e9,
               max_rel_err=err, dw_rel_err=err_w)
    rows.append(row)
    print(f"| {impl} | {over if over is not None else '-'} | {row['fwd_ms']:.3f} | "
          f"{row['fwd_gbs']:.0f} | {row['fwd_bwd_ms']:.3f} | {row['fwd_bwd_gbs']:.0f} | "
          f"{err:.1e} | {err_w:.1e} |")
  timed = [r for r in rows if "fwd_bwd_ms" in r]
  if len(timed) > 1:
    best = min(timed[1:], key=lambda r: r["fwd_bwd_ms"])
    n_lin = sum(t == "linear" for t in cfg.layer_types())
    print(f"\nbest Pallas config {best['config']}: fwd+bwd {timed[0]['fwd_bwd_ms']:.3f} -> "
          f"{best['fwd_bwd_ms']:.3f} ms a layer; x {n_lin} Lightning layers = "
          f"{n_lin * (best['fwd_bwd_ms'] - timed[0]['fwd_bwd_ms']):+.2f} ms a step")
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "qk_norm_rope.json"), "w") as fh:
      json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  main()
