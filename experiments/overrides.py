"""`key.sub=value` command-line overrides of frozen dataclass configs.

    python -m experiments.tiny_pretrain train.steps=50 data.seq_len=64 model.num_hidden_layers=2

Each value is parsed by the field's annotated type (int, float, bool, str, Literal, `X | None`,
`tuple[int, ...]`) and the config is rebuilt with `dataclasses.replace`, so its own validation
runs. An unknown key, a malformed value or an invalid result raises `OverrideError` naming it,
before anything runs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from typing import Any, Literal


class OverrideError(ValueError):
  pass


def _parse(text: str, tp, key: str) -> Any:
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if text.lower() in ("none", "null") and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _parse(text, a, key)
      except OverrideError as e:
        errors.append(str(e))
    raise OverrideError(f"{key}={text!r} fits none of {tp}")
  if origin is Literal:
    for a in args:
      if str(a) == text:
        return a
    raise OverrideError(f"{key}={text!r}: choose one of {list(args)}")
  if origin is tuple:
    item = args[0]
    return tuple(_parse(v.strip(), item, key) for v in text.split(",") if v.strip())
  if tp is bool:
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise OverrideError(f"{key}={text!r} is not a bool (true/false)")
  if tp in (int, float, str):
    try:
      return tp(text)
    except ValueError:
      raise OverrideError(f"{key}={text!r} is not {tp.__name__}") from None
  if dataclasses.is_dataclass(tp):
    raise OverrideError(f"{key} is a config section; set its fields as {key}.<field>=...")
  raise OverrideError(f"{key}: cannot parse a value of type {tp}")


def _replace(cfg, path: list[str], text: str, full: str):
  if not dataclasses.is_dataclass(cfg):
    raise OverrideError(f"{full}: {'.'.join(path)} is not a config section")
  fields = {f.name: f for f in dataclasses.fields(cfg)}
  name = path[0]
  if name not in fields:
    raise OverrideError(f"unknown field {full.split('=')[0]!r}: {type(cfg).__name__} has "
                        f"{sorted(fields)}")
  hints = typing.get_type_hints(type(cfg))
  if len(path) == 1:
    value = _parse(text, hints[name], full.split("=")[0])
  else:
    value = getattr(cfg, name)
    if value is None:
      raise OverrideError(f"{full}: {name} is None in this config; it has no fields to set")
    value = _replace(value, path[1:], text, full)
  try:
    return dataclasses.replace(cfg, **{name: value})
  except (ValueError, TypeError) as e:
    raise OverrideError(f"{full}: {e}") from None


def apply_overrides(cfg, args: list[str]):
  """`cfg` with every `a.b.c=value` in `args` applied in order."""
  for arg in args:
    key, sep, text = arg.partition("=")
    if not sep or not key:
      raise OverrideError(f"expected key.sub=value, got {arg!r}")
    cfg = _replace(cfg, key.split("."), text, arg)
  return cfg


def main(config_fn, argv: list[str], run=None):
  """Entry point of `python -m experiments.<name> key=value ...`: override, then train (with
  `run(experiment)`, default pretraining's `ling_jax.train.run`; a stage's run imports jax
  inside it, so that --help stays instant).

  `-h` / `--help` lists every field (experiments/usage.py) and exits without importing jax.
  Exit status: 2 for bad input (an override, the corpus, a checkpoint of another config or
  past train.steps), 1 when training diverges (a non-finite loss or gradient), 130 when
  interrupted (Ctrl-C), each with a one-line message; anything else keeps its traceback."""
  if "-h" in argv or "--help" in argv:
    from experiments.usage import help_text, program_of
    try:
      exp = apply_overrides(config_fn(), [a for a in argv if a not in ("-h", "--help")])
    except OverrideError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(help_text(exp, *program_of(config_fn)))
    return None
  from ling_jax.data.sources import DataError  # here: parsing overrides needs no jax
  from ling_jax.posttrain.chat import ChatError
  from ling_jax.train.errors import NonFiniteError, RunRefused
  if run is None:
    from ling_jax.train import run

  try:
    return run(apply_overrides(config_fn(), argv))
  except (OverrideError, DataError, RunRefused, ChatError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt as e:  # TrainingInterrupted says where to resume; a bare one does not
    print(str(e) or "interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown: after a second Ctrl-C an abandoned save's native writer threads
    # may still run, and tearing down under them aborts the process (std::terminate, exit 134).
    # Every file a run writes is closed by now or written atomically (checkpoints by rename).
    os._exit(130)
