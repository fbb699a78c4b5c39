"""Meshes, their checks, strict parameter shardings, per-device memory, and the distributed
helpers in one process (ling_jax.parallel.{mesh, memory, distributed}, ling_jax.axes)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ling_jax import axes as ax
from ling_jax.config import ling_2_6_flash, ling_tiny
from ling_jax.convert import load, store
from ling_jax.hf_config import to_hf_config
from ling_jax.model import LingForCausalLM
from ling_jax.model.common import CHECKPOINTED
from ling_jax.parallel import distributed, memory
from ling_jax.parallel.mesh import MeshConfig, build_mesh, check_mesh

N = len(jax.devices())  # 8 (tests/conftest.py)


def _abstract(cfg):  # the checkpointed variables, without the Lightning decays (constants)
  return nnx.state(nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0))), CHECKPOINTED)


def _flat(tree):
  return {".".join(map(str, p)): (v.get_value() if isinstance(v, nnx.Variable) else v)
          for p, v in nnx.to_flat_state(tree)}


# ---------------------------------------------------------------------- MeshConfig, build_mesh
def test_mesh_config_resolves_the_absorbing_axis():
  assert MeshConfig().resolve(N) == dict(data=N, fsdp=1, expert=1, tensor=1)
  assert MeshConfig(data=1, fsdp=-1).resolve(N) == dict(data=1, fsdp=N, expert=1, tensor=1)
  assert MeshConfig(fsdp=2, tensor=2).resolve(N) == dict(data=N // 4, fsdp=2, expert=1, tensor=2)
  mesh = build_mesh(MeshConfig(data=1, expert=-1, tensor=2))
  assert dict(mesh.shape) == dict(data=1, fsdp=1, expert=N // 2, tensor=2)
  assert mesh.devices.size == N


@pytest.mark.parametrize("kwargs, match", [
    (dict(data=-1, fsdp=-1), "data and fsdp are both -1"),
    (dict(tensor=0), "tensor=0"),
    (dict(expert=-2), "expert=-2"),
    (dict(fsdp=True), "fsdp=True"),
    (dict(fsdp=2.0), "fsdp=2.0"),
])
def test_mesh_config_refuses_bad_sizes(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MeshConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(data=2, fsdp=8), f"data=2 x fsdp=8 x expert=1 x tensor=1 needs 16 devices; only {N}"),
    (dict(data=-1, tensor=3), f"devices do not divide the {N} present"),
    (dict(data=1, fsdp=4), f"uses 4 of the {N} devices"),
])
def test_build_mesh_refuses_a_mesh_the_devices_do_not_fill(kwargs, match):
  with pytest.raises(ValueError, match=match):
    build_mesh(MeshConfig(**kwargs))


# ---------------------------------------------------------------------- check_mesh
def test_check_mesh_accepts_the_meshes_the_tests_use():
  cfg = ling_tiny()
  for kwargs in [dict(fsdp=2, expert=2, tensor=2), dict(fsdp=2, tensor=4), dict(expert=8),
                 dict(data=1, fsdp=-1)]:
    check_mesh(cfg, build_mesh(MeshConfig(**kwargs)), batch_size=8)
  # Flash on 8-way tensor, fsdp and expert axes alike.
  for kwargs in [dict(tensor=4, fsdp=2), dict(data=1, fsdp=-1), dict(data=1, expert=-1)]:
    check_mesh(ling_2_6_flash(), build_mesh(MeshConfig(**kwargs)), batch_size=16)


def _mesh(devices, **sizes):
  return build_mesh(MeshConfig(data=1, **sizes), jax.devices()[:devices])


@pytest.mark.parametrize("cfg, mesh, batch, match", [
    (ling_tiny(), lambda: _mesh(8, tensor=8), None,
     r"mesh axis 'tensor' of size 8 does not divide num_attention_heads=4"),
    (ling_tiny(), lambda: _mesh(3, expert=3), None,
     r"mesh axis 'expert' of size 3 does not divide num_experts=8"),
    (ling_tiny(num_attention_heads=6, group_norm_size=3), lambda: _mesh(2, tensor=2), None,
     r"'tensor' of size 2 splits GroupRMSNorm's group_norm_size=3 groups"),
    (ling_tiny(), lambda: build_mesh(MeshConfig()), 6,
     r"batch of 6 rows does not split over data=8 x fsdp=1 x expert=1 = 8 devices"),
    (ling_tiny(), lambda: _mesh(6, fsdp=3, expert=2), 4,
     r"'fsdp' of size 3 does not divide hidden_size=64.*"
     r"batch of 4 rows does not split over data=1 x fsdp=3 x expert=2 = 6"),
])
def test_check_mesh_names_the_axis_and_sizes(cfg, mesh, batch, match):
  with pytest.raises(ValueError, match=match):
    check_mesh(cfg, mesh(), batch)


def test_check_mesh_follows_the_rules_table():
  # Pure data parallelism splits no parameter: a tensor axis that cannot split the heads is fine.
  check_mesh(ling_tiny(), _mesh(8, tensor=8), rules=ax.RULES_DP)


def test_restore_onto_an_impossible_mesh_fails_before_reading(tmp_path):
  """The marker alone: were load to reach Orbax, it would fail on the missing state instead."""
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / store.MARKER).write_text(json.dumps(
      {"format": store.FORMAT, "config": to_hf_config(ling_tiny()), "dtype": "float32"}))
  before = sorted(os.listdir(ckpt))
  with pytest.raises(ValueError, match="'tensor' of size 8 does not divide num_attention_heads=4"):
    load(ckpt, _mesh(8, tensor=8))
  assert sorted(os.listdir(ckpt)) == before and sorted(os.listdir(tmp_path)) == ["ckpt"]


# ---------------------------------------------------------------------- state_shardings
def test_state_shardings_refuses_to_replicate_a_large_parameter():
  cfg = ling_tiny(vocab_size=5001)  # embeddings 5001 x 64 fp32 = 1.2 MiB; tensor=2 cannot split
  state = _abstract(cfg)
  mesh = _mesh(8, fsdp=4, tensor=2)
  with pytest.raises(ValueError, match=r"2 parameter dimension\(s\).*lm_head \[64, 5001\] "
                     r"\(1\.2 MiB\): mesh axis 'tensor' of size 2 does not divide its logical "
                     r"axis 'vocab' of size 5001.*word_embeddings \[5001, 64\]"):
    ax.state_shardings(state, mesh)
  flat = _flat(ax.state_shardings(state, mesh, allow_replicated=["lm_head", "word_*"]))
  assert flat["word_embeddings"].spec == P(None, "fsdp")
  assert flat["lm_head"].spec == P("fsdp", None)


def test_state_shardings_lets_small_parameters_stay_whole():
  # kv_lora_rank=12 on fsdp=8: kv_b_proj [12, 4, 32] (6 KiB) keeps its latent dim whole.
  state = _abstract(ling_tiny(kv_lora_rank=12))
  mesh = _mesh(8, fsdp=8)
  flat = _flat(ax.state_shardings(state, mesh))
  assert flat["mtp.layer.attention.kv_b_proj"].spec == P(None, "tensor", None)
  with pytest.raises(ValueError, match=r"kv_b_proj \[12, 4, 32\].*'fsdp' of size 8 does not "
                     r"divide its logical axis 'kv_lora' of size 12"):
    ax.state_shardings(state, mesh, replicate_below_bytes=1024)


def test_no_large_flash_parameter_is_replicated_under_fsdp():
  state = _abstract(ling_2_6_flash())
  flat_state = _flat(state)
  for path, s in _flat(ax.state_shardings(state, _mesh(8, fsdp=8))).items():
    v = flat_state[path]
    if v.size * v.dtype.itemsize >= ax.REPLICATE_BELOW_BYTES:
      assert "fsdp" in s.spec, (path, v.shape, s.spec)


# ---------------------------------------------------------------------- memory
def test_flash_per_device_bytes_fall_with_fsdp_and_expert_sharding():
  cfg = ling_2_6_flash()
  state = _abstract(cfg)
  total = cfg.param_count(include_mtp=True) * 4  # fp32
  tx = optax.adamw(1e-3)
  est = {}
  for name, kwargs in [("dp", dict()), ("fsdp", dict(data=1, fsdp=-1)),
                       ("ep", dict(data=1, expert=-1))]:
    shardings = ax.state_shardings(state, build_mesh(MeshConfig(**kwargs)))
    est[name] = memory.estimate(state, shardings, tx=tx)
    # AdamW: two moments shaped and sharded like the parameters, and a replicated int32 step.
    assert est[name].opt_state == 2 * est[name].params + 4
  assert est["dp"].params == total  # 400.4 GiB on every device
  assert 1 / 8 <= est["fsdp"].params / total < 1.001 / 8  # 50.1 GiB: only norms stay whole
  names = _flat(ax.logical_axes(state))
  expert_bytes = sum(v.size * 4 for p, v in _flat(state).items() if ax.EXPERT in names[p])
  assert expert_bytes / total > 0.9
  # 64.3 GiB: the routed experts (and their router columns) split 8 ways, everything else whole.
  assert est["ep"].params == total - expert_bytes + expert_bytes // 8
  text = est["fsdp"].report(80 * 2**30)
  assert "parameters 50.1 GiB, optimizer state 100.1 GiB" in text and "of 80.0 GiB" in text
  with pytest.raises(memory.DoesNotFit, match=r"total 150\.2 GiB of 80\.0 GiB \(188%\)"):
    memory.check_fits(est["fsdp"], 80 * 2**30)
  inference = memory.estimate(state, ax.state_shardings(state, _mesh(8, fsdp=8)))
  assert "total 50.1 GiB of 80.0 GiB" in memory.check_fits(inference, 80 * 2**30)
  assert memory.check_fits(est["dp"])  # CPU: no memory limit known, nothing refused


def test_cache_bytes_follow_their_shardings():
  mesh = _mesh(8, fsdp=8)
  cache = {"a": jax.ShapeDtypeStruct((8, 64, 32), jnp.bfloat16),
           "b": jax.ShapeDtypeStruct((3, 8, 4, 16, 16), jnp.float32)}
  split = {"a": NamedSharding(mesh, P("fsdp")), "b": NamedSharding(mesh, P(None, "fsdp"))}
  whole = (8 * 64 * 32 * 2 + 3 * 8 * 4 * 16 * 16 * 4)
  assert memory.per_device_bytes(cache, split) == whole // 8
  assert memory.per_device_bytes(cache, NamedSharding(mesh, P())) == whole
  state = _abstract(ling_tiny())
  est = memory.estimate(state, ax.state_shardings(state, mesh), cache=cache, cache_shardings=split)
  assert est.cache == whole // 8 and est.opt_state == 0


def test_compiled_adamw_step_memory_matches_the_estimate_and_falls_with_fsdp():
  """XLA's own count of a sharded AdamW update's arguments (params, grads, two moments, step)."""
  state = _abstract(ling_tiny(num_hidden_layers=2))
  tx = optax.adamw(1e-3)
  opt = jax.eval_shape(tx.init, state)

  def update(params, grads, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  args = {}
  for name, kwargs in [("dp", dict()), ("fsdp", dict(data=1, fsdp=-1)),
                       ("ep", dict(data=1, expert=-1))]:
    shardings = ax.state_shardings(state, build_mesh(MeshConfig(**kwargs)))
    opt_shardings = memory.optimizer_shardings(opt, state, shardings)
    step = jax.jit(update, in_shardings=(shardings, shardings, opt_shardings),
                   out_shardings=(shardings, opt_shardings), donate_argnums=(0, 2))
    compiled = step.lower(state, state, opt).compile({"xla_backend_optimization_level": 0})
    args[name] = compiled.memory_analysis().argument_size_in_bytes
    est = memory.estimate(state, shardings, tx=tx)
    assert args[name] == 2 * est.params + est.opt_state, name
  # ling_tiny (2 layers): 3.59 MB replicated, 0.46 MB with fsdp=8, 2.19 MB with expert=8.
  assert 1 / 8 <= args["fsdp"] / args["dp"] < 1.05 / 8
  assert args["ep"] < 0.65 * args["dp"]


# ---------------------------------------------------------------------- distributed, one process
@pytest.mark.parametrize("env, match", [
    ({"JAX_NUM_PROCESSES": "2"}, r"JAX_PROCESS_ID=None: expected an integer >= 0"),
    ({"JAX_NUM_PROCESSES": "two"}, r"JAX_NUM_PROCESSES='two'"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"JAX_PROCESS_ID=2 must be < "),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, r"JAX_COORDINATOR_ADDRESS='': expected"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "host"},
     r"JAX_COORDINATOR_ADDRESS='host'"),
])
def test_initialize_names_the_bad_variable(env, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(env=env)
  assert not jax.distributed.is_initialized()


def test_initialize_is_a_no_op_for_one_process():
  assert not distributed.initialize(env={})
  assert not distributed.initialize(env={"JAX_NUM_PROCESSES": "1"})
  assert not distributed.initialize(env={"SLURM_NTASKS": "1"})
  assert not jax.distributed.is_initialized()


def test_one_process_holds_the_whole_batch():
  mesh = build_mesh(MeshConfig(fsdp=2, tensor=2))
  assert distributed.process_batch_slice(12, mesh) == slice(0, 12)
  with pytest.raises(ValueError, match="batch of 6 rows does not split over the mesh's 4-way"):
    distributed.process_batch_slice(6, mesh)
  x = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
  g = distributed.global_batch({"x": x}, mesh, 12)["x"]
  np.testing.assert_array_equal(np.asarray(g), x)
  assert g.sharding.spec == P(("data", "fsdp", "expert"))
  assert g.addressable_shards[0].data.shape == (3, 5)
