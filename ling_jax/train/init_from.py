"""`train.init_from=PATH`: start a run from released or trained weights instead of random init.

PATH is one of
* an HF folder (config.json and safetensors): read whole into host memory by `ling_jax.load_hf`
  (on the host's CPU), then each process places its devices' shards. Refused, with the command
  that converts it, when the model's fp32 parameters would take more than half the host's
  memory: a large model is converted once (`python -m ling_jax.convert import HF_DIR CKPT_DIR`)
  and started from the checkpoint;
* a converted checkpoint (ling_jax.json of the Orbax format): `ling_jax.load(ckpt, mesh)`,
  every device reading only its shards (refused if it kept FP8 experts: training updates bf16
  or fp32 weights only);
* a run's out_dir (or its checkpoints/ folder): the latest checkpoint's train state, restored
  into this run's shardings, read-only.
Only the parameters and the expert biases are taken; the optimizer starts fresh at step 0. The
model config must be the run's: a difference is an error naming each field.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from ling_jax.config import LingConfig
from ling_jax.hf_config import from_hf_config
from ling_jax.io.destination import MARKER
from ling_jax.model.common import Constant, ExpertBias
from ling_jax.parallel.distributed import host_to_global
from ling_jax.train.checkpoint import _diff, committed_steps, restore_read_only, saved_meta
from ling_jax.train.config import Experiment
from ling_jax.train.errors import RunRefused
from ling_jax.train.optim import optimizer
from ling_jax.train.sharding import Layout, abstract_train_state, init_constants


def _kind(path: str) -> str:
  """"orbax" (a converted checkpoint), "hf" (an HF folder) or "run" (a run's checkpoints)."""
  marker = os.path.join(path, MARKER)
  if os.path.isfile(marker):
    from ling_jax.convert import store
    with open(marker) as f:
      if json.load(f).get("format") in store.KNOWN_FORMATS:
        return "orbax"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  if committed_steps(os.path.join(path, "checkpoints")) or committed_steps(path):
    return "run"
  raise RunRefused(f"train.init_from={path!r} is neither an HF folder (config.json), a converted "
                   "checkpoint (ling_jax.json) nor a run's out_dir (checkpoints/<step>)")


def _check_config(path: str, saved: LingConfig | dict, want: LingConfig) -> None:
  saved = saved if isinstance(saved, dict) else dataclasses.asdict(saved)
  diff = _diff(json.loads(json.dumps(saved)), json.loads(json.dumps(dataclasses.asdict(want))),
               "model.")
  if diff:
    raise RunRefused(f"train.init_from={path!r} holds another model: "
                     + "; ".join(d.replace("checkpoint", "there", 1) for d in diff)
                     + " (set the run's model.* to the checkpoint's)")


def _host_bytes() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def _states(model) -> tuple:
  _, params, bias, _ = nnx.split(model, nnx.Param, ExpertBias, Constant)
  return params, bias


def load_initial(exp: Experiment, lay: Layout) -> tuple:
  """(params, expert_bias, constants) of `exp.train.init_from` in the run's shardings. Call it
  outside `jax.set_mesh` (arrays made under it are replicated over the mesh)."""
  path = os.path.abspath(exp.train.init_from)
  if not os.path.isdir(path):
    raise RunRefused(f"train.init_from={exp.train.init_from!r}: no such directory")
  kind, cfg, kernels = _kind(path), exp.model, exp.train.kernels
  if kind == "orbax":
    from ling_jax.convert import load, store
    marker = store.read_marker(path)
    kept = marker.get("expert_weights", {}).get("format", "dense")
    if kept != "dense":
      raise RunRefused(f"train.init_from={path!r} keeps its routed experts in {kept} (convert "
                       "import --keep-fp8), which training cannot update: import the HF folder "
                       "again without --keep-fp8 and start from that")
    _check_config(path, from_hf_config(marker["config"]), cfg)
    params, bias = _states(load(path, lay.mesh, np.float32, kernels=kernels)[1])
    params, bias = (jax.device_put(s, sh) for s, sh in zip((params, bias), lay.model))
  elif kind == "hf":
    from ling_jax.hf_io import load_hf
    from ling_jax.hf_config import read_hf_config
    _check_config(path, read_hf_config(path), cfg)
    need, host = 4 * cfg.param_count(include_mtp=True), _host_bytes()
    if host is not None and need > host // 2:
      raise RunRefused(
          f"train.init_from={path!r}: an HF folder is read whole into host memory, and this "
          f"model's fp32 parameters take {need / 2**30:.1f} GiB of the host's "
          f"{host / 2**30:.1f} GiB. Convert it once (python -m ling_jax.convert import {path} "
          "CKPT_DIR) and set train.init_from=CKPT_DIR: a checkpoint restores sharded")
    with jax.default_device(jax.devices("cpu")[0]):
      states = _states(load_hf(path, np.float32, kernels=kernels, progress=False)[1])
    params, bias = host_to_global(states, lay.model[:2])
  else:
    directory = path if committed_steps(path) else os.path.join(path, "checkpoints")
    step, meta = saved_meta(directory)
    _check_config(path, meta["model"], cfg)
    state = restore_read_only(directory, step,
                              abstract_train_state(lay, optimizer(exp.train)))
    params, bias = state.params, state.expert_bias
    del state  # the optimizer's moments go now
  return params, bias, init_constants(exp, lay)
