"""The dense Linears (model/linear.py) with FP8 weights (`ExpertWeights.linears`): their variables,
the XLA path against the dequantised model bit for bit, the grouped-matmul kernel (interpreted)
against the XLA path, and the refusals. The import of a release's FP8 Linears is
tests/convert/test_convert.py's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ling_jax.config import ling_small, ling_tiny
from ling_jax.model import Kernels, LingForCausalLM, with_kernels
from ling_jax.model.linear import SwiGLU
from ling_jax.model.ling import (fp8_linears, record_routing, with_dense_experts,
                                 with_fp8_experts)
from ling_jax.model.settings import ExpertWeights
from testing import gpu, random_model, random_tokens, rel

CFG = ling_tiny(num_hidden_layers=2, num_nextn_predict_layers=1)  # (Lightning, MLA) and MTP
BLOCK = (16, 16)


@pytest.fixture(scope="module")
def base():
  return random_model(CFG, seed=3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def test_fp8_linears_are_values_and_scales_beside_the_same_kernels():
  """With linears every dense Linear (not the router gate, the head or the embedding) is an
  N(0, 1) float8 kernel of its dense shape plus an fp32 scale over its [in, out] view at
  fan_in^-1/2: blocks of the [H K, D] view for the Lightning output projection, one per output
  column for channel scales. Without, no scale and the kernels in param_dtype, as before."""
  make = lambda w: nnx.state(nnx.eval_shape(lambda: LingForCausalLM(
      CFG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, expert_weights=w)))
  dense = dict(nnx.to_flat_state(make(ExpertWeights())))
  experts = dict(nnx.to_flat_state(make(ExpertWeights("fp8-block", BLOCK))))
  fp8 = dict(nnx.to_flat_state(make(ExpertWeights("fp8-block", BLOCK, linears=True))))
  channel = dict(nnx.to_flat_state(make(ExpertWeights("fp8-channel", linears=True))))
  shape = lambda st, p: tuple(st[p].get_value().shape)
  assert not [p for p in dense if str(p[-1]).endswith("_scale")]
  kernels = [p for p in fp8 if p[:-1] + (f"{p[-1]}_scale",) in fp8 and "experts" not in p]
  # Lightning 3 + dense MLP 3; MLA 5 + shared expert 3; MTP: eh_proj, MLA 5, shared expert 3
  assert len(kernels) == 23
  assert {p[-1] for p in kernels} >= {"query_key_value", "dense", "q_b_proj", "eh_proj", "up_proj"}
  assert set(fp8) == set(experts) | {p[:-1] + (f"{p[-1]}_scale",) for p in kernels}
  for p in kernels:
    assert shape(fp8, p) == shape(dense, p) and fp8[p].get_value().dtype == jnp.float8_e4m3fn, p
    assert dense[p].get_value().dtype == jnp.bfloat16, p
  for p in ("lm_head",), ("word_embeddings",), ("prefix", 0, "layers", 1, "mlp", "gate", "weight"):
    assert p[:-1] + (f"{p[-1]}_scale",) not in fp8
  lightning_dense = ("prefix", 0, "layers", 0, "attention", "dense")  # [H, K, D] = [4, 16, 64]
  assert shape(fp8, lightning_dense[:-1] + ("dense_scale",)) == (4, 4)
  assert shape(channel, lightning_dense[:-1] + ("dense_scale",)) == (1, 64)
  built = LingForCausalLM(CFG, rngs=nnx.Rngs(0), expert_weights=ExpertWeights("fp8-channel",
                                                                               linears=True))
  v = np.asarray(built.prefix[0].layers[0].attention.dense[...], np.float32)
  s = np.asarray(built.prefix[0].layers[0].attention.dense_scale[...])
  np.testing.assert_array_equal(s, np.full((1, 64), 64 ** -0.5, np.float32))
  assert 0.8 < v.std() < 1.2 and abs(v.mean()) < 0.1
  with pytest.raises(ValueError, match="linears=True needs an FP8 format"):
    ExpertWeights(linears=True)


@pytest.mark.parametrize("fmt", ["fp8-block", "fp8-channel"])
def test_fp8_linears_on_xla_equal_the_dequantised_model(base, fmt):
  """The XLA path dequantises with one rounding and runs the same einsum: logits, MTP logits and
  a cached decode step (MLA's absorbed form dequantises kv_b_proj) equal those of the model with
  the weights dequantised, bit for bit; and quantising changed the weights (the test can fail)."""
  fp8 = with_fp8_experts(base, ExpertWeights(fmt, BLOCK, linears=True))
  ref = with_dense_experts(fp8)
  assert len(fp8_linears(fp8)) == 23

  @nnx.jit
  def run(model, tokens):
    out = model.forward(tokens, mtp=True)
    _, cache = model(tokens[:, :-1], cache=model.init_cache(tokens.shape[0], tokens.shape[1]))
    return out.logits, out.mtp_logits, model(tokens[:, -1:], cache=cache)[0]

  tokens = random_tokens(CFG, (2, 9), seed=4)
  for got, want in zip(run(fp8, tokens), run(ref, tokens)):
    np.testing.assert_array_equal(got, want)
  changed = lambda m: m.prefix[0].layers[0].attention.dense[...]  # quantised, then dequantised
  assert not np.array_equal(changed(base), changed(ref))


@pytest.mark.parametrize("fmt", ["fp8-block", "fp8-channel"])
def test_fp8_linears_in_the_kernel_match_the_xla_path(base, fmt):
  """Every dense Linear through the grouped-matmul kernel (one group, interpreted) against the XLA
  path, with the routing replayed so that a bf16 rounding cannot flip a top-k choice: within bf16
  noise (the kernel rounds block-scaled tiles as the dequantisation does, and scales a channel
  weight's fp32 accumulator instead of each weight)."""
  fp8 = with_fp8_experts(base, ExpertWeights(fmt, BLOCK, linears=True))
  fwd = nnx.jit(lambda m, t, r: m.forward(t, routing=r))
  tokens = random_tokens(CFG, (1, 8), seed=5)
  want = fwd(with_kernels(fp8, Kernels(linear="xla")), tokens, record_routing(CFG, *tokens.shape))
  got = fwd(with_kernels(fp8, Kernels(linear="interpret")), tokens, want.expert_ids)
  assert rel(got.logits, want.logits) < 2e-2


def test_a_bad_scale_and_a_gradient_are_refused_by_name():
  """A scale of the wrong shape is an error naming the variable; differentiating through the
  kernel's FP8 product says it has no gradient (training needs dense weights)."""
  fp8 = SwiGLU(64, 32, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
               weights=ExpertWeights("fp8-channel", linears=True), linear_impl="interpret")
  x = jax.random.normal(jax.random.key(1), (2, 3, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="FP8 weights .* has no gradient"):
    jax.grad(lambda x: fp8(x)[0].astype(jnp.float32).sum())(x)
  fp8.up_proj_scale = nnx.Param(jnp.ones((1, 31), jnp.float32))
  with pytest.raises(ValueError, match=r"SwiGLU\.up_proj_scale has shape \[1, 31\].*\[1, 32\]"):
    fp8(x)


@gpu
@pytest.mark.parametrize("fmt", ["fp8-block", "fp8-channel"])
def test_gpu_fp8_linears_compiled_match_the_xla_path(fmt):
  """ling_small (random) with 128 x 128 block or channel FP8 experts and dense Linears: every
  Linear through the compiled one-group kernel ("auto" on a GPU) against the XLA path, routing
  replayed, at a prefill (4 x 256 rows) and a decode step's size (4 rows)."""
  cfg = ling_small(num_nextn_predict_layers=1)
  base = random_model(cfg, seed=0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  fp8 = with_fp8_experts(base, ExpertWeights(fmt, (128, 128), linears=True))
  fwd = nnx.jit(lambda m, t, r: m.forward(t, routing=r))
  for shape in ((4, 256), (4, 1)):
    tokens = random_tokens(cfg, shape, seed=1)
    want = fwd(with_kernels(fp8, Kernels(linear="xla")), tokens,
               record_routing(cfg, *tokens.shape))
    got = fwd(fp8, tokens, want.expert_ids)
    assert rel(got.logits, want.logits) < 2e-2, shape
