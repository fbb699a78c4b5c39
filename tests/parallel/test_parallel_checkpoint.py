"""A sharded run's checkpoint and data on 8 fake CPU devices (docs/parallelism.md §5): a train
state saved on one mesh resumes onto another, each process's rows of the batch make the whole
batch and its iterator position, `train.init_from` takes a run's, an HF folder's or a converted
checkpoint's weights onto the run's mesh (and refuses FP8 experts), and bad meshes are refused
before anything is written. No train step is compiled here (tests/parallel/test_parallel_train.py
runs the steps)."""

import dataclasses

import jax
import numpy as np
import pytest

from ling_jax.config import ling_tiny
from ling_jax.convert import import_hf
from ling_jax.data import DataConfig, SyntheticIterator
from ling_jax.data.pipeline import merge_row_states, row_state
from ling_jax.parallel import distributed
from ling_jax.parallel.mesh import MeshConfig
from ling_jax.train import Experiment, TrainConfig, run
from ling_jax.train import sharding
from ling_jax.train.checkpoint import Checkpointer, config_meta
from ling_jax.train.errors import RunRefused
from ling_jax.train.init_from import load_initial
from ling_jax.train.optim import optimizer

CFG = ling_tiny(num_hidden_layers=2, first_k_dense_replace=0)
BATCH, SEQ = 8, 16


def experiment(mesh: dict, **train) -> Experiment:
  return Experiment(CFG, DataConfig(source="synthetic", seq_len=SEQ, batch_size=BATCH),
                    TrainConfig(compute_dtype="float32", **train),
                    MeshConfig(**{"data": 1, **mesh}))


def random_state(exp: Experiment, seed: int):
  """A train state of `exp` on its mesh, every leaf fresh random values; and the host copy."""
  mesh = sharding.mesh_for(exp)
  tx = optimizer(exp.train)
  lay = sharding.layout(exp, mesh, tx)
  abstract = sharding.abstract_train_state(lay, tx)
  rng = np.random.default_rng(seed)
  host = jax.tree.map(lambda s: (rng.integers(1, 100, s.shape) if s.dtype == np.int32 else
                                 rng.standard_normal(s.shape)).astype(s.dtype), abstract)
  return lay, distributed.host_to_global(host, lay.state), host


def _leaves_with_paths(tree):
  return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_a_checkpoint_resumes_onto_another_mesh(tmp_path):
  """Saved under fsdp 8; restored under tensor 2 x fsdp 4 and expert 4 x data 2: every leaf of
  the state (parameters, expert biases, both AdamW moments, the step) bit for bit, each placed
  as the new mesh's layout says, and the data position with it."""
  exp = experiment({"fsdp": 8})
  _, state, host = random_state(exp, 0)
  it = SyntheticIterator(batch_size=BATCH, seq_len=SEQ, vocab_size=CFG.vocab_size, seed=1)
  next(it), next(it)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), every=1, keep=1, async_save=False)
  ckpt.save(2, state, it.get_state(), config_meta(exp), force=True)
  ckpt.close()
  want = _leaves_with_paths(host)
  assert len(want) > 60
  for mesh in ({"tensor": 2, "fsdp": 4}, {"expert": 4, "data": 2}):
    other = experiment(mesh)
    tx = optimizer(other.train)
    lay = sharding.layout(other, sharding.mesh_for(other), tx)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), every=1, keep=1)
    got, data_state = ckpt.restore(2, sharding.abstract_train_state(lay, tx))
    ckpt.close()
    assert data_state == it.get_state()
    placed = jax.tree.leaves(lay.state, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    for (path, w), g, s in zip(want, jax.tree.leaves(got), placed):
      assert g.sharding == s, (mesh, path, g.sharding, s)
      np.testing.assert_array_equal(np.asarray(g), w, err_msg=path)
    # Something is split differently from the saving mesh (else the test would prove nothing).
    assert any(g.sharding.shard_shape(g.shape) != s.sharding.shard_shape(s.shape) for g, s in
               zip(jax.tree.leaves(got), jax.tree.leaves(state)))


def test_process_rows_make_the_batch_and_its_position():
  """Two processes' rows (as process_batch_slice gives them) of the synthetic stream are the
  whole batch's rows, and their iterator states merge into the whole batch's and split back."""
  whole = SyntheticIterator(batch_size=BATCH, seq_len=SEQ, vocab_size=CFG.vocab_size, seed=3)
  parts = [SyntheticIterator(batch_size=BATCH, seq_len=SEQ, vocab_size=CFG.vocab_size, seed=3,
                             rows=r) for r in (slice(0, 4), slice(4, 8))]
  for _ in range(2):
    want = next(whole)
    got = [next(p) for p in parts]
    for k in want:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], err_msg=k)
  merged = merge_row_states([(slice(4, 8), parts[1].get_state()),
                             (slice(0, 4), parts[0].get_state())])
  assert merged == whole.get_state()
  # The packed streams' state holds one entry per row: merged in row order, split back.
  rows = [{"parents": [{"r": 0}, {"r": 1}]}, {"parents": [{"r": 2}, {"r": 3}]}]
  merged = merge_row_states([(slice(2, 4), rows[1]), (slice(0, 2), rows[0])])
  assert merged == {"parents": [{"r": i} for i in range(4)]}
  assert row_state(merged, slice(2, 4), 4) == rows[1]
  with pytest.raises(ValueError, match="holds 4 rows; the batch has 8"):
    row_state(merged, slice(0, 4), 8)


