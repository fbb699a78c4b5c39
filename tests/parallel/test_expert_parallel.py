"""Expert-parallel routed experts (ling_jax/parallel) on 8 fake CPU devices against the single-device
computation: output, every gradient and the expert loads, per mesh and exchange strategy; the
padded exchange against ragged_all_to_all's documented semantics; capacity; bad input."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ling_jax import axes as ax
from ling_jax.model.router import expert_load
from ling_jax.parallel.exchange import ragged_all_to_all
from ling_jax.parallel.expert import expert_parallel_experts, fill_empty
from pallas_kernels.moe import (routed_experts_blocked, routed_experts_grouped,
                                routed_experts_reference)
from testing import ON_GPU, rel

E, D, F, N, X = 8, 32, 16, 64, 2


def onehot_experts(x, ids, w, wg, wu, wd):
  """A local expert function that takes empty slots (id E) itself: their one-hot row is zero."""
  combine = jnp.einsum("nx,nxe->ne", w, jax.nn.one_hot(ids, wg.shape[0], dtype=w.dtype))
  h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, wg)) * jnp.einsum("nd,edf->nef", x, wu)
  return jnp.einsum("ne,ned->nd", combine, jnp.einsum("nef,efd->ned", h, wd))


def problem(seed=0, skewed=False):
  """Fresh fp32 tokens, routing (X distinct experts per token, positive weights), experts and a
  random output cotangent. skewed: every token picks experts 0 and 1 (one or two devices get the
  whole group's tokens: the dropless worst case)."""
  k = jax.random.split(jax.random.key(seed), 7)
  ids = jnp.argsort(jax.random.uniform(k[1], (N, E)), axis=1)[:, :X].astype(jnp.int32)
  if skewed:
    ids = jnp.broadcast_to(jnp.arange(X, dtype=jnp.int32), (N, X))
  return dict(x=jax.random.normal(k[0], (N, D)), ids=ids,
              w=jax.random.uniform(k[2], (N, X), minval=0.1),
              wg=jax.random.normal(k[3], (E, D, F)) / D ** 0.5,
              wu=jax.random.normal(k[4], (E, D, F)) / D ** 0.5,
              wd=jax.random.normal(k[5], (E, F, D)) / F ** 0.5,
              r=jax.random.normal(k[6], (N, D)))


@functools.lru_cache
def _jitted_value_and_grads(experts):
  def loss(x, ids, w, wg, wu, wd, r):
    y, load = experts(x, ids, w, wg, wu, wd)
    return (y * r).sum(), (y, load)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4, 5), has_aux=True))


def value_and_grads(experts, p):
  """experts(x, ids, w, wg, wu, wd) -> (y, load): y, load and d(sum(y r)) / d(x, w, wg, wu, wd)."""
  (_, (y, load)), grads = _jitted_value_and_grads(experts)(
      *(p[k] for k in ("x", "ids", "w", "wg", "wu", "wd", "r")))
  return y, load, grads


def reference(x, ids, w, wg, wu, wd):
  return routed_experts_reference(x, ids, w, wg, wu, wd), expert_load(ids, E)


def single_device(p):
  return value_and_grads(reference, p)


MESHES = {"fsdp2_expert4": {"fsdp": 2, "expert": 4}, "expert2_tensor4": {"expert": 2, "tensor": 4},
          "expert8": {"expert": 8}, "data2_fsdp2_expert2": {"data": 2, "fsdp": 2, "expert": 2}}
DENSE = fill_empty(routed_experts_reference)
GROUPED = functools.partial(routed_experts_grouped, interpret=not ON_GPU)
CASES = [  # (mesh, strategy, local (None: the default, the XLA sorted path), skewed routing)
    ("fsdp2_expert4", "all_gather", None, False),
    ("expert2_tensor4", "all_gather", onehot_experts, False),
    ("expert8", "all_gather", DENSE, True),
    ("data2_fsdp2_expert2", "all_gather", onehot_experts, False),
    ("expert2_tensor4", "all_to_all", DENSE, False),
    ("expert8", "all_to_all", None, True),
    ("data2_fsdp2_expert2", "all_to_all", onehot_experts, False),
]


