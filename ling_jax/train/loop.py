"""`run(experiment)`: train, checkpoint, evaluate, sample and plot one run.

Order matters for bad input: the data (an empty corpus, an unreadable file, a tokenizer larger
than the vocabulary) and an existing checkpoint (its config, its step against train.steps) are
checked before anything is written, so a refused run leaves its output directory as it found it.

A run stops short with an error of train/errors.py: a non-finite loss or gradient norm stops it
before the state is saved (`NonFiniteError`), and Ctrl-C stops it between two steps once the
checkpoint being written is complete (`TrainingInterrupted`); either way the checkpoints on disk
are complete and finite, and re-running the same command resumes from the last one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ling_jax.config import LingConfig
from ling_jax.data.pipeline import Data, merge_row_states, row_state
from ling_jax.generate import generate
from ling_jax.model.ling import LingForCausalLM
from ling_jax.parallel import distributed
from ling_jax.train import sharding
from ling_jax.train.checkpoint import (Checkpointer, check_compatible, committed_steps,
                                       config_meta)
from ling_jax.train.config import Experiment, TrainConfig
from ling_jax.train.errors import NonFiniteError, RunRefused, TrainingInterrupted
from ling_jax.train.optim import optimizer, schedule
from ling_jax.train.report import (MetricsLog, peak_flops, read_metrics, unigram_baseline,
                                   write_loss_curve)
from ling_jax.train.step import make_eval_step, make_train_step


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

  make = sharding.model_factory(exp)
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


def evaluate(graphdef, constants, params, expert_bias, batches, ce_chunk: int = 4096,
             lay: sharding.Layout | None = None) -> float:
  """Mean next-token cross-entropy (nats) over the valid targets of `batches` (with `lay`: this
  process's rows of each, the step on its mesh; call it under that mesh's `jax.set_mesh`)."""
  shardings = None if lay is None else (lay.state, lay.batch)
  eval_step = make_eval_step(graphdef, constants, ce_chunk, shardings)
  total, n = 0.0, 0.0
  for b in batches:
    if lay is not None:
      b = sharding.put_batch(b, lay, b["tokens"].shape[0] * _shards(lay))
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


def train_step(cfg: LingConfig, t: TrainConfig, graphdef, constants, tx,
               lay: sharding.Layout | None = None):
  """The jitted train step `t` asks for (loss weights, remat, CE chunking, bias updates), with
  `lay`'s shardings (train/sharding.py)."""
  return make_train_step(graphdef, constants, tx, schedule(t), mtp_weight=mtp_weight(cfg, t),
                         bias_rate=t.bias_update_rate, remat=t.remat,
                         ce_chunk=t.ce_chunk, grad_accum=t.grad_accum,
                         compute_dtype=t.compute_dtype,
                         shardings=None if lay is None else (lay.state, lay.batch))


def _shards(lay: sharding.Layout) -> int:
  """How many processes' rows make a batch (each process feeds an equal part)."""
  return jax.process_count() if lay.mesh.size > 1 else 1


class _Placed:
  """This process's rows of each batch (`Data(rows=...)`'s iterator) as global batches on the
  mesh; its position saved for the whole batch (`merge_row_states`), restored for its rows."""

  def __init__(self, it, lay: sharding.Layout, rows: slice, batch_size: int):
    self.it, self.lay, self.rows, self.batch_size = it, lay, rows, batch_size

  def __iter__(self):
    return self

  def __next__(self):
    return sharding.put_batch(next(self.it), self.lay, self.batch_size)

  def get_state(self) -> dict:
    parts = distributed.allgather_json([self.rows.start, self.rows.stop, self.it.get_state()])
    return merge_row_states([(slice(a, b), state) for a, b, state in parts])

  def set_state(self, state: dict) -> None:
    self.it.set_state(row_state(state, self.rows, self.batch_size))


