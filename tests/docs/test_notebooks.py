"""Every notebook under notebooks/ executes top to bottom without error, by the README's command
(`jupyter execute`, nbclient's, in the test extras), shows what its headings promise, and is
stored without outputs (they are rendered when run, never committed)."""

import functools
import os
import pathlib
import subprocess
import sys
import tempfile

import nbformat
import pytest

from testing import xla_flags

ROOT = pathlib.Path(__file__).parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@functools.cache
def _executed(path: pathlib.Path):
  """The notebook with its outputs, run as `jupyter execute NB --output=OUT` (the README's)."""
  out = pathlib.Path(tempfile.mkdtemp()) / path.stem
  jupyter = os.path.join(os.path.dirname(sys.executable), "jupyter")
  # The kernel imports this checkout's ling_jax, whichever one the environment has installed; on
  # the CPU, with the suite's quick compiles: on a CPU compilation is most of a notebook's time
  # (ling_tiny's eager init: 18 s of CPU at the default level, 6 s at 0).
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  proc = subprocess.run([jupyter, "execute", str(path), f"--output={out}"], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return nbformat.read(out.with_suffix(".ipynb"), as_version=4)


STRIP = ("python -c \"import nbformat, sys; nb = nbformat.read(sys.argv[1], 4); "
         "[(c.update(outputs=[], execution_count=None), c.metadata.pop('execution', None)) "
         "for c in nb.cells if c.cell_type == 'code']; nbformat.write(nb, sys.argv[1])\" {path}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
  _executed(path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  # Execution timestamps too (nbclient records them): they change on every run.
  dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
           and (cell.get("outputs") or cell.get("execution_count") is not None
                or "execution" in cell.metadata)]
  assert not dirty, (f"{path.relative_to(ROOT)}: code cells {dirty} hold outputs, an execution "
                     f"count or execution times; strip them before committing: "
                     f"{STRIP.format(path=path.relative_to(ROOT))}")


def test_architecture_tour_compares_the_decode_states():
  """Its decode-state heading promises fixed-size Lightning states against growing MLA caches:
  the cell under it prints both for several context lengths."""
  nb = _executed(ROOT / "notebooks" / "01_architecture_tour.ipynb")
  at = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and
            c.source.startswith("### Decode state: fixed-size Lightning states vs growing MLA"))
  text = "".join(o.get("text", "") for o in nb.cells[at + 1].outputs)
  lines = text.splitlines()
  assert "Lightning states" in lines[0] and "MLA latent caches" in lines[0], text
  rows = [[int(v.replace(",", "")) for v in line.split()] for line in lines[1:5]]
  assert len(rows) == 4 and len({lin for _, lin, _ in rows}) == 1  # fixed
  assert all(mla / n == rows[0][2] / rows[0][0] for n, _, mla in rows)  # linear in the context
