"""Training: overrides and config validation, the optimizer's decay mask, the expert-bias rule,
the train step, exact resume after `kill -9` of a real training process, a clean stop on Ctrl-C,
and no non-finite state saved or resumed."""

import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import tiny_pretrain
from experiments.overrides import OverrideError, apply_overrides
from ling_jax.config import ling_tiny
from ling_jax.data import SyntheticIterator
from ling_jax.model import Kernels, LingForCausalLM, Remat
from ling_jax.train import TrainConfig, build_model, run
from ling_jax.train.balance import moe_rows, update_expert_bias
from ling_jax.train.checkpoint import Checkpointer, ConfigMismatch, committed_steps, config_meta
from ling_jax.train.errors import NonFiniteError, RunRefused
from ling_jax.train.loop import _train
from ling_jax.train.optim import decays, optimizer, schedule
from ling_jax.train.report import MetricsLog, read_metrics, write_loss_curve
from ling_jax.train.step import (_losses, compute_copies, init_state, make_train_step,
                                  split_model)
from testing import deadline, random_model, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DENSE = Kernels(moe="reference")  # every expert on every token, as tiny_pretrain runs it


# ---------------------------------------------------------------------- overrides
def test_overrides_parse_typed_fields_and_refuse_unknown_ones():
  exp = apply_overrides(tiny_pretrain.config(), [
      "train.steps=7", "train.learning_rate=1e-4", "train.mtp=false", "data.tokenizer=none",
      "model.eos_token_id=1,2", "model.decay_form=B", "model.q_lora_rank=None"])
  assert (exp.train.steps, exp.train.learning_rate, exp.train.mtp) == (7, 1e-4, False)
  assert exp.data.tokenizer is None and exp.model.eos_token_id == (1, 2)
  assert exp.model.decay_form == "B" and exp.model.q_lora_rank is None
  bad = {
      "train.stepz=3": "unknown field 'train.stepz'",
      "modle.hidden_size=3": "unknown field 'modle.hidden_size'",
      "train.steps=many": "is not int",
      "train.mtp=maybe": "not a bool",
      "model.num_hidden_layers=0": "num_hidden_layers=0 must be an integer >= 1",
      "model.rope_scaling.factor=2": "rope_scaling is None",
      "train": "expected key.sub=value",
      "data=1": "config section",
  }
  for arg, match in bad.items():
    with pytest.raises(OverrideError, match=match):
      apply_overrides(tiny_pretrain.config(), [arg])


def test_cli_refuses_unknown_override_without_writing(tmp_path, jax_cache):
  out = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "experiments.tiny_pretrain", "train.nope=1",
                         f"train.out_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                        env=_env(jax_cache))
  assert proc.returncode != 0 and "unknown field 'train.nope'" in proc.stderr
  assert not out.exists()


def test_kernel_and_remat_settings_override_as_sections():
  """train.kernels and train.remat are frozen sections: their fields override one by one, a
  value outside an op's vocabulary (the old names included) is refused naming field and value."""
  exp = apply_overrides(tiny_pretrain.config(), ["train.kernels.moe=xla",
                                                 "train.kernels.attention=cudnn",
                                                 "train.remat.policy=dots", "train.remat.scope=group"])
  assert exp.train.kernels == Kernels(moe="xla", lightning="xla", qk_norm_rope="xla",
                                      attention="cudnn")
  assert exp.train.remat == Remat("dots", "group")
  bad = {"train.kernels.moe=gmm": "moe='gmm' not in", "train.kernels.lightning=chunked":
         "lightning='chunked' not in", "train.kernels.moe_impl=dense": "unknown field",
         "train.remat=full": "config section", "train.remat.policy=most": "unknown remat policy",
         "train.remat.scope=model": "unknown remat scope"}
  for arg, match in bad.items():
    with pytest.raises(OverrideError, match=match):
      apply_overrides(tiny_pretrain.config(), [arg])


