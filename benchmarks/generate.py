"""Whole-model generation on one device: decode tokens/s at several batch sizes, with and without
MTP speculative decoding, and prefill tokens/s, beside the HBM byte floor of each decode step.

  python -m benchmarks.generate [--model flash|flash-group|small|tiny] [--batches 1,16,64]
      [--prompt 256] [--new 64] [--mtp 0,1] [--accept 0.8] [--prefill 4096,32768]
      [--contexts 4096,65536,131072] [--fp8 block|channel [--no-fp8-linears]] [--hbm 3.35e12]
      [--png generate.png] [--memory]

Models (random weights, bf16): "flash" is Ling-2.6-flash whole (32 layers and its MTP layer:
208 GB in bf16, 112 GB with FP8 experts alone, which fits one H200), "flash-group" the same widths
with 8 layers (one hybrid group of 7 Lightning + 1 MLA) and the MTP layer, "small" ling_small with
one MTP layer, "tiny" a toy for the CPU. --fp8 draws the routed experts in FP8 (128 x 128 blocks,
or one scale per output column) and, as the FP8 release stores them, the dense Linears too
(attention, the dense and shared-expert MLPs, eh_proj; `ExpertWeights.linears`); with
--no-fp8-linears those stay bf16. The embedding, the head, the norms and the router are bf16 /
fp32 either way.

Decode: `ling_jax.generate.generate` (greedy, no eos) on --prompt-token prompts, timed for --new
new tokens and for 1; a step is the difference over --new - 1 steps (the prefill and the first
token cancel). With MTP (k drafts a step), random weights accept almost no draft, so acceptance is
rigged: each draft counts as accepted with probability --accept whatever its token
(speculative.py's rig; the step's work is the same as for a right draft): tokens/s at that stated
rate, the measured acceptance printed beside it.
The byte floor of a step is what it must read from HBM over --hbm bytes/s (3.35e12: an H100 SXM;
4.8e12 on an H200): every weight but the routed experts and the embedding table; of each MoE
layer's routed experts the expected distinct ones that the step's R token rows pick,
E (1 - (1 - X / E)^R) (uniform routing; R = B, or B (k + 1) for a speculative step); the caches
(fp32 Lightning states, the MLA latents up to the context). Tokens/s at the floor are the
step's tokens over it (for MTP: at the same acceptance).

Prefill: batch 1, prompts of --prefill tokens (chunks of 2048), one new token: tokens/s.

Hybrid against all-MLA (--contexts, e.g. 4096,65536,131072): the same widths with every layer
MLA (`layer_group_size=1`); a one-token decode step at batch --context-batch with each row's
cache filled to the context (random latents and states: the step's cost does not depend on
them), timed over 16 steps with the cache donated; cache bytes per sequence (Lightning states +
MLA latents, bf16) beside it. The release's throughput-against-context figure in this form.
The all-MLA model is built once the hybrid one's rows are done and that one dropped (one model on
the device at a time); a context whose step runs out of device memory is a row saying so.

--memory prints, before each decode row, the compiled memory (arguments, outputs, temporaries) of
the three jitted functions generation runs and the largest arrays each program names, and every
row ends with the allocator's bytes in use, peak and limit: where the bytes go when a model
barely fits (Ling-2.6-flash FP8 on an H200 ran out of memory asking for 16 GiB in its first-token
step, 2026-12-07). A decode row that runs out of device memory is a row saying so.

Prints a markdown table, writes the PNG (decode tokens/s beside the floor's, per batch), and the
raw rows to $OUT/generate.json when OUT is set.
"""

from __future__ import annotations

import os

# JAX's default pool is 75% of the card: on an H200 (140.4 GiB) 105.3 GiB, and Ling-2.6-flash with
# FP8 experts is 104.3 GiB of weights (out of memory in its first prefill, 2026-12-07).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
# The pool taken whole at start (JAX's default), not grown: a growing allocator asks the driver
# for regions of doubling size and, once it has backed off a failed one, no longer backs off, so
# near the card's limit it fails on a region (exactly 16 GiB, in the first-token step of
# Ling-2.6-flash FP8, 2026-12-07; the likely cause, not yet confirmed) while the step needs far
# less. This script used to turn preallocation off.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "true")

