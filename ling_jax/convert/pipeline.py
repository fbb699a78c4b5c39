"""The block pipeline shared by import and export: bounded work in flight, recycled buffers.

The main thread walks the tensors block by block and `submit`s one job per block; `workers`
threads run the jobs (pread, numpy's copies, tensorstore's waits and pwrite all release the GIL);
a job may hand back a future (tensorstore's write) that finishes it later. At most `budget` bytes
of blocks are in flight: the main thread waits for the oldest job before it submits more, and
finished blocks advance the progress bar in submission order. A job's first error stops the run
as a `ConversionError` that names the file and the tensor.
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys
from typing import Any, Callable

import numpy as np

from ling_jax.convert.progress import Progress


class ConversionError(RuntimeError):
  """A failure while converting one tensor; the message names the file and the tensor."""


class Pipeline:
  """Jobs on `workers` threads with at most `budget` bytes of blocks in flight; the jobs get their
  scratch memory from `Buffers` of at most twice `budget`."""

  def __init__(self, workers: int, budget: int, bar: Progress):
    self.budget, self.bar = budget, bar
    self.pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), "ling-convert")
    self.buffers = Buffers(2 * budget)
    self.queue: collections.deque = collections.deque()
    self.inflight = 0

  def submit(self, job: Callable[..., Any], nbytes: int, buffer_bytes: tuple[int, ...],
             where: str) -> None:
    """Run `job(*buffers)` on a worker, with flat uint8 buffers of `buffer_bytes` (none if they
    cannot fit in the budget at all: the job then allocates its own). `nbytes` counts towards the
    budget and the bar; `where` ("file: tensor 'name'") prefixes its errors."""
    def task(buffers=self._reserve(buffer_bytes)):
      try:
        return job(*buffers)
      except Exception as e:
        raise ConversionError(f"{where}: {type(e).__name__}: {e}") from e
    self.queue.append((self.pool.submit(task), nbytes, where))
    self.inflight += nbytes
    while self.inflight > self.budget:
      self._wait_oldest()

  def _reserve(self, sizes) -> list:
    while True:
      buffers = self.buffers.take(sizes)
      if buffers is not None:
        return buffers
      if not self.queue:  # one block larger than the whole budget: let it allocate its own
        return []
      self._wait_oldest()

  def tensor_done(self, where: str) -> None:
    self.queue.append((None, 0, where))  # marks the end of one tensor, for the bar

  def _wait_oldest(self) -> None:
    task, nbytes, where = self.queue.popleft()
    if task is None:
      self.bar.update(0, tensors=1)
      return
    try:
      _finish(task)
    except ConversionError:
      raise
    except Exception as e:
      raise ConversionError(f"{where}: {type(e).__name__}: {e}") from e
    self.inflight -= nbytes
    self.bar.update(nbytes)

  def drain(self) -> None:
    """Wait for every job submitted so far."""
    while self.queue:
      self._wait_oldest()

  def close(self) -> None:
    self.drain()
    self.pool.shutdown()

  def abort(self) -> None:
    """Let the jobs and writes already started finish (ignoring errors) before cleaning up."""
    self.pool.shutdown(cancel_futures=True)
    for task, _, _ in self.queue:
      if task is not None and not task.cancelled():
        try:
          _finish(task)
        except BaseException:  # noqa: BLE001 - the first error is already propagating
          pass
    self.queue.clear()


def _finish(task) -> None:
  """Wait for a job and for the future it handed back, if any (tensorstore's write)."""
  done = task.result()
  if done is not None:
    done.result()


class Buffers:
  """Flat uint8 block buffers, recycled, at most `budget` bytes in all.

  In a VM the first touch of a fresh page can cost more than copying it several times (measured
  on this project's machine: 0.7-1.5 GB/s), and numpy maps and unmaps fresh pages for every
  block of a few MiB. A buffer is handed out again only when nothing else refers to it any more
  (its reference count is back to the pool's own): tensorstore keeps a reference to a written
  block until its write commits, and a view of a buffer keeps the buffer referenced.
  Not thread-safe: one thread takes buffers (the pipeline's main thread).
  """

  def __init__(self, budget: int):
    self.budget = budget
    self.buffers: list[np.ndarray] = [np.empty(0, np.uint8)]
    self._unused = self._refs(0)  # the count of a buffer that only the pool refers to
    self.buffers.clear()

  def _refs(self, i: int) -> int:
    return sys.getrefcount(self.buffers[i])

  def take(self, sizes) -> list[np.ndarray] | None:
    """Buffers of exactly `sizes` bytes, or None when they do not fit in the budget now."""
    picked = []
    for n in sizes:
      buf = self._take(n)  # `picked` holds a reference: it is not free any more
      if buf is None:
        return None
      picked.append(buf)
    return picked

  def _take(self, n: int) -> np.ndarray | None:
    free = [i for i in range(len(self.buffers)) if self._refs(i) == self._unused]
    same = [i for i in free if self.buffers[i].nbytes == n]
    if same:
      return self.buffers[same[0]]
    held = sum(b.nbytes for b in self.buffers)
    drop = set()
    for i in free:  # make room by letting go of free buffers of other sizes
      if held + n <= self.budget:
        break
      held -= self.buffers[i].nbytes
      drop.add(i)
    self.buffers = [b for i, b in enumerate(self.buffers) if i not in drop]
    if held + n > self.budget:
      return None
    self.buffers.append(np.empty(n, np.uint8))
    return self.buffers[-1]


__all__ = ["Buffers", "ConversionError", "Pipeline"]