@pytest.mark.parametrize("mesh_name,strategy,local,skewed", CASES)
def test_matches_single_device(mesh_name, strategy, local, skewed):
  p = problem(seed=len(mesh_name), skewed=skewed)
  mesh = ax.make_mesh(MESHES[mesh_name])
  y, load, grads = value_and_grads(
      lambda *a: expert_parallel_experts(*a, mesh=mesh, strategy=strategy, local=local), p)
  y0, load0, grads0 = single_device(p)
  assert rel(y, y0) < 1e-5
  np.testing.assert_array_equal(load, load0)
  for name, g, g0 in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, grads0):
    assert rel(g, g0) < 1e-5, name
  token_sharding = jax.sharding.NamedSharding(mesh, P(("data", "fsdp", "expert"), None))
  assert y.sharding.is_equivalent_to(token_sharding, 2)


def test_grouped_local_in_interpret_mode():
  """The Pallas grouped-matmul experts as the local function (interpret mode on CPU)."""
  p = problem(seed=3)
  mesh = ax.make_mesh({"fsdp": 4, "expert": 2})
  y, load, grads = value_and_grads(lambda *a: expert_parallel_experts(
      *a, mesh=mesh, strategy="all_to_all", local=fill_empty(GROUPED)), p)
  y0, load0, grads0 = single_device(p)
  assert rel(y, y0) < 1e-5
  np.testing.assert_array_equal(load, load0)
  for g, g0 in zip(grads, grads0):
    assert rel(g, g0) < 1e-5


def numpy_ragged_all_to_all(operand, output, in_off, send, out_off, recv):
  """jax.lax.ragged_all_to_all's documented semantics over the leading (device) axis, in NumPy."""
  out = np.array(output)
  for i in range(operand.shape[0]):  # sender
    for j in range(operand.shape[0]):  # receiver
      assert recv[j, i] == send[i, j]
      rows = operand[i, in_off[i, j]:in_off[i, j] + send[i, j]]
      out[j, out_off[i, j]:out_off[i, j] + send[i, j]] = rows
  return out


def test_padded_exchange_has_ragged_all_to_all_semantics():
  """Random slices with gaps in both buffers, and rows of `output` left as they were."""
  n, S, R, cap = 4, 12, 16, 3
  rng = np.random.default_rng(0)
  send = rng.integers(0, cap + 1, (n, n))
  in_off = np.cumsum(send, 1) - send + rng.integers(0, 2, (n, n)).cumsum(1)  # gaps between slices
  out_off = np.cumsum(send, 0) - send + rng.integers(0, 2, (n, n)).cumsum(0)
  assert (in_off + send).max() <= S and (out_off + send).max() <= R
  operand = rng.normal(size=(n, S, 2)).astype(np.float32)
  output = rng.normal(size=(n, R, 2)).astype(np.float32)
  mesh = jax.make_mesh((n,), ("e",), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))

  def body(a, o, io, s, oo, r):
    return ragged_all_to_all(a[0], o[0], io[0], s[0], oo[0], r[0], axis_name="e", max_send=cap,
                             padded=True)[None]

  run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("e"), out_specs=P("e")))
  i32 = lambda a: jnp.asarray(a, jnp.int32)
  got = run(operand, output, i32(in_off), i32(send), i32(out_off), i32(send.T))
  want = numpy_ragged_all_to_all(operand, output, in_off, send, out_off, send.T)
  np.testing.assert_array_equal(got, want)


