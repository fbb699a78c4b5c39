"""Streaming HF <-> Orbax conversion: round trips, restore on meshes, FP8, bad input.

Sources are random checkpoints in the release layout written by `hf_fixtures` from the spec (not
from `ling_jax.weights`), checked against mlx-lm's independent `bailing_hybrid`. The conversions
run with tiny block, chunk and in-flight budgets so that every tensor crosses several blocks.
"""

import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import (FP8_SCHEMES, INDEX, MTP_FILE, is_quantised, mlx_logits, tiny_hf_config,
                         write_fp8_checkpoint, write_random_hf_checkpoint)
from ling_jax import axes as ax
from ling_jax.convert import (CheckpointFormatError, ConversionError, export_hf, import_hf, load,
                              save)
from ling_jax.convert import store
from ling_jax.convert.fp8 import QuantScheme, quantize
from ling_jax.hf_io import CheckpointError
from ling_jax.io.destination import DISCARD, DestinationError
from ling_jax.io.safetensors import SafetensorsError, SafetensorsFile, write_safetensors
from ling_jax.io.safetensors_writer import SafetensorsWriter
from ling_jax.model import LingForCausalLM
from ling_jax.model.common import Constant
from ling_jax.model.settings import ExpertWeights
from testing import deadline, rel

SMALL = dict(progress=False, block_bytes=2048, chunk_bytes=1024, inflight_bytes=1 << 18)
# Layers 0-1 a prefix group, 2-5 two scanned groups (stacked axis of 2), 6 the MLA tail; MTP.
CFG = tiny_hf_config(num_hidden_layers=7)
TOKENS = np.random.default_rng(1).integers(0, CFG["vocab_size"], (2, 11)).astype(np.int32)


@functools.partial(nnx.jit)
def _logits(model, tokens):
  return model(tokens)


def read_folder(folder) -> dict[str, np.ndarray]:
  out = {}
  for f in sorted(os.listdir(folder)):
    if f.endswith(".safetensors"):
      with SafetensorsFile(os.path.join(folder, f)) as st:
        out.update({n: np.array(st.get(n)) for n in st.keys()})
  return out


