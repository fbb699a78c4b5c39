"""MoE routing replay, model side: the forward records the experts each token went to and takes
replayed ones ([B, T, M, X], -1 = route as usual); off by default, logits unchanged when off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ling_jax.config import ling_tiny
from ling_jax.model.moe import SparseMoE
from ling_jax.model.settings import Kernels
from testing import random_model, random_tokens

# A prefix group (dense, MoE), one scanned group (2 MoE layers) and an MoE tail layer: M = 4.
CFG = ling_tiny(num_hidden_layers=5)
KERNELS = Kernels(moe="reference", lightning="xla", qk_norm_rope="xla")
M, X = 4, CFG.num_experts_per_tok


@nnx.jit(static_argnames=("scan",))
def _forward(model, tokens, routing, scan=True):
  out = model.forward(tokens, routing=routing, scan=scan)
  return out.logits, out.expert_ids


@pytest.fixture(scope="module")
def models():
  return (random_model(CFG, seed=1, kernels=KERNELS), random_model(CFG, seed=2, kernels=KERNELS))


def test_recording_alone_changes_nothing(models):
  a, _ = models
  tokens = random_tokens(CFG, (2, 11), seed=3)
  plain = np.asarray(_forward(a, tokens, None)[0])
  for scan in (True, False):
    logits, ids = _forward(a, tokens, jnp.full((2, 11, M, X), -1, jnp.int32), scan=scan)
    np.testing.assert_array_equal(np.asarray(logits), plain)  # bit for bit
    assert ids.shape == (2, 11, M, X) and ids.dtype == jnp.int32
    assert ((0 <= ids) & (ids < CFG.num_experts)).all()
    if scan:
      recorded = np.asarray(ids)
    else:
      np.testing.assert_array_equal(np.asarray(ids), recorded)
  assert _forward(a, tokens, None)[1] is None


def test_replayed_forward_takes_the_samplers_routing(models):
  a, b = models
  tokens = random_tokens(CFG, (2, 11), seed=4)
  none = jnp.full((2, 11, M, X), -1, jnp.int32)
  logits_a, ids_a = _forward(a, tokens, none)
  logits_b, ids_b = _forward(b, tokens, none)
  assert (np.asarray(ids_a) != np.asarray(ids_b)).any()  # the two policies route differently
  # Policy b replaying a's routing sends every token where a sent it ...
  replayed, ids = _forward(b, tokens, ids_a)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_a))
  assert not np.allclose(np.asarray(replayed), np.asarray(logits_b))
  # ... a replaying its own routing computes exactly what it computed ...
  np.testing.assert_array_equal(np.asarray(_forward(a, tokens, ids_a)[0]), np.asarray(logits_a))
  # ... and -1 rows route as usual: only the first sequence replays.
  half = ids_a.at[1].set(-1)
  _, ids = _forward(b, tokens, half)
  np.testing.assert_array_equal(np.asarray(ids[0]), np.asarray(ids_a[0]))
  np.testing.assert_array_equal(np.asarray(ids[1]), np.asarray(ids_b[1]))
  with pytest.raises(ValueError, match="M = 4 MoE layers"):
    b.forward(tokens, routing=ids_a[:, :, :3])


def test_replayed_moe_matches_float64_reference_and_trains_the_router():
  """One MoE layer with replayed experts: y = sum_k w_k expert_k(x) + shared(x), w the current
  sigmoid scores at the replayed experts, renormalised and scaled (docs/architecture.md §3.7)."""
  moe = SparseMoE(hidden=16, num_experts=8, top_k=2, width=8, shared_width=8, n_group=4,
                  topk_group=2, routed_scale=2.5, rngs=nnx.Rngs(0), impl="reference")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 5, 16)).astype(np.float32)
  replay = np.stack([rng.choice(8, 2, replace=False) for _ in range(5)])[None].astype(np.int32)
  replay[0, 2] = -1  # this token routes as usual
  y, (load, ids) = moe(jnp.asarray(x), jnp.asarray(replay))
  natural = np.asarray(moe(jnp.asarray(x), jnp.full((1, 5, 2), -1, jnp.int32))[1][1])
  want_ids = np.where(replay[..., :1] >= 0, replay, natural)
  np.testing.assert_array_equal(np.asarray(ids), want_ids)
  np.testing.assert_array_equal(np.asarray(load), np.bincount(want_ids.ravel(), minlength=8))

  f64 = lambda v: np.asarray(v, np.float64)
  wr = f64(moe.gate.weight[...])
  gate, up, down = (f64(getattr(moe.experts, n)[...])
                    for n in ("gate_proj", "up_proj", "down_proj"))
  sh = moe.shared_experts
  silu = lambda v: v / (1 + np.exp(-v))
  want = np.zeros((5, 16))
  for t in range(5):
    xt = f64(x[0, t])
    s = 1 / (1 + np.exp(-(xt @ wr)))
    w = s[want_ids[0, t]] / s[want_ids[0, t]].sum() * 2.5
    for k, e in enumerate(want_ids[0, t]):
      want[t] += w[k] * (silu(xt @ gate[e]) * (xt @ up[e])) @ down[e]
    shared = silu(xt @ f64(sh.gate_proj[...])) * (xt @ f64(sh.up_proj[...]))
    want[t] += shared @ f64(sh.down_proj[...])
  np.testing.assert_allclose(np.asarray(y[0], np.float64), want, rtol=1e-5, atol=1e-5)

  # The router still learns under replay: its weight gets a gradient through the gate weights.
  graphdef, state = nnx.split(moe)
  loss = lambda st: nnx.merge(graphdef, st)(jnp.asarray(x), jnp.asarray(replay))[0].sum()
  grads = jax.grad(loss)(state)
  assert np.abs(np.asarray(grads["gate"]["weight"][...])).sum() > 0


def test_replay_removes_routing_flips_from_the_ratio_after_a_small_update(models):
  """After a small parameter change (every matrix moved by 0.1% of its spread) free routing flips
  some top-k choices, and those tokens' log-probabilities jump; replaying the old routing keeps
  every choice, so the learner's log-ratio to the old policy is the parameter change alone
  (measured: mean |log ratio| 10x smaller, max 100x on this model)."""
  a, _ = models
  tokens = random_tokens(CFG, (4, 64), seed=3)
  none = jnp.full((4, 64, M, X), -1, jnp.int32)

  def logp(model, routing):
    logits, ids = _forward(model, tokens, routing)
    lsm = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    picked = jnp.take_along_axis(lsm, tokens[:, 1:, None], -1)[..., 0]
    return np.asarray(picked, np.float64), np.asarray(ids)

  old, ids = logp(a, none)
  graphdef, state = nnx.split(a)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  moved = [x + 1e-3 * jnp.std(x) * jax.random.normal(k, x.shape)
           if x.dtype == jnp.float32 and x.ndim >= 2 else x for x, k in zip(leaves, keys)]
  b = nnx.merge(graphdef, jax.tree.unflatten(tree, moved))
  free, free_ids = logp(b, none)
  replayed, replayed_ids = logp(b, jnp.asarray(ids))
  np.testing.assert_array_equal(replayed_ids, ids)
  flipped = (np.sort(free_ids, -1) != np.sort(ids, -1)).any(-1).mean()
  assert 0 < flipped < 0.2
  assert np.abs(replayed - old).mean() < np.abs(free - old).mean() / 3
  assert np.abs(replayed - old).max() < np.abs(free - old).max() / 10
