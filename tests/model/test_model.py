"""Model internals: scan vs unrolled, MoE dispatch paths, router, decode, MTP, sharded forward,
kernel settings, stored constants, remat."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import numpy_reference as ref
from ling_jax import axes as ax
from ling_jax.config import alibi_slopes, ling_small, ling_tiny
from ling_jax.hf_config import to_hf_config
from ling_jax.hf_io import hf_tensors
from ling_jax.generate import generate
from ling_jax.model import Kernels, LingForCausalLM, Remat, router, with_kernels
from ling_jax.model.common import CHECKPOINTED, Constant
from ling_jax.model.ling import record_routing
from ling_jax.train.step import init_state, split_model
from ling_jax.weights import all_maps
from pallas_kernels.moe import routed_experts_blocked, routed_experts_reference
from testing import gpu, random_model, random_tokens, rel


@functools.partial(nnx.jit, static_argnames=("scan",))
def _logits(model, tokens, scan=True):
  return model(tokens, scan=scan)


@pytest.mark.parametrize("overrides", [
    dict(),                                                        # prefix group + scanned group
    dict(num_hidden_layers=7, layer_group_size=2, first_k_dense_replace=0),  # scan 3 + tail 1
    dict(num_hidden_layers=8, layer_group_size=4, first_k_dense_replace=5),  # 2 prefix groups
])
def test_scan_and_unrolled_give_identical_logits(overrides):
  cfg = ling_tiny(**overrides)
  model = random_model(cfg)
  tokens = random_tokens(cfg, (2, 13))
  a, b = _logits(model, tokens, scan=True), _logits(model, tokens, scan=False)
  assert np.isfinite(np.asarray(a)).all()
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _routing_case(seed, N=40, D=16, E=8, X=2, skew=0.0):
  k = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(k[0], (N, D))
  wr = jax.random.normal(k[1], (D, E)) / np.sqrt(D)
  bias = 0.05 * jax.random.normal(k[2], (E,)) + skew * (jnp.arange(E) < 2)  # skew: all to experts 0, 1
  F = 12
  wg = jax.random.normal(k[3], (E, D, F)) / 4
  wu = jax.random.normal(k[4], (E, D, F)) / 4
  wd = jax.random.normal(k[5], (E, F, D)) / 4
  return x, wr, bias, (wg, wu, wd)


def test_router_logits_of_bf16_activations_reach_fp32_accuracy():
  """router.router_logits runs bf16 matmuls on split operands for bf16 x: the logits and d weight
  within fp32 rounding of float64 (a plain bf16 or TF32 product is off by ~1e-3 / ~3e-4 of the
  largest), d x the float64 value rounded to bf16 (but for rare double-rounding ties), also
  jitted (a compiler folding the split's round trips would zero its later terms)."""
  k = jax.random.split(jax.random.key(4), 3)
  N, D, E = 384, 256, 32
  x = jax.random.normal(k[0], (N, D), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(k[1], (D, E), jnp.float32) * D ** -0.5
  g = jax.random.normal(k[2], (N, E), jnp.float32)

  @jax.jit
  def run(x, w, g):
    out, vjp = jax.vjp(router.router_logits, x, w)
    return out, *vjp(g)

  out, dx, dw = run(x, w, g)
  assert out.dtype == dw.dtype == jnp.float32 and dx.dtype == jnp.bfloat16
  X, W, G = (np.asarray(a, np.float64) for a in (x.astype(jnp.float32), w, g))
  for got, want in ((out, X @ W), (dw, X.T @ G)):
    assert np.abs(np.asarray(got, np.float64) - want).max() < 2e-6 * np.abs(want).max()
  want_dx = np.asarray(jnp.asarray(G @ W.T, jnp.float32).astype(jnp.bfloat16), np.float64)
  got_dx = np.asarray(dx, np.float64)
  assert (got_dx == want_dx).mean() > 0.999
  assert np.abs(got_dx - want_dx).max() <= 2 ** -7 * np.abs(want_dx).max()


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (2, 1), (4, 2)])
def test_router_matches_float64_spec(n_group, topk_group):
  x, wr, bias, _ = _routing_case(3)
  cfg = dict(num_experts=8, n_group=n_group, topk_group=topk_group, num_experts_per_tok=2,
             routed_scaling_factor=2.5)
  idx, w = router.route(x, wr, bias, top_k=2, n_group=n_group, topk_group=topk_group, scale=2.5)
  W = {"m.gate.weight": np.asarray(wr, np.float64).T, "m.gate.expert_bias": np.asarray(bias, np.float64)}
  for t in range(x.shape[0]):
    ids, wt = ref.route(W, "m", np.asarray(x[t], np.float64), cfg)
    assert list(np.asarray(idx[t])) == list(ids)
    np.testing.assert_allclose(np.asarray(w[t]), wt, rtol=1e-5)