def assert_bit_exact(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for name, w in want.items():
    g = got[name]
    assert (g.dtype, g.shape) == (w.dtype, w.shape), name
    assert g.tobytes() == w.tobytes(), name


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def converted(request, tmp_path_factory):
  """(source folder, its tensors, checkpoint, exported folder) for one dtype."""
  root = tmp_path_factory.mktemp(request.param)
  dtype = np.dtype(getattr(ml_dtypes, request.param, None) or request.param)
  tensors = write_random_hf_checkpoint(root / "hf", CFG, dtype=dtype, num_shards=3)
  summary = import_hf(root / "hf", root / "ckpt", dtype, **SMALL)
  assert summary.tensors == len(tensors) and summary.bytes == sum(
      a.nbytes for a in tensors.values())
  export_hf(root / "ckpt", root / "out", progress=False, block_bytes=2048,
            max_shard_bytes=200_000)
  return root / "hf", tensors, root / "ckpt", root / "out"


def test_import_then_export_is_bit_exact(converted):
  src, tensors, _, out = converted
  assert_bit_exact(read_folder(out), tensors)
  index = json.loads((out / INDEX).read_text())["weight_map"]
  assert sorted(index) == sorted(tensors)
  L = CFG["num_hidden_layers"]
  assert all((f == MTP_FILE) == n.startswith(f"model.layers.{L}.") for n, f in index.items())
  shards = sorted({f for f in index.values() if f != MTP_FILE})
  assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert json.loads((out / "config.json").read_text())["model_type"] == "bailing_hybrid"
  written = sorted(shards + [MTP_FILE, INDEX, "config.json"])
  assert sorted(p.name for p in out.iterdir()) == sorted(written + [store.MARKER])
  # The marker lists what --overwrite may replace: every file of the folder, and only those.
  assert json.loads((out / store.MARKER).read_text()) == {"format": "ling_jax.hf/1",
                                                          "files": written}


def test_mlx_gives_identical_logits_on_the_exported_folder(converted):
  src, _, _, out = converted
  np.testing.assert_array_equal(mlx_logits(out, TOKENS, "float32"),
                                mlx_logits(src, TOKENS, "float32"))


def test_restored_model_matches_mlx_and_any_mesh(converted, tmp_path):
  src, tensors, ckpt, _ = converted
  want = mlx_logits(src, TOKENS, "float32")
  _, model = load(ckpt, dtype=jnp.float32)  # a bf16 checkpoint is upcast by Orbax on restore
  assert rel(_logits(model, TOKENS), want) < 1e-4
  if next(iter(tensors.values())).dtype != np.float32:
    return

  # Restore onto one mesh, save from it, restore onto a different one: same logits.
  mesh_a = ax.make_mesh({"fsdp": 2, "tensor": 4})
  _, model_a = load(ckpt, mesh_a, dtype=jnp.float32)
  experts = model_a.groups.layers[0].mlp.experts.gate_proj[...]
  assert experts.sharding.mesh.shape == mesh_a.shape
  assert experts.sharding.spec != jax.sharding.PartitionSpec()
  logits_a = np.asarray(_logits(model_a, TOKENS))
  assert rel(logits_a, want) < 1e-4
  save(model_a, tmp_path / "resaved")
  mesh_b = ax.make_mesh({"expert": 8})
  _, model_b = load(tmp_path / "resaved", mesh_b, dtype=jnp.float32)
  experts = model_b.groups.layers[0].mlp.experts.gate_proj[...]
  assert experts.sharding.spec[:2] == (None, "expert")
  np.testing.assert_allclose(np.asarray(_logits(model_b, TOKENS)), logits_a, rtol=1e-5, atol=1e-5)
  # ... and what Orbax saved from a sharded model exports to the same bytes.
  export_hf(tmp_path / "resaved", tmp_path / "out", progress=False)
  assert_bit_exact(read_folder(tmp_path / "out"), tensors)


def test_constants_are_rebuilt_not_stored(converted, tmp_path):
  """The Lightning decays (`Constant`s) are in no converted checkpoint, imported or saved from a
  live model; a restored model computes them as a freshly built one does."""
  _, _, ckpt, _ = converted
  cfg, model = load(ckpt, dtype=jnp.float32)
  save(model, tmp_path / "resaved")
  for folder in (ckpt, tmp_path / "resaved"):
    tree = (folder / store.STATE / "_METADATA").read_text()
    assert "gate_proj" in tree and "decay" not in tree, folder
  fresh = nnx.state(LingForCausalLM(cfg, rngs=nnx.Rngs(1)), Constant)
  restored = dict(nnx.to_flat_state(nnx.state(model, Constant)))
  assert len(restored) == 2  # prefix layer 0's, the scanned groups' (layers 2 and 4, stacked)
  for path, var in nnx.to_flat_state(fresh):
    np.testing.assert_array_equal(np.asarray(restored[path].get_value()),
                                  np.asarray(var.get_value()), err_msg=str(path))


# ---------------------------------------------------------------------------------------- FP8
def write_fp8(folder, scheme: QuantScheme, qc: dict) -> dict[str, np.ndarray]:
  return write_fp8_checkpoint(folder, CFG, scheme, qc)


@pytest.mark.parametrize("kind", sorted(FP8_SCHEMES))
def test_fp8_is_dequantised_on_import(kind, tmp_path):
  scheme, qc = FP8_SCHEMES[kind]
  expected = write_fp8(tmp_path / "hf", scheme, qc)
  import_hf(tmp_path / "hf", tmp_path / "ckpt", np.float32, **SMALL, verify_data=True)
  assert json.loads((tmp_path / "ckpt" / store.MARKER).read_text())["source"][
      "quantization"] == scheme.description
  export_hf(tmp_path / "ckpt", tmp_path / "out", progress=False)
  assert_bit_exact(read_folder(tmp_path / "out"), expected)
  # bf16, the default for an FP8 source: one rounding of the fp32 product (dequantised tensors
  # export in the import dtype).
  summary = import_hf(tmp_path / "hf", tmp_path / "ckpt16", **SMALL)
  assert summary.dtype == "bfloat16" and "FP8 source, dequantised to bfloat16" in str(summary)
  export_hf(tmp_path / "ckpt16", tmp_path / "out16", progress=False)
  got = read_folder(tmp_path / "out16")
  quantised = [n for n, a in expected.items() if is_quantised(n, a)]
  assert_bit_exact({n: got[n] for n in quantised},
                   {n: expected[n].astype(ml_dtypes.bfloat16) for n in quantised})


# (HF layer, state path, stacked index, input axes) of one of each kind of dense Linear: the
# prefix group's Lightning and MLA layers and dense MLP, the scanned groups' Lightning output
# projection (two input axes) and shared expert, the MLA tail, the MTP layer.
DENSE_LINEARS = [
    ("model.layers.0.attention.query_key_value", ("prefix", 0, "layers", 0, "attention",
                                                  "query_key_value"), (), 1),
    ("model.layers.0.mlp.up_proj", ("prefix", 0, "layers", 0, "mlp", "up_proj"), (), 1),
    ("model.layers.1.attention.q_b_proj", ("prefix", 0, "layers", 1, "attention", "q_b_proj"),
     (), 1),
    ("model.layers.4.attention.dense", ("groups", "layers", 0, "attention", "dense"), (1,), 2),
    ("model.layers.5.mlp.shared_experts.down_proj", ("groups", "layers", 1, "mlp",
                                                     "shared_experts", "down_proj"), (1,), 1),
    ("model.layers.6.attention.kv_b_proj", ("tail", 0, "attention", "kv_b_proj"), (), 1),
    ("model.layers.7.eh_proj", ("mtp", "eh_proj"), (), 1),
    ("model.layers.7.attention.kv_a_proj_with_mqa", ("mtp", "layer", "attention",
                                                     "kv_a_proj_with_mqa"), (), 1),
]


@pytest.fixture(scope="module", params=["channel", "block"])
def fp8_source(request, tmp_path_factory):
  """(kind, scheme, FP8 folder, its fully dequantised bf16 import). Blocks of 16 x 8, so that
  transposing the block is checked too."""
  root = tmp_path_factory.mktemp(f"fp8_{request.param}")
  if request.param == "block":
    scheme = QuantScheme("block", (16, 8))
    qc = {**FP8_SCHEMES["block"][1], "weight_block_size": [16, 8]}
  else:
    scheme, qc = FP8_SCHEMES["channel"]
  write_fp8(root / "hf", scheme, qc)
  import_hf(root / "hf", root / "deq", **SMALL)
  return request.param, scheme, root / "hf", root / "deq"


@functools.partial(nnx.jit)
def _logits_and_mtp(model, tokens):
  out = model.forward(tokens, mtp=True)
  return out.logits, out.mtp_logits


def test_fp8_weights_are_kept_on_import_and_load(fp8_source, tmp_path):
  """import keep_fp8: the routed experts (main layers, stacked groups and MTP) and every dense
  Linear (both attentions, the dense MLP, shared experts, eh_proj) keep the source's e4m3 values
  and scales, transposed to the model's layout (a Linear over its [in, out] view); the router and
  head, not quantised, keep their dtypes. `load` restores them, and the logits and MTP logits
  equal those of the fully dequantised bf16 import bit for bit (the XLA path dequantises with
  the import's rounding); export refuses such a checkpoint."""
  kind, scheme, hf, deq_dir = fp8_source
  summary = import_hf(hf, tmp_path / "kept", keep_fp8=True, verify_data=True, **SMALL)
  assert summary.fp8 == f"fp8-{kind}: routed experts and dense Linears"
  assert json.loads((tmp_path / "kept" / store.MARKER).read_text())["expert_weights"][
      "linears"] is True
  _, kept = load(tmp_path / "kept")
  _, deq = load(deq_dir)
  block = (scheme.block[1], scheme.block[0]) if kind == "block" else (128, 128)
  assert kept.expert_weights == ExpertWeights(f"fp8-{kind}", block, linears=True)
  src = read_folder(hf)
  flat = dict(nnx.to_flat_state(nnx.state(kept)))
  value = lambda path: np.asarray(flat[path].get_value())
  e4m3 = np.dtype(ml_dtypes.float8_e4m3fn)
  experts = [(f"model.layers.{layer}.mlp.experts.3.{name}",
              path + ("mlp", "experts", name), index + (3,), 1)
             for layer, path, index in [(1, ("prefix", 0, "layers", 1), ()),
                                        (5, ("groups", "layers", 1), (1,)),
                                        (7, ("mtp", "layer"), ())]
             for name in ("gate_proj", "down_proj")]
  for hf_name, path, index, n_in in experts + DENSE_LINEARS:
    v, s = value(path)[index], value(path[:-1] + (f"{path[-1]}_scale",))[index]
    assert v.dtype == e4m3, hf_name
    np.testing.assert_array_equal(v.reshape(int(np.prod(v.shape[:n_in])), -1).view(np.uint8),
                                  src[f"{hf_name}.weight"].T.view(np.uint8), err_msg=hf_name)
    np.testing.assert_array_equal(s, src[f"{hf_name}.{scheme.scale_suffix}"].astype(np.float32).T,
                                  err_msg=hf_name)
  assert value(("groups", "layers", 0, "mlp", "gate", "weight")).dtype == np.float32
  assert value(("lm_head",)).dtype == value(("word_embeddings",)).dtype == ml_dtypes.bfloat16
  for got, want in zip(_logits_and_mtp(kept, TOKENS), _logits_and_mtp(deq, TOKENS)):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(CheckpointFormatError, match="keeps its experts in FP8"):
    export_hf(tmp_path / "kept", tmp_path / "out", progress=False)


def test_keep_fp8_refuses_a_bad_dense_scale_or_a_partly_quantised_source(tmp_path, capsys):
  """A dense Linear's scale of the wrong shape is refused naming the tensor; a source whose dense
  Linears are float8 but for one is refused naming it (a model holds them all in one form), and
  imports with the experts alone kept (`--keep-fp8 experts`): the dense Linears dequantised as
  without keep_fp8, the marker as it was before FP8 dense Linears existed."""
  scheme, qc = FP8_SCHEMES["block"]
  hf = tmp_path / "hf"
  expected = write_fp8(hf, scheme, qc)
  w = "model.layers.4.attention.dense"
  fname = json.loads((hf / INDEX).read_text())["weight_map"][f"{w}.weight"]
  scale = read_folder(hf)[f"{w}.weight_scale_inv"]
  rewrite(hf, fname, lambda t: t.update({f"{w}.weight_scale_inv": scale[:, :1]}))
  with pytest.raises(CheckpointError, match=rf"{w}\.weight_scale_inv.*\[4, 1\]"):
    import_hf(hf, tmp_path / "ckpt", keep_fp8=True, **SMALL)
  rewrite(hf, fname, lambda t: t.update({f"{w}.weight_scale_inv": scale}))
  w = "model.layers.7.eh_proj"
  dense = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
  rewrite(hf, MTP_FILE,
          lambda t: (t.pop(f"{w}.weight_scale_inv"), t.update({f"{w}.weight": dense})))
  with pytest.raises(CheckpointError, match=rf"are float8.*, 1 not \('{w}\.weight'\).*"
                     "--keep-fp8 experts"):
    import_hf(hf, tmp_path / "ckpt", keep_fp8=True, **SMALL)
  assert not (tmp_path / "ckpt").exists()
  from ling_jax.convert.__main__ import main
  assert main(["import", str(hf), str(tmp_path / "ckpt"), "--keep-fp8", "experts",
               "--no-progress"]) == 0
  assert "kept in fp8-block: routed experts; dense Linears dequantised" in capsys.readouterr().err
  assert json.loads((tmp_path / "ckpt" / store.MARKER).read_text())["expert_weights"] == {
      "format": "fp8-block", "block": [16, 16]}
  _, model = load(tmp_path / "ckpt")
  assert model.expert_weights == ExpertWeights("fp8-block", (16, 16))
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  assert not any(str(p[-1]).endswith("_scale") and "experts" not in p for p in flat)
  expected[f"{w}.weight"] = dense
  for name, path, index, n_in in DENSE_LINEARS:
    got = np.asarray(flat[path].get_value())[index]
    want = expected[f"{name}.weight"].T.astype(ml_dtypes.bfloat16)
    assert got.reshape(want.shape).tobytes() == want.tobytes(), name
  assert model.groups.layers[0].mlp.experts.gate_proj[...].dtype == jnp.float8_e4m3fn


def test_dense_linears_stay_as_stored_where_the_source_quantised_none(hf):
  """kept_linears turns `linears` on only for float8 dense Linears: where the source stores none
  in float8 (as a release that quantised only its experts would) the setting stays off."""
  from ling_jax.convert.importer import kept_linears
  from ling_jax.convert.source import read_config
  from ling_jax.hf_io import scan_folder
  _, cfg, _ = read_config(str(hf))
  experts = ExpertWeights("fp8-block", (16, 16))
  assert kept_linears(experts, cfg, str(hf), scan_folder(hf)) == experts


def test_keep_fp8_needs_an_fp8_source(tmp_path):
  write_random_hf_checkpoint(tmp_path / "hf", CFG, num_shards=1)
  with pytest.raises(CheckpointError, match="keeping FP8 experts needs an FP8 source"):
    import_hf(tmp_path / "hf", tmp_path / "ckpt", keep_fp8=True, **SMALL)
  assert not (tmp_path / "ckpt").exists()


# -------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  root = tmp_path_factory.mktemp("pristine")
  write_random_hf_checkpoint(root, tiny_hf_config(), num_shards=3)
  return root


@pytest.fixture
def hf(pristine, tmp_path):
  shutil.copytree(pristine, tmp_path / "hf")
  return tmp_path / "hf"


def rewrite(folder, fname, edit):
  """Apply `edit(dict of tensors)` to one shard and keep the index in step with it."""
  with SafetensorsFile(folder / fname) as st:
    tensors = {n: np.array(st.get(n)) for n in st.keys()}
  edit(tensors)
  write_safetensors(folder / fname, tensors)
  index = json.loads((folder / INDEX).read_text())
  index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != fname}
  index["weight_map"].update({n: fname for n in tensors})
  (folder / INDEX).write_text(json.dumps(index))


