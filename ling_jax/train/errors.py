"""How a training run stops short: the errors `run` raises, each with a message that says what
happened, what was kept and what to do next.

`python -m experiments.<name>` turns them into one line and an exit status
(experiments/overrides.py): `RunRefused` 2, `NonFiniteError` 1, `TrainingInterrupted` 130.
"""

from __future__ import annotations


class RunRefused(ValueError):
  """The run cannot start from what its output directory holds; nothing was written."""


class NonFiniteError(RuntimeError):
  """A loss, a gradient norm or a checkpointed state is NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
  """Ctrl-C (SIGINT) stopped training between two steps, once the checkpoint being written was
  complete (a second Ctrl-C: at once, abandoning it). `step` is the last step run (None: not
  known), `checkpoint` the last complete checkpoint's step (None: none)."""

  def __init__(self, message: str, step: int | None, checkpoint: int | None):
    super().__init__(message)
    self.step, self.checkpoint = step, checkpoint