def test_configs_refuse_bad_optimizer_and_data_numbers():
  """Each bad number is refused before anything runs, with the field and the value named."""
  bad = {
      "train.learning_rate=nan": "learning_rate=nan must be a finite number > 0",
      "train.learning_rate=0": "learning_rate=0.0 must be a finite number > 0",
      "train.learning_rate=-1e-3": "learning_rate=-0.001 must be a finite number > 0",
      "train.learning_rate=inf": "learning_rate=inf must be a finite number > 0",
      "train.weight_decay=-0.1": "weight_decay=-0.1 must be a finite number >= 0",
      "train.weight_decay=nan": "weight_decay=nan must be a finite number >= 0",
      "train.b1=1": r"b1=1.0 must be in \[0, 1\)",
      "train.b2=-0.5": r"b2=-0.5 must be in \[0, 1\)",
      "train.b2=nan": r"b2=nan must be in \[0, 1\)",
      "train.eps=0": "eps=0.0 must be a finite number > 0",
      "train.grad_clip=-1": "grad_clip=-1.0 must be a finite number >= 0",
      "train.min_lr_ratio=1.5": r"min_lr_ratio=1.5 must be in \[0, 1\]",
      "train.log_every=0": "log_every=0 must be >= 1",
      "data.batch_size=0": "data.batch_size=0: invalid DataConfig: batch_size=0 must be >= 1$",
      "data.seq_len=2": "seq_len=2 must be >= 3$",
  }
  for arg, match in bad.items():
    with pytest.raises(OverrideError, match=match):
      apply_overrides(tiny_pretrain.config(), [arg])
  # grad_clip=0 turns clipping off (documented), rather than zeroing every gradient.
  params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 100.0)}
  for clip in (0.0, 1.0):
    tx = optimizer(TrainConfig(grad_clip=clip, warmup_steps=0, learning_rate=0.1, weight_decay=0))
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1, rtol=1e-5)  # Adam's first step: -lr * sign


def test_the_settings_name_choices_as_the_ops_do():
  """model/settings.py copies the ops' impl names and the remat policies' (so a config imports no
  jax): each Kernels field takes exactly its op's IMPLS."""
  from ling_jax.model import settings
  from ling_jax.model.remat import REMAT
  from pallas_kernels import (attention, cross_entropy, grouped_matmul, moe, qk_norm_rope,
                              rms_norm, simple_gla)
  ops = {"lightning": simple_gla, "qk_norm_rope": qk_norm_rope, "attention": attention,
         "moe": moe, "rms_norm": rms_norm, "cross_entropy": cross_entropy,
         "linear": grouped_matmul}
  assert {f.name for f in dataclasses.fields(Kernels)} == set(ops)
  for name, op in ops.items():
    assert op.IMPLS == (settings.ATTENTION_IMPLS if name == "attention" else settings.IMPLS), name
  assert settings.REMAT_POLICIES == tuple(REMAT)
  from ling_jax.parallel.expert import STRATEGIES
  assert set(settings.EXPERT_EXCHANGES) == set(STRATEGIES)
  with pytest.raises(ValueError, match="unknown expert_exchange 'ring'"):
    settings.Parallel("ring")


# ---------------------------------------------------------------------- optimizer
def test_no_weight_decay_on_norms_and_biases():
  model = nnx.eval_shape(lambda: LingForCausalLM(ling_tiny(), rngs=nnx.Rngs(0)))
  _, params, _, _ = split_model(model)
  flat = {".".join(map(str, p)): p for p, _ in nnx.to_flat_state(params)}
  path = lambda name: [jax.tree_util.DictKey(k) for k in flat[name]]
  for name in ("norm.weight", "prefix.0.layers.0.attention.g_norm.weight",
               "groups.layers.0.input_layernorm.weight", "mtp.enorm.weight"):
    assert not decays(path(name)), name
  for name in ("word_embeddings", "lm_head", "groups.layers.0.mlp.experts.up_proj",
               "prefix.0.layers.1.attention.kv_b_proj"):
    assert decays(path(name)), name
  lr = schedule(TrainConfig(steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1))
  assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1.0)
  assert float(lr(100)) == pytest.approx(0.1)


# ---------------------------------------------------------------------- expert bias
O0 = {"xla_backend_optimization_level": 0}  # compile time dominates these CPU tests