def edit_config(folder, **changes):
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, **changes}))


SHARD = "model-00002-of-00003.safetensors"
QKV = "model.layers.2.attention.query_key_value.weight"   # in SHARD for the default tiny config


def expect_failure(hf, tmp_path, error, *fragments):
  with pytest.raises(error) as e:
    import_hf(hf, tmp_path / "ckpt", np.float32, **SMALL)
  for fragment in fragments:
    assert fragment in str(e.value)
  assert not (tmp_path / "ckpt").exists() and not (tmp_path / f"ckpt{store.PARTIAL}").exists()


def test_missing_shard(hf, tmp_path):
  os.remove(hf / SHARD)
  expect_failure(hf, tmp_path, CheckpointError, SHARD, "missing")


def test_truncated_shard(hf, tmp_path):
  size = os.path.getsize(hf / SHARD)
  with open(hf / SHARD, "r+b") as f:
    f.truncate(size - 100)
  expect_failure(hf, tmp_path, SafetensorsError, str(hf / SHARD), "truncated", "tensor '")


def test_unknown_and_missing_tensors(hf, tmp_path):
  rewrite(hf, MTP_FILE, lambda t: t.update({"model.layers.4.mystery.weight": np.zeros(3)}))
  expect_failure(hf, tmp_path, CheckpointError, "'model.layers.4.mystery.weight' in " + MTP_FILE)
  rewrite(hf, MTP_FILE, lambda t: t.pop("model.layers.4.mystery.weight"))
  rewrite(hf, SHARD, lambda t: t.pop(QKV))
  expect_failure(hf, tmp_path, CheckpointError, "missing tensor", QKV)