import argparse
import dataclasses
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ling_jax.config import ling_2_6_flash, ling_small, ling_tiny
from ling_jax.generate import generate
from ling_jax.model import LingForCausalLM
from ling_jax.model.settings import ExpertWeights

MODELS = {
    "flash": lambda: ling_2_6_flash(),
    "flash-group": lambda: ling_2_6_flash(num_hidden_layers=8),
    "small": lambda: ling_small(num_nextn_predict_layers=1),
    "tiny": lambda: ling_tiny(),
}


def build(cfg, fp8: str | None, linears: bool = True):
  """A random model made on the device: bf16 in one jitted init; with --fp8, every FP8 kernel
  (the routed experts', and with `linears` the dense Linears') drawn straight in FP8, one tensor
  at a time and the experts one stacked layer at a time (the whole model never exists in bf16,
  which no single GPU holds, and one program drawing every expert at once keeps their random
  bits alive together: 650 GB of temporaries for Ling-2.6-flash on XLA:CPU)."""
  weights = (ExpertWeights() if fp8 is None
             else ExpertWeights(f"fp8-{fp8}", (128, 128), linears=linears))
  make = lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                 param_dtype=jnp.bfloat16, expert_weights=weights)
  if fp8 is None:
    return nnx.jit(make)()
  in_fp8 = lambda _, v: v.get_value().dtype == jnp.float8_e4m3fn
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  # Every other variable (scales included) from the model's own init (XLA drops the FP8
  # kernels' unused draws).
  rest = jax.jit(lambda: nnx.state(make()).filter(lambda p, v: not in_fp8(p, v)))()
  flat = list(nnx.to_flat_state(rest))
  key = jax.random.key(0)
  for i, (path, var) in enumerate(nnx.to_flat_state(abstract.filter(in_fp8))):
    shape, dtype = var.get_value().shape, var.get_value().dtype
    # Experts [groups..., E, K, N] a layer at a time; a dense Linear (at most ~0.2 GB) at once.
    each = 3 if path[-2] == "experts" else len(shape)
    draw = lambda k, sh=shape[len(shape) - each:]: (
        jax.random.normal(k, sh, jnp.bfloat16).astype(dtype))
    keys = jax.random.split(jax.random.fold_in(key, i), int(np.prod(shape[:len(shape) - each])))
    values = jax.jit(lambda ks: jax.lax.map(draw, ks))(keys).reshape(shape)
    flat.append((path, var.replace(values)))  # N(0, 1), as the module draws them
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def label(args) -> str:
  """What --fp8 made FP8, for the log and the plot."""
  if not args.fp8:
    return ""
  return f" fp8 {args.fp8}" + (" (experts and Linears)" if args.fp8_linears else " (experts)")


def weight_bytes(model, rows: int, mtp: bool) -> float:
  """HBM bytes of the weights a step over `rows` token rows reads (module docstring)."""
  cfg = model.config
  E, X = cfg.num_experts, cfg.num_experts_per_tok
  touched = E * (1 - (1 - X / E) ** rows) / E  # expected fraction of a layer's experts
  total = 0.0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    a = var.get_value()
    names = [str(p) for p in path]
    if names[0] == "word_embeddings" or (names[0] == "mtp" and not mtp):
      continue
    total += a.size * a.dtype.itemsize * (touched if "experts" in names[:-1]
                                          and "shared_experts" not in names else 1)
  return total + rows * cfg.hidden_size * 2  # the embedding rows


def cache_bytes(model, batch: int, context: int) -> float:
  """HBM bytes of the caches a step at `context` tokens reads: Lightning states whole, MLA
  latents up to the context."""
  cfg = model.config
  kinds = cfg.layer_types()
  lin = sum(k == "linear" for k in kinds)
  mla = len(kinds) - lin
  H, K = cfg.num_attention_heads, cfg.head_dim
  return batch * (lin * H * K * K * 4
                  + mla * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2)


