"""Configuration of the post-training stages: SFT, shortest-correct distillation and RL.

Each stage is a frozen dataclass of sections, like pretraining's `Experiment`, so that
`python -m experiments.<name> key.sub=value` overrides any field and `--help` lists them
(experiments/overrides.py). The sections shared by the stages:

  model  the LingConfig of a fresh model; with `start.init` the checkpoint's config is used
  start  where the stage starts (`init`) and its tokenizer and chat template
  tasks  the seeded verifiable tasks (posttrain/tasks.py) the stage trains and evaluates on
  eval   how accuracy and answer length are measured before and after
  train  pretraining's TrainConfig: optimizer, schedule, numerics, checkpoints, out_dir

This module imports no jax, so `--help` stays instant.
"""

from __future__ import annotations

import dataclasses
import math

from ling_jax.config import LingConfig
from ling_jax.train.config import TrainConfig

TASK_KINDS = ("arith", "list", "tool")
LEVELS = ("token", "unit", "sequence")  # posttrain/losses.py's
AGGREGATIONS = ("token-mean", "seq-mean")
MODES = ("sync", "async")


def _errors(cls_name: str, errors: list[str]):
  if errors:
    raise ValueError(f"invalid {cls_name}: " + "; ".join(errors))


@dataclasses.dataclass(frozen=True)
class Start:
  """Where a stage starts, and how it turns text into tokens."""

  # An HF folder, a converted checkpoint (ling_jax.json) or a run's checkpoint (its out_dir,
  # checkpoints/ or checkpoints/<step>); None: a fresh model of `model`.
  init: str | None = None
  # An HF tokenizer.json (or a folder holding one); None: the init HF folder's tokenizer.json if
  # it has one, else UTF-8 bytes (ids < 256).
  tokenizer: str | None = None
  # "auto": the tokenizer folder's chat template (a clear error when it has none), the built-in
  # one for bytes; "builtin": the built-in template; or a folder / .jinja file holding one.
  chat_template: str = "auto"


@dataclasses.dataclass(frozen=True)
class Tasks:
  """Seeded verifiable tasks: training prompts from seeds 0.., evaluation prompts from
  eval_offset.. (disjoint)."""

  kinds: tuple[str, ...] = ("arith",)  # arith, list, tool (mixed round-robin)
  difficulty: int = 2              # arith: operations; list: length; tool: items to price
  train_prompts: int = 4096        # distinct training prompts (seeds 0..train_prompts-1)
  eval_prompts: int = 64           # evaluation prompts
  eval_offset: int = 1_000_000     # the first evaluation seed
  # SFT references: 0 answer only, 1 terse, 2 verbose; -1 mixed (seed s: verbosity s mod 3), so
  # that a fine-tuned model samples answers of different lengths for distillation and RL to
  # choose between.
  verbosity: int = 2
  # Only prompts of exactly this many tokens (0: any). The sampler compiles once per prompt
  # length (ling_jax.generate takes one length a call): the CPU experiments use one.
  prompt_tokens: int = 0

  def __post_init__(self):
    errors = []
    bad = [k for k in self.kinds if k not in TASK_KINDS]
    if not self.kinds or bad:
      errors.append(f"kinds={self.kinds}: choose from {TASK_KINDS}")
    for name in ("difficulty", "train_prompts", "eval_prompts"):
      if getattr(self, name) < 1:
        errors.append(f"{name}={getattr(self, name)} must be >= 1")
    if self.eval_offset < self.train_prompts:
      errors.append(f"eval_offset={self.eval_offset} must be >= train_prompts (disjoint seeds)")
    if self.verbosity not in (-1, 0, 1, 2):
      errors.append(f"verbosity={self.verbosity} must be 0, 1, 2 or -1 (mixed)")
    if self.prompt_tokens < 0:
      errors.append(f"prompt_tokens={self.prompt_tokens} must be >= 0")
    _errors("Tasks", errors)


@dataclasses.dataclass(frozen=True)
class Eval:
  """Accuracy and mean answer length on the evaluation prompts, before and after a stage."""

  samples: int = 1                 # answers per prompt
  temperature: float = 0.0         # 0: greedy
  max_new_tokens: int = 128        # per assistant turn
  max_turns: int = 8               # tool episodes
  show: int = 3                    # sampled answers printed and kept in summary.json
  seed: int = 1234

  def __post_init__(self):
    errors = []
    for name in ("samples", "max_new_tokens", "max_turns"):
      if getattr(self, name) < 1:
        errors.append(f"{name}={getattr(self, name)} must be >= 1")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      errors.append(f"temperature={self.temperature} must be a finite number >= 0")
    _errors("Eval", errors)