def test_shape_and_dtype_mismatch(hf, tmp_path):
  rewrite(hf, SHARD, lambda t: t.update({QKV: t[QKV][:-1]}))
  expect_failure(hf, tmp_path, CheckpointError, str(hf / SHARD), QKV, "shape")
  rewrite(hf, SHARD, lambda t: t.update({QKV: np.zeros((3 * 4 * 16, 64), np.int32)}))
  expect_failure(hf, tmp_path, CheckpointError, str(hf / SHARD), QKV, "int32")


def test_config_that_disagrees_with_the_tensors(hf, tmp_path):
  edit_config(hf, moe_intermediate_size=16)
  expect_failure(hf, tmp_path, CheckpointError, "model.layers.", "shape", "config.json")
  edit_config(hf, moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1)
  expect_failure(hf, tmp_path, CheckpointError, "missing tensor", "unexpected tensor",
                 "'model.layers.2.attention.query_key_value.weight' in " + SHARD)


def test_a_config_asking_for_more_layers_or_experts_than_the_folder_fails_at_once(hf, tmp_path):
  # The model and the name map enumerate layers and experts: without a look at the names first,
  # a corrupt count would run for ever.
  edit_config(hf, num_hidden_layers=10**12)
  with deadline(60, "import_hf"):
    expect_failure(hf, tmp_path, CheckpointError, "config.json: num_hidden_layers=1000000000000",
                   "ask for 1000000000001 layers", "tensors of 5")
  edit_config(hf, num_hidden_layers=4, num_experts=10**9, n_group=1, topk_group=1)
  with deadline(60, "import_hf"):
    expect_failure(hf, tmp_path, CheckpointError, "config.json: num_experts=1000000000",
                   "tensors of 8 experts")