def device_memory() -> str:
  """The device's allocator: in use, peak, limit (GiB), for the log."""
  st = jax.devices()[0].memory_stats() or {}
  g = lambda k: st.get(k, 0) / 2**30
  return (f"device memory: {g('bytes_in_use'):.1f} GiB in use, {g('peak_bytes_in_use'):.1f} "
          f"peak, {g('bytes_limit'):.1f} limit")


def compiled_memory(model, batch: int, prompt: int, new: int, k: int) -> str:
  """GiB of arguments, outputs (aliased: donated back), and temporaries of each jitted function
  that `generate` runs for a `batch` x `prompt` decode of `new` tokens with k drafts, from their
  compiled programs (nothing is allocated: the slots are abstract)."""
  from ling_jax.generate import engine
  from ling_jax.generate.api import cache_length, chunk_width
  from ling_jax.generate.sampling import Sampling
  from ling_jax.generate.slots import init_slots
  graphdef, state = nnx.split(model)
  max_len = cache_length(prompt + new, k)
  slots = jax.eval_shape(lambda s: init_slots(nnx.merge(graphdef, s), batch, max_len, new, k, 0,
                                              0), state)
  cols = jax.ShapeDtypeStruct((batch, chunk_width(prompt, 2048)), jnp.int32)
  rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
  eos, greedy = jax.ShapeDtypeStruct((1,), jnp.int32), Sampling(0.0, 0, 1.0)
  calls = {"prefill_chunk": lambda: engine.prefill_chunk.lower(
               graphdef, state, slots, cols, cols, rows, cols, cols),
           "start": lambda: engine.start.lower(graphdef, state, slots, rows, eos, None,
                                               sampling=greedy),
           "decode": lambda: engine.decode.lower(graphdef, state, slots, jnp.int32(16), eos, None,
                                                 sampling=greedy)}
  lines = [f"compiled memory, batch {batch}, MTP k {k}, cache {max_len} (GiB):"]
  for name, lower in calls.items():
    compiled = lower().compile()
    m = compiled.memory_analysis()
    gib = lambda f: getattr(m, f) / 2**30
    lines.append(f"  {name}: arguments {gib('argument_size_in_bytes'):.2f}, outputs "
                 f"{gib('output_size_in_bytes'):.2f} ({gib('alias_size_in_bytes'):.2f} donated), "
                 f"temporaries {gib('temp_size_in_bytes'):.2f}; largest arrays in its program: "
                 + ", ".join(largest_arrays(compiled.as_text())))
  return "\n".join(lines)


_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}


def largest_arrays(hlo: str, n: int = 3) -> list[str]:
  """The n largest array shapes named in a compiled program's text, with their GiB (what a
  temporary that does not fit is likely made of)."""
  sizes = {}
  for dtype, dims in re.findall(r"\b(" + "|".join(_BYTES) + r")\[([\d,]+)\]", hlo):
    shape = f"{dtype}[{dims}]"
    sizes[shape] = float(np.prod([int(d) for d in dims.split(",")])) * _BYTES[dtype]
  top = sorted(sizes.items(), key=lambda kv: -kv[1])[:n]
  return [f"{shape} {b / 2**30:.2f}" for shape, b in top]


def timed(fn, trials: int = 3) -> float:
  """The fastest of `trials` calls' seconds, after a warm-up (compilation) call."""
  jax.block_until_ready(fn().tokens)
  best = float("inf")
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(fn().tokens)
    best = min(best, time.perf_counter() - t0)
  return best


def decode_row(model, batch, prompt, new, k, accept, hbm, seed=0):
  cfg = model.config
  rng = np.random.default_rng(seed)
  prompts = rng.integers(0, cfg.vocab_size, (batch, prompt)).astype(np.int32)
  rig = None
  if k:  # acceptance rigged at the stated rate (module docstring)
    rig = (None, rng.random((batch, prompt + new + k + 1)) < accept, np.bool_(True))
  run = lambda n: lambda: generate(model, prompts, n, eos_ids=None, mtp_draft=k, _rig=rig)
  t_new, t_one = timed(run(new)), timed(run(1))
  out = run(new)()
  step = (t_new - t_one) / max(out.steps, 1)
  tokens_per_step = batch * (new - 1) / max(out.steps, 1)
  rows = batch * (k + 1)
  floor = (weight_bytes(model, rows, mtp=bool(k))
           + cache_bytes(model, batch, prompt + new)) / hbm
  return dict(kind="decode", batch=batch, mtp=k, context=prompt + new, step_ms=step * 1e3,
              tokens_s=tokens_per_step / step, floor_ms=floor * 1e3,
              floor_tokens_s=tokens_per_step / floor, x_floor=step / floor,
              acceptance=out.acceptance)


