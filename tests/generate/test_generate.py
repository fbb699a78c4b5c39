"""Generation (ling_jax/generate): ragged batches, eos, sampling, MTP speculative decoding.

The model routes every token to all 8 of its experts: the routing weights stay continuous, so the
fp32 rounding differences between a one-token step, a (k+1)-token verification and a cache-free
forward cannot flip a near-tied top-k choice (a random router has such near ties often enough to
change a token in a few hundred), and token-for-token comparisons test generation, not rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ling_jax.config import ling_tiny
from ling_jax.generate import Sampling, generate, log_probs, sample
from testing import gpu, random_model, rel

# Layers: a prefix group (Lightning + MLA), a scanned group, the MLA tail; MTP.
CFG = ling_tiny(num_hidden_layers=5, num_experts_per_tok=8, topk_group=4)
N, CHUNK = 16, 8  # new tokens; prompt chunks of 8, which the 13- and 9-token prompts cross
LENS = (5, 13, 9)


@pytest.fixture(scope="module")
def model():
  return random_model(CFG, seed=2)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(0, CFG.vocab_size, n).tolist() for n in LENS]


@pytest.fixture(scope="module")
def plain(model, prompts):
  return generate(model, prompts, N, chunk=CHUNK)


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def test_ragged_batch_equals_each_prompt_alone_and_the_full_forward(model, prompts, plain):
  """Right-padded rows prefilled in chunks: each row's tokens are those it gets alone, and greedy
  with log-probabilities of a cache-free forward over prompt + output."""
  assert plain.lengths.tolist() == [N] * 3 and plain.steps == N - 1
  for b in (0, 1):
    assert generate(model, [prompts[b]], N, chunk=CHUNK).sequences()[0] == plain.sequences()[b]
  seqs = np.zeros((3, max(LENS) + N), np.int32)
  for b, p in enumerate(prompts):
    seqs[b, :len(p) + N] = p + plain.sequences()[b]
  lp = np.asarray(jax.nn.log_softmax(_logits(model, seqs)))
  for b, n in enumerate(LENS):
    want = lp[b, n - 1:n - 1 + N]
    assert (want.argmax(-1) == plain.sequences()[b]).all(), b
    assert rel(plain.logprobs[b], want[np.arange(N), plain.sequences()[b]]) < 1e-5


def test_rows_stop_at_their_first_eos(model, prompts, plain):
  """Each row stops after the first eos id it emits (kept as its last token); rows that never
  emit one run to max_new_tokens; the rest of a stopped row is padding."""
  seqs = plain.sequences()
  eos = [seqs[0][3], seqs[1][9]]
  stop = [[t in eos for t in s] for s in seqs]
  want = [s.index(True) + 1 if True in s else N for s in stop]
  got = generate(model, prompts, N, chunk=CHUNK, eos_ids=eos)
  assert got.lengths.tolist() == want
  for b in range(3):
    assert got.sequences()[b] == seqs[b][:want[b]]
    assert (np.asarray(got.tokens[b, want[b]:]) == 0).all()


def _expected_drafts(lens, accept, k):
  """(drafted, accepted, steps) that a rig pattern implies for N tokens a row."""
  drafted = accepted = steps = 0
  done = [False] * len(lens)
  pos, n = list(lens), [1] * len(lens)  # the newest token's position; tokens emitted
  while not all(done):
    steps += 1
    for b in range(len(lens)):
      if done[b]:
        continue
      a = 0
      while a < k and accept[b, pos[b] + 1 + a]:
        a += 1
      emitted = min(a + 1, N - n[b])
      drafted, accepted = drafted + k, accepted + min(a, emitted)
      pos[b] += a + 1
      n[b] += emitted
      done[b] = n[b] >= N
  return drafted, accepted, steps


K = 2  # drafts a step: the first from the MTP layer after the main model, the second chained
M = max(LENS) + N + 3 + 1  # positions a rig covers (up to 3 drafts a step)


def rig(prompts, plain, accept, on=True):
  """speculative.py's test rig: drafts right where `accept` [3, M] says so (`on`), from plain
  greedy's tokens by position."""
  ref = np.zeros((3, M), np.int32)
  for b, p in enumerate(prompts):
    ref[b, len(p):len(p) + N] = plain.sequences()[b]
  return ref, accept, np.bool_(on)


@pytest.mark.parametrize("pattern", ["all", "none", "mixed"])
def test_speculative_greedy_equals_plain_with_rigged_drafts(model, prompts, plain, pattern):
  """MTP speculative decoding with 2 drafts a step, rigged right (all), wrong (none) or at random
  (mixed): the output equals plain greedy token for token, with rejected drafts whose
  verification windows cross the prefill chunk size and both kinds of layer (the Lightning
  states restored, the MLA slots rewritten); the acceptance counts are the pattern's."""
  accept = {"all": np.ones((3, M), bool), "none": np.zeros((3, M), bool),
            "mixed": np.random.default_rng(5).random((3, M)) < 0.6}[pattern]
  got = generate(model, prompts, N, chunk=CHUNK, mtp_draft=K,
                 _rig=rig(prompts, plain, accept))
  assert got.sequences() == plain.sequences()
  assert (got.drafted, got.accepted, got.steps) == _expected_drafts(LENS, accept, K)


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_equals_plain_for_other_draft_counts(model, prompts, plain, k):
  """One draft a step (what the release serves) and three (two chained MTP applications), on
  drafts right at random: plain greedy's tokens and the rig's acceptance counts."""
  accept = np.random.default_rng(7 + k).random((3, M)) < 0.6
  got = generate(model, prompts, N, chunk=CHUNK, mtp_draft=k, _rig=rig(prompts, plain, accept))
  assert got.sequences() == plain.sequences()
  assert (got.drafted, got.accepted, got.steps) == _expected_drafts(LENS, accept, k)