@pytest.mark.parametrize("shape,k", [((50, 8), 2), ((50, 4), 2), ((30, 4, 8), 2), ((40, 32), 4),
                                     ((20, 64), 8)])
def test_ranked_top_k_matches_lax_top_k_with_ties_and_masks(shape, k):
  x = jax.random.normal(jax.random.key(7), shape)
  ties = jnp.round(x * 2) / 2  # a handful of distinct values: most rows hold ties
  masked = jnp.where(jax.random.bernoulli(jax.random.key(8), 0.5, shape), -jnp.inf, ties)
  odd = jnp.where(jax.random.bernoulli(jax.random.key(9), 0.2, shape), jnp.nan, masked)
  for v in (x, ties, masked, odd, ties.astype(jnp.bfloat16)):  # ties include -0 against +0
    got, want = router._top_k(v, k), jax.lax.top_k(v, k)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    if v.dtype != jnp.bfloat16:  # the group score's top-2 sum, NaNs aside (both give NaN there)
      np.testing.assert_array_equal(np.asarray(router._top2_sum(v)),
                                    np.asarray(jax.lax.top_k(v, 2)[0].sum(-1)))


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 3)])
def test_router_ranked_top_k_matches_sorting_top_k(monkeypatch, n_group, topk_group):
  x, wr, bias, _ = _routing_case(11, N=300, E=32)
  bias = jnp.round(bias * 20) / 20 - 0.5 * (jnp.arange(32) % 3 == 0)  # tied groups, skewed
  a = router.route(x, wr, bias, top_k=4, n_group=n_group, topk_group=topk_group, scale=2.5)
  old = router.route_reference(x, wr, bias, top_k=4, n_group=n_group, topk_group=topk_group, scale=2.5)
  monkeypatch.setattr(router, "_RANKED_MAX", 0)  # lax.top_k for every width
  b = router.route(x, wr, bias, top_k=4, n_group=n_group, topk_group=topk_group, scale=2.5)
  for other in (old, b):
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(other[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(other[1]))
  load = router.expert_load(a[0], 32)
  np.testing.assert_array_equal(np.asarray(load), np.bincount(np.asarray(a[0]).ravel(), minlength=32))
  assert load.dtype == jnp.int32 and int(load.sum()) == 300 * 4


@pytest.mark.parametrize("skew,block", [(0.0, 4), (0.0, 64), (10.0, 8)])
def test_sorted_moe_matches_dense_reference_with_grads(skew, block):
  x, wr, bias, wts = _routing_case(5, skew=skew)
  idx, w = router.route(x, wr, bias, top_k=2, n_group=1, topk_group=1, scale=2.5)
  if skew:  # heavily imbalanced: every token goes to experts 0 and 1, the others are empty
    assert (np.asarray(idx) == 0).any(axis=1).all()
    assert (np.bincount(np.asarray(idx).ravel(), minlength=8) == 0).any()

  def loss(fn, x, w, wts):
    y = fn(x, idx, w, *wts)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

  dense = routed_experts_reference
  srt = lambda *a: routed_experts_blocked(*a, block_size=block, blocks_per_step=3)
  np.testing.assert_allclose(srt(x, idx, w, *wts), dense(x, idx, w, *wts), rtol=1e-5, atol=1e-5)
  gd = jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2))(x, w, wts)
  gs = jax.grad(lambda *a: loss(srt, *a), argnums=(0, 1, 2))(x, w, wts)
  for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gd)):
    assert rel(a, b) < 1e-5


