"""Several processes, one program: joining the job (`jax.distributed`), and each process's part of
a global batch (docs/parallelism.md).

JAX's own runtime is the distributed engine: `jax.distributed.initialize` connects the processes
to a coordinator, after which `jax.devices()` lists every process's devices and a jitted
computation over a mesh of them runs its collectives over NCCL on GPUs (gloo on CPU, jax 0.11's
default `jax_cpu_collectives_implementation`). There is no launcher here: the same command starts
each process, with its environment saying which one it is.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from ling_jax.parallel.mesh import batch_axes_size, batch_sharding

# The manual launch (any machine, no cluster manager): every process gets the same
# JAX_COORDINATOR_ADDRESS (host:port of process 0) and JAX_NUM_PROCESSES, and its own
# JAX_PROCESS_ID. JAX itself reads JAX_COORDINATOR_ADDRESS, and JAX_LOCAL_DEVICE_IDS (the GPUs
# this process drives, e.g. "3" for one process per GPU); the count and the id are ours, since
# JAX takes those only from a cluster manager.
COORDINATOR = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
# Cluster managers whose jobs JAX recognises by itself (jax._src.clusters): their task count.
_CLUSTER_COUNTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _int_env(env, name: str, low: int) -> int:
  text = env.get(name)
  try:
    value = int(text)
  except (TypeError, ValueError):
    value = None
  if value is None or value < low:
    raise ValueError(f"environment variable {name}={text!r}: expected an integer >= {low}")
  return value


def initialize(timeout_s: int = 300, env=None) -> bool:
  """Join the job's other processes if the environment asks for several; True if it did.

  Call it first, before any JAX computation. Several processes are asked for by
  JAX_NUM_PROCESSES > 1 (with JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID), or by a Slurm or
  Open MPI job of more than one task (JAX reads their variables itself). One process, or none of
  these variables: nothing to do. `timeout_s` bounds the wait for the other processes.
  """
  env = os.environ if env is None else env
  if jax.distributed.is_initialized():
    return True
  if NUM_PROCESSES in env:
    n = _int_env(env, NUM_PROCESSES, 1)
    if n == 1:
      return False
    pid = _int_env(env, PROCESS_ID, 0)
    if pid >= n:
      raise ValueError(f"environment variable {PROCESS_ID}={pid} must be < {NUM_PROCESSES}={n}")
    address = env.get(COORDINATOR, "")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"environment variable {COORDINATOR}={address!r}: expected host:port of "
                       f"process 0, the same for all {n} processes")
    jax.distributed.initialize(address, num_processes=n, process_id=pid,
                               initialization_timeout=timeout_s)
    return True
  if any(name in env and env[name].isdigit() and int(env[name]) > 1 for name in _CLUSTER_COUNTS):
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return True
  return False


def process_batch_slice(global_batch_size: int, mesh: jax.sharding.Mesh) -> slice:
  """The rows of a `global_batch_size`-row batch that this process's devices hold under
  `mesh`'s batch sharding (ling_jax.parallel.mesh.batch_sharding): the rows it must load."""
  n = batch_axes_size(mesh)
  if global_batch_size % n:
    raise ValueError(f"the global batch of {global_batch_size} rows does not split over the "
                     f"mesh's {n}-way batch axes {dict(mesh.shape)}")
  sharding = batch_sharding(mesh)
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
    rows.update(range(global_batch_size)[index[0]])
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    # jax.make_mesh orders devices process by process, so this is not expected.
    raise ValueError(f"process {jax.process_index()} holds rows {sorted(rows)} of the batch: "
                     "not one contiguous range")
  return slice(start, stop)


def global_batch(local, mesh: jax.sharding.Mesh, global_batch_size: int):
  """One global jax.Array per leaf of `local` (host arrays: this process's rows,
  `process_batch_slice`), sharded by rows over `mesh`'s batch axes."""
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (global_batch_size, *x.shape[1:]))

  return jax.tree.map(put, local)


def host_to_global(tree, shardings):
  """Host values (numpy, or arrays of one device: the same in every process) as global arrays
  under `shardings` (a tree of Shardings, a prefix of `tree`'s), each process supplying only its own
  devices' shards: nothing is whole on an accelerator (jax.device_put cannot place a
  process-local array onto devices of other processes)."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  # The shardings' tree may be a prefix of the values' (one Sharding for a whole nnx.Variable).
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: put(x, s), sub), shardings, tree)


def allgather_json(obj) -> list:
  """`obj` (anything JSON can write) of every process, in process order; [obj] for one process.
  Each process calls it at the same point (a collective)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  every = np.asarray(multihost_utils.process_allgather(padded))  # [processes, longest]
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, sizes.reshape(-1))]
