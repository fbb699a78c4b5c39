"""Training: optax AdamW over NNX state, MTP loss, aux-loss-free balancing, Orbax checkpoints."""

from ling_jax.train.config import Experiment, TrainConfig
from ling_jax.train.loop import build_model, evaluate, run
from ling_jax.train.step import TrainState, make_eval_step, make_train_step, split_model

__all__ = ["Experiment", "TrainConfig", "run", "build_model", "evaluate", "TrainState",
           "make_train_step", "make_eval_step", "split_model"]