def test_model_moe_impls_agree():
  cfg = ling_tiny()
  a = random_model(cfg, kernels=Kernels(moe="xla"))
  b = random_model(cfg, kernels=Kernels(moe="reference"))
  tokens = random_tokens(cfg, (2, 9))
  assert rel(_logits(a, tokens), _logits(b, tokens)) < 1e-5


@pytest.mark.parametrize("overrides,T", [
    (dict(), 70),                                                  # longer than a 64-chunk
    (dict(num_hidden_layers=5, layer_group_size=2, q_lora_rank=None), 9),  # tail MLA layer
])
def test_prefill_then_decode_matches_full_forward(overrides, T):
  cfg = ling_tiny(**overrides)
  model = random_model(cfg, seed=2)
  tokens = random_tokens(cfg, (2, T), seed=3)
  full = np.asarray(_logits(model, tokens))

  @nnx.jit
  def step(model, tok, cache):
    return model(tok, cache=cache)

  P = T // 2
  cache = model.init_cache(2, T + 3)
  logits, cache = step(model, tokens[:, :P], cache)
  outs = [np.asarray(logits)]
  for t in range(P, T):
    logits, cache = step(model, tokens[:, t:t + 1], cache)
    outs.append(np.asarray(logits))
  dec = np.concatenate(outs, axis=1)
  assert int(cache["index"]) == T
  for t in range(T):
    assert rel(dec[:, t], full[:, t]) < 1e-5, t


def test_mla_cache_writes_each_row_at_its_own_position():
  """Rows of a batch may stand at different lengths: a one-token step at positions [5, 8] writes
  each row's latent at its own slot and attends to its own prefix, as the same rows without a
  cache (the prefix prefilled, slots past a row's position masked)."""
  cfg = ling_tiny()
  mla = random_model(cfg, seed=6).prefix[0].layers[1].attention
  x = jax.random.normal(jax.random.key(7), (2, 9, cfg.hidden_size))  # 8 prefilled, then a step
  pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  _, cache = mla(x[:, :8], positions=pos, cache=mla.init_cache(2, 12))
  step = jnp.stack([x[0, 8], x[1, 8]])[:, None]  # row 0's token at position 5, row 1's at 8
  got, cache = mla(step, positions=jnp.array([[5], [8]], jnp.int32), cache=cache)
  for b, p in ((0, 5), (1, 8)):
    row = jnp.concatenate([x[b, :p], x[b, 8:9]])[None]  # [1, p + 1, D]
    want, _ = mla(row, positions=jnp.arange(p + 1, dtype=jnp.int32)[None])
    assert rel(got[b, 0], want[0, -1]) < 1e-5, b
  _, alone = mla(step, positions=jnp.array([[5], [8]], jnp.int32), cache=mla.init_cache(2, 12))
  np.testing.assert_array_equal(cache[0, 5], alone[0, 5])  # each row wrote its own slot only
  np.testing.assert_array_equal(cache[1, 8], alone[1, 8])
  assert not np.asarray(cache[0, 8]).any() and np.asarray(cache[1, 5]).any()


def test_prefill_in_chunks_with_ragged_rows_matches_each_row_alone():
  """Right-padded rows of 11 and 4 tokens prefilled in chunks of 8 against the cache (row 0 crosses
  a chunk boundary, row 1 is all padding in the second chunk), padding at position -1: each row's
  logits and its next one-token step equal a cache-free forward over that row alone."""
  cfg = ling_tiny(num_hidden_layers=5)  # prefix group, a scanned group, the MLA tail
  model = random_model(cfg, seed=8)
  lens, C = np.array([11, 4]), 8
  toks = np.asarray(random_tokens(cfg, (2, 2 * C + 1), seed=9))

  @nnx.jit
  def call(model, tok, pos, cache):
    return model(tok, positions=pos, cache=cache)

  cache, got = model.init_cache(2, 32), []
  for c0 in (0, C):
    cols = np.arange(c0, c0 + C)
    pos = np.where(cols < lens[:, None], cols, -1).astype(np.int32)
    logits, cache = call(model, toks[:, c0:c0 + C], pos, cache)
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  nxt = toks[np.arange(2), lens]  # each row's next token, fed at its own position
  step, _ = call(model, nxt[:, None], lens[:, None].astype(np.int32), cache)
  alone = toks[:, :12].copy()  # each row, its next token, then anything (causal: unseen)
  alone[np.arange(2), lens] = nxt
  want = np.asarray(_logits(model, alone))
  for b, n in enumerate(lens):
    assert rel(got[b, :n], want[b, :n]) < 1e-5, b
    assert rel(step[b, 0], want[b, n]) < 1e-5, b


