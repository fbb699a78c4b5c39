"""The jitted train and eval steps over NNX state.

The model is split once into a static graphdef and three states: `nnx.Param` (fp32 master
weights, what the optimizer and the gradient see), `ExpertBias` (moved by the load rule in
balance.py) and nothing else (`split_model` refuses any other variable kind). A step
merges them back, runs `model.forward` with packed-row segment ids and positions, and returns
the new `TrainState` and a dict of device scalars; the host fetches those when it logs.

Loss: next-token cross-entropy, plus `mtp_loss_scaling_factor` x the MTP cross-entropy for token
t+2 (spec 3.9). Targets that cross a document boundary (or are padding, segment 0) are masked:
the model cannot and must not predict the next document's first token.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ling_jax.model.common import ExpertBias
from ling_jax.train.balance import update_expert_bias

# Named jax.checkpoint policies. Applied around the whole loss: with "dots" the backward pass
# keeps matmul outputs and recomputes the cheap elementwise work (norms, SwiGLU, softmax).
# Per-group placement (inside the scan) needs a hook in LingForCausalLM._run_groups.
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimizer steps taken
  params: nnx.State      # nnx.Param, fp32
  expert_bias: nnx.State  # ExpertBias, fp32
  opt_state: Any


def split_model(model: nnx.Module):
  """(graphdef, params, expert_bias); refuses variables that neither the optimizer nor the
  balancing rule would update (they would silently stay at init and miss the checkpoint)."""
  graphdef, params, bias, rest = nnx.split(model, nnx.Param, ExpertBias, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"model has variables that are neither Param nor ExpertBias: {rest}")
  return graphdef, params, bias


def init_state(params, expert_bias, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, expert_bias=expert_bias,
                    opt_state=tx.init(params))


def _masked_ce(logits, targets, valid):
  """Summed fp32 cross-entropy over `valid` positions, and their count."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  valid = valid.astype(jnp.float32)
  return (ce * valid).sum(), valid.sum()


def lm_losses(out, batch) -> dict[str, jax.Array]:
  """Sums and counts of the next-token and (if present) MTP cross-entropies."""
  tokens, seg = batch["tokens"], batch["segment_ids"]
  # valid[t]: token t+1 belongs to token t's (non-padding) document.
  valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  ce_sum, n = _masked_ce(out.logits[:, :-1], tokens[:, 1:], valid)
  res = {"ce_sum": ce_sum, "n": n}
  if out.mtp_logits is not None:
    valid2 = valid[:, :-1] & valid[:, 1:]  # tokens t+1 and t+2 both in t's document
    res["mtp_sum"], res["n_mtp"] = _masked_ce(out.mtp_logits[:, :-2], tokens[:, 2:], valid2)
  return res


def _forward(graphdef, params, expert_bias, batch, mtp: bool):
  model = nnx.merge(graphdef, params, expert_bias)
  return model.forward(batch["tokens"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"], mtp=mtp)


def make_train_step(graphdef, tx: optax.GradientTransformation, lr_schedule, *, mtp_weight: float,
                    bias_rate: float, remat: str = "none"):
  """A jitted `(state, batch) -> (state, metrics)`; `state` is donated. mtp_weight 0 skips MTP."""
  mtp = mtp_weight > 0
  policy = REMAT[remat]

  def loss_fn(params, expert_bias, batch):
    out = _forward(graphdef, params, expert_bias, batch, mtp)
    sums = lm_losses(out, batch)
    ce = sums["ce_sum"] / jnp.maximum(sums["n"], 1.0)
    total = ce
    aux = {"ce": ce, "loads": (out.expert_load, out.mtp_expert_load)}
    if mtp:
      aux["mtp"] = sums["mtp_sum"] / jnp.maximum(sums["n_mtp"], 1.0)
      total = ce + mtp_weight * aux["mtp"]
    return total, aux

  if policy is not None:
    loss_fn = jax.checkpoint(loss_fn, policy=policy)

  def step(state: TrainState, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.expert_bias, batch)
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

  return jax.jit(step, donate_argnums=0)


def make_eval_step(graphdef):
  """A jitted `(params, expert_bias, batch) -> sums` (use `lm_losses` keys) without MTP."""

  def step(params, expert_bias, batch):
    return lm_losses(_forward(graphdef, params, expert_bias, batch, mtp=False), batch)

  return jax.jit(step)
