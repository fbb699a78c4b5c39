"""load_hf / save_hf against mlx-lm's independent `bailing_hybrid` (docs/architecture.md §4, 6), and
bad input."""

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import ling_jax
from hf_fixtures import INDEX, MTP_FILE, mlx_logits, tiny_hf_config, write_random_hf_checkpoint
from ling_jax import hf_io
from ling_jax.convert import import_hf
from ling_jax.convert.fp8 import QuantScheme, quantize
from ling_jax.io.safetensors import SafetensorsError, SafetensorsFile, write_safetensors
from testing import rel

# Config families: head counts (power of two and the ALiBi fallback), layer_group_size
# 2-8 with and without tail layers, first_k_dense_replace 0-2, q-LoRA on/off, n_group/topk_group,
# YaRN; T shorter and longer than our 64-chunk and mlx's 128-chunk.
CASES = {
    "default_T20": (dict(), 20),
    "default_T150": (dict(rope_theta=10000.0), 150),
    "heads6_fallback": (dict(num_attention_heads=6, num_key_value_heads=6, group_norm_size=3), 150),
    "no_qlora_dense0": (dict(q_lora_rank=None, first_k_dense_replace=0), 33),
    "L5_G2_tail_dense2": (dict(num_hidden_layers=5, first_k_dense_replace=2, rope_theta=10000.0), 40),
    "L7_G3_tail": (dict(num_hidden_layers=7, layer_group_size=3), 70),
    "L8_G4_groups1": (dict(num_hidden_layers=8, layer_group_size=4, first_k_dense_replace=0,
                           n_group=1, topk_group=1), 65),
    "L8_G8_E16_ng8": (dict(num_hidden_layers=8, layer_group_size=8, num_experts=16,
                           num_experts_per_tok=4, n_group=8, topk_group=4), 130),
    "L10_G8_tail2_ng2": (dict(num_hidden_layers=10, layer_group_size=8, first_k_dense_replace=2,
                              n_group=2, topk_group=1, num_experts_per_tok=3), 50),
    "yarn": (dict(rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 2.0,
                                                   "original_max_position_embeddings": 64}), 100),
}


@pytest.fixture
def tokens_for():
  return lambda T, seed=0: np.random.default_rng(seed).integers(0, 256, size=(2, T)).astype(np.int32)


def _forward(model, tokens):
  return np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_mlx(tmp_path, name, tokens_for):
  overrides, T = CASES[name]
  hf = tiny_hf_config(**overrides)
  write_random_hf_checkpoint(tmp_path, hf, seed=len(name))
  cfg, model = ling_jax.load_hf(tmp_path, dtype=jnp.float32, progress=False)
  tokens = tokens_for(T, seed=len(name))
  ours, want = _forward(model, tokens), mlx_logits(tmp_path, tokens)
  assert np.isfinite(ours).all()
  assert rel(ours, want) < 1e-4, rel(ours, want)


def test_decay_form_b_differs_from_a(tmp_path, tokens_for):
  """The docs/architecture.md §6.1 switch is live: form (B) changes the logits (mlx implements
  (A))."""
  write_random_hf_checkpoint(tmp_path, tiny_hf_config(num_hidden_layers=6, layer_group_size=3))
  hf = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**hf, "decay_form": "B"}))
  _, model = ling_jax.load_hf(tmp_path, dtype=jnp.float32, progress=False)
  tokens = tokens_for(40)
  assert rel(_forward(model, tokens), mlx_logits(tmp_path, tokens)) > 1e-3


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_load_save_round_trip_is_bit_exact_and_mlx_agrees(tmp_path, dtype, tokens_for):
  src, out = tmp_path / "src", tmp_path / "out"
  hf = tiny_hf_config(num_hidden_layers=5)
  tensors = write_random_hf_checkpoint(src, hf, dtype=dtype, seed=7)
  cfg, model = ling_jax.load_hf(src, dtype=jnp.dtype(dtype), progress=False)
  ling_jax.save_hf(model, cfg, out, max_shard_bytes=40_000, progress=False)
  index = json.loads((out / INDEX).read_text())["weight_map"]
  assert set(index) == set(tensors)
  assert {f for n, f in index.items() if n.startswith("model.layers.5.")} == {MTP_FILE}
  assert len(set(index.values())) > 2  # sharded
  for name, want in tensors.items():
    with SafetensorsFile(out / index[name]) as st:
      got = st.get(name)
      assert got.dtype == want.dtype and got.shape == want.shape, name
      assert got.tobytes() == want.tobytes(), name
  # save -> load gives back the same parameters bit for bit.
  _, again = ling_jax.load_hf(out, dtype=jnp.dtype(dtype), progress=False)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
  if dtype == np.float32:
    tokens = tokens_for(30)
    np.testing.assert_array_equal(mlx_logits(out, tokens), mlx_logits(src, tokens))


