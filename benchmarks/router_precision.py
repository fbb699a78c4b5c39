"""The router's fp32 logits matmul at each dot precision: device time and error against float64.

  python -m benchmarks.router_precision [--tokens 32768]

`router.route` computes x [N, D] @ w [D, E] in fp32, as the reference's F.linear in float32
does; on a GPU a plain fp32 dot runs at the default precision (TF32), whose error flips near-tied
experts. For ling_small's (D 1024, E 32) and Ling-2.6-flash's (D 4096, E 256) router at 32768
tokens, with x in bf16 as under bf16 compute, it prints the forward's and the forward+backward's
device microseconds (from a trace) and the largest error relative to the largest |logit|, for
`router.router_logits` (what the model runs: bf16 matmuls on split operands), and for one dot of
the fp32-cast x at HIGHEST (true fp32), the split-operand algorithms (3 TF32 or 3 / 6 bf16 products)
and DEFAULT.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.moe_parts import per_op
from ling_jax.model.router import router_logits

PRECISIONS = {"router_logits": "ours", "HIGHEST": jax.lax.Precision.HIGHEST,
              "TF32_X3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
              "BF16_X6": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
              "BF16_X3": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
              "DEFAULT": None}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=32768)
  N = ap.parse_args().tokens
  print(f"# {jax.devices()[0].device_kind}\n")
  print("| N | D | E | precision | fwd us | fwd+bwd us | max error / max logit |")
  print("|---|---|---|---|---|---|---|")
  for D, E in [(1024, 32), (4096, 256)]:
    k = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(k[0], (N, D), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(k[1], (D, E), jnp.float32) * D ** -0.5
    exact = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(w, np.float64)
    for name, p in PRECISIONS.items():
      if p == "ours":
        logits = router_logits
      else:
        logits = lambda x, w, p=p: jnp.matmul(x.astype(jnp.float32), w, precision=p)
      try:
        fwd = jax.jit(logits)
        grad = jax.jit(jax.value_and_grad(lambda x, w, f=logits: jnp.sum(jnp.sin(f(x, w))),
                                          argnums=(0, 1)))
        err = np.abs(np.asarray(fwd(x, w)) - exact).max() / np.abs(exact).max()
      except Exception as e:  # e.g. TF32_X3 on a CPU
        print(f"| {N} | {D} | {E} | {name} | unsupported: {type(e).__name__} | | |")
        continue
      us_f = sum(t for t, *_ in per_op(fwd, (x, w)))
      us_g = sum(t for t, *_ in per_op(grad, (x, w)))
      print(f"| {N} | {D} | {E} | {name} | {us_f:.1f} | {us_g:.1f} | {err:.2e} |", flush=True)


if __name__ == "__main__":
  main()
