"""A model whose routed experts hold FP8 weights (ExpertWeights) against the same model with the
weights dequantised to bf16: the grouped-matmul kernels read the FP8 tiles themselves.

On the CPU the kernels run interpreted on a tiny model; on a GPU (`gpu` tests) compiled, on
ling_small: a trained checkpoint if LING_SMALL_CKPT names one (a converted checkpoint or an HF
folder), else random weights.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ling_jax
from ling_jax.config import ling_small, ling_tiny
from ling_jax.model import Kernels, with_kernels
from ling_jax.model.ling import record_routing, with_dense_experts, with_fp8_experts
from ling_jax.model.settings import ExpertWeights
from pallas_kernels.grouped_matmul import dequantize, quantize
from testing import gpu, random_model, random_tokens, rel


@pytest.mark.parametrize("block", [(16, 16), (16, 8), None])
def test_quantize_inverts_dequantize(block):
  """quantize's scales are each block's (column's) largest magnitude over 448 and dequantising
  its values gives the weight to e4m3's rounding (2^-4 of the scale's reach, relative)."""
  w = jax.random.normal(jax.random.key(0), (3, 40, 24)) * jnp.linspace(0.1, 3, 24)
  q = quantize(w, block)
  back = dequantize(q)
  if block is None:
    np.testing.assert_allclose(q.scale, np.abs(w).max(1) / 448, rtol=1e-6)
  else:
    assert q.scale.shape == (3, -(-40 // block[0]), -(-24 // block[1]))
    np.testing.assert_allclose(q.scale[:, 0, 0], np.abs(w[:, :block[0], :block[1]]).max((1, 2))
                               / 448, rtol=1e-6)
  assert np.all(np.abs(np.asarray(back - w)) <= np.abs(np.asarray(w)) / 16 + 1e-6)


CFG = ling_tiny(num_hidden_layers=2, num_experts_per_tok=8, topk_group=4)  # one MoE layer


@pytest.mark.parametrize("fmt", ["fp8-block", "fp8-channel"])
def test_fp8_experts_in_the_kernels_match_the_dequantised_model(fmt):
  """The grouped-matmul kernels (interpreted) on FP8 experts: block scales bit for bit the bf16
  kernels on the dequantised weights (the same rounding), channel scales within bf16 noise (the
  fp32 accumulator is scaled instead of each weight). (The XLA path, which dequantises first,
  is held to the dequantised import bit for bit in test_convert.py.)"""
  base = random_model(CFG, seed=3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  fp8 = with_fp8_experts(base, ExpertWeights(fmt, (16, 16)))
  ref = with_dense_experts(fp8)
  tokens = random_tokens(CFG, (1, 8), seed=4)
  run = nnx.jit(lambda m, t: m(t))
  k = Kernels(moe="interpret")
  got, want = run(with_kernels(fp8, k), tokens), run(with_kernels(ref, k), tokens)
  if fmt == "fp8-block":
    np.testing.assert_array_equal(got, want)
  else:
    assert rel(got, want) < 1e-2


def test_dense_experts_in_float32_are_the_fp8_weights_to_one_rounding():
  """with_dense_experts(model, float32): every variable in fp32, the experts values x scale
  rounded once to fp32 (the float64 product is exact), the compute in fp32; the default keeps
  the model's dtype and shares the other variables."""
  base = random_model(CFG, seed=3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  fp8 = with_fp8_experts(base, ExpertWeights("fp8-channel"))
  exact = with_dense_experts(fp8, jnp.float32)
  same = with_dense_experts(fp8)
  assert exact.dtype == jnp.float32 and same.dtype == jnp.bfloat16
  moe = next(i for i, kind in enumerate(CFG.mlp_types()) if kind == "moe")
  experts = lambda m: m.prefix[0].layers[moe].mlp.experts
  v = np.asarray(experts(fp8).down_proj[...], np.float64)
  s = np.asarray(experts(fp8).down_proj_scale[...], np.float64)
  np.testing.assert_array_equal(np.asarray(experts(exact).down_proj[...]),
                                (v * s).astype(np.float32))
  assert experts(same).down_proj[...].dtype == jnp.bfloat16
  for path, var in nnx.to_flat_state(nnx.state(exact)):
    assert var.get_value().dtype in (jnp.float32, jnp.int32), path
  assert same.word_embeddings[...] is fp8.word_embeddings[...]


@gpu
@pytest.mark.parametrize("fmt", ["fp8-block", "fp8-channel"])
def test_gpu_fp8_ling_small_logits_match_the_dequantised_model(fmt):
  """ling_small (trained if LING_SMALL_CKPT is set, else random) with 128 x 128 block or channel
  FP8 experts on the compiled kernels, against the bf16 model on the dequantised weights.

  Channel scales make the kernels' weights differ from the dequantised ones by bf16's rounding
  (module docstring of fp8.py), and a random ling_small is chaotic under that much: one-ulp
  changes to half its routed experts' weights moved the logits by 0.56 (relative), through top-k
  choices that flip and then diverge. So the channel model replays the reference's routing
  (`forward(routing=)`). Even then a random ling_small's bf16 forward is only good to a few
  percent: the dequantised bf16 model was 0.036 from the fp32 model on the same weights, the
  channel model 0.035 (closer), and the two 0.029 apart (`python -m benchmarks.fp8_accuracy
  --model small --tokens 1,32 --formats channel`, CPU, kernels interpreted). A wrong scale or
  column would be O(1)."""
  path = os.environ.get("LING_SMALL_CKPT")
  if path is None:
    base = random_model(ling_small(), seed=0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  elif os.path.isfile(os.path.join(path, "ling_jax.json")):
    _, base = ling_jax.load(path, dtype=jnp.bfloat16)
  else:
    _, base = ling_jax.load_hf(path, dtype=jnp.bfloat16, progress=False)
  fp8 = with_fp8_experts(base, ExpertWeights(fmt, (128, 128)))
  ref = with_dense_experts(fp8)
  tokens = random_tokens(base.config, (4, 256), seed=1)
  if fmt == "fp8-block":
    run = nnx.jit(lambda m, t: m(t))
    assert rel(run(fp8, tokens), run(ref, tokens)) < 1e-3
    return
  fwd = nnx.jit(lambda m, t, r: m.forward(t, routing=r))
  want = fwd(ref, tokens, record_routing(base.config, *tokens.shape))
  got = fwd(fp8, tokens, want.expert_ids)
  assert rel(got.logits, want.logits) < 5e-2


def test_fp8_experts_under_a_mesh_are_refused_by_name():
  """FP8 routed experts run on one device only for now: generation over a mesh says so."""
  from ling_jax import axes as ax
  from ling_jax.generate import generate
  fp8 = with_fp8_experts(random_model(ling_tiny(), seed=0), ExpertWeights("fp8-channel"))
  prompts = random_tokens(fp8.config, (4, 6), seed=1)
  with pytest.raises(NotImplementedError, match="FP8 routed experts run on one device only"):
    generate(fp8, prompts, 2, mesh=ax.make_mesh({"data": 4, "expert": 2}))


def test_the_accuracy_benchmark_runs_tiny_interpreted():
  """benchmarks/fp8_accuracy.py at its CPU default (ling_tiny, interpreted kernels): the
  block-scaled model equals its dequantised reference bit for bit, the channel one is within
  bf16 noise of it once routing is replayed, and both are as close to the fp32 model as it."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
  env.pop("OUT", None)
  res = subprocess.run([sys.executable, "-m", "benchmarks.fp8_accuracy", "--tokens", "1,8"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = {l.split("|")[1].strip(): [float(x) for x in l.split("|")[2:6]]
          for l in res.stdout.splitlines() if l.startswith(("| channel", "| block"))}
  assert rows["block"][2] == 0 and rows["block"][3] == 0, res.stdout
  assert rows["channel"][2] < 2e-2, res.stdout
  for dequant_vs_fp32, fp8_vs_fp32, _, _ in rows.values():
    assert 0 < fp8_vs_fp32 < 1.25 * dequant_vs_fp32, res.stdout
