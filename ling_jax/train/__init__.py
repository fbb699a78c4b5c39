"""Training: optax AdamW over NNX state, MTP loss, aux-loss-free balancing, Orbax checkpoints."""

from ling_jax.train.config import Experiment, TrainConfig

# The loop and the step import jax, flax and orbax: on first use, so that an experiment's config
# (and its `--help`) builds without them.
_LAZY = {"run": "loop", "build_model": "loop", "evaluate": "loop", "TrainState": "step",
         "make_train_step": "step", "make_eval_step": "step", "split_model": "step"}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(f"ling_jax.train.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'ling_jax.train' has no attribute {name!r}")


__all__ = ["Experiment", "TrainConfig", "run", "build_model", "evaluate", "TrainState",
           "make_train_step", "make_eval_step", "split_model"]