# --------------------------------------------------------------------------------- bad input


@pytest.fixture
def ckpt(tmp_path):
  folder = tmp_path / "ckpt"
  write_random_hf_checkpoint(folder, tiny_hf_config(), seed=1)
  return folder


def test_loads_of_one_config_share_no_state(tmp_path):
  """abstract_model remembers the models it described; two loads of one config still get their
  own variables: filling the second leaves the first as it was."""
  hf_config = tiny_hf_config()
  folders = [tmp_path / "a", tmp_path / "b"]
  tensors = [write_random_hf_checkpoint(f, hf_config, seed=i) for i, f in enumerate(folders)]
  _, first = hf_io.load_hf(folders[0], jnp.float32)
  _, second = hf_io.load_hf(folders[1], jnp.float32)
  name = "model.word_embeddings.weight"
  np.testing.assert_array_equal(np.asarray(first.word_embeddings[...]), tensors[0][name])
  np.testing.assert_array_equal(np.asarray(second.word_embeddings[...]), tensors[1][name])


def test_unknown_config_field(ckpt):
  hf = json.loads((ckpt / "config.json").read_text())
  (ckpt / "config.json").write_text(json.dumps({**hf, "mystery_knob": 3}))
  with pytest.raises(ValueError, match="mystery_knob"):
    ling_jax.load_hf(ckpt, progress=False)


def test_missing_shard(ckpt):
  os.remove(ckpt / "model-00002-of-00003.safetensors")
  with pytest.raises(hf_io.CheckpointError, match="model-00002-of-00003.safetensors"):
    ling_jax.load_hf(ckpt, progress=False)


def test_truncated_shard(ckpt):
  path = ckpt / "model-00003-of-00003.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:-10])
  with pytest.raises(SafetensorsError, match="model-00003-of-00003.safetensors.*truncated"):
    ling_jax.load_hf(ckpt, progress=False)


def _rewrite(ckpt, fname, edit):
  with SafetensorsFile(ckpt / fname) as st:
    tensors = {n: np.array(st.get(n)) for n in st.keys()}
  edit(tensors)
  write_safetensors(ckpt / fname, tensors)


def test_wrong_shape(ckpt):
  name = "model.layers.1.attention.kv_b_proj.weight"
  fname = json.loads((ckpt / INDEX).read_text())["weight_map"][name]
  _rewrite(ckpt, fname, lambda t: t.update({name: t[name][:-1]}))
  with pytest.raises(hf_io.CheckpointError, match=f"{name}.*shape"):
    ling_jax.load_hf(ckpt, progress=False)


def test_missing_and_unexpected_tensors(ckpt):
  _rewrite(ckpt, MTP_FILE, lambda t: t.pop("model.layers.4.enorm.weight"))
  index = json.loads((ckpt / INDEX).read_text())
  del index["weight_map"]["model.layers.4.enorm.weight"]
  (ckpt / INDEX).write_text(json.dumps(index))
  with pytest.raises(hf_io.CheckpointError, match="missing.*model.layers.4.enorm.weight"):
    ling_jax.load_hf(ckpt, progress=False)
  _rewrite(ckpt, MTP_FILE, lambda t: t.update({"model.layers.4.enorm.weight": np.ones(64, np.float32),
                                               "model.layers.4.bogus.weight": np.ones(3, np.float32)}))
  with pytest.raises(hf_io.CheckpointError, match="unexpected.*model.layers.4.bogus.weight"):
    ling_jax.load_hf(ckpt, progress=False)