def test_fp8_config_and_scales_must_agree(hf, tmp_path):
  scheme, qc = FP8_SCHEMES["channel"]
  w = "model.layers.2.attention.g_proj.weight"
  q, s = quantize(np.ones((64, 64), np.float32), scheme)
  rewrite(hf, SHARD, lambda t: t.update({w: q, w + "_scale": s}))
  expect_failure(hf, tmp_path, CheckpointError, "no quantization_config")
  edit_config(hf, quantization_config=qc)
  rewrite(hf, SHARD, lambda t: t.update({w + "_scale": s[:10]}))
  expect_failure(hf, tmp_path, CheckpointError, w + "_scale", "[10, 1]")
  rewrite(hf, SHARD, lambda t: t.pop(w + "_scale"))
  expect_failure(hf, tmp_path, CheckpointError, w, "float8", "weight_scale")
  edit_config(hf, quantization_config=FP8_SCHEMES["block"][1])
  rewrite(hf, SHARD, lambda t: t.update({w: np.ones((64, 64), np.float32)}))
  expect_failure(hf, tmp_path, CheckpointError, "no tensor is float8")


# ------------------------------------------------------------------ interruption and re-runs
def test_interrupted_import_leaves_nothing_that_looks_complete(hf, tmp_path, monkeypatch):
  calls = []
  write = store.StateWriter.write

  def flaky(self, path, region, block):
    calls.append(path)
    if len(calls) == 40:
      raise KeyboardInterrupt
    return write(self, path, region, block)

  monkeypatch.setattr(store.StateWriter, "write", flaky)
  with pytest.raises(KeyboardInterrupt):
    import_hf(hf, tmp_path / "ckpt", np.float32, **SMALL, workers=1)
  assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.partial").exists()

  # A write that silently never happens is caught by the chunk count before the commit.
  calls.clear()
  def lossy(self, path, region, block):
    calls.append(path)
    return _done() if len(calls) == 40 else write(self, path, region, block)

  monkeypatch.setattr(store.StateWriter, "write", lossy)
  with pytest.raises(CheckpointFormatError, match="chunks"):
    import_hf(hf, tmp_path / "ckpt", np.float32, **SMALL, workers=1)
  assert not (tmp_path / "ckpt").exists()
  monkeypatch.undo()

  # A killed run leaves only `.partial` (marked unfinished from its creation): not loadable, and
  # the next run starts from scratch.
  (tmp_path / "ckpt.partial" / "state").mkdir(parents=True)
  (tmp_path / "ckpt.partial" / "state" / "junk").write_text("half a checkpoint")
  (tmp_path / "ckpt.partial" / DISCARD).touch()
  with pytest.raises(CheckpointFormatError, match="unfinished conversion"):
    load(tmp_path / "ckpt")
  import_hf(hf, tmp_path / "ckpt", np.float32, **SMALL)
  assert not (tmp_path / "ckpt.partial").exists()
  assert sorted(os.listdir(tmp_path / "ckpt")) == [store.MARKER, store.STATE]
  with pytest.raises(FileExistsError):
    import_hf(hf, tmp_path / "ckpt", np.float32, **SMALL)
  import_hf(hf, tmp_path / "ckpt", np.float32, **SMALL, overwrite=True)


