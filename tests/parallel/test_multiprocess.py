"""Two processes with four CPU devices each, started with docs/parallelism.md's command on one
machine, compute the same ling_tiny loss and gradients, and the same train step of the training
library (loss, gradient norm, every updated parameter), as one process with eight devices."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import multiprocess_worker as worker
from testing import rel, xla_flags

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _tail(path: Path, n: int = 30) -> str:
  lines = [l for l in path.read_text(errors="replace").splitlines() if not l.startswith("[Gloo]")]
  return "\n".join(lines[-n:])


def _start(n: int, out_dir: Path, log_dir: Path, *args: str) -> list:
  """Start the worker n times with the docs' per-process environment; [(process, log path)]."""
  port = _free_port()
  started = []
  for i in range(n):
    env = {**os.environ,
           "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(n),
           "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(4),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = log_dir / f"process{i}.log"
    with open(log, "w") as f:
      started.append((subprocess.Popen([sys.executable, "tests/multiprocess_worker.py",
                                        str(out_dir), *args], cwd=ROOT, env=env, stdout=f,
                                       stderr=subprocess.STDOUT), log))
  return started


def _wait(started: list, deadline: float) -> None:
  """Wait for every process to succeed; fail on the first that does not, or at the deadline."""
  while True:
    for i, (p, log) in enumerate(started):
      if p.poll() not in (None, 0):
        raise AssertionError(f"process {i} exited with status {p.returncode}:\n{_tail(log)}")
    if all(p.poll() == 0 for p, _ in started):
      return
    if time.monotonic() > deadline:
      raise AssertionError(f"the processes did not finish in {TIMEOUT_S} s; process 0's log:\n"
                           f"{_tail(started[0][1])}")
    time.sleep(0.2)


def _compare(tmp_path, local, *args) -> None:
  """The worker (with `args`) in two processes of 4 devices against `local()` in this one."""
  out = tmp_path / "out"
  out.mkdir()
  deadline = time.monotonic() + TIMEOUT_S
  started = _start(2, out, tmp_path, *args)
  try:
    want = local()  # meanwhile, here: the same mesh over this process's 8 devices
    _wait(started, deadline)
  finally:  # never leave a process behind (one waiting for a dead peer would wait 60 s)
    for p, _ in started:
      if p.poll() is None:
        p.kill()
        p.wait()
  got = [dict(np.load(out / f"process{i}.npz")) for i in range(2)]
  assert sorted(got[0]) == sorted(want) and len(want) > 30
  for key in want:
    np.testing.assert_array_equal(got[0][key], got[1][key], err_msg=key)
    assert np.abs(want[key]).max() > 0, key
    assert rel(got[0][key], want[key]) < 1e-5, key


def test_two_processes_give_the_single_process_step(tmp_path):
  _compare(tmp_path, worker.step)


def test_two_processes_give_the_single_process_train_step(tmp_path):
  """The training library's step: its loss, gradient norm and every updated parameter."""
  _compare(tmp_path, worker.train_step, "train")