def _with(bias, path, g, expert, delta):
  """`bias` with `delta` added to one expert of one layer's row."""
  flat = dict(nnx.to_flat_state(bias))
  v = flat[path].get_value()
  v = v.at[expert].add(delta) if g is None else v.at[g, expert].add(delta)
  return nnx.from_flat_state([(p, var.replace(v if p == path else var.get_value()))
                              for p, var in flat.items()]), v


def test_build_model_initialises_like_the_module_with_uncommitted_arrays():
  """build_model compiles the init as one program (on the host CPU when the default device is an
  accelerator): the same weights as the module's own eager init from the same seed, and arrays
  left uncommitted (committed ones made the jitted steps of these tests ~2x slower to run)."""
  cfg = ling_tiny(num_hidden_layers=2)
  t = TrainConfig(kernels=DENSE, compute_dtype="float32", seed=3)
  built = nnx.state(build_model(type(tiny_pretrain.config())(cfg, tiny_pretrain.config().data, t)),
                    nnx.Param)
  eager = nnx.state(LingForCausalLM(cfg, rngs=nnx.Rngs(3), param_dtype=jnp.float32,
                                    kernels=t.kernels), nnx.Param)
  a, b = jax.tree.leaves(built), jax.tree.leaves(eager)
  assert len(a) == len(b) > 20
  for x, y in zip(a, b):
    assert not x.committed
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  assert np.std(np.asarray(a[-1])) > 0


def test_expert_bias_pairs_with_its_load_row_and_moves_toward_balance():
  # ling_tiny with 7 layers: a prefix group (dense layer 0, MoE layer 1), two scanned groups
  # (layers 2-5), a tail MLA layer and MTP: every place an expert bias lives.
  cfg = ling_tiny(num_hidden_layers=7)
  exp = tiny_pretrain.config()
  model = build_model(type(exp)(cfg, exp.data, TrainConfig(kernels=DENSE)))
  graphdef, params, bias, constants = split_model(model)
  tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, cfg.vocab_size)

  @functools.partial(jax.jit, compiler_options=O0)
  def loads(bias):
    out = nnx.merge(graphdef, params, bias, constants).forward(tokens, mtp=True)
    return out.expert_load, out.mtp_expert_load

  update = jax.jit(update_expert_bias, static_argnums=3, compiler_options=O0)
  rows = moe_rows(bias)
  assert len(rows) == 6  # layer 1 (prefix), 2 scanned groups x 2 layers, layer 6 (tail)
  base, _ = loads(bias)
  assert base.shape == (len(rows), cfg.num_experts)
  # Pushing one layer's bias towards expert 3 puts every token of that layer's row on expert 3
  # (earlier rows unchanged), and the update lowers exactly that entry.
  for i, (path, g) in enumerate(rows):
    pushed, v = _with(bias, path, g, 3, 10.0)
    load, _ = loads(pushed)
    assert load[i, 3] == tokens.size, (i, path, g)
    np.testing.assert_array_equal(load[:i], base[:i])
    new = dict(nnx.to_flat_state(update(pushed, load, None, 0.01)))[path].get_value()
    before, after = (v[3], new[3]) if g is None else (v[g, 3], new[g, 3])
    assert float(after) == pytest.approx(float(before) - 0.01)

  # Every router (MTP included) starts overloading experts 0 and 1 through its bias (sigmoid
  # scores are < 1, so +1 always wins); with the router weights frozen, repeated sign updates
  # bring every layer back near balance.
  skew = jnp.zeros(cfg.num_experts).at[:2].set(1.0)
  bias = jax.tree.map(lambda b: b + skew, bias)
  ratios = []
  for _ in range(50):
    load, mtp_load = loads(bias)
    everything = jnp.concatenate([load, mtp_load[None]])
    ratios.append(np.asarray(everything.max(-1) / everything.mean(-1)))
    bias = update(bias, load, mtp_load, 0.05)
  assert ratios[0].min() == pytest.approx(4.0)  # experts 0 and 1 take every token
  # Sign updates settle into a small oscillation around balance, not onto it.
  assert ratios[-1].max() < 2.0 and ratios[-1].mean() < 1.5, ratios[-1]


