"""Sharded training on 8 fake CPU devices against the single-device step (docs/parallelism.md):
for each mesh of the issue, one train step's loss, every gradient and the expert loads, ten
steps' losses, and the per-device memory XLA compiles for; the one-device mesh compiles today's
program; bad meshes are refused before anything is written. fp32, the XLA impls inside the
shard_map islands (the same islands the GPU runs with the Pallas kernels).

Compiling dominates: one test function per mesh checks everything for it, the single-device
reference is computed once per process, and XLA's backend optimisation is off.
"""

import contextlib
import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ling_jax.config import ling_tiny
from ling_jax.data import DataConfig, SyntheticIterator
from ling_jax.model import Kernels, Parallel
from ling_jax.model.ling import build_constants
from ling_jax.parallel import distributed, memory
from ling_jax.parallel.mesh import MeshConfig
from ling_jax.train import Experiment, TrainConfig
from ling_jax.train import loop, sharding
from ling_jax.train.step import init_state, split_model
from testing import random_model, rel, xla_flags

# Two layers (Lightning + MLA, both MoE) and MTP: 3 MoE layers of 8 experts, 4 heads in
# GroupRMSNorm groups of 2, vocabulary 256: every split of the meshes below applies.
CFG = ling_tiny(num_hidden_layers=2, first_k_dense_replace=0)
BATCH, SEQ, STEPS = 8, 16, 10
O0 = {"xla_backend_optimization_level": 0}
TRAIN = TrainConfig(steps=STEPS, learning_rate=1e-2, warmup_steps=0, compute_dtype="float32",
                    kernels=Kernels(), ce_chunk=32, bias_update_rate=1e-2, out_dir="unused")


def experiment(mesh: dict, exchange: str = "all_gather", grad_accum: int = 1) -> Experiment:
  train = dataclasses.replace(TRAIN, parallel=Parallel(exchange), grad_accum=grad_accum)
  return Experiment(CFG, DataConfig(source="synthetic", seq_len=SEQ, batch_size=BATCH), train,
                    MeshConfig(**{"data": 1, **mesh}))


def capturing(tx):
  """`tx` whose state also holds the latest gradient (read back after the step)."""
  def init(params):
    return jax.tree.map(jnp.zeros_like, params), tx.init(params)

  def update(grads, state, params=None):
    updates, inner = tx.update(grads, state[1], params)
    return updates, (grads, inner)

  return optax.GradientTransformation(init, update)


@functools.cache
def initial():
  """The run's first parameters, expert biases and constants as host arrays (drawn once, with
  norm scales and expert biases perturbed), and the batches."""
  # One compiled program (eager init compiles one per parameter shape).
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: random_model(CFG, seed=5)))
  model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(random_model(CFG, seed=5)),
                                      compiler_options=O0)())
  _, params, bias, constants = split_model(model)
  host = lambda s: jax.tree.map(np.asarray, s)
  it = SyntheticIterator(batch_size=BATCH, seq_len=SEQ, vocab_size=CFG.vocab_size, seed=2,
                         mean_doc_len=6)  # several documents a row: segment resets everywhere
  # One batch ten times: memorising it moves the loss by more than fresh batches would.
  return host(params), host(bias), host(constants), [next(it)] * STEPS