def _fullest_device(p):
  """Rows the fullest device of {fsdp 2, expert 4} receives under p's routing (< ep n = 32)."""
  ids = np.asarray(p["ids"]).reshape(2, 32, X)  # [group (fsdp), its tokens, X]
  owners = (ids[..., None] // (E // 4) == np.arange(4)).any(2)  # [group, token, device]
  return int(owners.sum(1).max())


def _capacity_run(slack):
  """all_to_all on {fsdp 2, expert 4}, capacity `slack` rows over the fullest device's rows:
  (y, single-device y)."""
  p = problem(seed=5)
  args = (p["x"], p["ids"], p["w"], p["wg"], p["wu"], p["wd"])
  mesh = ax.make_mesh({"fsdp": 2, "expert": 4})
  y, _ = jax.jit(lambda *a: expert_parallel_experts(
      *a, mesh=mesh, strategy="all_to_all", capacity=_fullest_device(p) + slack,
      local=onehot_experts))(*args)
  return y, routed_experts_reference(*args)


def test_capacity_that_fits_the_fullest_device_is_exact():
  assert _fullest_device(problem(seed=5)) < 32  # the capacity is below the dropless buffer
  y, y0 = _capacity_run(0)
  assert rel(y, y0) < 1e-5


def test_capacity_overflow_raises():
  """In a subprocess: the failed callbacks stay in jax's runtime tokens for the process' life."""
  code = "import jax, test_expert_parallel as t\njax.block_until_ready(t._capacity_run(-1))\n"
  run = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__),
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                       capture_output=True, text=True, timeout=300)
  rows = _fullest_device(problem(seed=5))
  assert run.returncode != 0
  assert f"over capacity: {rows} rows routed to one device, capacity {rows - 1}" in run.stderr


@pytest.mark.parametrize("change,kwargs,message", [
    (dict(E=6), {}, "6 experts do not divide over mesh axis 'expert' of size 4"),
    (dict(N=36), {}, r"36 tokens do not divide over the token axes \{'data': 1, 'fsdp': 2, "
                     r"'expert': 4\} \(8 shards\)"),
    ({}, dict(token_axes=("data", "fsdp")), "must include the expert axis 'expert'"),
    ({}, dict(strategy="ragged"), "unknown expert-parallel strategy 'ragged'"),
    ({}, dict(strategy="all_gather", capacity=8), "'all_gather' takes none"),
    (dict(F=6, mesh={"expert": 2, "tensor": 4}), {},
     "expert width F = 6 does not divide over mesh axis 'tensor' of size 4"),
    ({}, dict(token_axes=("expert", "tensor")), "tensor axis 'tensor' splits the experts' width"),
])
def test_bad_input_names_the_axis_and_sizes(change, kwargs, message):
  n, e, f = change.get("N", N), change.get("E", E), change.get("F", F)
  x, ids, w = jnp.ones((n, D)), jnp.zeros((n, X), jnp.int32), jnp.ones((n, X))
  wg, wd = jnp.ones((e, D, f)), jnp.ones((e, f, D))
  mesh = ax.make_mesh(change.get("mesh", {"fsdp": 2, "expert": 4}))
  with pytest.raises(ValueError, match=message):
    expert_parallel_experts(x, ids, w, wg, wg, wd, mesh=mesh, **kwargs)


@pytest.mark.skipif(ON_GPU, reason="XLA:GPU has a ragged all-to-all")
def test_ragged_all_to_all_on_cpu_says_to_use_the_padded_exchange():
  p = problem()
  with pytest.raises(ValueError, match="XLA:CPU has no ragged-all-to-all; 'all_to_all'"):
    expert_parallel_experts(p["x"], p["ids"], p["w"], p["wg"], p["wu"], p["wd"],
                            mesh=ax.make_mesh({"expert": 8}), strategy="ragged_all_to_all")


@pytest.mark.skipif(not ON_GPU or jax.device_count() < 2, reason="needs 2+ GPUs")
def test_ragged_all_to_all_gpu_matches_single_device():
  p = problem(seed=7)
  mesh = ax.make_mesh({"expert": 2}, devices=jax.devices()[:2])
  with jax.default_matmul_precision("highest"):  # fp32 dots, not TF32, on both sides
    y, load, grads = value_and_grads(lambda *a: expert_parallel_experts(
        *a, mesh=mesh, strategy="ragged_all_to_all", local=fill_empty(routed_experts_blocked)), p)
    y0, load0, grads0 = single_device(p)
  assert rel(y, y0) < 1e-5
  np.testing.assert_array_equal(load, load0)
  for g, g0 in zip(grads, grads0):
    assert rel(g, g0) < 1e-5