@dataclasses.dataclass(frozen=True)
class SFTData:
  """What SFT trains on: a chat JSONL file, or the reference solutions of `tasks`."""

  jsonl: str | None = None         # {"messages": [...]} a line; None: generated from `tasks`
  seq_len: int = 512               # tokens a row (whole conversations packed, docs/posttrain.md)
  batch_size: int = 16             # rows a step
  seed: int = 0                    # conversation order (epoch e: the permutation of (seed, e))

  def __post_init__(self):
    errors = []
    if self.seq_len < 3:
      errors.append(f"seq_len={self.seq_len} must be >= 3")
    if self.batch_size < 1:
      errors.append(f"batch_size={self.batch_size} must be >= 1")
    _errors("SFTData", errors)


@dataclasses.dataclass(frozen=True)
class SFTExperiment:
  model: LingConfig
  start: Start
  tasks: Tasks
  data: SFTData
  eval: Eval
  train: TrainConfig


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Rollouts, rewards, the policy loss and asynchrony (docs/posttrain.md, "RL losses")."""

  prompts_per_step: int = 8        # groups a step
  group_size: int = 8              # answers sampled per prompt (the GRPO group)
  temperature: float = 1.0         # sampling; the losses score the same tempered policy
  max_new_tokens: int = 128        # per assistant turn
  max_turns: int = 8               # tool episodes
  # Reward: 1 right / 0 wrong (the checkers), plus length_alpha x the group-relative brevity
  # bonus for right answers (losses.length_shaped_rewards; 0: off).
  length_alpha: float = 0.0
  normalize_std: bool = True       # advantages (r - mean) / std per group; False: r - mean
  # The clipped surrogate: level token (GRPO), unit (linguistic units) or sequence (GSPO).
  level: str = "token"
  aggregation: str = "token-mean"  # or seq-mean
  clip_eps: float = 0.2
  clip_eps_high: float = 0.28      # upper clip (DAPO's clip-higher)
  behav_weight_cap: float = 2.0    # cap of the off-policy weight pi_prox / mu (0: none)
  kl_coef: float = 0.0             # k3 KL to the frozen initial policy (0: off, not computed)
  minibatches: int = 1             # optimizer steps per rollout batch (its rows split evenly)
  # Asynchrony: "sync" samples then learns; "async" samples the next batches on a worker thread
  # while the learner trains, from a policy at most max_staleness versions old.
  mode: str = "sync"
  max_staleness: int = 1
  # MoE routing replay: the learner's forward routes each sampled token to the experts the
  # sampler's forward chose (docs/posttrain.md, "Routing replay").
  routing_replay: bool = False
  logprob_chunk: int = 0           # tokens a chunk of the head's log-probabilities (0: all)

  def __post_init__(self):
    errors = []
    for name in ("prompts_per_step", "group_size", "max_new_tokens", "max_turns", "minibatches"):
      if getattr(self, name) < 1:
        errors.append(f"{name}={getattr(self, name)} must be >= 1")
    for name in ("temperature", "clip_eps", "clip_eps_high"):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
        errors.append(f"{name}={getattr(self, name)} must be a finite number > 0")
    for name in ("length_alpha", "behav_weight_cap", "kl_coef"):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
        errors.append(f"{name}={getattr(self, name)} must be a finite number >= 0")
    if self.level not in LEVELS:
      errors.append(f"level={self.level!r}; choose one of {LEVELS}")
    if self.aggregation not in AGGREGATIONS:
      errors.append(f"aggregation={self.aggregation!r}; choose one of {AGGREGATIONS}")
    if self.mode not in MODES:
      errors.append(f"mode={self.mode!r}; choose one of {MODES}")
    if self.max_staleness < 0:
      errors.append(f"max_staleness={self.max_staleness} must be >= 0")
    if self.logprob_chunk < 0:
      errors.append(f"logprob_chunk={self.logprob_chunk} must be >= 0")
    if (self.prompts_per_step * self.group_size) % self.minibatches:
      errors.append(f"minibatches={self.minibatches} must divide prompts_per_step x group_size")
    _errors("RLConfig", errors)


@dataclasses.dataclass(frozen=True)
class RLExperiment:
  model: LingConfig
  start: Start
  tasks: Tasks
  rl: RLConfig
  eval: Eval
  train: TrainConfig


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Shortest-correct distillation: sample `samples` answers per training prompt, keep the
  shortest correct one (posttrain/distill.py), fine-tune on those."""

  prompts: int = 256               # training prompts sampled
  samples: int = 8                 # answers per prompt
  temperature: float = 1.0
  max_new_tokens: int = 128
  seq_len: int = 512               # SFT rows
  batch_size: int = 16

  def __post_init__(self):
    errors = []
    for name in ("prompts", "samples", "max_new_tokens", "batch_size"):
      if getattr(self, name) < 1:
        errors.append(f"{name}={getattr(self, name)} must be >= 1")
    if not (math.isfinite(self.temperature) and self.temperature > 0):
      errors.append(f"temperature={self.temperature} must be a finite number > 0")
    if self.seq_len < 3:
      errors.append(f"seq_len={self.seq_len} must be >= 3")
    _errors("DistillConfig", errors)


@dataclasses.dataclass(frozen=True)
class DistillExperiment:
  model: LingConfig
  start: Start
  tasks: Tasks
  distill: DistillConfig
  eval: Eval
  train: TrainConfig
