"""A training run's checkpoint as a model: `ling_jax.load` and `python -m ling_jax.convert export`
read it (out_dir, checkpoints/ or one step), and mlx-lm runs the exported folder."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ling_jax
from hf_fixtures import mlx_logits
from ling_jax.config import ling_tiny
from ling_jax.convert import CheckpointFormatError, export_hf
from ling_jax.convert.__main__ import main as convert_main
from ling_jax.train.checkpoint import Checkpointer, config_meta, find_run_checkpoint
from ling_jax.train.config import Experiment, TrainConfig
from ling_jax.data import DataConfig
from ling_jax.train.errors import RunRefused
from ling_jax.train.optim import optimizer
from ling_jax.train.step import init_state, split_model
from testing import random_model, rel

CFG = ling_tiny(num_hidden_layers=3)  # a prefix group, a tail MLA layer, MTP
TOKENS = np.random.default_rng(3).integers(0, 256, (2, 9)).astype(np.int32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """runs/x with steps 1 and 2 (step 2's parameters differ from step 1's), and the models."""
  out = tmp_path_factory.mktemp("run")
  exp = Experiment(model=CFG, data=DataConfig(), train=TrainConfig())
  models = {}
  ckpt = Checkpointer(str(out / "checkpoints"), every=1, keep=3, async_save=False)
  for step in (1, 2):
    model = random_model(CFG, seed=step)
    _, params, bias, _ = split_model(model)
    state = init_state(params, bias, optimizer(exp.train))
    ckpt.save(step, state, {"epoch": 0, "index": step}, config_meta(exp), force=True)
    models[step] = model
  ckpt.close()
  return out, models


def _logits(model, tokens):
  return np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))


def test_load_reads_a_run_in_each_form(run_dir):
  out, models = run_dir
  for path, step in ((out, 2), (out / "checkpoints", 2), (out / "checkpoints" / "1", 1)):
    cfg, model = ling_jax.load(path)
    assert cfg == CFG
    got, ref = nnx.state(model, nnx.Param), nnx.state(models[step], nnx.Param)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # In another dtype, cast by Orbax on restore (the router stays fp32, as the model builds it).
  _, model = ling_jax.load(out, dtype=jnp.bfloat16)
  assert model.word_embeddings[...].dtype == jnp.bfloat16
  assert model.prefix[0].layers[1].mlp.gate.weight[...].dtype == jnp.float32


def test_export_of_a_run_runs_in_mlx(run_dir, tmp_path):
  out, models = run_dir
  hf = tmp_path / "hf"
  assert convert_main(["export", str(out), str(hf), "--no-progress", "--no-fsync"]) == 0
  config = json.loads((hf / "config.json").read_text())
  assert config["torch_dtype"] == "float32" and config["num_hidden_layers"] == 3
  assert rel(mlx_logits(hf, TOKENS), _logits(models[2], TOKENS)) < 1e-4
  # ... and a chosen dtype, from one step's directory.
  export_hf(out / "checkpoints" / "1", tmp_path / "bf16", dtype=jnp.bfloat16, progress=False)
  want = _logits(models[1], TOKENS)
  assert rel(mlx_logits(tmp_path / "bf16", TOKENS, "float32"), want) < 3e-2


def test_what_is_not_a_run_is_refused_by_name(tmp_path):
  assert find_run_checkpoint(tmp_path) is None
  with pytest.raises(CheckpointFormatError, match="not a complete ling_jax checkpoint"):
    ling_jax.load(tmp_path)
  (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
  with pytest.raises(RunRefused, match="no complete checkpoint step"):
    find_run_checkpoint(tmp_path)
  assert convert_main(["export", str(tmp_path), str(tmp_path / "hf"), "--no-progress"]) == 1
  assert not (tmp_path / "hf").exists()


def test_a_meta_item_of_unknown_fields_is_refused(run_dir):
  from ling_jax.train.checkpoint import model_config_from_meta
  meta = dataclasses.asdict(CFG) | {"new_field": 1}
  with pytest.raises(RunRefused, match="new_field"):
    model_config_from_meta(meta, "x")