def test_cached_mla_attends_in_blocks_of_slots(monkeypatch):
  """The absorbed attention over a cache of 40 slots in blocks of 16 (the last block clamped to
  the cache's end) equals one block over all slots, for queries in every block and a padding row."""
  from ling_jax.model import mla as mla_mod
  cfg = ling_tiny()
  layer = random_model(cfg, seed=10).prefix[0].layers[1].attention
  x = jax.random.normal(jax.random.key(11), (2, 40, cfg.hidden_size))
  pos = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))
  _, cache = layer(x, positions=pos, cache=layer.init_cache(2, 40))
  q = jax.random.normal(jax.random.key(12), (2, 3, cfg.hidden_size))
  qpos = jnp.array([[3, 17, 39], [-1, -1, -1]], jnp.int32)  # row 1: padding, writes nothing
  one, c1 = layer(q, positions=qpos, cache=cache)
  monkeypatch.setattr(mla_mod, "BLOCK_BYTES", 1)  # blocks of MIN_BLOCK slots
  monkeypatch.setattr(mla_mod, "MIN_BLOCK", 16)
  assert mla_mod.block_slots(2 * 3 * 4, 40) == 16
  blocked, c2 = layer(q, positions=qpos, cache=cache)
  assert rel(blocked[0], one[0]) < 1e-6
  np.testing.assert_array_equal(c1, c2)
  np.testing.assert_array_equal(c1[1], cache[1])  # the padding row's cache is unchanged


def test_decode_kernel_step_matches_xla_step_in_the_model():
  """The Lightning layers' one-token step on the Pallas decode kernel (interpreted) gives the
  XLA step's logits and states."""
  cfg = ling_tiny(num_hidden_layers=2)
  model = random_model(cfg, seed=12, kernels=Kernels(lightning="xla"))
  toks = random_tokens(cfg, (2, 6), seed=13)
  call = nnx.jit(lambda model, tok, cache: model(tok, cache=cache))
  _, cache = call(model, toks[:, :5], model.init_cache(2, 8))
  got, c_k = call(with_kernels(model, Kernels(lightning="interpret")), toks[:, 5:], cache)
  want, c_x = call(model, toks[:, 5:], cache)
  assert rel(got, want) < 1e-6
  assert rel(c_k["prefix"][0][0], c_x["prefix"][0][0]) < 1e-6


def test_mtp_matches_float64_spec():
  cfg = ling_tiny(q_lora_rank=None)
  model = random_model(cfg, seed=4)
  tokens = random_tokens(cfg, (2, 12), seed=5)
  out = nnx.jit(lambda m, t: m.forward(t, mtp=True))(model, tokens)
  W = {n: np.asarray(a, np.float64) for n, a in hf_tensors(model, all_maps(cfg))}
  hf = to_hf_config(cfg)
  for b in range(2):
    want = ref.mtp_logits(W, hf, np.asarray(out.hidden[b], np.float64), np.asarray(tokens[b]))
    assert rel(out.mtp_logits[b], want) < 1e-5


def test_expert_load_counts_every_routed_token():
  cfg = ling_tiny()
  model = random_model(cfg)
  out = nnx.jit(lambda m, t: m.forward(t))(model, random_tokens(cfg, (2, 7)))  # op by op: 4x
  n_moe = cfg.mlp_types().count("moe")
  assert out.expert_load.shape == (n_moe, cfg.num_experts)
  np.testing.assert_array_equal(np.asarray(out.expert_load).sum(1), 2 * 7 * cfg.num_experts_per_tok)


