"""Every notebook under notebooks/ executes top to bottom without error, by the README's command
(`jupyter execute`, nbclient's, in the test extras), and shows what its headings promise."""

import functools
import os
import pathlib
import subprocess
import sys
import tempfile

import nbformat
import pytest

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@functools.cache
def _executed(path: pathlib.Path):
  """The notebook with its outputs, run as `jupyter execute NB --output=OUT` (the README's)."""
  out = pathlib.Path(tempfile.mkdtemp()) / path.stem
  jupyter = os.path.join(os.path.dirname(sys.executable), "jupyter")
  # The kernel imports this checkout's ling_jax, whichever one the environment has installed.
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([jupyter, "execute", str(path), f"--output={out}"], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return nbformat.read(out.with_suffix(".ipynb"), as_version=4)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
  _executed(path)


def test_explore_notebook_ends_with_the_decode_state_comparison():
  """Its last heading promises fixed-size Lightning states against growing MLA caches: its last
  cell prints both for several context lengths."""
  nb = _executed(ROOT / "notebooks" / "explore_tiny_ling.ipynb")
  heading = [c for c in nb.cells if c.cell_type == "markdown"][-1].source
  assert heading.startswith("## Decode state: fixed-size linear state vs growing MLA")
  text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
  lines = text.splitlines()
  assert "Lightning states" in lines[0] and "MLA latent caches" in lines[0], text
  rows = [[int(v.replace(",", "")) for v in line.split()] for line in lines[1:5]]
  assert len({lin for _, lin, _ in rows}) == 1  # fixed
  assert all(mla / n == rows[0][2] / rows[0][0] for n, _, mla in rows)  # linear in the context