# ---------------------------------------------------------------------- the train step
def test_train_step_learns_and_moves_only_what_it_should():
  cfg = ling_tiny(num_hidden_layers=2)  # one (linear, MLA-MoE) group + MTP: a quick compile
  tcfg = TrainConfig(steps=20, learning_rate=1e-2, warmup_steps=3, compute_dtype="float32",
                     kernels=DENSE)
  exp = tiny_pretrain.config()
  graphdef, params, bias, constants = split_model(build_model(type(exp)(cfg, exp.data, tcfg)))
  tx = optimizer(tcfg)
  state = init_state(params, bias, tx)
  step = make_train_step(graphdef, constants, tx, schedule(tcfg),
                         mtp_weight=cfg.mtp_loss_scaling_factor, bias_rate=1e-3,
                         remat=Remat("dots"))
  # One batch over and over: memorising it is the quickest proof that the step learns.
  batch = next(SyntheticIterator(batch_size=2, seq_len=32, vocab_size=cfg.vocab_size, seed=0))
  bias0 = jax.tree.map(np.asarray, bias)
  losses = []
  for _ in range(tcfg.steps):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert set(m) >= {"loss", "ce", "mtp", "grad_norm", "lr", "load_max_mean"}
  assert m["load_max_mean"].shape == (1,)
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0, losses
  assert int(state.step) == tcfg.steps
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.expert_bias, bias0)
  assert all(0 < d <= tcfg.steps * 1e-3 + 1e-6 for d in jax.tree.leaves(moved))


def test_gradient_accumulation_gives_the_whole_batch_update():
  """grad_accum=2 runs the batch as two micro-batches: the same loss, metrics, new parameters
  and expert biases as one pass (fp32; only the summation order differs). Packed rows with
  different target counts per micro-batch check the loss is normalised by the whole batch."""
  cfg = ling_tiny(num_hidden_layers=2)
  tcfg = TrainConfig(steps=2, learning_rate=1e-2, warmup_steps=0, compute_dtype="float32",
                     kernels=DENSE)
  exp = tiny_pretrain.config()
  graphdef, params, bias, constants = split_model(build_model(type(exp)(cfg, exp.data, tcfg)))
  # Plain SGD: the new parameters are linear in the gradients (AdamW's m / sqrt(v) would magnify
  # summation-order noise wherever a gradient is near zero).
  tx = optax.sgd(0.1)
  batch = next(SyntheticIterator(batch_size=4, seq_len=32, vocab_size=cfg.vocab_size, seed=1))
  batch = dict(batch, segment_ids=np.asarray(batch["segment_ids"]).copy())
  batch["segment_ids"][0, 20:] = 0  # padding in the first micro-batch only
  results = []
  for accum in (1, 2):
    step = make_train_step(graphdef, constants, tx, schedule(tcfg),
                           mtp_weight=cfg.mtp_loss_scaling_factor, bias_rate=1e-3,
                           grad_accum=accum)
    state = init_state(jax.tree.map(jnp.array, params), jax.tree.map(jnp.array, bias), tx)
    for _ in range(2):
      state, m = step(state, batch)
    results.append((jax.tree.map(np.asarray, (state.params, state.expert_bias)),
                    {k: np.asarray(v) for k, v in m.items()}))
  (p1, m1), (p2, m2) = results
  for k in m1:
    np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="grad_accum"):
    type(exp)(cfg, dataclasses.replace(exp.data, batch_size=3),
              dataclasses.replace(tcfg, grad_accum=2))