def test_sharded_forward_on_fake_mesh_matches_single_device():
  cfg = ling_tiny()
  model = random_model(cfg)
  tokens = random_tokens(cfg, (4, 8))
  want = np.asarray(_logits(model, tokens))
  mesh = ax.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
  assert mesh.devices.size == 8
  state = nnx.state(model)
  shardings = ax.state_shardings(state, mesh)
  nnx.update(model, jax.device_put(state, shardings))
  expert = model.groups.layers[1].mlp.experts.gate_proj[...]
  assert len(expert.sharding.device_set) == 8
  tokens = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
  got = np.asarray(_logits(model, tokens))
  assert rel(got, want) < 1e-5


def test_model_with_pallas_lightning_kernels_matches_reference():
  """The Lightning layers through the Pallas kernels (interpreted on CPU); kernel gradients are
  covered in test_simple_gla_pallas.py."""
  cfg = ling_tiny(num_hidden_layers=2, first_k_dense_replace=0)  # one Lightning layer: interpret is slow
  tokens = random_tokens(cfg, (1, 20))
  want = _logits(random_model(cfg, kernels=Kernels(lightning="xla")), tokens)
  got = _logits(random_model(cfg, kernels=Kernels(lightning="interpret",
                                                  qk_norm_rope="interpret")), tokens)
  assert rel(got, want) < 1e-4


# ---------------------------------------------------------------------- per-layer remat
_O0 = {"xla_backend_optimization_level": 0}  # compile time dominates
# (layout, policy, scope) checked against no remat (scanned): each policy once, both scopes and
# both layouts (each case adds ~7 s of compile); the checkpoints' placement is counted for every
# scope and layout. dots_no_scores saves nothing at ling_tiny's widths (all < 256): it is "full"
# there; its choice of matmuls is tested on its own below.
_REMATS = [(True, "full", "layer"), (True, "dots_no_batch", "group"), (False, "dots", "layer")]


def test_dots_no_scores_saves_deep_matmuls_not_attention_scores():
  from ling_jax.model.remat import dots_no_scores_saveable as save
  dot = lambda a, b, eq: jax.make_jaxpr(lambda x, y: jnp.einsum(eq, x, y))(
      jnp.zeros(a), jnp.zeros(b)).eqns[0]  # the dot_general (a transpose may follow)
  decide = lambda e: save(e.primitive, *[v.aval for v in e.invars], **e.params)
  assert decide(dot((2, 8, 1024), (1024, 3072), "btd,de->bte"))            # projection
  assert decide(dot((2, 8, 256), (256, 4, 128), "btl,lhk->bthk"))           # MLA kv_b expansion
  assert not decide(dot((2, 512, 4, 64), (2, 512, 4, 64), "bthk,bshk->bhts"))  # QK^T scores
  assert decide(dot((2, 4, 512, 512), (2, 512, 4, 64), "bhts,bshv->bthv"))  # P V contracts T


