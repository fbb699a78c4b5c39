"""Orbax checkpoints of a run: train state, data-iterator position and config, saved together.

Each step directory holds three items: `state` (the TrainState pytree: fp32 params, expert
biases, optimizer state, step), `data` (the iterator's `get_state()` as JSON) and `meta` (the
model and data configs). Orbax writes a step into a temporary directory and renames it when
complete, so a process killed at any moment leaves only complete checkpoints behind (plus a
temporary directory that is ignored and cleaned up by the next run). Saves are asynchronous: the
device-to-host copy blocks, the file writes overlap the next training steps.

A state with a NaN or an infinity is never written, and a checkpoint holding one (from an older
version) is refused on restore: resuming from it would train on garbage without an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ling_jax.data.pipeline import json_state
from ling_jax.train.errors import NonFiniteError, RunRefused


class ConfigMismatch(RunRefused):
  """The checkpoint directory holds a run of another model or data configuration."""


def committed_steps(directory: str) -> list[int]:
  """The complete checkpoints in `directory`: Orbax renames a step's temporary directory to the
  bare step number only once every file is written."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


@jax.jit
def _finite(tree):
  return jax.tree.map(lambda x: jnp.isfinite(x).all(), tree)


def nonfinite_leaves(tree) -> list[str]:
  """The paths of the leaves of `tree` holding a NaN or an infinity (one compiled reduction)."""
  flags = jax.device_get(_finite(tree))
  return [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_leaves_with_path(flags)
          if not ok]


def _names(paths: list[str]) -> str:
  return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def config_meta(experiment) -> dict:
  """The parts of an experiment a checkpoint must agree with (JSON-normalised)."""
  meta = {"model": dataclasses.asdict(experiment.model), "data": dataclasses.asdict(experiment.data)}
  return json.loads(json.dumps(meta))


def _diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k, "<missing>"), current.get(k, "<missing>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: checkpoint {a!r}, now {b!r}")
  return out


def _read_only(directory: str) -> ocp.CheckpointManager:
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)  # a read-only manager warns that it is read-only
  try:
    return ocp.CheckpointManager(directory, item_names=("state", "data", "meta"),
                                 options=ocp.CheckpointManagerOptions(
                                     read_only=True, create=False, save_interval_steps=0))
  finally:
    absl.setLevel(level)


def restore_read_only(directory: str, step: int, abstract_state):
  """The train state of `step` in another run's `directory`, restored into the structure and
  shardings of `abstract_state` (arrays or ShapeDtypeStructs), writing nothing there."""
  manager = _read_only(directory)
  try:
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  finally:
    manager.close()


def saved_meta(directory: str) -> tuple[int | None, dict | None]:
  """(the latest complete step in `directory`, the configs it was written with), (None, None)
  if there is none. Read-only: nothing is created or cleaned up here."""
  if not os.path.isdir(directory):
    return None, None
  probe = _read_only(directory)
  try:
    step = probe.latest_step()
    if step is None:
      return None, None
    saved = probe.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    probe.close()
  return step, saved


def check_compatible(directory: str, meta: dict) -> int | None:
  """The latest complete step in `directory` (None if none), after checking it was written by the
  same model and data config. Read-only: nothing is created or cleaned up here."""
  step, saved = saved_meta(directory)
  if step is None:
    return None
  diff = _diff(saved, meta)
  if diff:
    raise ConfigMismatch(f"{directory} holds step {step} of a different configuration ("
                         + "; ".join(diff) + "); use another train.out_dir or delete it")
  return step


class Checkpointer:
  """Save every `every` steps (and at the end), keep the last `keep`, restore the latest."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.every = every
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return step % self.every == 0

  def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
    if not force and not self.due(step):
      return False
    bad = nonfinite_leaves(state)
    if bad:
      raise NonFiniteError(f"refusing to checkpoint step {step}: non-finite values in "
                           f"{_names(bad)}")
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, abstract_state):
    """(state, data-iterator state) of `step`; `abstract_state` gives the structure and shardings."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    bad = nonfinite_leaves(out["state"])
    if bad:
      earlier = [s for s in committed_steps(self.directory) if s < step]
      raise NonFiniteError(
          f"{self.directory} step {step} holds non-finite values ({_names(bad)}): a run that "
          f"diverged wrote it. Delete {os.path.join(self.directory, str(step))} to resume from "
          + (f"step {earlier[-1]}" if earlier else "scratch") + ", or use another train.out_dir")
    return out["state"], json_state(out["data"])

  def wait(self) -> int | None:
    """Wait for the save in flight (if any); the last complete step (None: none)."""
    self.manager.wait_until_finished()
    steps = committed_steps(self.directory)
    return steps[-1] if steps else None

  def close(self) -> int | None:
    """`wait`, then release the manager (and its threads)."""
    last = self.wait()
    self.manager.close()
    return last