def train(exp: Experiment, mesh=None, generation: bool = True) -> dict:
  """Ten steps of `exp` from `initial()`; on `mesh` through train/sharding.py, else the
  single-device step. {losses, grads (step 1), loads, logits, tokens, the per-device bytes of
  the state and the batch, and XLA's for the compiled step}."""
  params, bias, constants, batches = initial()
  tx = capturing(loop.optimizer(exp.train))
  graphdef = nnx.graphdef(nnx.eval_shape(sharding.model_factory(exp)))
  if mesh is None:
    lay, state = None, init_state(*jax.tree.map(jnp.asarray, (params, bias)), tx)
    consts, put = jax.tree.map(jnp.asarray, constants), lambda b: b
  else:
    lay = sharding.layout(exp, mesh, tx)
    placed = distributed.host_to_global((params, bias, constants), lay.model)
    state = sharding.init_train_state(*placed[:2], tx, lay)
    consts, put = placed[2], lambda b: sharding.put_batch(b, lay, BATCH)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    step = loop.train_step(exp.model, exp.train, graphdef, consts, tx, lay)
    compiled = step.lower(state, put(batches[0])).compile(O0)
    model = nnx.merge(graphdef, state.params, state.expert_bias, consts)
    forward = jax.jit(lambda m, b: m.forward(b["tokens"], positions=b["positions"],
                                             segment_ids=b["segment_ids"], mtp=True),
                      compiler_options=O0)
    out = forward(model, put(batches[0]))
    result = {"loads": np.concatenate([out.expert_load, out.mtp_expert_load[None]]),
              "logits": np.asarray(out.logits),
              "xla_bytes": compiled.memory_analysis().argument_size_in_bytes}
    # The captured gradient is not read by the step, so XLA drops it from the arguments.
    kept = lambda s: (s.step, s.params, s.expert_bias, s.opt_state[1])
    if mesh is None:
      result["state_bytes"] = sum(x.nbytes for x in jax.tree.leaves(kept(state)))
      result["batch_bytes"] = sum(x.nbytes for x in jax.tree.leaves(batches[0]))
    else:
      result["state_bytes"] = memory.per_device_bytes(kept(state), kept(lay.state))
      result["batch_bytes"] = memory.per_device_bytes(put(batches[0]), lay.batch)
    prompt = batches[0]["tokens"][:, :6]
    # Generation ends up on `mesh` whatever the test's context: it places and traces itself.
    if generation:
      result["tokens"] = np.asarray(loop.generate(model, prompt, 4, mesh=mesh).tokens)
    losses = []
    for i, batch in enumerate(batches):
      state, metrics = compiled(state, put(batch))
      losses.append(float(metrics["loss"]))
      if i == 0:
        result["grads"] = {".".join(map(str, p)): np.asarray(getattr(v, "get_value", lambda: v)())
                           for p, v in nnx.to_flat_state(state.opt_state[0])}
  result["losses"] = np.array(losses)
  return result


COMPARED = ("losses", "grads", "loads", "logits", "tokens")


@pytest.fixture(autouse=True)
def _quick_compiles():
  """XLA's backend optimisation off for this module's programs (generation's jit included),
  and back on for the other tests in the process."""
  with unoptimised():
    yield


@contextlib.contextmanager
def unoptimised():
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@functools.cache
def reference() -> dict:
  return train(experiment({}), None)


def check(mesh_sizes: dict, exchange: str, grad_accum: int = 1, want: dict | None = None,
          generation: bool = True) -> dict:
  """Everything for one mesh against the single-device reference (`want`: given, or computed);
  returns the sharded run. `generation`: also greedy generation's tokens (its programs compile
  for a third of a mesh's time: checked on the meshes that split the model differently)."""
  exp = experiment(mesh_sizes, exchange, grad_accum)
  mesh = sharding.mesh_for(exp)
  got, want = train(exp, mesh, generation), want or reference()
  assert rel(got["losses"][0], want["losses"][0]) < 1e-5
  flat_got, flat_want = got["grads"], want["grads"]
  assert flat_got.keys() == flat_want.keys() and len(flat_want) > 40
  for path, g in flat_want.items():
    assert np.abs(g).max() > 0, path
    assert rel(flat_got[path], g) < 1e-5, (path, rel(flat_got[path], g))
  np.testing.assert_array_equal(got["loads"], want["loads"])
  assert got["loads"].sum() > 0
  assert rel(got["logits"], want["logits"]) < 1e-5
  # Ten steps of AdamW: summation order moves the updates by ~1e-7 of the weights, and the
  # losses follow each other to 1e-4 (they fall by ~0.3 over the ten steps).
  np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-4)
  assert want["losses"][-1] < want["losses"][0] - 0.1, want["losses"]
  if generation:
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
  # What XLA compiled the step for holds exactly the state and batch shards counted from the
  # shardings (ling_jax.parallel.memory, what a run prints before compiling).
  assert got["xla_bytes"] == got["state_bytes"] + got["batch_bytes"]
  if "xla_bytes" in want:
    assert want["xla_bytes"] == want["state_bytes"] + want["batch_bytes"]
  return got


