"""The post-training experiments' command line: `--help` lists every section and field without
importing jax, and overrides reach the stage's config (bad ones are refused by name)."""

import importlib
import os
import subprocess
import sys

import pytest

from experiments.overrides import OverrideError, apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = {"sft": ("model", "start", "tasks", "data", "eval", "train"),
          "distill": ("model", "start", "tasks", "distill", "eval", "train"),
          "rl": ("model", "start", "tasks", "rl", "eval", "train")}
MODULES = [f"experiments.{stage}_{size}" for stage in STAGES for size in ("tiny", "small")]


@pytest.mark.parametrize("module", MODULES)
def test_help_without_jax(module):
  code = (f"import runpy, sys; sys.argv = [{module!r}, 'start.init=none', '--help']; "
          "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True); "
          "print('jax imported:', 'jax' in sys.modules)")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert out.startswith(f"usage: python -m {module} [-h] [key.sub=value ...]")
  assert out.rstrip().endswith("jax imported: False")
  assert "  start.init: str | None = None" in out
  for section in STAGES[module.split(".")[1].split("_")[0]]:
    assert f"\n{section} (" in out, section


def test_overrides_reach_the_stage_and_bad_ones_are_named():
  exp = apply_overrides(importlib.import_module("experiments.rl_tiny").config(),
                        ["rl.level=unit", "rl.mode=async", "tasks.kinds=arith,list"])
  assert exp.rl.level == "unit" and exp.rl.mode == "async" and exp.tasks.kinds == ("arith", "list")
  with pytest.raises(ValueError, match="level='word'"):
    apply_overrides(exp, ["rl.level=word"])
  with pytest.raises(OverrideError, match="rl.group_size"):
    apply_overrides(exp, ["rl.group_size=many"])
