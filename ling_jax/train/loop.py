"""`run(experiment)`: train, checkpoint, evaluate, sample and plot one run.

Order matters for bad input: the data (an empty corpus, a tokenizer larger than the vocabulary)
and an existing checkpoint's config are checked before anything is written, so a refused run
leaves its output directory as it found it.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ling_jax.config import LingConfig
from ling_jax.data.pipeline import Data
from ling_jax.generate import generate
from ling_jax.model.ling import LingForCausalLM
from ling_jax.train.checkpoint import Checkpointer, check_compatible, config_meta
from ling_jax.train.config import Experiment, TrainConfig
from ling_jax.train.optim import optimizer, schedule
from ling_jax.train.report import (MetricsLog, peak_flops, read_metrics, unigram_baseline,
                                   write_loss_curve)
from ling_jax.train.step import init_state, make_eval_step, make_train_step, split_model


# Above this many parameters LLVM's optimisation of the init program pays for itself on the CPU
# (ling_small on 2 cores: 15 s compile + 16 s run, against 11 s + 56 s at level 0); below it, it
# costs more than it saves (ling_tiny).
_OPTIMISE_INIT_ABOVE = 100_000_000


def _host_cpu():
  """The CPU device, or None where JAX_PLATFORMS leaves the CPU backend out."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return None


def build_model(exp: Experiment) -> LingForCausalLM:
  """The initialised model: built by one compiled program on the host's CPU, then placed on the
  default device.

  One program rather than eager init: eager init compiles one XLA program per parameter shape
  (~10 s for ling_tiny on CPU). On the CPU rather than the accelerator: the program is ~2,200
  small fusions of threefry hashes and normal transforms, which XLA's GPU backend took 2m2-2m21
  to compile for ling_small on an H100, every run; the CPU compiles it in ~15 s. (Where
  JAX_PLATFORMS leaves the CPU out, it runs on the default device.)"""
  t = exp.train

  def make():
    return LingForCausalLM(exp.model, rngs=nnx.Rngs(t.seed), dtype=jnp.dtype(t.compute_dtype),
                           param_dtype=jnp.float32, kernels=t.kernels)

  graphdef = nnx.graphdef(nnx.eval_shape(make))
  cpu, target = _host_cpu(), jax.devices()[0]
  small = exp.model.param_count(include_mtp=True) <= _OPTIMISE_INIT_ABOVE
  opts = {"xla_backend_optimization_level": 0} if cpu is not None and small else None
  with jax.default_device(cpu or target):
    state = jax.jit(lambda: nnx.state(make()), compiler_options=opts)()
  if cpu is not None and target != cpu:
    # Through the default device's jit rather than device_put(state, target): the arrays stay
    # uncommitted, as they were when the default device built them.
    state = jax.jit(lambda s: s)(state)
  return nnx.merge(graphdef, state)


def evaluate(graphdef, constants, params, expert_bias, batches, ce_chunk: int = 4096) -> float:
  """Mean next-token cross-entropy (nats) over the valid targets of `batches`."""
  eval_step = make_eval_step(graphdef, constants, ce_chunk)
  total, n = 0.0, 0.0
  for b in batches:
    sums = jax.device_get(eval_step(params, expert_bias, b))
    total, n = total + float(sums["ce_sum"]), n + float(sums["n"])
  return total / max(n, 1.0)


def _log_line(r: dict) -> str:
  s = f"step {r['step']:>6}  loss {r['loss']:.4f}  ce {r['ce']:.4f}"
  if "mtp" in r:
    s += f"  mtp {r['mtp']:.4f}"
  s += f"  |g| {r['grad_norm']:.3f}  lr {r['lr']:.2e}  load max/mean {max(r['load_max_mean']):.2f}"
  s += f"  {r['tokens_per_s']:,.0f} tok/s"
  if r.get("mfu") is not None:
    s += f"  MFU {100 * r['mfu']:.1f}%"
  return s


def mtp_weight(cfg: LingConfig, t: TrainConfig) -> float:
  """The MTP loss weight: the config's scaling factor when MTP is on and the model has the layer."""
  return cfg.mtp_loss_scaling_factor if t.mtp and cfg.num_nextn_predict_layers else 0.0


def train_step(cfg: LingConfig, t: TrainConfig, graphdef, constants, tx):
  """The jitted train step `t` asks for (loss weights, remat, CE chunking, bias updates)."""
  return make_train_step(graphdef, constants, tx, schedule(t), mtp_weight=mtp_weight(cfg, t),
                         bias_rate=t.bias_update_rate, remat=t.remat,
                         ce_chunk=t.ce_chunk, grad_accum=t.grad_accum,
                         compute_dtype=t.compute_dtype)


