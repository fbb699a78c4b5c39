"""The jitted train and eval steps over NNX state.

The model is split once into a static graphdef and three states: `nnx.Param` (fp32 master
weights, what the optimizer and the gradient see), `ExpertBias` (moved by the load rule in
balance.py) and the model's `Constant`s (built from the config, neither trained nor saved: the
steps close over them); `split_model` refuses any other variable kind. A step merges them back,
runs `model.forward` with packed-row segment ids and positions, and returns the new `TrainState`
and a dict of device scalars; the host fetches those when it logs.

Loss: next-token cross-entropy, plus `mtp_loss_scaling_factor` x the MTP cross-entropy for token t+2
(docs/architecture.md §3.9). Targets that cross a document boundary (or are padding, segment 0) are
masked: the model cannot and must not predict the next document's first token. A batch may carry
`loss_mask` [B, T] (SFT, docs/posttrain.md): then only tokens with mask 1 are targets.

Memory (ling_small, 4 x 4096 tokens; benchmarks/train_memory.py): the step keeps every layer's
residuals for the backward pass unless `remat` checkpoints the stack block by block
(`LingForCausalLM.forward(remat=...)`), and [tokens, vocab] fp32 logits (main and MTP, and their
gradients) unless `ce_chunk` > 0 computes the cross-entropy through the head in token chunks
(train/loss.py).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ling_jax.model.common import Constant, ExpertBias
from ling_jax.model.settings import Remat
from ling_jax.parallel import islands
from ling_jax.train.balance import update_expert_bias
from ling_jax.train.loss import head_ce


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimizer steps taken
  params: nnx.State      # nnx.Param, fp32
  expert_bias: nnx.State  # ExpertBias, fp32
  opt_state: Any


def split_model(model: nnx.Module):
  """(graphdef, params, expert_bias, constants); refuses variables that neither the optimizer
  nor the balancing rule would update and that are not rebuilt with the model (they would
  silently stay at init and miss the checkpoint)."""
  graphdef, params, bias, constants, rest = nnx.split(model, nnx.Param, ExpertBias, Constant, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"model has variables that are neither Param, ExpertBias nor Constant: {rest}")
  return graphdef, params, bias, constants


# The projection matrices, which the forward casts to the compute dtype at their use
# (`w[...].astype(dtype)`); not the norms' scales or the router's weight (leaves named "weight": the
# router runs in fp32, docs/architecture.md §4.3, and the QK-norm kernel widens its scales'
# gradients itself), nor the embedding and head that the main and MTP branches share (two uses:
# their cotangents must add up in fp32).
_KEEP_FP32 = ("weight", "word_embeddings", "lm_head")


def _cast_in_forward(path) -> bool:
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  names = [n for n in names if n != "value"]
  return bool(names) and names[-1] not in _KEEP_FP32


def compute_copies(params, dtype):
  """`params` with the fp32 projection matrices, which the forward casts to `dtype` at their use,
  cast now; the rest (norm scales, router, embedding, head) as they are.

  The model casts each master weight where it uses it (`w[...].astype(dtype)`, a no-op on a leaf
  already in `dtype`). Under gradient accumulation that cast (4 bytes read, 2 written a parameter)
  would run in every micro-batch; the train step casts once and differentiates with respect to the
  copies. Their gradients are the casts' cotangents, which the casts' own backward would only have
  widened to fp32: the same gradients bit for bit (tests/train/test_train.py).
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.astype(dtype) if p.dtype == jnp.float32 and _cast_in_forward(path) else p,
      params)


def init_state(params, expert_bias, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, expert_bias=expert_bias,
                    opt_state=tx.init(params))