def test_rigged_acceptance_counts_whatever_the_drafts(model, prompts):
  """The benchmarks' rig (no reference): drafts count as accepted where the mask says, whatever
  their tokens, so the step counts are the mask's; the rows still emit N tokens each."""
  accept = np.random.default_rng(8).random((3, M)) < 0.8
  got = generate(model, prompts, N, chunk=CHUNK, mtp_draft=K, _rig=(None, accept, np.bool_(True)))
  assert (got.drafted, got.accepted, got.steps) == _expected_drafts(LENS, accept, K)
  assert got.lengths.tolist() == [N] * 3


def test_speculative_greedy_equals_plain_with_the_mtp_layer(model, prompts, plain):
  """The model's own (random) MTP layer drafting: the same tokens as plain greedy."""
  got = generate(model, prompts, N, chunk=CHUNK, mtp_draft=K,
                 _rig=rig(prompts, plain, np.zeros((3, M), bool), on=False))
  assert got.sequences() == plain.sequences()
  assert got.drafted > 0 and 0 <= got.acceptance <= 1


def test_speculative_sampling_at_low_temperature_is_greedy(model, prompts, plain):
  """The sampling acceptance rule (accept with the target probability, else draw from the rest)
  at temperature 1e-4, where the target is one-hot: greedy's tokens, on mixed rigged drafts."""
  accept = np.random.default_rng(6).random((3, M)) < 0.5
  got = generate(model, prompts, N, chunk=CHUNK, mtp_draft=K, temperature=1e-4, seed=3,
                 _rig=rig(prompts, plain, accept))
  assert got.sequences() == plain.sequences() and 0 < got.acceptance < 1


# ------------------------------------------------------------------------------------- sampling
def _np_filter(logits, temperature, top_k, top_p):
  """Float64 form of the sampling distribution (sampling.py's docstring)."""
  x = np.asarray(logits, np.float64) / temperature
  if top_k:
    x = np.where(x >= np.sort(x)[-top_k], x, -np.inf)
  p = np.exp(x - x.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  before = np.cumsum(p[order]) - p[order]
  keep = np.zeros_like(p, bool)
  keep[order[before < top_p]] = True
  p = np.where(keep, p, 0)
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0),
                                                      (1.3, 0, 0.6), (0.5, 12, 0.9)])
def test_sampling_distribution_matches_float64(temperature, top_k, top_p):
  logits = jax.random.normal(jax.random.key(1), (3, 64)) * 2
  s = Sampling(temperature, top_k, top_p)
  got = np.exp(np.asarray(log_probs(logits, s), np.float64))
  for b in range(3):
    want = _np_filter(logits[b], temperature, top_k, top_p)
    np.testing.assert_allclose(got[b], want, atol=1e-6)
  want = _np_filter(logits[0], temperature, top_k, top_p)
  assert (want > 0).sum() > 1  # a real cut, not a point mass
  toks, lp = sample(jax.random.key(2), jnp.tile(logits[:1], (512, 1)), s)
  toks = np.asarray(toks)
  assert (want[toks] > 0).all()
  np.testing.assert_allclose(np.asarray(lp), np.log(want[toks]), atol=1e-5)


def test_bad_arguments_name_the_culprit(model):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate(model, [[1, 2], []], 4)
  with pytest.raises(ValueError, match="prompt 0 token 1 is 999"):
    generate(model, [[1, 999]], 4)
  with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
    generate(model, [[1, 2]], CFG.max_position_embeddings)
  with pytest.raises(ValueError, match="top_p=0"):
    generate(model, [[1, 2]], 4, temperature=1.0, top_p=0)
  with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
    generate(random_model(ling_tiny(num_nextn_predict_layers=0)), [[1, 2]], 4, mtp_draft=1)


@gpu
def test_gpu_speculative_greedy_equals_plain():
  """On the GPU (fp32 at full matmul precision: TF32 rounding would differ between the one-token
  and the verification path): MTP drafting with the model's own and rigged drafts."""
  with jax.default_matmul_precision("highest"):
    model = random_model(CFG, seed=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in LENS]
    plain = generate(model, prompts, N, chunk=CHUNK)
    assert generate(model, prompts, N, chunk=CHUNK, mtp_draft=1).sequences() == plain.sequences()
    accept = rng.random((3, M)) < 0.6
    got = generate(model, prompts, N, chunk=CHUNK, mtp_draft=K,
                   _rig=rig(prompts, plain, accept))
    assert got.sequences() == plain.sequences()