def test_remat_hook_keeps_loss_and_gradients():
  """Every remat policy, scope and layout gives the loss and gradients of no remat, and those
  reference gradients are finite and nonzero for every parameter (every Param reaches the loss)."""
  # 7 layers of 2: a prefix group (dense layer 0, MoE layer 1), two scanned groups, an MLA tail
  # layer and MTP: every kind of block the hook wraps. Sorted MoE: its lax.map runs under remat.
  cfg = ling_tiny(num_hidden_layers=7)
  graphdef, state = nnx.split(random_model(cfg))
  tokens = random_tokens(cfg, (2, 12))

  def loss(state, remat, scope, scan):
    out = nnx.merge(graphdef, state).forward(tokens, mtp=True, scan=scan,
                                             remat=Remat(remat, scope))
    lp = jax.nn.log_softmax(out.logits[:, :-1])
    mp = jax.nn.log_softmax(out.mtp_logits[:, :-2])
    return -(jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean()
             + 0.3 * jnp.take_along_axis(mp, tokens[:, 2:, None], -1).mean())

  # One checkpoint (printed with its prevent_cse flag) around each block, the scan body's once:
  # prefix group (2 layers), scanned groups (2 x 2 layers), tail layer, MTP layer.
  for scan in (True, False):
    counts = {"layer": 2 + (2 if scan else 4) + 1 + 1, "group": 1 + (1 if scan else 2) + 1 + 1}
    for scope, n in counts.items():
      f = functools.partial(loss, remat="full", scope=scope, scan=scan)
      assert str(jax.make_jaxpr(f)(state)).count("prevent_cse=") == n, (scan, scope)
  # The unrolled layout against the scanned one too: their logits are bit-identical
  # (test_scan_and_unrolled_give_identical_logits), their gradients sum in other orders.
  # The reference and every case in one program: 28 s of compile against 36 s for a program
  # each. Each case's gradients are still its own remat's (XLA merges only identical
  # computations, which give identical values), and a failure names its case.
  cases = [(True, "none", "layer")] + _REMATS
  (want_loss, want), *results = jax.jit(lambda state: [
      jax.value_and_grad(functools.partial(loss, remat=remat, scope=scope, scan=scan))(state)
      for scan, remat, scope in cases], compiler_options=_O0)(state)
  want = dict(nnx.to_flat_state(want))
  params = [(path, np.asarray(g.get_value())) for path, g in want.items()
            if isinstance(g, nnx.Param)]
  assert len(params) > 40
  for path, g in params:
    assert np.isfinite(g).all(), path
    assert np.abs(g).max() > 0, path
  for (scan, remat, scope), (got_loss, got) in zip(_REMATS, results):
    case = f"{'scanned' if scan else 'unrolled'} {remat} {scope}"
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6, err_msg=case)
    for path, g in nnx.to_flat_state(got):
      g, w = np.asarray(g.get_value()), np.asarray(want[path].get_value())
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max(),
                                 err_msg=f"{case} {path}")


# ---------------------------------------------------------------------- settings, constants
def test_kernel_settings_reach_every_layer_and_refuse_old_names():
  """One Kernels object, passed once: each layer's modules hold its field for their op."""
  cfg = ling_tiny(num_hidden_layers=5, layer_group_size=2)  # prefix, scanned groups, tail, MTP
  k = Kernels(lightning="reference", qk_norm_rope="interpret", attention="cudnn", moe="xla",
              rms_norm="pallas")
  model = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0), kernels=k))
  seen = {}
  for _, m in nnx.iter_graph(model):
    for field in ("impl", "qk_impl"):
      if isinstance(getattr(m, field, None), str):
        seen.setdefault((type(m).__name__, field), set()).add(getattr(m, field))
  assert seen == {("LightningAttention", "impl"): {"reference"},
                  ("LightningAttention", "qk_impl"): {"interpret"},
                  ("MultiLatentAttention", "impl"): {"cudnn"}, ("SparseMoE", "impl"): {"xla"},
                  ("RMSNorm", "impl"): {"pallas"}, ("GroupRMSNorm", "impl"): {"pallas"}}
  assert model.kernels == k
  assert set(dataclasses.asdict(Kernels.every("xla")).values()) == {"xla"}
  with pytest.raises(ValueError, match="lightning='cudnn' not in"):  # attention's alone
    Kernels.every("cudnn")
  for old in (dict(moe="gmm"), dict(lightning="chunked"), dict(attention="flash_interpret"),
              dict(rms_norm="pallas_interpret")):
    with pytest.raises(ValueError, match=f"{next(iter(old))}='{next(iter(old.values()))}' not in"):
      Kernels(**old)


