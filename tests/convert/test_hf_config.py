"""config.json reading: absent fields take the reference's defaults, every field is type-checked,
values that would give NaN logits are refused (docs/config.md)."""

import dataclasses
import json
import math
import pathlib
import re
import warnings

import numpy as np
import pytest

from hf_fixtures import tiny_hf_config, write_random_hf_checkpoint
from ling_jax.config import ling_2_6_flash, ling_tiny
from ling_jax.convert import import_hf, store
from ling_jax.convert.__main__ import main as convert_main
from ling_jax.hf_config import (FIELDS, ConfigDefaultsWarning, ConfigError, from_hf_config,
                                read_hf_config, to_hf_config)

# The constructor defaults of BailingMoeV2_5Config, the config class of the release's remote code
# (configuration_bailing_moe_v2_5.py), for the fields of the network; written out here from that
# class, independently of the table in ling_jax.hf_config. bos_token_id is not one of its
# arguments: transformers' PretrainedConfig leaves it None.
REFERENCE_DEFAULTS = {
    "vocab_size": 157184, "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 20,
    "num_attention_heads": 16, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 600000.0,
    "partial_rotary_factor": 0.5, "rope_scaling": None, "max_position_embeddings": 32768,
    "layer_group_size": 5, "group_norm_size": 4, "use_qk_norm": True, "q_lora_rank": None,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1,
    "moe_intermediate_size": 512, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 1.0,
    "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "mtp_loss_scaling_factor": 0,
    "bos_token_id": None, "eos_token_id": 156892, "pad_token_id": 156892,
}


def _tiny(**changes) -> dict:
  """A complete tiny config.json dict (written by to_hf_config), with `changes`."""
  return {**json.loads(json.dumps(to_hf_config(ling_tiny(
      rope_scaling=None, bos_token_id=7, eos_token_id=(8, 9), pad_token_id=0)))), **changes}


def _without(hf: dict, *names) -> dict:
  return {k: v for k, v in hf.items() if k not in names}


def _quiet(hf: dict, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConfigDefaultsWarning)
    return from_hf_config(hf, **kwargs)


# ------------------------------------------------------------------------- absent fields
# Read only to be checked against the fields it is derived from.
_CHECKED = ("moe_shared_expert_intermediate_size",)
# Other fields a test of one absent field must set so that the reference's default is valid with
# the tiny sizes: 16 heads need 16 KV heads; 8 experts per token need 4 of the 4 groups of 2.
_ALONGSIDE = {"num_attention_heads": {"num_key_value_heads": 16},
              "num_experts_per_tok": {"topk_group": 4}}


@pytest.mark.parametrize("field", sorted(REFERENCE_DEFAULTS))
def test_an_absent_field_takes_the_reference_default(field):
  alongside = _ALONGSIDE.get(field, {})
  with pytest.warns(ConfigDefaultsWarning, match=rf"leaves out 1 field.* {field}="):
    cfg = from_hf_config(_without(_tiny(**alongside), field, *_CHECKED))
  assert getattr(cfg, field) == REFERENCE_DEFAULTS[field]
  model_fields = {k: v for k, v in alongside.items() if k in REFERENCE_DEFAULTS}
  assert cfg == dataclasses.replace(from_hf_config(_tiny()), **model_fields,
                                    **{field: REFERENCE_DEFAULTS[field]})  # nothing else changed


def test_flash_default_differs_from_reference_where_it_matters():
  """The fields the issue names: a preset default leaking in would change these."""
  flash = ling_2_6_flash()
  for field in ("rope_theta", "routed_scaling_factor", "q_lora_rank", "layer_group_size",
                "moe_intermediate_size", "num_nextn_predict_layers"):
    assert getattr(flash, field) != REFERENCE_DEFAULTS[field]
    assert getattr(_quiet(_without(_tiny(), field, *_CHECKED)), field) == REFERENCE_DEFAULTS[field]


