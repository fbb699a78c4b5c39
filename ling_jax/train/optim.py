"""AdamW with warmup + cosine decay and global-norm clipping; no weight decay on norms and biases."""

from __future__ import annotations

import jax
import optax

from ling_jax.train.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to learning_rate, then cosine decay to min_lr_ratio * learning_rate."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decays(path) -> bool:
  """Weight decay applies to matrices only: not to any norm's scale (RMSNorm, GroupRMSNorm g_norm,
  q/k/kv_a layernorms, MTP enorm/hnorm: their path has a `*norm*` module) nor to biases. The names
  are the checkpoint's, and a norm weight can be 2-D (g_norm [H, K], or stacked [layers, D]), so
  the rule reads the path, not the rank."""
  return not any("norm" in n or "bias" in n for n in _names(path))


def decay_mask(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  # grad_clip 0 is "off": identity keeps the chain's state structure (both states are empty),
  # so a checkpoint restores whichever way the flag is set.
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
  return optax.chain(
      clip,
      optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=decay_mask),
  )