# ---------------------------------------------------------------------------- reading a run
# A run's checkpoint as a model: what `ling_jax.load`, `python -m ling_jax.convert export` and a
# post-training stage's `init=` read. Only the parameters and the expert biases are restored
# (Orbax's partial restore: the optimizer's moments are never read).
STEP_ITEMS = ("state", "meta")


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
  """One complete step of a run's checkpoints: its directory, step and model config."""

  step_dir: str
  step: int
  config: Any  # LingConfig
  meta: dict

  @property
  def state_dir(self) -> str:
    return os.path.join(self.step_dir, "state")

  @staticmethod
  def array_name(path: tuple) -> str:
    """The stored name of the model variable at `path` (an nnx state path): the train state
    holds `params` and `expert_bias`, each leaf a Variable's `value`."""
    group = "expert_bias" if path[-1] == "expert_bias" else "params"
    return ".".join(map(str, (group, *path, "value")))


def _is_step_dir(path: str) -> bool:
  return all(os.path.isdir(os.path.join(path, item)) for item in STEP_ITEMS)


def model_config_from_meta(model: dict, where: str):
  """The LingConfig a run's meta item records (`dataclasses.asdict`, JSON-normalised)."""
  from ling_jax.config import LingConfig, YarnScaling
  fields = {f.name for f in dataclasses.fields(LingConfig)}
  if not isinstance(model, dict) or set(model) - fields:
    extra = sorted(set(model) - fields) if isinstance(model, dict) else model
    raise RunRefused(f"{where}: the meta item's model config has fields this version does not "
                     f"know: {extra}")
  kw = dict(model)
  if isinstance(kw.get("rope_scaling"), dict):
    kw["rope_scaling"] = YarnScaling(**kw["rope_scaling"])
  if isinstance(kw.get("eos_token_id"), list):
    kw["eos_token_id"] = tuple(kw["eos_token_id"])
  return LingConfig(**kw)


def find_run_checkpoint(path: str | os.PathLike) -> RunCheckpoint | None:
  """The run checkpoint `path` names, or None if it names none: a run's out_dir or its
  `checkpoints/` folder (-> the latest complete step), or one step's directory
  (`checkpoints/<step>`). A folder of steps none of which is complete is an error."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if _is_step_dir(path) and os.path.basename(path).isdigit():
    step_dir, step = path, int(os.path.basename(path))
  else:
    steps = committed_steps(path)
    if not steps:
      if os.path.isdir(path) and any(n.split(".")[0].isdigit() for n in os.listdir(path)):
        raise RunRefused(f"{path} holds no complete checkpoint step (only unfinished ones)")
      return None
    step_dir, step = os.path.join(path, str(steps[-1])), steps[-1]
  meta_path = os.path.join(step_dir, "meta")
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
      meta = ckptr.restore(meta_path)
  except (OSError, ValueError) as e:
    raise RunRefused(f"{meta_path}: unreadable meta item ({e})") from None
  if not isinstance(meta, dict) or "model" not in meta:
    raise RunRefused(f"{meta_path}: no model config (not a ling_jax run checkpoint)")
  return RunCheckpoint(step_dir, step, model_config_from_meta(meta["model"], meta_path), meta)


def load_run_params(run: RunCheckpoint, abstract_params, abstract_bias):
  """(params, expert_bias) of `run`, restored by Orbax into the structure, dtypes and shardings
  of the given abstract states (ShapeDtypeStructs with shardings: each device reads its shard).
  Refuses non-finite values, as `Checkpointer.restore` does."""
  target = {"params": abstract_params, "expert_bias": abstract_bias}
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(run.state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  bad = nonfinite_leaves(out)
  if bad:
    raise NonFiniteError(f"{run.step_dir} holds non-finite values ({_names(bad)})")
  return out["params"], out["expert_bias"]


def load_run(path: str | os.PathLike, dtype=None, *, kernels=None, mesh=None, rules=None):
  """A run's checkpoint -> (config, model), parameters in `dtype` (default: as stored, fp32
  masters) on the default device, or sharded over `mesh` by `rules` (ling_jax.axes); the model
  computes in `dtype` too. `path` as `find_run_checkpoint` takes it."""
  from flax import nnx

  from ling_jax import axes as ax
  from ling_jax.hf_io import abstract_model
  from ling_jax.model.common import ExpertBias
  from ling_jax.model.settings import Kernels

  run = find_run_checkpoint(path)
  if run is None:
    raise RunRefused(f"{path} is not a run's checkpoint (no checkpoints/<step> with a state and "
                     "a meta item)")
  dtype = jnp.float32 if dtype is None else dtype
  graphdef, abstract, constants = abstract_model(run.config, dtype, kernels=kernels or Kernels())
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:
    shardings = ax.state_shardings(abstract, mesh, rules or ax.RULES_FSDP_TP_EP)
    constants = jax.device_put(constants, ax.state_shardings(constants, mesh,
                                                             rules or ax.RULES_FSDP_TP_EP))
  structs = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                         abstract, shardings)
  params, bias = nnx.split_state(structs, nnx.Param, ExpertBias)
  params, bias = load_run_params(run, params, bias)
  return run.config, nnx.merge(graphdef, params, bias, constants)
