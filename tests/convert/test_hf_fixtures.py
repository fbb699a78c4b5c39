"""The random HF-layout fixtures (docs/architecture.md §4) and what mlx-lm's `bailing_hybrid` does
with them.

These pin down, before any model test relies on them, that (1) the fixture shapes add up to the
spec's exact parameter counts at flash size, (2) the folders look like the release (shards, MTP
file, index), and (3) mlx-lm loads every config family the model tests use, strictly, and gives
finite, non-degenerate, causal logits on both sides of its 128-token chunk.
"""

import json

import ml_dtypes
import numpy as np
import pytest

from hf_fixtures import (INDEX, MTP_FILE, hf_tensor_shapes, is_mla_layer, mlx_logits, mlx_model,
                         tiny_hf_config, write_random_hf_checkpoint)
from ling_jax.io.safetensors import SafetensorsFile

# docs/architecture.md §1.1: the Ling-2.6-flash values of the structural fields.
FLASH = tiny_hf_config(
    vocab_size=157184, hidden_size=4096, intermediate_size=9216, moe_intermediate_size=1024,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
    layer_group_size=8, group_norm_size=4, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_experts=256,
    num_experts_per_tok=8, n_group=8, topk_group=4, max_position_embeddings=131072)


def test_flash_shapes_reproduce_the_spec_parameter_counts():
  main = hf_tensor_shapes(FLASH, include_mtp=False)
  full = hf_tensor_shapes(FLASH)
  count = lambda shapes: sum(int(np.prod(s)) for s in shapes.values())
  assert count(main) == 104_186_915_584  # docs/architecture.md §1.4
  assert count(full) - count(main) == 3_307_493_632  # the MTP layer, docs/architecture.md §1.4
  assert len(main) == 24_229  # docs/architecture.md §4.2
  # docs/architecture.md §2
  assert [i for i in range(32) if is_mla_layer(i, FLASH)] == [7, 15, 23, 31]
  assert is_mla_layer(32, FLASH)
  assert full["model.layers.32.eh_proj.weight"] == (4096, 8192)
  assert full["model.layers.7.attention.kv_b_proj.weight"] == (8192, 512)
  assert full["model.layers.0.attention.query_key_value.weight"] == (12288, 4096)


@pytest.mark.parametrize("n_layers, group, mla", [
    (4, 2, [1, 3]), (5, 2, [1, 3, 4]), (7, 3, [2, 5, 6]), (6, 4, [3, 4, 5]), (8, 8, [7]),
    (10, 8, [7, 8, 9]), (4, 8, [0, 1, 2, 3])])
def test_layer_layout_tail_clause(n_layers, group, mla):
  cfg = tiny_hf_config(num_hidden_layers=n_layers, layer_group_size=group)
  assert [i for i in range(n_layers) if is_mla_layer(i, cfg)] == mla


def test_folder_layout_matches_the_release(tmp_path):
  cfg = tiny_hf_config()
  tensors = write_random_hf_checkpoint(tmp_path, cfg, num_shards=3)
  assert set(tensors) == set(hf_tensor_shapes(cfg))
  shards = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["config.json", INDEX, MTP_FILE] + shards)
  index = json.loads((tmp_path / INDEX).read_text())
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())

  where = {}
  for fname in shards + [MTP_FILE]:
    with SafetensorsFile(tmp_path / fname) as st:
      assert st.metadata == {"format": "pt"}
      for name in st.keys():
        where[name] = fname
        np.testing.assert_array_equal(st.get(name), tensors[name])
  assert where == index["weight_map"]
  assert {n for n, f in where.items() if f == MTP_FILE} == {
      n for n in tensors if n.startswith("model.layers.4.")}
  # Layers are filled in order, so shards hold contiguous layer ranges, and some layer straddles.
  layers_in = [{int(n.split(".")[2]) for n, f in where.items()
                if f == s and n.startswith("model.layers.")} for s in shards]
  assert any(a & b for a, b in zip(layers_in, layers_in[1:]))
  assert "model.word_embeddings.weight" in (n for n, f in where.items() if f == shards[0])
  assert where["lm_head.weight"] == shards[-1]
  assert json.loads((tmp_path / "config.json").read_text()) == cfg