def test_a_complete_config_warns_of_nothing_and_lists_every_field():
  for cfg in (ling_tiny(), ling_2_6_flash(), ling_tiny(q_lora_rank=None, eos_token_id=None)):
    hf = to_hf_config(cfg)
    assert set(REFERENCE_DEFAULTS) | {"decay_form", "num_key_value_heads", "model_type"} <= set(hf)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      assert from_hf_config(json.loads(json.dumps(hf))) == cfg
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    from_hf_config(tiny_hf_config())  # the test fixture's config is complete too


def test_several_absent_fields_are_listed_together():
  with pytest.warns(ConfigDefaultsWarning) as w:
    _quiet_free = from_hf_config(_without(_tiny(), "rope_theta", "n_group", "topk_group"))
  message = str(w[0].message)
  assert "leaves out 3 field(s)" in message and "BailingMoeV2_5Config" in message
  assert "rope_theta=600000.0" in message and "n_group=8" in message and "topk_group=4" in message
  assert (_quiet_free.n_group, _quiet_free.topk_group) == (8, 4)


def test_project_extension_decay_form_defaults_to_form_a_silently():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert from_hf_config(_without(_tiny(), "decay_form")).decay_form == "A"


def test_null_head_dim_is_hidden_size_over_heads_as_in_the_reference():
  cfg = from_hf_config(_tiny(head_dim=None, hidden_size=96, partial_rotary_factor=0.5))
  assert cfg.head_dim == 96 // 4


def test_absent_num_key_value_heads_must_match_the_reference_default():
  # 4 heads: the reference's default of 4 KV heads agrees, so nothing is missing.
  assert _quiet(_without(_tiny(), "num_key_value_heads")).num_attention_heads == 4
  hf = _without(_tiny(num_attention_heads=8, group_norm_size=2), "num_key_value_heads")
  with pytest.raises(ConfigError, match=r"no num_key_value_heads.*default 4.*num_attention_heads=8"
                     r".*\"num_key_value_heads\": 8"):
    _quiet(hf)


def test_model_type_is_required():
  with pytest.raises(ConfigError, match="no model_type"):
    _quiet(_without(_tiny(), "model_type"))