def test_index_disagreeing_with_headers(ckpt):
  index = json.loads((ckpt / INDEX).read_text())
  index["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors"
  (ckpt / INDEX).write_text(json.dumps(index))
  with pytest.raises(hf_io.CheckpointError, match="lm_head.weight"):
    ling_jax.load_hf(ckpt, progress=False)


def test_save_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
  cfg = ling_jax.ling_tiny()
  model = ling_jax.LingForCausalLM(cfg, rngs=nnx.Rngs(0))
  out = tmp_path / "out"
  calls = []

  def failing_write(path, tensors, metadata=None):
    calls.append(path)
    if len(calls) == 2:
      raise OSError("disk full (simulated)")
    return write_safetensors(path, tensors, metadata)

  monkeypatch.setattr(hf_io, "write_safetensors", failing_write)
  with pytest.raises(OSError, match="simulated"):
    hf_io.save_hf(model, cfg, out, max_shard_bytes=100_000, progress=False)
  assert os.listdir(tmp_path) == []  # neither the target nor the temporary folder remains
  monkeypatch.undo()
  hf_io.save_hf(model, cfg, out, progress=False)
  with pytest.raises(FileExistsError):
    hf_io.save_hf(model, cfg, out, progress=False)
  with pytest.raises(ValueError, match="config"):
    hf_io.save_hf(model, ling_jax.ling_tiny(vocab_size=300), tmp_path / "x", progress=False)


# ------------------------------------------------------------ dtypes: the policy of convert import
# Bit patterns that a cast would turn into weights: int16 codes, booleans, and FP8 with no scale
# (the stored values are W / scale, off by the scale's factor).
NON_FLOAT = {"int16": lambda a: (a * 1000).astype(np.int16), "bool": lambda a: a > 0,
             "float8_e4m3fn": lambda a: a.astype(ml_dtypes.float8_e4m3fn)}


@pytest.mark.parametrize("dtype", sorted(NON_FLOAT))
def test_non_float_tensors_are_refused_as_by_convert_import(ckpt, tmp_path, dtype):
  name = "model.layers.1.attention.kv_b_proj.weight"
  fname = json.loads((ckpt / INDEX).read_text())["weight_map"][name]
  _rewrite(ckpt, fname, lambda t: t.update({name: NON_FLOAT[dtype](t[name])}))
  with pytest.raises(hf_io.CheckpointError) as loaded:
    ling_jax.load_hf(ckpt, progress=False)
  for part in (str(ckpt / fname), repr(name), dtype):
    assert part in str(loaded.value)
  with pytest.raises(hf_io.CheckpointError) as imported:
    import_hf(ckpt, tmp_path / "out", np.float32, progress=False)
  assert str(loaded.value) == str(imported.value)


def test_fp8_weights_are_dequantised_with_their_scales(tmp_path):
  """An FP8 folder (per-channel scales) loads as the fp32 folder of its dequantised weights."""
  fp8, ref = tmp_path / "fp8", tmp_path / "ref"
  write_random_hf_checkpoint(fp8, tiny_hf_config(), seed=3)
  shutil.copytree(fp8, ref)
  index = json.loads((fp8 / INDEX).read_text())
  quantised = 0
  for fname in sorted(set(index["weight_map"].values())):
    with SafetensorsFile(fp8 / fname) as st:
      tensors = {n: np.array(st.get(n)) for n in st.keys()}
    stored, dequantised = {}, {}
    for n, a in tensors.items():
      stored[n] = dequantised[n] = a
      if a.ndim == 2 and not n.endswith(("word_embeddings.weight", "lm_head.weight",
                                         "mlp.gate.weight")):
        q, scale = quantize(a, QuantScheme("channel"))  # scale: [out, 1]
        stored[n], stored[n + "_scale"] = q, scale
        dequantised[n] = q.astype(np.float32) * scale
        index["weight_map"][n + "_scale"] = fname
        quantised += 1
    write_safetensors(fp8 / fname, stored)
    write_safetensors(ref / fname, dequantised)
  assert quantised > 50
  (fp8 / INDEX).write_text(json.dumps(index))
  config = json.loads((fp8 / "config.json").read_text())
  config["quantization_config"] = {
      "quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
          "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}}}}
  (fp8 / "config.json").write_text(json.dumps(config))
  _, got = ling_jax.load_hf(fp8, dtype=jnp.float32, progress=False)
  _, want = ling_jax.load_hf(ref, dtype=jnp.float32, progress=False)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(got)), nnx.to_flat_state(nnx.state(want))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                  err_msg=str(p))
