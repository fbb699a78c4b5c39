"""Every notebook under notebooks/ executes top to bottom without error, and is stored without
outputs (they are rendered when run, never committed)."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

STRIP = ("python -c \"import nbformat, sys; nb = nbformat.read(sys.argv[1], 4); "
         "[(c.update(outputs=[], execution_count=None), c.metadata.pop('execution', None)) "
         "for c in nb.cells if c.cell_type == 'code']; nbformat.write(nb, sys.argv[1])\" {path}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
  # The kernel is a process of its own: point it at this checkout's packages (not whichever copy
  # is installed), on the CPU, compiling without LLVM's optimisations: on a CPU compilation is
  # most of a notebook's time (ling_tiny's eager init: 18 s of CPU at the default level, 6 s at 0).
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT),
                                                                 os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()


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
