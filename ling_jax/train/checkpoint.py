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