def test_accumulation_casts_the_weights_once_with_the_same_update():
  """bf16 compute under grad_accum: the projection matrices are cast once per step and the
  micro-batches differentiate with respect to the copies (`compute_copies`). The same AdamW
  update bit for bit as casting in every micro-batch's forward; norms, router, embedding and
  head stay fp32."""
  cfg = ling_tiny(num_hidden_layers=2)
  tcfg = TrainConfig(steps=2, learning_rate=1e-2, warmup_steps=0, compute_dtype="bfloat16",
                     kernels=DENSE)
  exp = tiny_pretrain.config()
  graphdef, params, bias, constants = split_model(build_model(type(exp)(cfg, exp.data, tcfg)))
  copies = compute_copies(params, jnp.bfloat16)
  kept = {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(copies)
          if x.dtype == jnp.float32}
  assert any("lm_head" in k for k in kept) and any("['gate']['weight']" in k for k in kept)
  assert any("layernorm" in k for k in kept) and not any("_proj" in k for k in kept)
  tx = optimizer(tcfg)
  batch = next(SyntheticIterator(batch_size=4, seq_len=32, vocab_size=cfg.vocab_size, seed=2))
  results = []
  for cast_once in (False, True):
    step = make_train_step(graphdef, constants, tx, schedule(tcfg),
                           mtp_weight=cfg.mtp_loss_scaling_factor, bias_rate=1e-3, grad_accum=2,
                           compute_dtype="bfloat16", cast_once=cast_once)
    state = init_state(jax.tree.map(jnp.array, params), jax.tree.map(jnp.array, bias), tx)
    for _ in range(2):
      state, m = step(state, batch)
    results.append(jax.tree.map(np.asarray, (state.params, state.opt_state, m)))
  moved = jax.tree.map(lambda a, b: np.abs(a - np.asarray(b)).max(), results[1][0], params)
  assert min(jax.tree.leaves(moved)) > 0
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_array_equal(b, a)