def test_init_from_a_run_or_an_hf_folder_onto_the_runs_mesh(tmp_path):
  """`train.init_from`: a run's out_dir (its latest checkpoint) and an HF folder give their
  parameters and expert biases on this run's mesh; another model is refused, naming the field."""
  _, state, host = random_state(experiment({"fsdp": 8}), 1)
  ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"), every=1, keep=1, async_save=False)
  ckpt.save(3, state, {"step": 3}, config_meta(experiment({"fsdp": 8})), force=True)
  ckpt.close()
  exp = experiment({"tensor": 2, "expert": 4}, init_from=str(tmp_path / "run"))
  tx = optimizer(exp.train)
  lay = sharding.layout(exp, sharding.mesh_for(exp), tx)
  params, bias, constants = load_initial(exp, lay)
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  for got, want, where in ((params, host.params, lay.model[0]),
                           (bias, host.expert_bias, lay.model[1])):
    for g, w, s in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                       jax.tree.leaves(where, is_leaf=is_sharding)):
      assert g.sharding == s
      np.testing.assert_array_equal(np.asarray(g), w)
  assert jax.tree.leaves(constants)

  # The same weights written as an HF folder come back through the strict name map.
  import ling_jax
  from flax import nnx
  model = nnx.merge(lay.graphdef, *jax.tree.map(np.asarray, (params, bias, constants)))
  ling_jax.save_hf(model, CFG, str(tmp_path / "hf"))
  import_hf(tmp_path / "hf", tmp_path / "ckpt", np.float32, progress=False)
  # That folder, and converted from it (`convert import`: each device reads its shards).
  for source in ("hf", "ckpt"):
    start = dataclasses.replace(exp, train=dataclasses.replace(exp.train,
                                                               init_from=str(tmp_path / source)))
    got_params, got_bias, _ = load_initial(start, lay)
    for g, w in zip(jax.tree.leaves((got_params, got_bias)), jax.tree.leaves((params, bias))):
      assert g.sharding == w.sharding, source
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=source)

  wider = dataclasses.replace(exp, model=dataclasses.replace(CFG, moe_intermediate_size=64))
  with pytest.raises(RunRefused, match="holds another model: model.moe_intermediate_size: "
                     "there 32, now 64"):
    load_initial(wider, sharding.layout(wider, sharding.mesh_for(wider), tx))


@pytest.mark.parametrize("mesh, message", [
    ({"tensor": 3}, "mesh data=1 x fsdp=1 x expert=1 x tensor=3 uses 3 of the 8 devices"),
    ({"tensor": 16}, "needs 16 devices; only 8 are present"),
    ({"tensor": 8}, "mesh axis 'tensor' of size 8 does not divide num_attention_heads=4"),
    ({"data": 8}, "the batch of 4 rows does not split over data=8 x fsdp=1 x expert=1")])
def test_a_bad_mesh_is_refused_before_anything_is_written(tmp_path, mesh, message):
  """A mesh larger than the devices, one leaving devices idle, or one the heads, experts or
  batch do not divide: one RunRefused naming the axis and the sizes, and no out_dir."""
  out = tmp_path / "run"
  batch = 4 if "batch" in message else BATCH
  exp = dataclasses.replace(experiment(mesh, out_dir=str(out)),
                            data=DataConfig(source="synthetic", seq_len=SEQ, batch_size=batch))
  with pytest.raises(RunRefused) as e:
    run(exp)
  assert message in str(e.value), str(e.value)
  assert not out.exists()


def test_init_from_a_checkpoint_with_fp8_experts_is_refused(tmp_path):
  """A `convert import --keep-fp8` checkpoint holds e4m3 experts that training cannot update:
  refused, saying how to import it for training, before anything is read."""
  from hf_fixtures import FP8_SCHEMES, tiny_hf_config, write_fp8_checkpoint
  scheme, qc = FP8_SCHEMES["channel"]
  write_fp8_checkpoint(tmp_path / "hf", tiny_hf_config(num_hidden_layers=2), scheme, qc)
  import_hf(tmp_path / "hf", tmp_path / "kept", keep_fp8=True, progress=False)
  exp = experiment({"fsdp": 8}, init_from=str(tmp_path / "kept"))
  lay = sharding.layout(exp, sharding.mesh_for(exp), optimizer(exp.train))
  with pytest.raises(RunRefused, match="keeps its routed experts in fp8-channel .* without "
                     "--keep-fp8"):
    load_initial(exp, lay)