def test_interrupted_export_leaves_nothing_that_looks_complete(hf, tmp_path, monkeypatch):
  import_hf(hf, tmp_path / "ckpt", np.float32, **SMALL)
  export = functools.partial(export_hf, tmp_path / "ckpt", tmp_path / "out", progress=False,
                             block_bytes=2048, max_shard_bytes=200_000)
  count, write = itertools.count(), SafetensorsWriter.write  # next(count) is atomic

  def failing(self, name, offset, data):
    if next(count) == 30:
      raise OSError("No space left on device")
    return write(self, name, offset, data)

  monkeypatch.setattr(SafetensorsWriter, "write", failing)
  with pytest.raises(ConversionError, match="No space left") as e:
    export()
  assert ".safetensors: tensor '" in str(e.value)
  assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

  # A piece that silently never reaches the file is caught before the folder is published.
  count, lost = itertools.count(), []
  def lossy(self, name, offset, data):
    if next(count) == 30:
      lost.append(name)
      return None
    return write(self, name, offset, data)

  monkeypatch.setattr(SafetensorsWriter, "write", lossy)
  with pytest.raises(SafetensorsError, match="were never written") as e:
    export()
  assert repr(lost[0]) in str(e.value)
  assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
  monkeypatch.undo()
  export()
  assert_bit_exact(read_folder(tmp_path / "out"), read_folder(hf))


