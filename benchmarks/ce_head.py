"""The chunked LM-head cross-entropy (`train/loss.py`): XLA's passes over the logits against the
fused Pallas kernel (`pallas_kernels/cross_entropy`).

  python -m benchmarks.ce_head [--tokens 32768] [--hidden 1024] [--vocab 32768] [--chunk 4096]
      [--no-sweep] [--interpret]

At small_pretrain's head (8 x 4096 tokens, hidden 1024, vocab 32768, bf16) it prints two tables:
1. `head_ce`'s value and gradient, wall time per call and device time from a trace, with
   "one pass": the XLA path with the one-read logsumexp (then a second read to write g);
   "XLA two-pass": the same with `jax.nn.logsumexp` (max, then sum: three reads in all);
   "fused kernel": the kernel's default config, one read of the logits and one write of g.
   "(model)" marks what `head_ce` picks by default on this backend.
2. (not with --no-sweep) only what the kernel replaces, on one chunk's fp32 logits [chunk, vocab]:
   lse, ce and g in bf16, for XLA's one-pass path and a sweep of kernel configs, with the rate
   at which it moves the one read + one write the job needs (GB/s; an H100's HBM3 streams
   ~3 TB/s), so the sweep shows whether pass 2 re-reads from L2 or from HBM.
The kernel rows need a GPU; --interpret runs them in interpret mode (a CPU smoke test of this
script at small sizes, timings meaningless).
"""

from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp

from benchmarks.moe_parts import per_op
from benchmarks.timing import guarded, time_jax
from ling_jax.train import loss
from pallas_kernels.cross_entropy import Config, cross_entropy

SWEEP = [  # (label, kernel config): the default (BV 8192, 8 warps, 2 programs / SM) first
    ("default", Config()),
    ("no L2 hints", Config(l2_hints=False)),
    ("1 program / SM", Config(programs_per_sm=1)),
    ("4 programs / SM", Config(programs_per_sm=4)),
    ("a program per row", Config(programs_per_sm=0)),
    ("16 warps", Config(num_warps=16)),
    ("BV 4096", Config(block_v=4096)),
    ("BV 4096, 4 / SM", Config(block_v=4096, programs_per_sm=4)),
    ("BV 16384, 16 warps", Config(block_v=16384, num_warps=16)),
    ("2 rows, BV 4096", Config(block_rows=2, block_v=4096)),
    ("num_stages 2", Config(num_stages=2)),
    ("one read: BV 32768, 32 warps", Config(block_v=32768, num_warps=32)),
    ("one read: BV 32768, 16 warps", Config(block_v=32768, num_warps=16)),
]


@contextlib.contextmanager
def two_pass():
  """`head_ce` with XLA's own logsumexp (max, then sum of exps: two reads of the logits)."""
  keep = loss.logsumexp_one_pass
  loss.logsumexp_one_pass = lambda x: jax.nn.logsumexp(x, axis=-1)
  try:
    yield
  finally:
    loss.logsumexp_one_pass = keep


def time_and_busy(f, *args):
  """(timed ms per call, device busy ms per call from a trace)."""
  total = time_jax(f, *args)
  busy = sum(us for us, *_ in per_op(f, args))
  return total * 1e3, busy / 1e3


def head_table(a, kernel_impl):
  k = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k[0], (a.tokens, a.hidden), jnp.bfloat16)
  w = jax.random.normal(k[1], (a.hidden, a.vocab), jnp.float32) * a.hidden ** -0.5
  t = jax.random.randint(k[2], (a.tokens,), 0, a.vocab)
  mask = jnp.ones((a.tokens,), jnp.float32)
  default = "pallas" if jax.default_backend() == "gpu" else "xla"
  print("| head_ce | value + grad ms (timed) | device busy ms (trace) | loss |")
  print("|---|---|---|---|")
  rows = [("one pass", "xla", contextlib.nullcontext), ("XLA two-pass", "xla", two_pass)]
  if kernel_impl:
    rows.append(("fused kernel", kernel_impl, contextlib.nullcontext))
  for name, impl, ctx in rows:
    with ctx():
      f = jax.jit(jax.value_and_grad(
          lambda h, w: loss.head_ce(h, w, t, mask, a.chunk, jnp.bfloat16, impl), argnums=(0, 1)))
      total, busy = time_and_busy(f, h, w)
      value = float(f(h, w)[0])
    model = " (model)" if impl == default and name != "XLA two-pass" else ""
    print(f"| {name}{model} | {total:.3f} | {busy:.3f} | {value:.6e} |")


def chunk_table(a, kernel_impl):
  """lse, ce and g from one chunk's fp32 logits: the part of head_ce the kernel replaces."""
  c, V = a.chunk, a.vocab
  k = jax.random.split(jax.random.key(1), 2)
  logits = 2.0 * jax.random.normal(k[0], (c, V), jnp.float32)
  t = jax.random.randint(k[1], (c,), 0, V)
  mask = jnp.ones((c,), jnp.float32)
  gbytes = c * V * (4 + 2) / 1e9  # the job's HBM traffic: one fp32 read, one bf16 write

  def xla(x, t, m):  # loss.py's XLA path on given logits: the one-pass lse, then g's fusion
    lse = loss.logsumexp_one_pass(x)
    ce = (lse - jnp.take_along_axis(x, t[:, None], axis=-1)[:, 0]) * m
    hit = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) == t[:, None]
    return ((jnp.exp(x - lse[:, None]) - hit) * m[:, None]).astype(jnp.bfloat16), lse, ce

  print(f"\n# one chunk: [{c}, {V}] fp32 logits -> lse, ce, g in bf16; "
        f"{gbytes:.3f} GB of one read + one write")
  print("| lse + ce + g | timed ms | device busy ms | GB/s (busy) | max g error vs XLA |")
  print("|---|---|---|---|---|")
  want = jax.jit(xla)(logits, t, mask)
  rows = [("XLA one pass (loss.py)", jax.jit(xla))]
  if kernel_impl:
    rows += [(f"kernel, {name}", jax.jit(lambda x, t, m, cfg=cfg: cross_entropy(
        x, t, m, impl=kernel_impl, config=cfg))) for name, cfg in SWEEP]
  for name, f in rows:
    r = guarded(time_and_busy, f, logits, t, mask)
    if isinstance(r, str):
      print(f"| {name} | {r} | | | |")
      continue
    err = float(jnp.abs(f(logits, t, mask)[0].astype(jnp.float32)
                        - want[0].astype(jnp.float32)).max())
    rate = f"{gbytes / r[1] * 1e3:.0f}" if r[1] > 0 else "-"
    print(f"| {name} | {r[0]:.3f} | {r[1]:.3f} | {rate} | {err:.1e} |")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=32768)
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--vocab", type=int, default=32768)
  ap.add_argument("--chunk", type=int, default=4096)
  ap.add_argument("--no-sweep", action="store_true", help="skip the per-chunk kernel table")
  ap.add_argument("--interpret", action="store_true",
                  help="kernel rows in interpret mode (CPU smoke test)")
  a = ap.parse_args()
  kernel_impl = ("interpret" if a.interpret else
                 "pallas" if jax.default_backend() == "gpu" else None)
  print(f"# {jax.devices()[0].device_kind}: {a.tokens} tokens, hidden {a.hidden}, vocab {a.vocab}, "
        f"chunk {a.chunk}, bf16" + ("" if kernel_impl else " (no GPU: no kernel rows)"))
  head_table(a, kernel_impl)
  if not a.no_sweep:
    chunk_table(a, kernel_impl)


if __name__ == "__main__":
  main()
