"""The chunked LM-head cross-entropy (`train/loss.py`): logsumexp in one read against XLA's two.

  python -m benchmarks.ce_head [--tokens 32768] [--hidden 1024] [--vocab 32768] [--chunk 4096]

At small_pretrain's head (8 x 4096 tokens, hidden 1024, vocab 32768, bf16, 4096-token chunks)
it times `head_ce`'s value and gradient with the one-pass logsumexp the model uses and with
`jax.nn.logsumexp` swapped in, side by side: wall time per call and the device time from a
trace (what differs is one reduction over each chunk's fp32 logits).
"""

from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp

from benchmarks.moe_parts import per_op
from benchmarks.timing import time_jax
from ling_jax.train import loss


@contextlib.contextmanager
def two_pass():
  """`head_ce` with XLA's own logsumexp (max, then sum of exps: two reads of the logits)."""
  keep = loss.logsumexp_one_pass
  loss.logsumexp_one_pass = lambda x: jax.nn.logsumexp(x, axis=-1)
  try:
    yield
  finally:
    loss.logsumexp_one_pass = keep


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=32768)
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--vocab", type=int, default=32768)
  ap.add_argument("--chunk", type=int, default=4096)
  a = ap.parse_args()
  k = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k[0], (a.tokens, a.hidden), jnp.bfloat16)
  w = jax.random.normal(k[1], (a.hidden, a.vocab), jnp.float32) * a.hidden ** -0.5
  t = jax.random.randint(k[2], (a.tokens,), 0, a.vocab)
  mask = jnp.ones((a.tokens,), jnp.float32)
  print(f"# {jax.devices()[0].device_kind}: {a.tokens} tokens, hidden {a.hidden}, vocab {a.vocab}, "
        f"chunk {a.chunk}, bf16")
  print("| logsumexp | value + grad ms (timed) | device busy ms (trace) | loss |")
  print("|---|---|---|---|")
  for name, ctx in [("one pass (model)", contextlib.nullcontext), ("XLA two-pass", two_pass)]:
    with ctx():
      f = jax.jit(jax.value_and_grad(
          lambda h, w: loss.head_ce(h, w, t, mask, a.chunk, jnp.bfloat16), argnums=(0, 1)))
      total = time_jax(f, h, w)
      busy = sum(us for us, *_ in per_op(f, (h, w)))
      value = float(f(h, w)[0])
    print(f"| {name} | {total * 1e3:.3f} | {busy / 1e3:.3f} | {value:.6e} |")

if __name__ == "__main__":
  main()