# -------------------------------------------------------- what --overwrite may delete; locks
def test_overwrite_never_deletes_a_source_or_anything_ling_jax_did_not_write(hf, pristine,
                                                                            tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(DestinationError, match="contains the source"):
    import_hf(hf, tmp_path, np.float32, **SMALL, overwrite=True)
  with pytest.raises(DestinationError, match="lies inside the source"):
    import_hf(hf, hf / "ckpt", np.float32, **SMALL)
  assert (tmp_path / "notes.txt").read_text() == "mine" and (hf / SHARD).exists()
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  import_hf(hf, ckpt, np.float32, **SMALL)
  with pytest.raises(DestinationError, match="is the source itself"):
    export_hf(ckpt, ckpt, overwrite=True, progress=False)
  with pytest.raises(DestinationError, match="no valid ling_jax.json"):
    export_hf(ckpt, hf, overwrite=True, progress=False)  # a folder ling_jax did not write
  export_hf(ckpt, out, progress=False)
  (out / "tokenizer.json").write_text("{}")  # the user completes the exported folder
  with pytest.raises(DestinationError, match="'tokenizer.json'"):
    export_hf(ckpt, out, overwrite=True, progress=False)
  with pytest.raises(DestinationError, match="'tokenizer.json'"):
    import_hf(hf, out, np.float32, **SMALL, overwrite=True)
  (out / "tokenizer.json").unlink()
  import_hf(hf, out, np.float32, **SMALL, overwrite=True)  # ours: may be replaced, by any kind
  assert sorted(os.listdir(out)) == [store.MARKER, store.STATE]
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf", "notes.txt", "out"]
  assert_bit_exact(read_folder(hf), read_folder(pristine))  # the source is untouched


def test_overwrite_through_a_symlink_replaces_the_folder_it_points_to(hf, tmp_path):
  import_hf(hf, tmp_path / "real", np.float32, **SMALL)
  (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
  import_hf(hf, tmp_path / "link", np.float32, **SMALL, overwrite=True)
  assert (tmp_path / "link").is_symlink()
  assert sorted(os.listdir(tmp_path)) == ["hf", "link", "real"]
  assert sorted(os.listdir(tmp_path / "link")) == [store.MARKER, store.STATE]
  store.read_marker(tmp_path / "link")


KILLED_BETWEEN_RENAMES = r"""
import os, sys
import numpy as np
from ling_jax.convert import import_hf
real = os.replace

def replace(src, dst):
  if src.endswith(".partial"):
    os._exit(17)  # killed after moving the old checkpoint aside, before the new one moves in
  return real(src, dst)

os.replace = replace
import_hf(sys.argv[1], sys.argv[2], np.float32, overwrite=True, progress=False)
"""


def test_a_rerun_repairs_an_overwrite_killed_between_its_renames(hf, tmp_path):
  ckpt = tmp_path / "ckpt"
  import_hf(hf, ckpt, np.float32, **SMALL)
  r = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(hf), str(ckpt)],
                     capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 17, r.stderr
  import_hf(hf, ckpt, np.float32, **SMALL, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]  # no full-size ckpt.old left behind
  assert sorted(os.listdir(ckpt)) == [store.MARKER, store.STATE]


def test_two_imports_into_one_destination_at_once(hf, tmp_path, monkeypatch):
  ckpt = tmp_path / "ckpt"
  started, release, errors = threading.Event(), threading.Event(), []
  write = store.StateWriter.write

  def paused(self, *args):
    started.set()
    release.wait(20)
    return write(self, *args)

  def first():
    try:
      import_hf(hf, ckpt, np.float32, **SMALL)
    except BaseException as e:  # reported below
      errors.append(e)

  monkeypatch.setattr(store.StateWriter, "write", paused)
  thread = threading.Thread(target=first)
  thread.start()
  try:
    assert started.wait(20)
    with pytest.raises(DestinationError, match=f"another ling_jax process \\(pid {os.getpid()}"
                                               f"\\) is writing {ckpt}"):
      import_hf(hf, ckpt, np.float32, **SMALL)
  finally:
    release.set()
    thread.join(60)
  assert errors == []
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]  # the lock file is gone too
  store.read_marker(ckpt)