def test_one_pass_logsumexp_matches_float64():
  """The head's one-read logsumexp: random rows at several scales (fp32 order against float64,
  like XLA's two-pass one), and rows with -inf entries (masked logits)."""
  from ling_jax.train.loss import logsumexp_one_pass
  rng = np.random.default_rng(5)
  for shape, scale in [((7, 1000), 1.0), ((3, 4099), 30.0), ((4, 3), 1e-3)]:
    x = rng.standard_normal(shape) * scale
    want = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    got = np.asarray(jax.jit(logsumexp_one_pass)(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
  x = jnp.array([[-jnp.inf, 0.0, 1.0], [-jnp.inf, -jnp.inf, 2.0]], jnp.float32)
  np.testing.assert_allclose(logsumexp_one_pass(x), [np.log(1 + np.e), 2.0], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_head_cross_entropy_matches_full_logits(dtype):
  """ce_chunk > 0 (train/loss.py: no [tokens, vocab] logits, gradient formed chunk by chunk) gives
  the loss of the full fp32 logits, and its gradients. With bf16 compute the fused gradient
  rounds softmax - onehot to bf16 before its two matmuls (the autodiff of the full logits runs
  them in fp32): ~0.3% on the head's gradients, ~1-2% once through the bf16 backward pass."""
  cfg = ling_tiny(num_hidden_layers=2)
  graphdef, params, bias, constants = split_model(random_model(cfg, dtype=jnp.dtype(dtype),
                                                               kernels=DENSE))
  batch = next(SyntheticIterator(batch_size=2, seq_len=32, vocab_size=cfg.vocab_size, seed=0))

  def loss(params, ce_chunk):
    _, s = _losses(graphdef, constants, params, bias, batch, mtp=True, ce_chunk=ce_chunk)
    return s["ce_sum"] / s["n"] + 0.3 * s["mtp_sum"] / s["n_mtp"], s

  # Ragged, even, larger than the 64 tokens; in bf16 the ragged one only. The full logits and
  # every chunk in one program: the model's trunk is the same in each, and XLA compiles it once
  # (fp32: 8 s against 19 s for a program each; each chunking is still its own computation).
  chunks = (5, 64, 200) if dtype == "float32" else (5,)
  ((want, want_sums), want_g), *results = jax.jit(lambda params: [
      jax.value_and_grad(functools.partial(loss, ce_chunk=c), has_aux=True)(params)
      for c in (0, *chunks)], compiler_options=O0)(params)
  assert 0 < float(want_sums["n_mtp"]) < float(want_sums["n"]) < 2 * 31  # documents do split rows
  for chunk, ((got, sums), got_g) in zip(chunks, results):
    for k in want_sums:
      np.testing.assert_allclose(sums[k], want_sums[k], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    want_flat = dict(nnx.to_flat_state(want_g))
    for path, g in nnx.to_flat_state(got_g):
      g, w = np.asarray(g.get_value(), np.float64), np.asarray(want_flat[path].get_value())
      err = np.linalg.norm(g - w) / np.linalg.norm(w)
      tol = 1e-5 if dtype == "float32" else (5e-3 if path == ("lm_head",) else 5e-2)
      assert err < tol, (chunk, path, err)


# ---------------------------------------------------------------------- non-finite states
def _fake_step(bad_step: int):
  """A train step that counts, with a NaN loss and NaN weights from step `bad_step` on."""
  def step(state, batch):
    n = int(state["step"]) + 1
    nan = n >= bad_step
    metrics = {"loss": jnp.float32(np.nan if nan else 1.0 / n), "ce": jnp.float32(1.0 / n),
               "grad_norm": jnp.float32(np.inf if nan else 1.0), "lr": jnp.float32(0.1),
               "load_max_mean": jnp.ones(1)}
    return {"step": state["step"] + 1, "w": state["w"] * (np.nan if nan else 1.0)}, metrics
  return step


def test_a_non_finite_loss_stops_the_run_before_its_state_is_saved(tmp_path):
  """Step 7 of 10 goes NaN; metrics are fetched every 5 steps and at every save (every 2): the
  loop stops at the save of step 8, which is not written, and says which checkpoint (6) is kept.
  A non-finite state is refused by `save` and, written by an older version, by `restore`."""
  exp = apply_overrides(tiny_pretrain.config(), [
      "train.steps=10", "train.log_every=5", "train.checkpoint_every=2", "train.keep_checkpoints=2",
      "train.progress=false", f"train.out_dir={tmp_path}"])
  ckpt_dir = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(ckpt_dir, every=2, keep=2)
  log = MetricsLog(str(tmp_path / "metrics.jsonl"), 0)
  it = SyntheticIterator(batch_size=1, seq_len=4, vocab_size=8, seed=0)
  state = {"step": jnp.zeros((), jnp.int32), "w": jnp.arange(3.0)}
  meta = config_meta(exp)
  with pytest.raises(NonFiniteError, match=r"diverged at step 7: loss nan, gradient norm inf; "
                     r"stopped without saving it. The last checkpoint, step 6 under "):
    _train(_fake_step(7), state, it, ckpt, log, exp, 0, meta, lambda tps: None,
           threading.Event())
  ckpt.close()
  assert committed_steps(ckpt_dir) == [4, 6]
  records = read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, 8)) and np.isnan(records[-1]["loss"])

  bad = {"step": jnp.array(8, jnp.int32), "w": jnp.array([0.0, np.inf, 1.0])}
  ckpt = Checkpointer(ckpt_dir, every=2, keep=3)
  with pytest.raises(NonFiniteError,
                     match=r"refusing to checkpoint step 8: non-finite values in \['w'\]"):
    ckpt.save(8, bad, it.get_state(), meta)
  # What the old loop wrote: a NaN state under a step directory. Restoring it is refused.
  import orbax.checkpoint as ocp
  ckpt.manager.save(8, args=ocp.args.Composite(
      state=ocp.args.StandardSave(bad), data=ocp.args.JsonSave(it.get_state()),
      meta=ocp.args.JsonSave(meta)), force=True)
  ckpt.close()
  ckpt = Checkpointer(ckpt_dir, every=2, keep=3)
  with pytest.raises(NonFiniteError, match=r"step 8 holds non-finite values \(\['w'\]\).*Delete "
                     + re.escape(os.path.join(ckpt_dir, "8")) + " to resume from step 6"):
    ckpt.restore(8, state)
  restored, _ = ckpt.restore(6, state)  # the finite one before it restores
  assert int(restored["step"]) == 6
  ckpt.close()


# ---------------------------------------------------------------------- reports
def test_loss_curve_leaves_the_matplotlib_backend_alone(tmp_path):
  """The PNG is drawn on a Figure of its own: switching the process to Agg, as the run once did,
  silenced every later inline figure of a notebook that had trained (notebooks/04_training_run)."""
  import matplotlib

  before = matplotlib.get_backend()
  matplotlib.use("svg")  # any backend but Agg stands for a notebook's inline one
  try:
    records = [{"step": i, "ce": 5.0 - 0.1 * i, "mtp": 5.2 - 0.1 * i} for i in range(1, 9)]
    assert write_loss_curve(str(tmp_path / "curve.png"), records, eval_loss=4.4, unigram=5.0)
    assert matplotlib.get_backend() == "svg"
  finally:
    matplotlib.use(before)
  assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _env(jax_cache):
  env = dict(os.environ)
  # Few steps: compile time dominates, and the suite's quick compiles halve it. The processes
  # of this module's tests share a compilation cache, so later ones load rather than compile
  # (the Ctrl-C runs load the kill test's step and eval programs).
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(),
             JAX_COMPILATION_CACHE_DIR=str(jax_cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


# One train.steps for every run of RUN: the learning-rate schedule spans it, so another value is
# another program to compile (the Ctrl-C test's runs load the kill test's).
STEPS = 16
RUN = [f"train.steps={STEPS}", "train.checkpoint_every=2", "train.log_every=1",
       "train.progress=false", "train.warmup_steps=2", "train.sample_tokens=0",
       "train.unigram_batches=1", "data.seq_len=32", "data.batch_size=4", "data.eval_batches=1",
       "data.eval_docs=4",
       # One hybrid group (Lightning + MLA, both MoE), scanned, and MTP: what a run saves and
       # resumes (stacked expert biases included) at about half the compile of two groups.
       "model.first_k_dense_replace=0", "model.num_hidden_layers=2"]


def _committed(ckpt_dir):
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []


def _snapshot(root):
  return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getmtime(os.path.join(d, f)))
                for d, _, fs in os.walk(root) for f in fs)


def test_resume_after_kill_gives_exactly_the_same_losses(tmp_path, capsys, jax_cache):
  """Kill -9 a training process after its first checkpoint; rerunning the same command resumes
  from the last complete checkpoint and logs exactly the losses of an uninterrupted run. The
  finished run then refuses a different config or a smaller train.steps without touching its
  directory, and at the same train.steps says there is nothing to train."""
  env = _env(jax_cache)
  cmd = [sys.executable, "-m", "experiments.tiny_pretrain", *RUN]
  full_dir, kill_dir = tmp_path / "full", tmp_path / "killed"
  # The uninterrupted run first: it fills the compilation cache, so the victim (and later the
  # resumed run) load its programs rather than compile them again at the same time.
  full = subprocess.run(cmd + [f"train.out_dir={full_dir}", "train.sample_tokens=8"], cwd=ROOT,
                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=300)
  assert full.returncode == 0, full.stdout
  assert "sample (prompt" in full.stdout and (full_dir / "loss_curve.png").stat().st_size > 1000
  victim = subprocess.Popen(cmd + [f"train.out_dir={kill_dir}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  give_up = time.time() + 300
  while not _committed(kill_dir / "checkpoints") and victim.poll() is None:
    assert time.time() < give_up, "no checkpoint appeared"
    time.sleep(0.01)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  killed_at = _committed(kill_dir / "checkpoints")[-1]
  assert 2 <= killed_at < STEPS

  resumed = subprocess.run(cmd + [f"train.out_dir={kill_dir}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert f"step {killed_at}" in resumed.stdout.split("resumed from")[1].splitlines()[0]
  want, got = read_metrics(full_dir / "metrics.jsonl"), read_metrics(kill_dir / "metrics.jsonl")
  keys = ("loss", "ce", "mtp", "grad_norm", "lr", "load_max_mean")
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))
  assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]
  summary = json.loads((kill_dir / "summary.json").read_text())
  assert summary["eval_loss"] == json.loads((full_dir / "summary.json").read_text())["eval_loss"]
  assert summary["eval_loss"] < summary["unigram_baseline"] + 1.0  # finite and sane

  # A checkpoint from a different config is refused before anything is built or written.
  before = _snapshot(full_dir)
  exp = apply_overrides(tiny_pretrain.config(), RUN + [f"train.out_dir={full_dir}"])
  with pytest.raises(ConfigMismatch, match="model.hidden_size: checkpoint 64, now 32"):
    run(apply_overrides(exp, ["model.hidden_size=32"]))
  with pytest.raises(ConfigMismatch, match="data.seq_len: checkpoint 32, now 16"):
    run(apply_overrides(exp, ["data.seq_len=16"]))
  # So is a train.steps below the checkpoint's step: nothing would be trained.
  with pytest.raises(RunRefused, match=f"checkpoint at step {STEPS} under .* > train.steps=5: "
                     "nothing to train; use another train.out_dir"):
    run(apply_overrides(exp, ["train.steps=5"]))
  assert _snapshot(full_dir) == before
  # At train.steps, the run says it trains nothing and evaluates the checkpoint again.
  # (This process fakes 8 devices: the 4 rows split over data 4, the heads over tensor 2; the
  # checkpoint of a one-device run restores onto that mesh.)
  again = run(apply_overrides(exp, ["mesh.data=4", "mesh.tensor=2"]))
  assert f"checkpoint at step {STEPS} = train.steps: nothing to train" in capsys.readouterr().out
  assert again["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-4)


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path, jax_cache):
  """SIGINT after step 5: the run finishes its step and the saves in flight, says
  where it can resume and exits with 130, without a traceback or an abort; the same command then
  resumes from that checkpoint and finishes. Before the first step, the run says it compiles."""
  env, out, steps = {**_env(jax_cache), "PYTHONUNBUFFERED": "1"}, tmp_path / "run", STEPS
  cmd = [sys.executable, "-m", "experiments.tiny_pretrain", *RUN, f"train.out_dir={out}"]
  err_path = tmp_path / "stderr.txt"
  with open(err_path, "w") as err:
    # SIGINT as a terminal delivers it: a test run started in the background (CI scripts) passes
    # SIGINT on ignored, which the training loop rightly leaves alone.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Interrupt once step 5 is logged (the saves of steps 2 and 4 asked for), reading the log as
    # it comes.
    with deadline(300, "the run up to step 5"):
      lines = []
      for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and int(line.split()[1]) >= 5:
          break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
  stdout, stderr = "".join(lines) + rest, err_path.read_text()
  assert proc.returncode == 130, stdout + stderr
  last = _committed(out / "checkpoints")[-1]
  stopped = re.search(r"interrupted at step (\d+); the last checkpoint is step (\d+) under "
                      + re.escape(str(out / "checkpoints")) + "; re-run the same command to resume",
                      stderr)
  assert stopped and int(stopped[2]) == last <= int(stopped[1]) < steps, stderr
  assert "Traceback" not in stderr and "terminate called" not in stderr, stderr
  lines = stdout.splitlines()
  first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
  assert "compiling the train step..." in lines[:first_step], stdout

  resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert f"resumed from {out / 'checkpoints'} step {last}\n" in resumed.stdout
  assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, steps + 1))