def check_against_saved(mesh_sizes: dict, exchange: str, path: str) -> None:
  """`check` against a reference another process computed and saved (`save_reference`)."""
  jax.config.update("jax_disable_most_optimizations", True)  # a process of its own
  saved = dict(np.load(path))
  want = {k: saved[k] for k in COMPARED if k != "grads"}
  want["grads"] = {k[len("grad:"):]: v for k, v in saved.items() if k.startswith("grad:")}
  check(mesh_sizes, exchange, want=want)


def save_reference(path) -> None:
  want = reference()
  np.savez(path, **{k: want[k] for k in COMPARED if k != "grads"},
           **{f"grad:{k}": v for k, v in want["grads"].items()})


def test_data8():
  """The default mesh: every device a replica (generation is checked on the meshes that split
  the model)."""
  got = check({"data": 8}, "all_gather", generation=False)
  assert got["state_bytes"] == reference()["state_bytes"]  # replicated


def test_fsdp8():
  """FSDP over 8: every parameter, moment and captured gradient split 8 ways but the norms'
  scales and the expert biases, so a device holds 1/8 of the state."""
  got = check({"fsdp": 8}, "all_gather", generation=False)  # fsdp2_expert4 generates
  ratio = got["state_bytes"] / reference()["state_bytes"]
  assert 1 / 8 <= ratio < 1.03 / 8, ratio  # the norms (2.3% of this tiny model): whole


def test_fsdp2_expert4():
  """The routed experts (0.58 of the parameters) split 8 ways (experts 4 x width 2), the rest
  2 ways: a device holds 0.58 / 8 + 0.42 / 2 = 0.28 of the state."""
  got = check({"fsdp": 2, "expert": 4}, "all_to_all")
  ratio = got["state_bytes"] / reference()["state_bytes"]
  assert 0.26 < ratio < 0.30, ratio


def test_expert2_tensor4():
  check({"expert": 2, "tensor": 4}, "all_gather")


def test_data2_fsdp2_tensor2_with_micro_batches():
  """And grad_accum=2: each device splits its own rows into the micro-batches."""
  check({"data": 2, "fsdp": 2, "tensor": 2}, "all_gather", grad_accum=2, generation=False)


def test_all_four_axes_on_16_devices(tmp_path):
  """data 2 x fsdp 2 x expert 2 x tensor 2 needs 16 devices: a process of its own faking 16,
  checked against this process's single-device reference."""
  save_reference(tmp_path / "reference.npz")
  code = ("import test_parallel_train as t; t.check_against_saved({'data': 2, 'fsdp': 2, "
          f"'expert': 2, 'tensor': 2}}, 'all_to_all', {str(tmp_path / 'reference.npz')!r})")
  tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests]),
         "XLA_FLAGS": xla_flags(16)}
  proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(len(jax.devices("gpu") if jax.default_backend() == "gpu" else []) < 2,
                    reason="ragged_all_to_all has no XLA:CPU lowering (jax 0.11.2); it needs "
                    "2+ GPUs")
