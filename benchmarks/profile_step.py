"""Where a train step's device time goes: a profiler trace of a few steps, summed per source line.

  python -m benchmarks.profile_step [--experiment small_pretrain] [--steps 3] [key.sub=value ...]

Builds the experiment's model, optimizer and jitted step exactly as `ling_jax.train.run` does,
warms it up, then traces `--steps` steps with `jax.profiler` (a Perfetto JSON trace: no
TensorBoard needed). Each device op of the trace is mapped through the compiled HLO's metadata to
the Python line that produced it, and the table prints device milliseconds per step by file
(model component) and the heaviest ops with their lines. Also prints wall time per step, tokens/s
and MFU, so the breakdown and the headline figure come from one run. Raw rows go to
$OUT/profile_step.json when OUT is set, and the compiled module's HLO text to
$OUT/step_hlo.txt.gz.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib
import json
import os
import tempfile
import time

import jax

from experiments.overrides import apply_overrides
from ling_jax.data.pipeline import Data
from ling_jax.profiling import device_ops, hlo_sources, summarise
from ling_jax.train.loop import build_model, mtp_weight, train_step
from ling_jax.train.optim import optimizer
from ling_jax.train.report import peak_flops
from ling_jax.train.step import init_state, split_model

def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--experiment", default="small_pretrain")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--top", type=int, default=30)
  p.add_argument("overrides", nargs="*")
  a = p.parse_args()
  exp = apply_overrides(importlib.import_module(f"experiments.{a.experiment}").config(), a.overrides)
  cfg, t, d = exp.model, exp.train, exp.data
  graphdef, params, bias, constants = split_model(build_model(exp))
  tx = optimizer(t)
  state = init_state(params, bias, tx)
  step = train_step(cfg, t, graphdef, constants, tx)
  it = Data(d, cfg.vocab_size).train_iterator()
  batches = [next(it) for _ in range(a.warmup + a.steps)]
  t0 = time.perf_counter()
  hlo = step.lower(state, batches[0]).compile().as_text()
  sources = hlo_sources(hlo)
  if os.environ.get("OUT"):  # the optimized module, to read the fusions behind the op names
    with gzip.open(os.path.join(os.environ["OUT"], "step_hlo.txt.gz"), "wt") as f:
      f.write(hlo)
  print(f"# compile {time.perf_counter() - t0:.1f} s; {len(sources)} HLO ops with metadata")
  for b in batches[:a.warmup]:
    state, m = step(state, b)
  jax.block_until_ready(m)
  trace_dir = tempfile.mkdtemp(prefix="profile_step_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    t0 = time.perf_counter()
    for b in batches[a.warmup:]:
      state, m = step(state, b)
    jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / a.steps
  tokens = d.batch_size * d.seq_len
  flops = cfg.flops_per_token(d.seq_len, include_mtp=mtp_weight(cfg, t) > 0) * tokens
  peak = t.peak_flops or peak_flops()
  by_file, by_op, names = summarise(device_ops(trace_dir), sources, a.steps)
  busy = sum(by_file.values())
  print(f"# {jax.devices()[0].device_kind}: {d.batch_size} x {d.seq_len} tokens, "
        f"step {wall * 1e3:.1f} ms (traced), {tokens / wall:,.0f} tok/s, "
        + (f"MFU {100 * flops / wall / peak:.1f}%, " if peak else "")
        + f"device busy {busy / 1e3:.1f} ms/step")
  files = collections.Counter()
  for (f, _), us in by_file.items():
    files[f] += us
  print("\n| file | fwd ms / step | bwd ms / step | share |\n|---|---|---|---|")
  for f, us in files.most_common():
    print(f"| {f} | {by_file[f, 'fwd'] / 1e3:.2f} | {by_file[f, 'bwd'] / 1e3:.2f} | "
          f"{100 * us / busy:.1f}% |")
  print("\n| op | kernel | line | ms / step | share |\n|---|---|---|---|---|")
  for op, us in by_op.most_common(a.top):
    kernel, where, _ = names[op]
    print(f"| {op} | {kernel[:40]} | {where} | {us / 1e3:.3f} | {100 * us / busy:.1f}% |")
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "profile_step.json"), "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, step_s=wall, tokens=tokens, flops=flops,
                     by_file={f"{f} {p}": us for (f, p), us in by_file.items()}, ops={o: [us, *names[o][:2]] for o, us in by_op.items()}),
                f, indent=1)


if __name__ == "__main__":
  main()