def _masked_ce(logits, targets, valid):
  """Summed fp32 cross-entropy over `valid` positions, and their count."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  valid = valid.astype(jnp.float32)
  return (ce * valid).sum(), valid.sum()


def _chunked_ce(hidden, lm_head, targets, valid, shift: int, chunk: int, dtype, impl: str):
  """`_masked_ce` of head(hidden[:, :-shift]) against `targets` [B, T - shift], via `head_ce`:
  hidden keeps all T positions (the last `shift` masked), so no [B, T-shift, D] copy is made."""
  B, T, D = hidden.shape
  pad = lambda x: jnp.pad(x, ((0, 0), (0, shift)))
  ce = head_ce(hidden.reshape(B * T, D), lm_head, pad(targets).reshape(-1),
               pad(valid).reshape(-1), min(chunk, B * T) if chunk > 0 else B * T, dtype, impl)
  return ce, valid.astype(jnp.float32).sum()


def _valid_targets(seg, loss_mask=None):
  """valid[t]: token t+1 belongs to token t's (non-padding) document; valid2[t]: tokens t+1 and
  t+2 both do (the MTP target). With a loss_mask [B, T] (SFT: 1 on the assistant's tokens), a
  target also needs loss_mask 1: valid[t] on token t+1's, valid2[t] on token t+2's."""
  valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  valid2 = valid[:, :-1] & valid[:, 1:]
  if loss_mask is not None:
    valid, valid2 = valid & (loss_mask[:, 1:] > 0), valid2 & (loss_mask[:, 2:] > 0)
  return valid, valid2


def lm_losses(out, batch, lm_head=None, *, ce_chunk: int = 0, dtype=jnp.float32,
              impl: str = "auto"):
  """Sums and counts of the next-token and (if present) MTP cross-entropies.

  From out.logits / out.mtp_logits when the forward made them; else (logits=False) from
  out.hidden / out.mtp_hidden through `lm_head` [D, V] in chunks of `ce_chunk` tokens, with the
  head matmul in `dtype` (the model's compute dtype) as `LingForCausalLM._head` does it, and the
  chunks' cross-entropy by pallas_kernels.cross_entropy's `impl`.
  """
  tokens = batch["tokens"]
  valid, valid2 = _valid_targets(batch["segment_ids"], batch.get("loss_mask"))
  res = {}
  if out.logits is not None:
    res["ce_sum"], res["n"] = _masked_ce(out.logits[:, :-1], tokens[:, 1:], valid)
  else:
    res["ce_sum"], res["n"] = _chunked_ce(out.hidden, lm_head, tokens[:, 1:], valid, 1, ce_chunk,
                                          dtype, impl)
  if out.mtp_logits is not None:
    res["mtp_sum"], res["n_mtp"] = _masked_ce(out.mtp_logits[:, :-2], tokens[:, 2:], valid2)
  elif out.mtp_hidden is not None:
    res["mtp_sum"], res["n_mtp"] = _chunked_ce(out.mtp_hidden, lm_head, tokens[:, 2:], valid2, 2,
                                               ce_chunk, dtype, impl)
  return res


def _losses(graphdef, constants, params, expert_bias, batch, *, mtp: bool,
            remat: Remat = Remat(), ce_chunk: int = 0):
  """(model output, `lm_losses` sums): the full logits only when ce_chunk is 0."""
  model = nnx.merge(graphdef, params, expert_bias, constants)
  out = model.forward(batch["tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], mtp=mtp, logits=not ce_chunk, remat=remat)
  return out, lm_losses(out, batch, model.lm_head[...], ce_chunk=ce_chunk, dtype=model.dtype,
                        impl=model.kernels.cross_entropy)


def make_train_step(graphdef, constants, tx: optax.GradientTransformation, lr_schedule, *,
                    mtp_weight: float, bias_rate: float, remat: Remat = Remat(),
                    ce_chunk: int = 4096, grad_accum: int = 1, compute_dtype=None,
                    cast_once: bool = True, shardings=None):
  """A jitted `(state, batch) -> (state, metrics)` of the model `split_model` gave as (graphdef,
  ..., constants); `state` is donated. mtp_weight 0 skips MTP.

  remat: the model's block checkpoints (`LingForCausalLM.forward`). ce_chunk: tokens per chunk
  of the fused head + cross-entropy (0: materialise the full fp32 logits). grad_accum: the batch's rows run as that
  many equal micro-batches in sequence (activation memory of one micro-batch); their gradients,
  loss sums and expert loads add up to the whole batch's, so the update is the same as one pass
  over the batch (up to summation order). compute_dtype (the model's, e.g. bf16) with cast_once:
  under accumulation the fp32 weights are cast to it once per step (`compute_copies`), not in
  each micro-batch's forward; the same gradients bit for bit.

  shardings: (the state's shardings, the batch's) on a mesh (train/sharding.py), for the jit's
  in and out shardings (the metrics replicated); trace and call the step under that mesh's
  `jax.set_mesh`. None: no shardings given (one device).
  """
  mtp = mtp_weight > 0
  if grad_accum < 1:
    raise ValueError(f"grad_accum={grad_accum} must be >= 1")

  def loss_fn(params, expert_bias, batch, n, n_mtp):
    """The batch's loss share: its CE sums over the whole batch's target counts n, n_mtp."""
    out, sums = _losses(graphdef, constants, params, expert_bias, batch, mtp=mtp, remat=remat,
                        ce_chunk=ce_chunk)
    aux = {"ce": sums["ce_sum"] / n, "loads": (out.expert_load, out.mtp_expert_load)}
    total = aux["ce"]
    if mtp:
      aux["mtp"] = sums["mtp_sum"] / n_mtp
      total = total + mtp_weight * aux["mtp"]
    return total, aux

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(params, expert_bias, batch, n, n_mtp):
    rows = batch["tokens"].shape[0]
    if rows % grad_accum:
      raise ValueError(f"batch of {rows} rows does not split into grad_accum={grad_accum}")
    if islands.active_mesh() is None:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, rows // grad_accum, *x.shape[1:]),
                           batch)
    else:  # micro-batch a: rows a, a + grad_accum, ...: every device splits its own rows
      micro = jax.tree.map(lambda x: jnp.swapaxes(
          x.reshape(rows // grad_accum, grad_accum, *x.shape[1:]), 0, 1), batch)
    weights = compute_copies(params, compute_dtype) if cast_once and compute_dtype else params

    def widen(out):  # the copies' gradients in the master weights' dtypes (fp32)
      return out[0], jax.tree.map(lambda g, p: g.astype(p.dtype), out[1], params)

    def body(acc, mb):
      mb = jax.tree.map(islands.constrain_rows, mb)  # (nothing without a mesh)
      out = widen(grad_fn(weights, expert_bias, mb, n, n_mtp))
      return jax.tree.map(jnp.add, acc, out), None

    # Every micro-batch inside the scan, from zeros: one copy of the forward and backward in
    # the program. (With the first one outside the scan, as the carry's start, the program held
    # two copies and asked for 48 GiB of temporaries at ling_small's 2 x 8 x 4096 on an H100.)
    one = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda *a: widen(grad_fn(*a)), weights, expert_bias, one, n, n_mtp)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(body, zeros, micro)[0]

  def step(state: TrainState, batch):
    valid, valid2 = _valid_targets(batch["segment_ids"], batch.get("loss_mask"))
    n = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
    n_mtp = jnp.maximum(valid2.sum().astype(jnp.float32), 1.0)
    if grad_accum == 1:
      (loss, aux), grads = grad_fn(state.params, state.expert_bias, batch, n, n_mtp)
    else:
      (loss, aux), grads = accumulate(state.params, state.expert_bias, batch, n, n_mtp)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    load, mtp_load = aux["loads"]
    expert_bias = update_expert_bias(state.expert_bias, load, mtp_load, bias_rate)
    metrics = {"loss": loss, "ce": aux["ce"], "grad_norm": optax.tree.norm(grads),
               "lr": lr_schedule(state.step),
               # Per MoE layer: the busiest expert's load over the mean load (1.0 = balanced).
               "load_max_mean": load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)}
    if mtp:
      metrics["mtp"] = aux["mtp"]
    new = TrainState(step=state.step + 1, params=params, expert_bias=expert_bias,
                     opt_state=opt_state)
    return new, metrics

  if shardings is None:
    return jax.jit(step, donate_argnums=0)
  state, batch = shardings
  return jax.jit(step, in_shardings=(state, batch), out_shardings=(state, _replicated(batch)),
                 donate_argnums=0)


def _replicated(sharding):
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


def make_eval_step(graphdef, constants, ce_chunk: int = 4096, shardings=None):
  """A jitted `(params, expert_bias, batch) -> sums` (use `lm_losses` keys) without MTP.
  shardings: as make_train_step's (the state's: its params and expert_bias are used)."""

  def step(params, expert_bias, batch):
    return _losses(graphdef, constants, params, expert_bias, batch, mtp=False,
                   ce_chunk=ce_chunk)[1]

  if shardings is None:
    return jax.jit(step)
  state, batch = shardings
  return jax.jit(step, in_shardings=(state.params, state.expert_bias, batch),
                 out_shardings=_replicated(batch))