def prefill_row(model, length):
  prompts = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, length))
  t = timed(lambda: generate(model, prompts, 1, eos_ids=None, chunk=2048))
  return dict(kind="prefill", batch=1, context=length, tokens_s=length / t, ms=t * 1e3)


def context_row(model, arm, batch, context):
  """One decode step at `context` tokens of cache per row (module docstring)."""
  cache = model.init_cache(batch, context + 16)
  key = iter(jax.random.split(jax.random.key(0), 1000))
  cache = jax.tree.map(lambda c: jax.random.normal(next(key), c.shape, c.dtype) * 0.1
                       if jnp.issubdtype(c.dtype, jnp.floating) else c, cache)
  step = nnx.jit(lambda m, t, p, c: m(t, positions=p, cache=c), donate_argnums=3)
  tok = jnp.ones((batch, 1), jnp.int32)
  pos = lambda i: jnp.full((batch, 1), context + i, jnp.int32)
  _, cache = step(model, tok, pos(0), cache)  # compile
  jax.block_until_ready(cache)
  t0 = time.perf_counter()
  for i in range(16):
    _, cache = step(model, tok, pos(i % 16), cache)
  jax.block_until_ready(cache)
  ms = (time.perf_counter() - t0) / 16 * 1e3
  per_seq = cache_bytes(model, 1, context)
  return dict(kind="context", arm=arm, batch=batch, context=context, step_ms=ms,
              tokens_s=batch / ms * 1e3, cache_mib=per_seq / 2**20)


