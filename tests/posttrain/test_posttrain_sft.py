"""The SFT loop: the assistant-only loss mask in pretraining's loss, and `run_sft` end to end
(measures, trains, resumes from its checkpoint, and its result loads as a model)."""

import dataclasses
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

import ling_jax
from experiments import sft_tiny
from ling_jax.config import ling_tiny
from ling_jax.posttrain.sft import run_sft
from ling_jax.train.step import lm_losses


def test_loss_mask_keeps_only_assistant_targets_float64():
  """With loss_mask, the CE sums over targets t+1 with mask 1 in the same (non-padding) segment;
  the MTP target t+2 needs mask 1 on t+2 and both links inside one segment."""
  rng = np.random.default_rng(0)
  B, T, V = 2, 12, 7
  logits = rng.normal(size=(B, T, V)).astype(np.float32)
  mtp = rng.normal(size=(B, T, V)).astype(np.float32)
  tokens = rng.integers(0, V, (B, T)).astype(np.int32)
  seg = np.array([[1] * 5 + [2] * 6 + [0], [1] * 12], np.int32)
  mask = rng.integers(0, 2, (B, T)).astype(np.int32)
  out = types.SimpleNamespace(logits=jnp.asarray(logits), mtp_logits=jnp.asarray(mtp))
  batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
           "loss_mask": jnp.asarray(mask)}
  res = lm_losses(out, batch)

  def ce(lg, t):
    lg = np.asarray(lg, np.float64)
    return np.log(np.exp(lg).sum()) - lg[t]

  want, n, want2, n2 = 0.0, 0, 0.0, 0
  for b in range(B):
    for t in range(T - 1):
      if seg[b, t] and seg[b, t + 1] == seg[b, t] and mask[b, t + 1]:
        want, n = want + ce(logits[b, t], tokens[b, t + 1]), n + 1
      if (t < T - 2 and seg[b, t] and seg[b, t + 1] == seg[b, t] == seg[b, t + 2]
          and mask[b, t + 2]):
        want2, n2 = want2 + ce(mtp[b, t], tokens[b, t + 2]), n2 + 1
  assert 0 < n < B * (T - 1)
  np.testing.assert_allclose(float(res["ce_sum"]), want, rtol=1e-5)
  assert float(res["n"]) == n
  np.testing.assert_allclose(float(res["mtp_sum"]), want2, rtol=1e-5)
  assert float(res["n_mtp"]) == n2
  # Without a mask every in-segment target counts.
  del batch["loss_mask"]
  assert float(lm_losses(out, batch)["n"]) > n


def test_sft_runs_resumes_and_loads(tmp_path):
  exp = sft_tiny.config()
  out = str(tmp_path / "sft")
  exp = dataclasses.replace(
      exp, model=ling_tiny(num_hidden_layers=2),
      tasks=dataclasses.replace(exp.tasks, train_prompts=64, eval_prompts=2),
      data=dataclasses.replace(exp.data, seq_len=160, batch_size=2),
      eval=dataclasses.replace(exp.eval, max_new_tokens=8),
      train=dataclasses.replace(exp.train, steps=3, checkpoint_every=2, log_every=1,
                                out_dir=out, async_checkpoint=False))
  first = run_sft(exp)
  assert first["resumed_from"] == 0 and first["before"]["n"] == 2
  assert first["before"]["mean_length"] == 8  # no end of turn within 8 tokens: reward 0
  assert first["after"]["accuracy"] == 0.0
  records = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
  assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["ce"] < records[0]["ce"] + 1
  # More steps: resumes from step 3 (its data state too) and measures "before" only once.
  more = dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=4))
  second = run_sft(more)
  assert second["resumed_from"] == 3 and second["before"] == first["before"]
  cfg, model = ling_jax.load(out)
  assert cfg == exp.model
  assert model.config.num_hidden_layers == 2


def test_start_points_and_a_tokenizer_without_chat_template(tmp_path):
  """start.init names an HF folder (read as ling_jax.load_hf reads it), a run checkpoint, or
  nothing usable (refused by name); a tokenizer folder without a chat template is a ChatError
  before anything is written, and the built-in template can be asked for instead."""
  import pytest
  from tokenizers import Tokenizer, models, pre_tokenizers

  from hf_fixtures import tiny_hf_config, write_random_hf_checkpoint
  from ling_jax.posttrain.chat import BUILTIN, ChatError
  from ling_jax.posttrain.config import Start
  from ling_jax.posttrain.init import init_kind, load_start_model, tokenizer_and_template
  from ling_jax.train.errors import RunRefused

  hf = tmp_path / "hf"
  write_random_hf_checkpoint(hf, tiny_hf_config(), num_shards=1)
  assert init_kind(str(hf)) == "hf"
  with pytest.raises(RunRefused, match="neither an HF folder"):
    init_kind(str(tmp_path))
  with pytest.raises(RunRefused, match="no such directory"):
    init_kind(str(tmp_path / "missing"))
  cfg, model = load_start_model(str(hf), dtype=jnp.float32, kernels=sft_tiny.config().train.kernels)
  cfg2, reference = ling_jax.load_hf(str(hf), np.float32)
  assert cfg == cfg2
  tokens = np.array([[1, 2, 3, 4]], np.int32)
  np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(reference(tokens)), rtol=1e-5,
                             atol=1e-5)

  tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(hf / "tokenizer.json"))
  with pytest.raises(ChatError, match="has no chat template"):
    tokenizer_and_template(Start(init=str(hf)), cfg.vocab_size)
  _, template, _ = tokenizer_and_template(Start(init=str(hf), chat_template="builtin"),
                                          cfg.vocab_size)
  assert template is BUILTIN
  exp = sft_tiny.config()
  out = tmp_path / "refused"
  exp = dataclasses.replace(exp, model=cfg, start=Start(init=str(hf)),
                            train=dataclasses.replace(exp.train, out_dir=str(out)))
  with pytest.raises(ChatError, match="has no chat template"):
    run_sft(exp)
  assert not out.exists()


def test_mixed_verbosity_references():
  """tasks.verbosity=-1 gives seed s the references of verbosity s mod 3: one task kind's
  references then come in three lengths (kinds alternate with the seed too)."""
  from ling_jax.posttrain.config import Tasks
  from ling_jax.posttrain.sft import task_conversations
  from ling_jax.posttrain.tasks import make_task, reference_messages

  tasks = Tasks(kinds=("arith", "list"), difficulty=2, train_prompts=12, verbosity=-1)
  convs = task_conversations(tasks)
  for s, conv in enumerate(convs):
    kind = ("arith", "list")[s % 2]
    assert conv == reference_messages(make_task(kind, s, 2), s % 3)
  lengths = {s % 3: len(convs[s][-1]["content"]) for s in range(0, 12, 2)}  # arith seeds
  assert len(set(lengths.values())) == 3
  with pytest.raises(ValueError, match="verbosity=3"):
    Tasks(verbosity=3)