def test_rope_parameters_must_agree_with_the_fields_read():
  assert _quiet(_tiny(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
  with pytest.raises(ConfigError, match="rope_parameters.rope_theta=6000000.0.*no rope_theta"):
    _quiet(_without(_tiny(rope_parameters={"rope_type": "default", "rope_theta": 6e6}),
                    "rope_theta"))
  with pytest.raises(ConfigError, match="rope_parameters asks for 'yarn'"):
    _quiet(_tiny(rope_parameters={"rope_type": "yarn", "factor": 2.0}))


def test_import_records_the_reference_default_not_a_preset_default(tmp_path):
  """The converted checkpoint (and so any export) carries the value the reference would use."""
  hf = _without(tiny_hf_config(), "rope_theta", "routed_scaling_factor")
  write_random_hf_checkpoint(tmp_path / "hf", hf)
  with pytest.warns(ConfigDefaultsWarning, match="rope_theta=600000.0, routed_scaling_factor=1.0"):
    import_hf(tmp_path / "hf", tmp_path / "ckpt", np.float32, progress=False)
  written = json.loads((tmp_path / "ckpt" / store.MARKER).read_text())["config"]
  assert (written["rope_theta"], written["routed_scaling_factor"]) == (600000.0, 1.0)


# ------------------------------------------------------------------------------ types
@pytest.mark.parametrize("field, value, expected", [
    ("rope_theta", "1e4", "a number"),
    ("hidden_size", "64", "an integer"),
    ("num_experts", "8", "an integer"),
    ("hidden_size", 64.0, "an integer"),
    ("num_hidden_layers", True, "an integer"),
    ("rms_norm_eps", None, "a number"),
    ("use_qk_norm", "true", "true or false"),
    ("use_bias", 0, "true or false"),
    ("q_lora_rank", "24", "an integer or null"),
    ("eos_token_id", ["8", 9], "an integer, a list of integers, or null"),
    ("decay_form", 1, "a string"),
    ("num_key_value_heads", 4.5, "an integer"),
    ("rope_scaling", "yarn", "an object or null"),
])
def test_a_value_of_the_wrong_json_type_names_field_value_and_type(field, value, expected):
  with pytest.raises(ConfigError) as e:
    _quiet(_tiny(**{field: value}))
  assert str(e.value) == (f"config.json: field {field!r} = {json.dumps(value)} "
                          f"({type(value).__name__}); expected {expected}")


def test_rope_scaling_sub_fields_are_type_checked():
  rs = {"type": "yarn", "factor": "2", "original_max_position_embeddings": 64}
  with pytest.raises(ConfigError, match=r"field 'rope_scaling.factor' = \"2\" \(str\); expected a"):
    _quiet(_tiny(rope_scaling=rs))
  with pytest.raises(ConfigError, match=r"rope_scaling.*factor=-2.0 must be a finite number > 0"):
    _quiet(_tiny(rope_scaling={**rs, "factor": -2}))
  assert _quiet(_tiny(rope_scaling={**rs, "factor": 2})).rope_scaling.factor == 2.0


def test_file_errors_name_the_file(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(_tiny(hidden_size="64")))
  with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: field 'hidden_size'"):
    read_hf_config(tmp_path)
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(ConfigError, match="must hold a JSON object, not list"):
    read_hf_config(tmp_path)


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("field, value, message", [
    ("rms_norm_eps", -1e-6, "rms_norm_eps=-1e-06 must be a finite number > 0"),
    ("routed_scaling_factor", math.nan, "routed_scaling_factor=nan must be a finite number > 0"),
    ("rope_theta", math.inf, "rope_theta=inf must be a finite number > 0"),
    ("rope_theta", 0, "rope_theta=0.0 must be a finite number > 0"),
    ("n_group", 0, "n_group=0 must be an integer >= 1"),
    ("group_norm_size", 0, "group_norm_size=0 must be an integer >= 1"),
    ("hidden_size", -64, "hidden_size=-64 must be an integer >= 1"),
    ("mtp_loss_scaling_factor", -0.3, "mtp_loss_scaling_factor=-0.3 must be a finite number >= 0"),
    ("pad_token_id", -1, "pad_token_id=-1 must be None or an integer >= 0"),
])
def test_values_that_break_the_forward_are_refused(field, value, message):
  # Through JSON text, as a file would hold them (Python's json writes and reads NaN, Infinity).
  hf = json.loads(json.dumps(_tiny(**{field: value})))
  with pytest.raises(ConfigError, match="config.json: invalid LingConfig: .*" + message):
    _quiet(hf)


def test_convert_import_refuses_a_string_number_and_writes_nothing(tmp_path, capsys):
  write_random_hf_checkpoint(tmp_path / "hf", tiny_hf_config(rope_theta="1e4"))
  assert convert_main(["import", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--no-progress"]) == 1
  assert "field 'rope_theta' = \"1e4\" (str); expected a number" in capsys.readouterr().err
  assert not (tmp_path / "ckpt").exists()


def test_docs_table_lists_every_field_with_its_default_and_source():
  doc = (pathlib.Path(__file__).parents[2] / "docs" / "config.md").read_text()
  rows = {}
  for line in doc.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 6 and re.fullmatch(r"`\w+`", cells[0]):
      rows[cells[0].strip("`")] = cells
  assert sorted(rows) == sorted(FIELDS)
  for name, (_, _, _, absent, source, _) in rows.items():
    field = FIELDS[name]
    assert source == field.source, name
    if absent not in ("error", "—"):
      assert absent == f"`{json.dumps(field.default)}`", name
