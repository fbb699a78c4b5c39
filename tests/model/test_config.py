"""Config presets, derived numbers, HF config strictness, and the real presets' shapes/shardings."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ling_jax import axes as ax
from ling_jax.config import YarnScaling, alibi_slopes, ling_2_6_1t, ling_2_6_flash, ling_small, ling_tiny
from ling_jax.hf_config import from_hf_config, read_hf_config, to_hf_config
from ling_jax.model import Kernels, LingForCausalLM
from ling_jax.model.common import CHECKPOINTED
from ling_jax.train.step import lm_losses
from pallas_kernels.moe import grouped
from flop_count import weight_matmul_flops
from testing import random_tokens


def test_flash_layout_and_counts_match_spec():
  cfg = ling_2_6_flash()
  types = cfg.layer_types()
  assert [i for i, t in enumerate(types) if t == "mla"] == [7, 15, 23, 31]
  assert cfg.mlp_types().count("dense") == 1
  # docs/architecture.md §1.4, exact.
  assert cfg.param_count() == 104_186_915_584
  assert cfg.param_count(include_mtp=True) - cfg.param_count() == 3_307_493_632
  assert cfg.active_param_count() == 7_449_488_128
  big = ling_2_6_1t()
  assert round(big.param_count() / 1e9) == 1012
  assert round(big.active_param_count() / 1e9, 1) == 63.6
  assert [i for i, t in enumerate(big.layer_types()) if t == "mla"] == list(range(7, 80, 8))


def test_small_preset_is_about_one_billion():
  cfg = ling_small()
  assert 0.9e9 < cfg.param_count() < 1.2e9
  assert cfg.flops_per_token(4096) > 6 * cfg.active_param_count() * 0.8


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "use_qk_norm": False,
                                          "first_k_dense_replace": 0}])
def test_flops_per_token_counts_the_matmuls_the_forward_runs(overrides, monkeypatch):
  """The MFU numerator's weight term against the traced training forward: every dot_general and
  ragged_dot with a weight operand, counted off the jaxpr (tests/flop_count.py). With MTP that
  includes the MTP head's own matmul through the shared lm_head; norms and the expert bias are
  in no matmul."""
  monkeypatch.setattr(grouped, "routed_experts_grouped",
                      functools.partial(grouped.routed_experts_grouped, matmul=jax.lax.ragged_dot))
  cfg = ling_tiny(**overrides)
  graphdef, params, rest = nnx.split(LingForCausalLM(cfg, rngs=nnx.Rngs(0),
                                                     kernels=Kernels(moe="interpret")),
                                     nnx.Param, ...)
  B, T = 2, 96
  batch = {"tokens": random_tokens(cfg, (B, T)),
           "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
           "segment_ids": jnp.ones((B, T), jnp.int32)}

  def loss(params, batch, mtp):
    model = nnx.merge(graphdef, params, rest)
    out = model.forward(batch["tokens"], positions=batch["positions"],
                        segment_ids=batch["segment_ids"], mtp=mtp, logits=False)
    return sum(lm_losses(out, batch, model.lm_head[...], ce_chunk=64).values())

  for mtp in (False, True):
    counted = weight_matmul_flops(functools.partial(loss, mtp=mtp), params, batch) / (B * T)
    assert counted == 2 * cfg.matmul_params_per_token(mtp), (mtp, counted)
  D, V = cfg.hidden_size, cfg.vocab_size
  assert cfg.matmul_params_per_token(True) - cfg.matmul_params_per_token(False) > V * D


def test_tail_layers_and_prefix_groups():
  cfg = ling_tiny(num_hidden_layers=7, layer_group_size=3, first_k_dense_replace=4)
  # (i+1) % 3 == 0 -> 2, 5; tail clause: i >= 6 -> 6.
  assert cfg.layer_types() == ("linear", "linear", "mla", "linear", "linear", "mla", "mla")
  assert (cfg.num_groups, cfg.num_prefix_groups, cfg.num_scanned_groups, cfg.num_tail_layers) == (2, 2, 0, 1)


def test_alibi_slopes_power_of_two_and_fallback():
  np.testing.assert_allclose(alibi_slopes(32), [2 ** (-(h + 1) / 4) for h in range(32)])
  s6 = alibi_slopes(6)  # 4 from the power-of-two set, then every other slope of 8 heads
  np.testing.assert_allclose(s6, alibi_slopes(4) + alibi_slopes(8)[0::2][:2])


def test_bad_configs_are_refused():
  with pytest.raises(ValueError, match="group_norm_size"):
    ling_tiny(group_norm_size=3)
  with pytest.raises(ValueError, match="n_group"):
    ling_tiny(n_group=3)
  with pytest.raises(ValueError, match="decay_form"):
    ling_tiny(decay_form="C")


@pytest.mark.parametrize("field, value, message", [
    ("rms_norm_eps", -1e-6, "rms_norm_eps=-1e-06 must be a finite number > 0"),
    ("routed_scaling_factor", float("nan"), "routed_scaling_factor=nan must be a finite number"),
    ("rope_theta", 0.0, "rope_theta=0.0 must be a finite number > 0"),
    ("hidden_size", "64", "hidden_size='64' must be an integer >= 1"),
    ("num_experts", 8.0, "num_experts=8.0 must be an integer >= 1"),
    ("n_group", 0, "n_group=0 must be an integer >= 1"),
    ("use_qk_norm", 1, "use_qk_norm=1 must be True or False"),
    ("partial_rotary_factor", float("nan"), "partial_rotary_factor=nan must be a number in"),
    ("q_lora_rank", 0, "q_lora_rank=0 must be None or an integer >= 1"),
    ("eos_token_id", (), r"eos_token_id=\(\) must be None, an integer >= 0 or a non-empty tuple"),
    ("rope_scaling", {"factor": 2.0}, "rope_scaling=.* must be None or a YarnScaling"),
])
def test_presets_refuse_bad_field_types_and_values(field, value, message):
  """Checked where the config is built, so presets are protected as well as config.json: these
  would otherwise fail as a raw TypeError in the model, or run and give NaN logits."""
  with pytest.raises(ValueError, match="invalid LingConfig: " + message):
    ling_tiny(**{field: value})
  with pytest.raises(ValueError, match=r"invalid YarnScaling: original_max_position_embeddings=64.0"):
    YarnScaling(factor=2.0, original_max_position_embeddings=64.0)


def test_hf_config_round_trip():
  for cfg in (ling_2_6_flash(), ling_tiny(q_lora_rank=None),
              ling_tiny(rope_scaling=YarnScaling(factor=2.0, original_max_position_embeddings=256))):
    hf = json.loads(json.dumps(to_hf_config(cfg)))
    assert hf["model_type"] == "bailing_hybrid"
    assert from_hf_config(hf) == cfg


def test_hf_config_refuses_unknown_and_unsupported_fields(tmp_path):
  hf = to_hf_config(ling_tiny())
  with pytest.raises(ValueError, match="does not understand.*'bogus_field'"):
    from_hf_config({**hf, "bogus_field": 1})
  with pytest.raises(ValueError, match="use_bias"):
    from_hf_config({**hf, "use_bias": True})
  with pytest.raises(ValueError, match="model_type"):
    from_hf_config({**hf, "model_type": "bailing_moe"})
  with pytest.raises(ValueError, match="num_key_value_heads"):
    from_hf_config({**hf, "num_key_value_heads": 1})
  with pytest.raises(ValueError, match="rope_scaling.*'foo'"):
    from_hf_config({**hf, "rope_scaling": {"type": "yarn", "factor": 2.0,
                                           "original_max_position_embeddings": 64, "foo": 1}})
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    read_hf_config(tmp_path)
  with pytest.raises(FileNotFoundError):
    read_hf_config(tmp_path / "nowhere")


@pytest.mark.parametrize("preset", [ling_2_6_flash, ling_2_6_1t])
def test_real_presets_eval_shape_counts_and_shardings(preset):
  cfg = preset()
  model = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, CHECKPOINTED)))
  assert n == cfg.param_count(include_mtp=True)
  mtp = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.mtp)))
  assert n - mtp == cfg.param_count()
  if preset is ling_2_6_flash:
    assert mtp == 3_307_493_632
  # Every variable (the Lightning decays too) has logical axes; they resolve on a fake 8-device
  # mesh.
  ax.logical_axes(state)
  mesh = ax.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
  shardings = ax.state_shardings(state, mesh)
  flat = dict(nnx.to_flat_state(shardings))
  experts = flat[("groups", "layers", 1, "mlp", "experts", "gate_proj")]
  assert experts.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
  embed = flat[("word_embeddings",)]
  assert embed.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
