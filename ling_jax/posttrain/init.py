"""Where a post-training stage starts: its model (`start.init`, or a fresh one), its tokenizer and
its chat template (docs/posttrain.md, "Training loops").

`start.init` is one of three things, told apart by what the folder holds:
  an HF folder           config.json + safetensors (`ling_jax.load_hf`)
  a converted checkpoint ling_jax.json of the Orbax format (`ling_jax.load`)
  a run's checkpoint     its out_dir, checkpoints/ or checkpoints/<step> (`ling_jax.load`:
                         pretraining's or an earlier post-training stage's)
The model is read with fp32 master weights and computes in the stage's compute dtype, as
training builds it.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.config import LingConfig
from ling_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from ling_jax.model.ling import LingForCausalLM
from ling_jax.model.settings import Kernels
from ling_jax.posttrain.chat import BUILTIN, ChatError, load_chat_template
from ling_jax.train.errors import RunRefused


def init_kind(path: str) -> str:
  """"hf", "converted" or "run": what `start.init=path` names (RunRefused if none)."""
  from ling_jax.io.destination import MARKER
  from ling_jax.train.checkpoint import find_run_checkpoint

  if not os.path.isdir(path):
    raise RunRefused(f"start.init={path!r}: no such directory")
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  if os.path.isfile(os.path.join(path, MARKER)):
    return "converted"
  if find_run_checkpoint(path) is not None:
    return "run"
  raise RunRefused(f"start.init={path!r} is neither an HF folder (config.json), a converted "
                   "checkpoint (ling_jax.json) nor a run's checkpoint (checkpoints/<step>)")


def init_config(path: str) -> LingConfig:
  """The model config of `start.init=path`, read without loading any weight."""
  kind = init_kind(path)
  if kind == "hf":
    from ling_jax.hf_config import read_hf_config
    return read_hf_config(path)
  if kind == "converted":
    from ling_jax.convert import store
    from ling_jax.hf_config import from_hf_config
    return from_hf_config(store.read_marker(path)["config"])
  from ling_jax.train.checkpoint import find_run_checkpoint
  return find_run_checkpoint(path).config


def _recast(model: LingForCausalLM, dtype, kernels: Kernels) -> LingForCausalLM:
  """`model`'s variables (fp32) in a model computing in `dtype` with `kernels`."""
  make = lambda: LingForCausalLM(model.config, rngs=nnx.Rngs(0), dtype=dtype,
                                 param_dtype=jnp.float32, kernels=kernels)
  return nnx.merge(nnx.graphdef(nnx.eval_shape(make)), nnx.state(model))


def fresh_model(cfg: LingConfig, *, seed: int, dtype, kernels: Kernels) -> LingForCausalLM:
  """A randomly initialised model (fp32 parameters), built by one compiled program (eager init
  compiles a program per parameter shape)."""
  make = lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=jnp.float32,
                                 kernels=kernels)
  graphdef = nnx.graphdef(nnx.eval_shape(make))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


def load_start_model(path: str, *, dtype, kernels: Kernels) -> tuple[LingConfig, LingForCausalLM]:
  """(config, model) of `start.init=path`: fp32 parameters, computing in `dtype`."""
  kind = init_kind(path)
  if kind == "hf":
    from ling_jax.hf_io import load_hf
    cfg, model = load_hf(path, jnp.float32, kernels=kernels, progress=False)
  else:
    import ling_jax
    cfg, model = ling_jax.load(path, dtype=jnp.float32, kernels=kernels)
  return cfg, _recast(model, dtype, kernels)


def stage_config(default: LingConfig, init: str | None) -> LingConfig:
  """The model config a stage trains: the checkpoint's with `init`, else `default`; a note names
  the fields where the two differ (the checkpoint decides)."""
  if init is None:
    return default
  cfg = init_config(init)
  diff = [f.name for f in dataclasses.fields(cfg)
          if getattr(cfg, f.name) != getattr(default, f.name)]
  if diff:
    print(f"model config from {init} (it differs from the experiment's model.* in "
          f"{', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''})")
  return cfg


def _tokenizer_file(path: str) -> str:
  return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path


def tokenizer_and_template(start, vocab_size: int):
  """(tokenizer, chat template, the tokenizer's folder or None) of a `Start` section.

  Errors are ChatError / RunRefused naming the culprit: a tokenizer larger than the model's
  vocabulary, a tokenizer folder without a chat template (with "auto"), an unreadable template.
  """
  folder = None
  if start.tokenizer is not None:
    path = _tokenizer_file(start.tokenizer)
    if not os.path.isfile(path):
      raise RunRefused(f"start.tokenizer={start.tokenizer!r}: no such tokenizer.json")
    tokenizer, folder = HFTokenizer(path), os.path.dirname(os.path.abspath(path))
  elif start.init is not None and os.path.isfile(os.path.join(start.init, "tokenizer.json")):
    tokenizer = HFTokenizer(os.path.join(start.init, "tokenizer.json"))
    folder = os.path.abspath(start.init)
  else:
    tokenizer = ByteTokenizer()
  if tokenizer.vocab_size > vocab_size:
    raise RunRefused(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
                     f"is {vocab_size}")
  if start.chat_template == "builtin" or (start.chat_template == "auto" and folder is None):
    return tokenizer, BUILTIN, folder
  source = folder if start.chat_template == "auto" else start.chat_template
  if os.path.isfile(source) and source.endswith(".jinja"):
    from ling_jax.posttrain.chat import JinjaTemplate
    with open(source, encoding="utf-8") as f:
      return tokenizer, JinjaTemplate(f.read(), name=source), folder
  if not os.path.isdir(source):
    raise ChatError(f"start.chat_template={source!r}: no such folder or .jinja file")
  return tokenizer, load_chat_template(source), folder


def stop_ids(template, tokenizer) -> list[int]:
  """The tokens of the template's end-of-turn marker (ChatError if it has none)."""
  if not template.stop:
    raise ChatError(f"{template.name}: the chat template has no end-of-turn marker (the "
                    "tokenizer_config.json has no eos_token), so generation cannot stop")
  ids = [int(i) for i in tokenizer.encode(template.stop)]
  if not ids:
    raise ChatError(f"{template.name}: the end-of-turn marker {template.stop!r} encodes to no "
                    "token")
  return ids