def table(rows, device) -> str:
  lines = [f"device: {device}", "",
           "| batch | MTP k | context | ms / step | tokens/s | floor ms | floor tokens/s | "
           "x floor | acceptance |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["kind"] == "decode" and r["step_ms"] is None:
      lines.append(f"| {r['batch']} | {r['mtp']} | {r['context']} | out of memory | - | - | - | - "
                   "| - |")
    elif r["kind"] == "decode":
      acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
      lines.append(f"| {r['batch']} | {r['mtp']} | {r['context']} | {r['step_ms']:.2f} | "
                   f"{r['tokens_s']:,.0f} | {r['floor_ms']:.2f} | {r['floor_tokens_s']:,.0f} | "
                   f"{r['x_floor']:.2f} | {acc} |")
  pre = [r for r in rows if r["kind"] == "prefill"]
  if pre:
    lines += ["", "| prefill tokens | ms | tokens/s |", "|---|---|---|"]
    lines += [f"| {r['context']} | {r['ms']:.1f} | {r['tokens_s']:,.0f} |" for r in pre]
  ctx = [r for r in rows if r["kind"] == "context"]
  if ctx:
    lines += ["", "| layers | batch | context | ms / step | tokens/s | cache MiB / sequence |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['batch']} | {r['context']} | "
              + ("out of memory | - | " if r["step_ms"] is None else
                 f"{r['step_ms']:.2f} | {r['tokens_s']:,.0f} | ") + f"{r['cache_mib']:.1f} |"
              for r in ctx]
  return "\n".join(lines)


def plot(rows, path, title):
  """Decode tokens/s against the floor's per batch; with --contexts, tokens/s against context for
  the hybrid and all-MLA arms beside it."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  dec = [r for r in rows if r["kind"] == "decode" and r["step_ms"] is not None]
  ctx = [r for r in rows if r["kind"] == "context"]
  fig, axes = plt.subplots(1, 2 if ctx else 1, figsize=(11 if ctx else 6, 4), squeeze=False)
  ax = axes[0, 0]
  labels = [f"B={r['batch']}" + (f"\nMTP {r['mtp']}" if r["mtp"] else "") for r in dec]
  x = np.arange(len(dec))
  ax.bar(x - 0.2, [r["tokens_s"] for r in dec], 0.4, label="measured")
  ax.bar(x + 0.2, [r["floor_tokens_s"] for r in dec], 0.4, label="HBM byte floor")
  ax.set_xticks(x, labels)
  ax.set_yscale("log")
  ax.set_ylabel("decode tokens / s")
  ax.set_title(title)
  ax.legend()
  if ctx:
    ax = axes[0, 1]
    for arm in dict.fromkeys(r["arm"] for r in ctx):
      pts = [r for r in ctx if r["arm"] == arm and r["step_ms"] is not None]
      ax.plot([r["context"] for r in pts], [r["tokens_s"] for r in pts], "o-", label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"decode tokens / s (batch {ctx[0]['batch']})")
    ax.set_title("hybrid vs all-MLA")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=sorted(MODELS), default="flash-group")
  p.add_argument("--batches", default="1,16,64")
  p.add_argument("--prompt", type=int, default=256)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--mtp", default="0,1", help="drafts a step to run (0: plain decoding)")
  p.add_argument("--accept", type=float, default=0.8, help="rigged draft acceptance rate")
  p.add_argument("--prefill", default="4096,32768", help="prompt lengths ('' for none)")
  p.add_argument("--contexts", default="", help="hybrid vs all-MLA decode at these contexts")
  p.add_argument("--context-batch", type=int, default=1)
  p.add_argument("--fp8", choices=("block", "channel"), default=None)
  p.add_argument("--fp8-linears", action=argparse.BooleanOptionalAction, default=True,
                 help="with --fp8, the dense Linears in FP8 too (the release's form; default)")
  p.add_argument("--hbm", type=float, default=3.35e12)
  p.add_argument("--png", default=None, help="default: $OUT/generate.png or ./generate.png")
  p.add_argument("--memory", action="store_true",
                 help="first print the compiled memory of each jitted step (prefill chunk, first "
                      "token, decode loop) at every batch and MTP setting")
  args = p.parse_args(argv)
  ints = lambda s: [int(v) for v in s.split(",") if v]
  cfg = MODELS[args.model]()
  model = build(cfg, args.fp8, args.fp8_linears)
  device = jax.devices()[0].device_kind
  print(f"built {args.model}{label(args)}; {device_memory()}", flush=True)
  rows = []
  for k in ints(args.mtp):
    for b in ints(args.batches):
      if args.memory:
        print(compiled_memory(model, b, args.prompt, args.new, k), flush=True)
      try:
        rows.append(decode_row(model, b, args.prompt, args.new, k, args.accept, args.hbm))
      except jax.errors.JaxRuntimeError as e:  # a batch the device cannot hold: say so, go on
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        print(f"batch {b}, MTP k {k}: out of device memory: {str(e).splitlines()[0][:300]}")
        rows.append(dict(kind="decode", batch=b, mtp=k, context=args.prompt + args.new,
                         step_ms=None))
      print(rows[-1], device_memory(), flush=True)
  for n in ints(args.prefill):
    rows.append(prefill_row(model, n))
    print(rows[-1], flush=True)
  if ints(args.contexts):
    for arm in ("hybrid", "all-MLA"):
      if arm == "all-MLA":
        # One model on the device at a time: flash-group and its all-MLA twin (49 GB each) did not
        # fit an H100 together.
        del model
        model = build(dataclasses.replace(cfg, layer_group_size=1), args.fp8, args.fp8_linears)
      for n in ints(args.contexts):
        try:
          rows.append(context_row(model, arm, args.context_batch, n))
        except jax.errors.JaxRuntimeError as e:  # a context the device cannot hold: say so, go on
          if "RESOURCE_EXHAUSTED" not in str(e):
            raise
          rows.append(dict(kind="context", arm=arm, batch=args.context_batch, context=n,
                           step_ms=None, tokens_s=None,
                           cache_mib=cache_bytes(model, 1, n) / 2**20))
        print(rows[-1], flush=True)
  print(table(rows, device))
  out = os.environ.get("OUT")
  png = args.png or os.path.join(out or ".", "generate.png")
  plot(rows, png, f"{args.model}{label(args)}, {device}")
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "generate.json"), "w") as f:
      json.dump({"device": device, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