@contextlib.contextmanager
def _sigint_sets(stop: threading.Event):
  """Within the block, Ctrl-C (SIGINT) sets `stop` instead of raising KeyboardInterrupt wherever
  the main thread happens to be (inside an Orbax save, that left a half-run save and its writer
  threads alive at exit, where the process could abort). The training loop reads `stop` between
  steps. A second Ctrl-C gets the previous handler back: KeyboardInterrupt at once."""
  if threading.current_thread() is not threading.main_thread():  # signals reach the main thread
    yield
    return
  previous = signal.getsignal(signal.SIGINT)
  if previous in (signal.SIG_IGN, None):  # ignored (e.g. a background job), or not Python's
    yield
    return

  def handler(signum, frame):
    stop.set()
    signal.signal(signal.SIGINT, previous)
    print("\nCtrl-C: stopping after this step, once the checkpoint being written is complete "
          "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

  signal.signal(signal.SIGINT, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)


def _last(ckpt_dir: str) -> int | None:
  steps = committed_steps(ckpt_dir)
  return steps[-1] if steps else None


def _resume_hint(ckpt_dir: str, t: TrainConfig) -> str:
  last = _last(ckpt_dir)
  if last is None:
    return (f"no checkpoint was written yet (train.checkpoint_every={t.checkpoint_every}): "
            "re-running the same command starts over")
  return f"the last checkpoint is step {last} under {ckpt_dir}; re-run the same command to resume"


def run(exp: Experiment) -> dict:
  """Train `exp` (resuming from its out_dir's last checkpoint), then evaluate and report.

  On the mesh of `exp.mesh` over every process's devices (several processes join first:
  ling_jax.parallel.distributed.initialize); each process loads its rows of every batch."""
  cfg, t, d = exp.model, exp.train, exp.data
  distributed.initialize()
  meta = config_meta(exp)
  ckpt_dir = os.path.abspath(os.path.join(t.out_dir, "checkpoints"))
  start = check_compatible(ckpt_dir, meta) or 0
  if start > t.steps:
    # Evaluating the checkpoint under a summary that says train.steps would report a model of
    # start steps as one of t.steps: refused, before anything is built or written.
    raise RunRefused(f"checkpoint at step {start} under {ckpt_dir} > train.steps={t.steps}: "
                     "nothing to train; use another train.out_dir for a new run, or a "
                     f"train.steps above {start} to train on")
  if start == t.steps:
    print(f"checkpoint at step {start} = train.steps: nothing to train; evaluating it (a larger "
          "train.steps trains on, another train.out_dir starts a new run)")
  # (The mesh is not part of the checkpoint's config: a run resumes onto any mesh.)
  mesh = sharding.mesh_for(exp)  # a mesh that cannot hold the model or batch: refused here
  rows = distributed.process_batch_slice(d.batch_size, mesh)
  data = Data(d, cfg.vocab_size, rows=rows)

  tx = optimizer(t)
  lay = sharding.layout(exp, mesh, tx)
  # Before anything is built or compiled: the state a device will hold, refused if too large.
  print(sharding.memory_line(lay, tx))
  t0 = time.perf_counter()
  if start:  # the state comes from the checkpoint: initialising it too would hold two copies
    constants = sharding.init_constants(exp, lay)
    state = sharding.abstract_train_state(lay, tx)
    source = "built (its state restored from the checkpoint)"
  else:
    if t.init_from:
      from ling_jax.train.init_from import load_initial
      params, expert_bias, constants = load_initial(exp, lay)
      source = f"loaded from {t.init_from}"
    else:
      params, expert_bias, constants = sharding.init_model_state(exp, lay, build_model)
      source = "initialised"
    state = sharding.init_train_state(params, expert_bias, tx, lay)
  graphdef = lay.graphdef
  jax.block_until_ready((state, constants))
  init_s = time.perf_counter() - t0
  it = _Placed(data.train_iterator(), lay, rows, d.batch_size)
  flops_per_token = cfg.flops_per_token(d.seq_len, include_mtp=mtp_weight(cfg, t) > 0)
  peak = t.peak_flops or peak_flops()
  print(f"model: {cfg.param_count(include_mtp=True):,} parameters "
        f"({cfg.active_param_count(include_mtp=True):,} active), layers {cfg.layer_types()}, "
        f"{source} in {init_s:.1f} s")
  print(f"train: {t.steps} steps x {d.batch_size} x {d.seq_len} tokens, {t.compute_dtype} compute,"
        f" {flops_per_token / 1e6:.2f} MFLOPs/token, {mesh.size} x "
        f"{jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}")

  os.makedirs(t.out_dir, exist_ok=True)
  ckpt = Checkpointer(ckpt_dir, every=t.checkpoint_every, keep=t.keep_checkpoints,
                      async_save=t.async_checkpoint)
  stop = threading.Event()
  try:
    with _sigint_sets(stop), jax.set_mesh(mesh):
      try:
        if start:
          state, data_state = ckpt.restore(start, state)
          it.set_state(data_state)
          print(f"resumed from {ckpt_dir} step {start}")
        log = _metrics_log(os.path.join(t.out_dir, "metrics.jsonl"), start)
        step_fn = train_step(cfg, t, graphdef, constants, tx, lay)
        state, tps, done = _train(step_fn, state, it, ckpt, log, exp, start, meta,
                                  lambda tps: flops_per_token * tps / peak if peak else None,
                                  stop)
      except KeyboardInterrupt:
        raise
      except BaseException:
        ckpt.close()
        raise
      ckpt.close()  # waits for the last asynchronous save
  except KeyboardInterrupt:
    # A second Ctrl-C: no waiting for a save in flight (Orbax renames a step's directory only
    # once it is complete; the next run removes the temporary one).
    raise TrainingInterrupted("interrupted again: a checkpoint being written was abandoned; "
                              + _resume_hint(ckpt_dir, t), None, _last(ckpt_dir)) from None
  if stop.is_set():
    raise TrainingInterrupted(f"interrupted at step {done}; " + _resume_hint(ckpt_dir, t), done,
                              _last(ckpt_dir))

  with jax.set_mesh(mesh):
    eval_loss = evaluate(graphdef, constants, state.params, state.expert_bias,
                         data.eval_batches(), t.ce_chunk, lay)
  # The baseline counts every row of the batches (this process's alone would differ by process).
  whole = slice(None)
  fresh = data.train_iterator(whole)
  eval_batches = data.eval_batches(whole)
  unigram = unigram_baseline((next(fresh) for _ in range(t.unigram_batches)), eval_batches,
                             cfg.vocab_size)
  records = read_metrics(log.path) if log.path else []
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
                                data, eval_batches[0], t, mesh)
  if jax.process_index() == 0:  # the other processes write nothing but their checkpoint shards
    png = os.path.join(t.out_dir, "loss_curve.png")
    if write_loss_curve(png, records, eval_loss=eval_loss, unigram=unigram):
      print(f"wrote {png}")
    with open(os.path.join(t.out_dir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


class _NoLog:
  """The metrics log of a process other than the first: records are not written."""

  path = None

  def write(self, records: list[dict]) -> None:
    pass


def _metrics_log(path: str, start: int):
  return MetricsLog(path, start) if jax.process_index() == 0 else _NoLog()


def _train(step_fn, state, it, ckpt: Checkpointer, log: MetricsLog, exp: Experiment, start: int,
           meta: dict, mfu, stop: threading.Event):
  """Steps start..train.steps, or until `stop` is set; returns the state, the median steady
  tokens/s and the number of steps done."""
  t, d = exp.train, exp.data
  tokens_per_step = d.batch_size * d.seq_len
  pending, steady, tps, done = [], [], None, start
  if start >= t.steps:
    return state, None, start
  with tqdm(total=t.steps, initial=start, disable=not t.progress, dynamic_ncols=True) as bar:
    t_last = time.perf_counter()
    for step in range(start, t.steps):
      if stop.is_set():
        break
      if step == start:
        # The first call traces and compiles the step (tens of seconds, minutes for large
        # models): said before it starts, so that a still terminal is not taken for a hang.
        _say(bar, "compiling the train step...")
        bar.set_description_str("compiling")
      state, metrics = step_fn(state, next(it))
      done = step + 1
      if step == start:
        bar.set_description_str("")
        _say(bar, f"compiled the train step in {time.perf_counter() - t_last:.1f} s")
      pending.append(metrics)
      save = ckpt.due(done) or done == t.steps
      if done % t.log_every and not save:
        continue
      # Fetching the metrics is the only host sync besides saving: steps in between are dispatched
      # back to back. They are fetched at every save too (which syncs anyway), so each step's loss
      # and gradient norm is checked before any state after it is saved.
      tps = len(pending) * tokens_per_step / (time.perf_counter() - t_last)
      if done - len(pending) > start:  # a process's first interval includes compilation
        steady.append(tps)
      records = _records(pending, done, tps, mfu)
      _log_checked(records, log, ckpt, t)
      bar.update(len(pending))
      bar.set_postfix_str(f"loss {records[-1]['ce']:.3f}, {tps:,.0f} tok/s")
      if not t.progress and (done % t.log_every == 0 or done == t.steps):
        print(_log_line(records[-1]), flush=True)
      pending, t_last = [], time.perf_counter()
      # Saved after the interval is timed: the final (forced, blocking) save is not training time;
      # a save at any other step is counted in the next interval.
      if save:
        ckpt.save(done, state, it.get_state(), meta, force=done == t.steps)
    if pending:  # stopped by Ctrl-C: the steps run since the last fetch still go into the log
      _log_checked(_records(pending, done, None, mfu), log, ckpt, t)
  return state, (float(np.median(steady)) if steady else None), done


def _say(bar, line: str) -> None:
  """Print `line` above the progress bar (if any), now."""
  bar.write(line, file=sys.stdout)
  sys.stdout.flush()


def _records(pending: list, done: int, tps, mfu) -> list[dict]:
  """The metrics of the steps up to `done` (fetched from the device), as metrics.jsonl records."""
  host = jax.device_get(pending)
  return [{"step": done - len(host) + 1 + i, **jax.tree.map(lambda v: np.asarray(v).tolist(), m),
           "tokens_per_s": tps, "mfu": mfu(tps) if tps else None} for i, m in enumerate(host)]


def _log_checked(records: list[dict], log: MetricsLog, ckpt: Checkpointer, t: TrainConfig):
  """Append `records` to the log, up to the first with a non-finite loss or gradient norm, and
  then raise `NonFiniteError`: the state after that step must not be saved or trained on."""
  bad = next((r for r in records if not (math.isfinite(r["loss"]) and
                                         math.isfinite(r["grad_norm"]))), None)
  log.write(records if bad is None else records[:records.index(bad) + 1])
  if bad is None:
    return
  last = ckpt.wait()
  where = (f"The last checkpoint, step {last} under {ckpt.directory}, is kept: re-run with a lower "
           f"train.learning_rate (now {t.learning_rate}) or more train.warmup_steps to resume from "
           "it (if that diverges at once too, the checkpoint was already far off: use another "
           "train.out_dir)" if last is not None else "No checkpoint was written")
  raise NonFiniteError(f"training diverged at step {bad['step']}: loss {bad['loss']}, gradient "
                       f"norm {bad['grad_norm']}; stopped without saving it. {where}")


def _sample(model: LingForCausalLM, data: Data, batch, t, mesh=None) -> str:
  """Continue the first (up to 32) tokens of the first eval document (on `mesh`)."""
  seg = batch["segment_ids"][0]
  n = int(min(32, np.argmax(seg != seg[0]) or len(seg)))
  prompt = batch["tokens"][:1, :n]
  new = generate(model, prompt, t.sample_tokens, temperature=t.sample_temperature,
                 seed=t.seed, mesh=mesh).sequences()[0]
  if data.cfg.source == "synthetic":  # ids, not text
    text = f"{prompt[0].tolist()}\u2502{new}"
  else:
    text = data.tokenizer.decode(prompt[0]) + "\u2502" + data.tokenizer.decode(new)
  print("sample (prompt\u2502continuation):\n" + text)
  return text