def test_other_kernel_settings_share_the_model_variables():
  """with_kernels (and generate(kernels=)) run the same arrays under other settings."""
  cfg = ling_tiny(num_hidden_layers=2)
  model = random_model(cfg)
  k = Kernels(moe="reference")
  other = with_kernels(model, k)
  assert other.kernels == k and other.prefix[0].layers[1].mlp.impl == "reference"
  same = lambda a, b: all(x is y for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(nnx.state(other), nnx.state(model)) and len(jax.tree.leaves(nnx.state(model))) > 20
  tokens = random_tokens(cfg, (2, 6))
  assert rel(_logits(other, tokens), _logits(model, tokens)) < 1e-5
  np.testing.assert_array_equal(generate(model, tokens, 2, kernels=k).tokens,
                                generate(other, tokens, 2).tokens)


@pytest.mark.parametrize("form", ["A", "B"])
def test_lightning_decay_is_a_constant_of_each_layer_and_never_saved(form):
  """Each Lightning layer stores its log-decay g = -slope * (1 - l / (L - 1) + 1e-5) (form B: l
  shifted down by one), stacked along `layers` in the scanned groups, as a Constant: not a
  parameter, not in the checkpointed state, and apart from the optimizer's state."""
  cfg = ling_tiny(num_hidden_layers=9, layer_group_size=3, decay_form=form)  # prefix + 2 scanned
  model = LingForCausalLM(cfg, rngs=nnx.Rngs(0))
  L, slopes = cfg.num_hidden_layers, np.asarray(alibi_slopes(cfg.num_attention_heads), np.float64)

  def want(l):
    l = max(l - 1, 0) if form == "B" else l
    return -slopes * (1.0 - l / (L - 1) + 1e-5)

  got = {}
  for j in range(2):
    first = model.prefix[0].layers[j].attention.decay
    stacked = model.groups.layers[j].attention.decay
    assert isinstance(first, Constant) and isinstance(stacked, Constant)
    assert stacked.get_metadata()["out_sharding"] == (ax.LAYERS, ax.HEADS)
    got[j] = first[...]
    for g in range(2):
      got[3 + 3 * g + j] = stacked[g]
  assert sorted(got) == [l for l, kind in enumerate(cfg.layer_types()) if kind == "linear"]
  for l, decay in got.items():
    np.testing.assert_allclose(np.asarray(decay), want(l), rtol=1e-6, err_msg=str(l))
  names = lambda state: {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}
  decays = {n for n in names(nnx.state(model)) if n.endswith("decay")}
  assert len(decays) == 4 and not decays & names(nnx.state(model, CHECKPOINTED))
  _, params, bias, constants = split_model(model)
  assert names(constants) == decays and not decays & (names(params) | names(bias))
  opt_state = init_state(params, bias, optax.adamw(1e-3)).opt_state  # what a run checkpoint holds
  paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(opt_state)}
  assert any("gate_proj" in p for p in paths) and not any("decay" in p for p in paths)


# ---------------------------------------------------------------------- on a GPU
@gpu
@pytest.mark.parametrize("op", [None, "lightning", "attention", "moe"])  # fp32's other "auto"s: XLA
def test_gpu_float32_ling_small_on_the_default_kernels_matches_the_xla_paths(op):
  """ling_small computing in fp32 on a GPU, one op on its default ("auto") kernel and the others
  on their XLA paths (op None: every op on "auto"), against every op on XLA, routing replayed (a
  near-tie may flip a top-k choice between the two). Each op alone, so that a failure names it:
  on an H100 (2026-12-07) the all-"auto" forward asked for 262,144 bytes of shared memory,
  232,448 there (the flash MLA kernel's fp32 tiles, sized as for bf16; now by bytes)."""
  model = random_model(ling_small(), seed=0, dtype=jnp.float32, param_dtype=jnp.float32)
  xla = with_kernels(model, Kernels.every("xla"))
  on = model if op is None else with_kernels(model,
                                             dataclasses.replace(xla.kernels, **{op: "auto"}))
  tokens = random_tokens(model.config, (4, 256), seed=1)
  fwd = nnx.jit(lambda m, t, r: m.forward(t, routing=r))
  want = fwd(xla, tokens, record_routing(model.config, *tokens.shape))
  got = fwd(on, tokens, want.expert_ids)
  assert rel(got.logits, want.logits) < 1e-2  # TF32 where a kernel allows it; a bug is O(1)
