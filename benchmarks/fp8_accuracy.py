"""How far a model with FP8 routed experts is from its references, and how far a random model
moves under the weights' own rounding: the numbers behind the FP8 model tests' bounds.

  python -m benchmarks.fp8_accuracy [--model small|tiny] [--tokens 4,256] [--formats channel,block]
      [--kernels auto|interpret|xla]

For each FP8 scheme (128 x 128 blocks, or one scale per output channel: `with_fp8_experts` of a
random bf16 model) it compares three models' logits (relative L2 error), all replaying the
routing of the first (`forward(routing=)`), so that no token changes experts:
  fp32       the FP8 weights as values x scale in fp32, every other weight and the compute in fp32
             (`with_dense_experts(model, float32)`), every op on its XLA path: the reference for
             both below (on an H100 the default kernels failed in fp32 at ling_small, 4 x 256
             tokens: "Shared memory size limit exceeded: requested 262144, available: 232448");
  dequant    the same weights rounded once to bf16, the model in bf16 (the FP8 tests' reference);
  fp8        the FP8 model, its experts read by the grouped-matmul kernels (`--kernels`).
Then, with routing free: fp8 against dequant (what the model tests compared first), and the
bf16 model against itself with one-ulp changes to half its routed experts' weights, chosen at
random (the XLA path): how much a random model amplifies the rounding, top-k flips included.

On the CPU the default is ling_tiny with the kernels interpreted (a test runs it); ling_small
interpreted takes ~4 minutes a forward there. Raw rows go to $OUT/fp8_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.config import ling_small, ling_tiny
from benchmarks.generate import build
from ling_jax.model import Kernels, LingForCausalLM, with_kernels
from ling_jax.model.ling import record_routing, with_dense_experts, with_fp8_experts
from ling_jax.model.settings import ExpertWeights

MODELS = {"small": ling_small, "tiny": lambda: ling_tiny(num_hidden_layers=3)}
XLA = Kernels.every("xla")  # the fp32 reference's ops


def rel(a, b) -> float:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def one_ulp_changes(model: LingForCausalLM, seed: int = 7) -> LingForCausalLM:
  """`model` with half its routed experts' weights, at random, one bf16 ulp (2^-7) up or down."""
  graphdef, state = nnx.split(model)
  key, flat = jax.random.key(seed), []
  for path, var in nnx.to_flat_state(state):
    if path[-2:-1] == ("experts",):
      key, k1, k2 = jax.random.split(key, 3)
      v = var.get_value()
      step = (jnp.where(jax.random.bernoulli(k1, 0.5, v.shape), 1.0, -1.0)
              * jax.random.bernoulli(k2, 0.5, v.shape) * 2.0 ** -7)
      var = var.replace((v.astype(jnp.float32) * (1 + step)).astype(v.dtype))
    flat.append((path, var))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", choices=sorted(MODELS), default=None,
                  help="default: small on a GPU, tiny elsewhere")
  ap.add_argument("--tokens", default=None, help="B,T (default 4,256 on a GPU, 1,16 elsewhere)")
  ap.add_argument("--formats", default="channel,block")
  ap.add_argument("--kernels", default=None,
                  help="the experts' impl for the FP8 and dequantised models (default: auto on a "
                       "GPU, interpret elsewhere)")
  args = ap.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  cfg = MODELS[args.model or ("small" if gpu else "tiny")]()
  B, T = (int(x) for x in (args.tokens or ("4,256" if gpu else "1,16")).split(","))
  kernels = Kernels(moe=args.kernels or ("auto" if gpu else "interpret"))
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size, jnp.int32)
  fwd = nnx.jit(lambda m, t, r: m.forward(t, routing=r))
  logits = nnx.jit(lambda m, t: m(t))
  free = record_routing(cfg, B, T)
  base = with_kernels(build(cfg, None), kernels)  # random, bf16
  print(f"# {jax.devices()[0].device_kind}: {args.model or ('small' if gpu else 'tiny')}, "
        f"{B} x {T} tokens, experts' kernels {kernels.moe}", flush=True)
  rows = []
  for fmt in args.formats.split(","):
    fp8 = with_fp8_experts(base, ExpertWeights(f"fp8-{fmt}", (128, 128)))
    dequant = with_dense_experts(fp8)
    fp32 = with_kernels(with_dense_experts(fp8, jnp.float32), XLA)
    ref = fwd(fp32, tokens, free)
    got = {name: fwd(m, tokens, ref.expert_ids).logits for name, m in
           (("dequant", dequant), ("fp8", fp8))}
    rows.append({"format": fmt, "dequant_vs_fp32": rel(got["dequant"], ref.logits),
                 "fp8_vs_fp32": rel(got["fp8"], ref.logits),
                 "fp8_vs_dequant": rel(got["fp8"], got["dequant"]),
                 "fp8_vs_dequant_free": rel(logits(fp8, tokens), logits(dequant, tokens))})
    print("# " + json.dumps(rows[-1]), flush=True)
  plain = with_kernels(base, XLA)
  ulp = rel(logits(one_ulp_changes(plain), tokens), logits(plain, tokens))
  print("\n| FP8 scheme | dequant vs fp32 | fp8 vs fp32 | fp8 vs dequant | fp8 vs dequant, "
        "routing free |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['format']} | {r['dequant_vs_fp32']:.4f} | {r['fp8_vs_fp32']:.4f} | "
          f"{r['fp8_vs_dequant']:.4f} | {r['fp8_vs_dequant_free']:.4f} |")
  print(f"\nThe bf16 model against itself with one-ulp changes to half its routed experts' "
        f"weights (routing free, XLA path): {ulp:.4f}")
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "fp8_accuracy.json"), "w") as f:
      json.dump({"rows": rows, "one_ulp": ulp}, f, indent=1)


if __name__ == "__main__":
  main()
