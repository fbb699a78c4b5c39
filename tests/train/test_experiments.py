"""The experiments' command line: `--help` lists every field an override can set, and the
README's override examples run beside the main job."""

import dataclasses
import importlib
import os
import pathlib
import re
import subprocess
import sys

from experiments import tiny_pretrain
from experiments.overrides import apply_overrides
from ling_jax.train.checkpoint import config_meta

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_help_lists_every_field_without_importing_jax():
  """`--help` of each experiment: every field of its model, data and train configs with its type,
  the experiment's value (after earlier overrides) and the comment on the field's source line;
  instant (no jax). The quickstart's --help writes nothing."""
  code = """
import runpy, sys
sys.argv = ["x", "model.hidden_size=32", "--help"]  # as `python -m x ...` sets it
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
print("jax imported:", "jax" in sys.modules)
"""
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  for module in ("experiments.tiny_pretrain", "experiments.small_pretrain",
                 "experiments.ablation_hybrid", "experiments.ablation_all_mla"):
    proc = subprocess.run([sys.executable, "-c", code.replace('"x"', repr(module))], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"usage: python -m {module} [-h] [key.sub=value ...]")
    assert out.rstrip().endswith("jax imported: False")
    exp = apply_overrides(importlib.import_module(module).config(), ["model.hidden_size=32"])
    for section in ("model", "data", "train"):
      cfg = getattr(exp, section)
      for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)  # a section (train.kernels) heads its own fields' lines
        line = f"  {section}.{f.name}: {f.type}" + (
            "" if dataclasses.is_dataclass(value) else f" = {value!r}")
        assert any(l.startswith(line) for l in out.splitlines()), line
    assert "  model.hidden_size: int = 32\n" in out
    assert "  train.seed: int = 0  # parameter init\n" in out
    assert "  # AdamW with linear warmup then cosine decay" in out  # a comment heading fields
  # The quickstart took "--help" for its output directory and wrote a checkpoint there.
  proc = subprocess.run([sys.executable, "-m", "experiments.quickstart", "--help"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and "OUT_DIR/hf" in proc.stdout, proc.stdout + proc.stderr
  assert "/ling_jax_quickstart" in proc.stdout and not (pathlib.Path(ROOT) / "--help").exists()


def test_the_readme_override_example_runs_after_the_main_job():
  """The README's override examples change the model or data config, which a checkpoint refuses,
  or train.steps below the main job's: each must name its own train.out_dir."""
  readme = open(os.path.join(ROOT, "README.md")).read().replace("\n", " ")
  examples = re.findall(r"`python -m experiments\.tiny_pretrain ([^`]+)`", readme)
  assert examples
  main_job = tiny_pretrain.config()
  for example in examples:
    exp = apply_overrides(main_job, example.split())
    resumable = (config_meta(exp) == config_meta(main_job)
                 and exp.train.steps >= main_job.train.steps)
    assert resumable or exp.train.out_dir != main_job.train.out_dir, example