def test_a_diverging_run_exits_non_zero_and_keeps_its_last_finite_checkpoint(tmp_path,
                                                                                  jax_cache):
  """A learning rate of 1e30 makes step 2's gradient NaN: the entry point stops with a one-line
  error and exit status 1; step 1's checkpoint is kept, and step 2 is never saved. (A process of
  one device: this suite's eight would compile a sharded step for half again the time.)"""
  argv = RUN + ["train.steps=3", "train.checkpoint_every=1", "train.log_every=3",
                "train.warmup_steps=0", "train.learning_rate=1e30", "data.seq_len=16",
                "data.batch_size=8", f"train.out_dir={tmp_path / 'run'}"]
  proc = subprocess.run([sys.executable, "-m", "experiments.tiny_pretrain", *argv], cwd=ROOT,
                        env=_env(jax_cache), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  err = proc.stderr
  assert err.startswith("error: training diverged at step 2: loss ") and err.count("\n") == 1, err
  assert "gradient norm nan; stopped without saving it. The last checkpoint, step 1" in err
  assert _committed(tmp_path / "run" / "checkpoints") == [1]


def test_empty_corpus_fails_before_writing(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("")
  out = tmp_path / "run"
  exp = apply_overrides(tiny_pretrain.config(), [f"data.source={empty}", "data.eval_docs=0",
                                                 f"train.out_dir={out}"])
  with pytest.raises(ValueError, match="corpus is empty"):
    run(exp)
  assert not out.exists()