def run(exp: Experiment) -> dict:
  """Train `exp` (resuming from its out_dir's last checkpoint), then evaluate and report."""
  cfg, t, d = exp.model, exp.train, exp.data
  data = Data(d, cfg.vocab_size)
  meta = config_meta(exp)
  ckpt_dir = os.path.abspath(os.path.join(t.out_dir, "checkpoints"))
  start = check_compatible(ckpt_dir, meta) or 0

  t0 = time.perf_counter()
  graphdef, params, expert_bias, constants = split_model(build_model(exp))
  jax.block_until_ready(params)
  init_s = time.perf_counter() - t0
  tx = optimizer(t)
  state = init_state(params, expert_bias, tx)
  it = data.train_iterator()
  flops_per_token = cfg.flops_per_token(d.seq_len, include_mtp=mtp_weight(cfg, t) > 0)
  peak = t.peak_flops or peak_flops()
  print(f"model: {cfg.param_count(include_mtp=True):,} parameters "
        f"({cfg.active_param_count(include_mtp=True):,} active), layers {cfg.layer_types()}, "
        f"initialised in {init_s:.1f} s")
  print(f"train: {t.steps} steps x {d.batch_size} x {d.seq_len} tokens, {t.compute_dtype} compute,"
        f" {flops_per_token / 1e6:.2f} MFLOPs/token, device {jax.devices()[0].device_kind}")

  os.makedirs(t.out_dir, exist_ok=True)
  ckpt = Checkpointer(ckpt_dir, every=t.checkpoint_every, keep=t.keep_checkpoints,
                      async_save=t.async_checkpoint)
  try:
    if start:
      state, data_state = ckpt.restore(start, state)
      it.set_state(data_state)
      print(f"resumed from {ckpt_dir} step {start}")
    log = MetricsLog(os.path.join(t.out_dir, "metrics.jsonl"), start)
    step_fn = train_step(cfg, t, graphdef, constants, tx)
    state, tps = _train(step_fn, state, it, ckpt, log, exp, start, meta,
                        lambda tps: flops_per_token * tps / peak if peak else None)
  finally:
    ckpt.close()  # waits for the last asynchronous save

  eval_batches = data.eval_batches()
  eval_loss = evaluate(graphdef, constants, state.params, state.expert_bias, eval_batches,
                       t.ce_chunk)
  fresh = data.train_iterator()
  unigram = unigram_baseline((next(fresh) for _ in range(t.unigram_batches)), eval_batches,
                             cfg.vocab_size)
  records = read_metrics(log.path)
  summary = {
      "steps": t.steps, "final_train_ce": records[-1]["ce"] if records else None,
      "eval_loss": eval_loss, "unigram_baseline": unigram, "tokens_per_s": tps,
      "mfu": flops_per_token * tps / peak if peak and tps else None,
  }
  print(f"eval loss {eval_loss:.4f} nats/token; unigram baseline {unigram:.4f}")
  if tps:
    print(f"steady-state {tps:,.0f} tokens/s" +
          (f", MFU {100 * summary['mfu']:.2f}% of {peak / 1e12:.0f} TFLOP/s" if peak else ""))
  mem = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")  # None on CPU
  if mem:
    summary["peak_device_bytes"] = mem
    print(f"peak device memory {mem / 2**30:.1f} GiB")
  if t.sample_tokens:
    summary["sample"] = _sample(nnx.merge(graphdef, state.params, state.expert_bias, constants),
                                data, eval_batches[0], t)
  png = os.path.join(t.out_dir, "loss_curve.png")
  if write_loss_curve(png, records, eval_loss=eval_loss, unigram=unigram):
    print(f"wrote {png}")
  with open(os.path.join(t.out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def _train(step_fn, state, it, ckpt: Checkpointer, log: MetricsLog, exp: Experiment, start: int,
           meta: dict, mfu):
  """Steps start..train.steps; returns the final state and the median steady tokens/s."""
  t, d = exp.train, exp.data
  tokens_per_step = d.batch_size * d.seq_len
  pending, steady = [], []
  t_last = time.perf_counter()
  bar = tqdm(total=t.steps, initial=start, disable=not t.progress, dynamic_ncols=True)
  for step in range(start, t.steps):
    state, metrics = step_fn(state, next(it))
    done = step + 1
    pending.append(metrics)
    if done % t.log_every and done != t.steps:
      ckpt.save(done, state, it.get_state(), meta)
      continue
    # Fetching the metrics is the only host sync: steps in between are dispatched back to back.
    host = jax.device_get(pending)
    tps = len(pending) * tokens_per_step / (time.perf_counter() - t_last)
    if done - len(pending) > start:  # a process's first interval includes compilation
      steady.append(tps)
    records = [{"step": done - len(host) + 1 + i, **jax.tree.map(lambda v: np.asarray(v).tolist(), m),
                "tokens_per_s": tps, "mfu": mfu(tps)} for i, m in enumerate(host)]
    log.write(records)
    bar.update(len(pending))
    bar.set_postfix_str(f"loss {records[-1]['ce']:.3f}, {tps:,.0f} tok/s")
    if not t.progress:
      print(_log_line(records[-1]), flush=True)
    pending, t_last = [], time.perf_counter()
    # Saved after the interval is timed: the final (forced, blocking) save is not training time;
    # a save at any other log step is counted in the next interval.
    ckpt.save(done, state, it.get_state(), meta, force=done == t.steps)
  bar.close()
  return state, (float(np.median(steady)) if steady else None)


def _sample(model: LingForCausalLM, data: Data, batch, t) -> str:
  """Continue the first (up to 32) tokens of the first eval document."""
  seg = batch["segment_ids"][0]
  n = int(min(32, np.argmax(seg != seg[0]) or len(seg)))
  prompt = batch["tokens"][:1, :n]
  out = np.asarray(generate(model, prompt, t.sample_tokens, temperature=t.sample_temperature,
                            seed=t.seed))
  if data.cfg.source == "synthetic":  # ids, not text
    text = f"{out[0, :n].tolist()}\u2502{out[0, n:].tolist()}"
  else:
    text = data.tokenizer.decode(out[0, :n]) + "\u2502" + data.tokenizer.decode(out[0, n:])
  print("sample (prompt\u2502continuation):\n" + text)
  return text