def test_bf16_fixture_keeps_the_router_bias_in_fp32(tmp_path):
  tensors = write_random_hf_checkpoint(tmp_path, tiny_hf_config(), dtype=ml_dtypes.bfloat16,
                                       num_shards=2)
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  with SafetensorsFile(tmp_path / "model-00002-of-00002.safetensors") as st:
    assert st.info("model.layers.3.mlp.gate.expert_bias")[0] == np.float32
    assert st.info("model.layers.3.mlp.gate.weight")[0] == ml_dtypes.bfloat16
  assert tensors["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == ml_dtypes.bfloat16


# Every config family the model tests compare against mlx-lm (docs/architecture.md §1.1, 2,
# 3.4-3.7).
E16 = dict(num_experts=16, num_experts_per_tok=4)
MLX_CONFIGS = {
    "base": dict(),
    "no_q_lora": dict(q_lora_rank=None),
    "heads6_alibi_fallback": dict(num_attention_heads=6, num_key_value_heads=6),
    "heads6_no_q_lora": dict(num_attention_heads=6, num_key_value_heads=6, q_lora_rank=None,
                             group_norm_size=3),
    "L5_G2_tail": dict(num_hidden_layers=5, layer_group_size=2),
    "L6_G3": dict(num_hidden_layers=6, layer_group_size=3),
    "L7_G3_tail": dict(num_hidden_layers=7, layer_group_size=3),
    "L8_G4": dict(num_hidden_layers=8, layer_group_size=4),
    "L6_G4_tail": dict(num_hidden_layers=6, layer_group_size=4),
    "L8_G8": dict(num_hidden_layers=8, layer_group_size=8),
    "L10_G8_tail": dict(num_hidden_layers=10, layer_group_size=8),
    "L4_G8_all_mla": dict(num_hidden_layers=4, layer_group_size=8),
    "dense0": dict(first_k_dense_replace=0),
    "dense2": dict(first_k_dense_replace=2),
    "groups_1_1": dict(E16, n_group=1, topk_group=1),
    "groups_2_1": dict(E16, n_group=2, topk_group=1),
    "groups_4_2": dict(E16, n_group=4, topk_group=2),
    "groups_8_4": dict(E16, n_group=8, topk_group=4),
    "yarn": dict(rope_scaling={"type": "yarn", "factor": 2.0,
                               "original_max_position_embeddings": 256}),
    "flash_theta": dict(rope_theta=6e6),
}


@pytest.mark.parametrize("name", list(MLX_CONFIGS))
def test_mlx_loads_strictly_and_gives_sane_logits(tmp_path, name):
  cfg = tiny_hf_config(**{"rope_theta": 10000.0, **MLX_CONFIGS[name]})
  write_random_hf_checkpoint(tmp_path, cfg, seed=list(MLX_CONFIGS).index(name))
  tokens = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 200))
  logits = mlx_logits(tmp_path, tokens)  # T = 200: two of mlx's 128-token chunks
  assert logits.shape == (2, 200, cfg["vocab_size"]) and logits.dtype == np.float32
  assert np.isfinite(logits).all()
  assert logits.std(axis=-1).min() > 0.2  # no position collapses to a constant distribution
  assert np.abs(np.diff(logits, axis=1)).mean() > 0.2  # positions differ
  assert np.abs(logits[0] - logits[1]).mean() > 0.2  # sequences differ
  # Causal and independent of the chunking: a prefix (one chunk, T < 128) gives the same logits.
  for t in (7, 150):
    np.testing.assert_allclose(mlx_logits(tmp_path, tokens[:, :t]), logits[:, :t],
                               rtol=1e-4, atol=1e-4, err_msg=f"prefix {t}")


def test_mlx_bf16_checkpoint(tmp_path):
  import safetensors.numpy

  cfg = tiny_hf_config(rope_theta=10000.0)
  tensors = write_random_hf_checkpoint(tmp_path / "bf16", cfg, dtype=ml_dtypes.bfloat16)
  tokens = np.random.default_rng(1).integers(0, 256, (1, 40))
  # Known mlx 0.32.4 CPU limitation: the routed experts' gather_mm is float32-only.
  with pytest.raises(RuntimeError, match="GatherMM.*float32"):
    mlx_logits(tmp_path / "bf16", tokens)
  logits = mlx_logits(tmp_path / "bf16", tokens, dtype="float32")  # bf16 weights, fp32 compute
  assert np.isfinite(logits).all() and logits.std(axis=-1).min() > 0.2
  # The same (bf16-rounded) values stored as fp32 in a single file give the same logits.
  (tmp_path / "f32").mkdir()
  safetensors.numpy.save_file({n: a.astype(np.float32) for n, a in tensors.items()},
                              str(tmp_path / "f32" / "model.safetensors"))
  (tmp_path / "f32" / "config.json").write_text(json.dumps(cfg))
  np.testing.assert_allclose(logits, mlx_logits(tmp_path / "f32", tokens), rtol=1e-5, atol=1e-5)


def test_mlx_cached_prefill_and_decode_match_the_full_forward(tmp_path):
  import mlx.core as mx

  cfg = tiny_hf_config(rope_theta=10000.0, num_hidden_layers=5)
  write_random_hf_checkpoint(tmp_path, cfg)
  tokens = np.random.default_rng(2).integers(0, 256, (2, 140))
  full = mlx_logits(tmp_path, tokens)
  model = mlx_model(tmp_path)
  cache = model.make_cache()
  parts = [model(mx.array(tokens[:, :130]), cache=cache)]
  for t in range(130, 140):  # one-token decode: mlx's recurrent / absorbed-MLA path
    parts.append(model(mx.array(tokens[:, t:t + 1]), cache=cache))
  cached = np.array(mx.concatenate(parts, axis=1))
  np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)


def test_mlx_load_is_strict(tmp_path):
  """A missing tensor must fail the mlx load: otherwise the comparisons above prove little."""
  import safetensors.numpy

  cfg = tiny_hf_config()
  write_random_hf_checkpoint(tmp_path, cfg, num_shards=1)
  shard = tmp_path / "model-00001-of-00001.safetensors"
  tensors = safetensors.numpy.load_file(str(shard))
  del tensors["model.layers.0.attention.g_norm.weight"]
  safetensors.numpy.save_file(tensors, str(shard))
  with pytest.raises(ValueError, match="g_norm"):
    mlx_model(tmp_path)