# ------------------------------------------------------------------------ dtype defaults
def test_import_and_load_keep_the_source_dtype_by_default(hf, tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  summary = import_hf(hf, ckpt, **SMALL)  # float32 tensors, config.json torch_dtype float32
  assert summary.dtype == "float32" and "(config.json torch_dtype)" in str(summary)
  assert json.loads((ckpt / store.MARKER).read_text())["dtype"] == "float32"
  export_hf(ckpt, tmp_path / "out", progress=False)
  assert_bit_exact(read_folder(tmp_path / "out"), read_folder(hf))  # lossless
  _, model = load(ckpt)  # the stored dtype
  assert model.word_embeddings.get_value().dtype == jnp.float32
  assert model.groups.layers[0].mlp.experts.gate_proj.get_value().dtype == jnp.float32

  config = json.loads((hf / "config.json").read_text())
  del config["torch_dtype"]
  (hf / "config.json").write_text(json.dumps(config))
  summary = import_hf(hf, ckpt, **SMALL, overwrite=True)
  assert summary.dtype == "float32" and summary.dtype_from == "the source tensors' dtype"
  edit_config(hf, torch_dtype="bfloat16")  # disagrees with the fp32 tensors: they win, losslessly
  summary = import_hf(hf, ckpt, **SMALL, overwrite=True)
  assert summary.dtype == "float32"
  assert summary.dtype_from == "the source tensors' dtype; config.json torch_dtype says bfloat16"
  edit_config(hf, torch_dtype="int8")
  with pytest.raises(CheckpointError, match="config.json: torch_dtype 'int8' is not one of"):
    import_hf(hf, ckpt, **SMALL, overwrite=True)
  import_hf(hf, ckpt, ml_dtypes.bfloat16, **SMALL, overwrite=True)  # asked for: no config read
  assert load(ckpt)[1].word_embeddings.get_value().dtype == jnp.bfloat16

  from ling_jax.convert.__main__ import main
  with pytest.raises(SystemExit):
    main(["import", "--help"])
  assert "default: the source's" in " ".join(capsys.readouterr().out.split())


class _done:
  """A write future that is already complete (the write it stands for never happened)."""

  def result(self):
    return None


def test_cli(hf, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *a: subprocess.run([sys.executable, "-m", "ling_jax.convert", *a],
                                  capture_output=True, text=True, env=env)
  r = run("import", str(hf), str(tmp_path / "ckpt"), "--dtype", "float32", "--no-progress",
          "--stats-json", str(tmp_path / "stats.json"))
  assert r.returncode == 0, r.stderr
  assert "import: " in r.stderr and "GB/s" in r.stderr and "peak host memory" in r.stderr
  stats = json.loads((tmp_path / "stats.json").read_text())
  assert stats["tensors"] > 0 and stats["peak_rss_bytes"] > 0
  r = run("export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--no-progress")
  assert r.returncode == 0, r.stderr
  assert_bit_exact(read_folder(tmp_path / "out"), read_folder(hf))
  r = run("import", str(hf), str(tmp_path), "--overwrite")  # the source's parent
  assert r.returncode == 1 and "contains the source" in r.stderr
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf", "out", "stats.json"]
  os.remove(hf / SHARD)
  r = run("import", str(hf), str(tmp_path / "ckpt2"))
  assert r.returncode == 1 and r.stderr.startswith("error: ") and SHARD in r.stderr