def test_ragged_all_to_all_on_gpus():
  n = len(jax.devices())
  check({"expert": 2, "data": n // 2}, "ragged_all_to_all")


# ---------------------------------------------------------------------- one device
def _canonical_jaxpr(jaxpr) -> str:
  """The jaxpr's text without what the mesh context only annotates: each nested jit's
  `ctx_mesh`, and shardings jax fills in over a one-device mesh (all of them size 1)."""
  from jax._src import core, mesh as mesh_lib

  def trivial(v):
    return isinstance(v, jax.sharding.NamedSharding) and v.mesh.size == 1

  def strip(j):
    eqns = []
    for e in j.eqns:
      params = {}
      for k, v in e.params.items():
        if k == "ctx_mesh":
          v = mesh_lib.empty_concrete_mesh
        elif trivial(v):
          v = None
        elif isinstance(v, core.ClosedJaxpr):
          v = v.replace(jaxpr=strip(v.jaxpr))
        elif isinstance(v, core.Jaxpr):
          v = strip(v)
        elif isinstance(v, tuple) and v and all(isinstance(x, core.ClosedJaxpr) for x in v):
          v = tuple(x.replace(jaxpr=strip(x.jaxpr)) for x in v)
        params[k] = v
      eqns.append(e.replace(params=params))
    return j.replace(eqns=eqns)

  return str(strip(jaxpr.jaxpr))


def _canonical_hlo(text: str) -> str:
  """Compiled HLO without source metadata and without the partitioner's annotations (the
  `sharding={...}` of each instruction and the header's propagation flags), which on one
  device change no instruction."""
  import re
  out, i = [], 0
  while (k := text.find(", sharding={", i)) >= 0:
    out.append(text[i:k])
    depth, j = 0, text.index("{", k)
    while True:
      depth += {"{": 1, "}": -1}.get(text[j], 0)
      j += 1
      if not depth:
        break
    i = j
  text = "".join(out) + text[i:]
  text = re.sub(r", metadata=\{[^}]*\}", "", text)
  text = re.sub(r", allow_spmd_sharding_propagation_to_\w+=\{[a-z,]*\}", "", text)
  # The stack-frame tables at the end (numbered file, function and frame lines) name the
  # Python frames the ops were traced in, which the mesh's code path changes.
  return "\n".join(l for l in text.splitlines() if not re.match(r"^\d+ [{\"]", l))


def test_a_one_device_mesh_compiles_the_single_device_program():
  """small_pretrain's shape of step (bf16 compute, gradient accumulation, chunked head) on a
  one-device mesh through train/sharding.py traces to the same jaxpr and compiles to the same
  HLO instructions as the step without any mesh: the islands and row constraints are absent,
  and what the shardings add are annotations only."""
  exp = experiment({}, grad_accum=2)
  exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, compute_dtype="bfloat16"))
  params, bias, constants, batches = initial()
  tx = loop.optimizer(exp.train)
  graphdef = nnx.graphdef(nnx.eval_shape(sharding.model_factory(exp)))
  state = init_state(*jax.tree.map(jnp.asarray, (params, bias)), tx)
  plain = loop.train_step(exp.model, exp.train, graphdef, jax.tree.map(jnp.asarray, constants),
                          tx).trace(state, batches[0])
  mesh = sharding.mesh_for(exp, jax.devices()[:1])
  lay = sharding.layout(exp, mesh, tx)
  placed = jax.device_put((params, bias, constants), lay.model)
  with jax.set_mesh(mesh):
    step = loop.train_step(exp.model, exp.train, graphdef, placed[2], tx, lay)
    meshed = step.trace(sharding.init_train_state(*placed[:2], tx, lay),
                        sharding.put_batch(batches[0], lay, BATCH))
    assert meshed.jaxpr.jaxpr.eqns and "shard_map" not in str(meshed.jaxpr)
    assert _canonical_jaxpr(meshed.jaxpr) == _canonical_jaxpr(plain.jaxpr)
    hlo = meshed.lower().compile().as_text()
  assert "sharding={" in hlo  # the annotations were there to remove
  assert _canonical_hlo(hlo) == _canonical_hlo(plain.lower().compile().as_text())
