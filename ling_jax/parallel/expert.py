"""Expert parallelism for the routed experts: experts split over the mesh's `expert` axis, each
token sent to the devices that hold its experts, the local experts run there, the results sent
back and combined. Forward and backward, dropless.

Why shard_map: the expert paths are Pallas kernels (the grouped matmuls), which GSPMD cannot
partition; under a mesh it would gather every operand (the whole expert layer) onto every device.
Here `jax.shard_map` makes each device's part explicit and the exchange is written out.

Layout. Tokens x [N, D] (with their routing: ids [N, X], weights [N, X]) are sharded over
`token_axes`, which must include the expert axis: the ep devices of an expert group each hold n =
N / (product of the token axes) tokens. Routed experts [E, D, F] are split over `expert` (E / ep
per device) and optionally F over `tensor` (gate and up split by column, down by row: each device
computes a partial sum of the output, summed over `tensor` at the end; tokens are then replicated
over `tensor` and every tensor shard repeats the exchange). The router and the shared expert are
not here: they stay data-parallel, before and beside this call.

One row per (token, owner device), not per assignment. A token whose X experts live on k distinct
devices is sent to each of them once, with its X ids (those on other devices marked empty) and
weights; the owner combines its experts' outputs for that token and sends back one row. Sending one
row per assignment (X copies of the token, as MaxText does) moves up to X / k times the bytes and
needs an X times larger dropless buffer. With Ling's group-limited routing and ep = n_group (one
expert group per device) a token reaches at most topk_group devices.

Strategies (`strategy=`), per device, per layer, forward (the backward moves the same again):
* "all_gather" (Levanter's ring EP): all-gather the group's tokens and routing over `expert`,
  compute this device's experts for every gathered token (the others' slots empty), then
  `psum_scatter` the partial outputs back to each device's tokens. Moves (ep - 1) n rows of D in
  and (ep - 1) n rows of D (fp32) out, however the tokens are routed. Memory: the gathered [ep n, D]
  tokens and the [ep n, D] fp32 partial output. Dropless by construction.
* "ragged_all_to_all" (MaxText / sglang-jax style): count the rows for each device, all-gather the
  [ep, ep] counts, `jax.lax.ragged_all_to_all` the rows to their owners, run the local experts,
  send the outputs back the same way and sum each token's rows. Moves only the rows that leave the
  device: about u (ep - 1) / ep n rows each way, u <= min(X, ep) the mean number of owner devices
  per token. Memory: a send buffer of n min(X, ep) rows and a receive buffer of `capacity` rows,
  by default ep n (the dropless worst case: every token of the group sends to this device), plus
  their fp32 outputs: more than all_gather unless `capacity` is set. A smaller `capacity` (rows
  per device) saves that memory; when a step's routing overflows it, nothing is exchanged and the
  call raises (a host callback on every device; never a silent drop). XLA:CPU has no ragged
  all-to-all (jax 0.11.2), so this strategy needs a GPU or TPU. On GPU: users report it at a few %
  of NVLink bandwidth, and XLA's default one-shot lowering corrupting gradients (fixed by
  `--xla_gpu_unsupported_enable_ragged_all_to_all_decomposer=true`): benchmarks/expert_parallel.py
  times it and checks its output and gradients against "all_gather" in the same run.
* "all_to_all": the same dispatch as "ragged_all_to_all", the exchange a dense `all_to_all` of
  blocks padded to n rows per peer (parallel/exchange.py). Moves (ep - 1) n rows each way, as
  all_gather; runs everywhere, so it is what tests the ragged dispatch on CPU.

Which wins where (rows counted by benchmarks/expert_parallel.py, not yet timed on GPUs): at
Ling-2.6-flash's routing (256 experts, top-8 within 4 of 8 groups), ragged_all_to_all moves 3.2 n
rows a device at ep = 8 against 7 n for all_gather (and 7 n for one row per assignment), 2.2 n
against 3 n at ep = 4, about n for both at ep = 2. So all_gather (plain NCCL collectives, no count
exchange, no worst-case receive buffer) should win at ep <= 4, and at ep = 8 the ragged exchange
wins only if it reaches about half the all-gather's bandwidth: measure with the benchmark.

Every strategy hands the local function [M, X] slots with M static: ep n for all_gather and the
dropless exchanges, `capacity` otherwise; the local path's own buffers (the sorted path's blocks,
the grouped kernels' [M X, F] intermediates) are sized by M X, whatever the routing.

The local experts: `local(x, ids, w, w_gate, w_up, w_down) -> y [M, D] fp32` over this device's
E / ep experts, the signature of pallas_kernels.moe's functions, where ids may equal E / ep: an
empty slot (weight 0) that must contribute nothing. `fill_empty` adapts a function that only takes
ids in [0, E / ep) by computing the empty slots with expert 0 (weight 0): free for the XLA sorted
path (`routed_experts_blocked`), whose work is static. The model's local function is
`pallas_kernels.moe.routed_experts(..., empty=True)`, whose grouped-matmul path sorts over
E / ep + 1 groups and passes the first E / ep sizes to the kernels, so the empty slots (for
all_gather, (ep - 1) / ep of them) lie past the groups' sum and cost no matmul.

Gradients come from autodiff: all_gather <-> psum_scatter, all_to_all <-> all_to_all,
ragged_all_to_all <-> ragged_all_to_all with swapped offsets (jax's transpose rule), the gathers
and scatters of the dispatch, and the local function's own VJP.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ling_jax.parallel.exchange import exclusive_cumsum, ragged_all_to_all
from pallas_kernels.moe import expert_load, routed_experts_blocked

STRATEGIES = ("all_gather", "ragged_all_to_all", "all_to_all")


def fill_empty(local):
  """`local` (ids in [0, E)) as a local expert function that takes empty slots (id E): they go to
  expert 0 with weight 0, are computed and contribute nothing."""

  def run(x, ids, w, w_gate, w_up, w_down):
    empty = ids >= w_gate.shape[0]
    return local(x, jnp.where(empty, 0, ids), jnp.where(empty, jnp.zeros((), w.dtype), w),
                 w_gate, w_up, w_down)

  return run


def expert_parallel_experts(x, expert_ids, weights, w_gate, w_up, w_down, *, mesh,
                            token_axes=("data", "fsdp", "expert"), expert_axis: str = "expert",
                            tensor_axis: str | None = "tensor", strategy: str = "all_gather",
                            local=None, capacity: int | None = None,
                            combine_dtype=jnp.float32):
  """The routed experts' output and load under expert parallelism.

  mesh: a Mesh, or the AbstractMesh of traced code under `jax.set_mesh` (the model's).
  x [N, D], expert_ids [N, X] (int, global expert ids), weights [N, X]: tokens and their routing,
  sharded (or to be sharded) over `token_axes`; w_gate, w_up [E, D, F] and w_down [E, F, D]: the
  routed experts, split over `expert_axis` (and F over `tensor_axis` where that axis is larger than
  1; None keeps F whole). `local` computes a device's experts (module docstring; default the XLA
  sorted path, `routed_experts_blocked`, through `fill_empty`). `capacity` bounds the rows a device
  receives ("all_to_all", "ragged_all_to_all"; None = dropless worst case). `combine_dtype` is the
  dtype in which partial outputs travel back and are summed.

  Returns y [N, D] fp32 = sum_x weights[n, x] expert_{ids[n, x]}(x[n]) (sharded as x), and load
  [E] int32, each expert's assignments over all N tokens (replicated).
  """
  ep, tensor = _check(x, expert_ids, weights, w_gate, w_up, w_down, mesh=mesh,
                      token_axes=tuple(token_axes), expert_axis=expert_axis,
                      tensor_axis=tensor_axis, strategy=strategy, capacity=capacity)
  common = dict(expert_axis=expert_axis, tensor_axis=tensor, token_axes=tuple(token_axes),
                num_experts=w_gate.shape[0], local=local or fill_empty(routed_experts_blocked),
                combine_dtype=combine_dtype)
  if strategy == "all_gather":
    body = functools.partial(_all_gather_body, **common)
  else:
    body = functools.partial(_exchange_body, **common, ep=ep, capacity=capacity,
                             padded=strategy == "all_to_all")
  tok, w_in, w_out = P(tuple(token_axes), None), P(expert_axis, None, tensor), P(expert_axis, tensor)
  # check_vma=False: a Pallas call under check_vma needs its out_shape's varying axes declared
  # (jax 0.11), which the local kernels do not; autodiff still psums the cotangents of inputs
  # replicated over an axis (the tests compare every gradient).
  run = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                      out_specs=(tok, P()), check_vma=False)
  return run(x, expert_ids.astype(jnp.int32), weights, w_gate, w_up, w_down)


def _check(x, ids, w, wg, wu, wd, *, mesh, token_axes, expert_axis, tensor_axis, strategy,
           capacity):
  """Validates the call; returns (the expert axis' size, the mesh axis splitting F or None)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown expert-parallel strategy {strategy!r}; choose one of {STRATEGIES}")
  named = dict(mesh.shape)
  for name in token_axes + (expert_axis,) + ((tensor_axis,) if tensor_axis else ()):
    if name not in named:
      raise ValueError(f"mesh axis {name!r} is not in the mesh {named}")
  if expert_axis not in token_axes:
    raise ValueError(f"token_axes {token_axes} must include the expert axis {expert_axis!r}: the "
                     f"tokens of an expert group are split over it")
  if tensor_axis in token_axes:
    raise ValueError(f"tensor axis {tensor_axis!r} splits the experts' width F, so tokens must be "
                     f"replicated over it; it is in token_axes {token_axes}")
  if x.ndim != 2 or ids.shape != w.shape or ids.ndim != 2 or ids.shape[0] != x.shape[0]:
    raise ValueError(f"want x [N, D], expert_ids and weights [N, X]; got {x.shape}, {ids.shape}, "
                     f"{w.shape}")
  E, D, F = wg.shape
  if wu.shape != (E, D, F) or wd.shape != (E, F, D) or D != x.shape[1]:
    raise ValueError(f"want w_gate, w_up [E, D, F] and w_down [E, F, D] with D = {x.shape[1]}; "
                     f"got {wg.shape}, {wu.shape}, {wd.shape}")
  ep = named[expert_axis]
  if E % ep:
    raise ValueError(f"{E} experts do not divide over mesh axis {expert_axis!r} of size {ep}")
  shards = math.prod(named[a] for a in token_axes)
  if x.shape[0] % shards:
    sizes = {a: named[a] for a in token_axes}
    raise ValueError(f"{x.shape[0]} tokens do not divide over the token axes {sizes} "
                     f"({shards} shards)")
  tensor = tensor_axis if tensor_axis and named[tensor_axis] > 1 else None
  if tensor and F % named[tensor]:
    raise ValueError(f"expert width F = {F} does not divide over mesh axis {tensor!r} of size "
                     f"{named[tensor]}")
  if capacity is not None:
    if strategy == "all_gather":
      raise ValueError("capacity bounds the rows a device receives in the 'all_to_all' and "
                       "'ragged_all_to_all' exchanges; 'all_gather' takes none")
    if int(capacity) < 1:
      raise ValueError(f"capacity must be a positive number of rows, got {capacity}")
  if strategy == "ragged_all_to_all" and _platform(mesh) == "cpu":
    raise ValueError("strategy 'ragged_all_to_all' needs a GPU or TPU: XLA:CPU has no "
                     "ragged-all-to-all; 'all_to_all' is the same dispatch through a padded "
                     "all_to_all")
  return ep, tensor


def _platform(mesh) -> str:
  """The platform of `mesh`'s devices: a Mesh's, or an AbstractMesh's (the one `jax.set_mesh`
  gives traced code)."""
  if isinstance(mesh, jax.sharding.Mesh):
    return mesh.devices.flat[0].platform
  return getattr(mesh.abstract_device, "platform", None) or jax.default_backend()


def _localise(ids, w, device, local_experts):
  """Global ids [M, X] -> ids among `device`'s experts, E / ep (empty) and weight 0 elsewhere."""
  mine = ids // local_experts == device
  return (jnp.where(mine, ids - device * local_experts, local_experts),
          jnp.where(mine, w, jnp.zeros((), w.dtype)))


def _load(ids, num_experts, token_axes):
  return jax.lax.psum(expert_load(ids, num_experts), token_axes)


def _finish(y, tensor_axis):
  """Sums the partial outputs of the F shards; fp32."""
  if tensor_axis is not None:
    y = jax.lax.psum(y, tensor_axis)
  return y.astype(jnp.float32)


def _all_gather_body(x, ids, w, wg, wu, wd, *, expert_axis, tensor_axis, token_axes, num_experts,
                     local, combine_dtype):
  me = jax.lax.axis_index(expert_axis)
  xg, idg, wtg = (jax.lax.all_gather(a, expert_axis, tiled=True) for a in (x, ids, w))
  lid, lw = _localise(idg, wtg, me, wg.shape[0])
  y = local(xg, lid, lw, wg, wu, wd).astype(combine_dtype)  # [ep n, D] this device's experts
  y = jax.lax.psum_scatter(y, expert_axis, scatter_dimension=0, tiled=True)  # [n, D]
  return _finish(y, tensor_axis), _load(ids, num_experts, token_axes)


def _exchange_body(x, ids, w, wg, wu, wd, *, expert_axis, tensor_axis, token_axes, num_experts,
                   local, combine_dtype, ep, capacity, padded):
  n, D = x.shape
  X, El = ids.shape[1], wg.shape[0]
  me = jax.lax.axis_index(expert_axis)
  devices = jnp.arange(ep, dtype=jnp.int32)
  # The send buffer: one row per (token, owner device), grouped by device, tokens in order.
  need = (ids[:, :, None] // El == devices).any(1)  # [n, ep] token t has an expert on device j
  send = need.sum(0, dtype=jnp.int32)  # [ep]
  S = n * min(X, ep)  # rows when every token has experts on min(X, ep) devices
  pos = jnp.where(need, exclusive_cumsum(send)[None, :] + exclusive_cumsum(need, 0), S)  # [n, ep]
  tokens = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, ep))
  row_token = jnp.full((S,), n, jnp.int32).at[pos].set(tokens, mode="drop")  # n: unused row
  row_device = jnp.zeros((S,), jnp.int32).at[pos].set(jnp.broadcast_to(devices, (n, ep)),
                                                      mode="drop")
  t = jnp.minimum(row_token, n - 1)
  lid, lw = _localise(ids[t], w[t], row_device[:, None], El)
  # ids travel as fp32 beside the weights (one exchange for both; exact below 2^24).
  meta = jnp.concatenate([lid.astype(jnp.float32), lw.astype(jnp.float32)], axis=1)  # [S, 2X]

  counts = jax.lax.all_gather(send, expert_axis)  # [ep, ep]: rows sender i sends receiver j
  before = exclusive_cumsum(counts, 0)  # [i, j]: receiver j's rows from senders before i
  recv = counts[:, me]
  R = ep * n if capacity is None else int(capacity)
  if capacity is not None:
    # On overflow nothing moves (the ragged collective must not write past its buffer) and the
    # callback below raises.
    worst = counts.sum(0).max()  # the same on every device of the group
    over = worst > R
    send, recv = jnp.where(over, 0, send), jnp.where(over, 0, recv)
    worst_any = jax.lax.pmax(worst, token_axes)  # any group's
  exchange = functools.partial(ragged_all_to_all, axis_name=expert_axis, max_send=n, padded=padded)
  xr = exchange(x[t], jnp.zeros((R, D), x.dtype), exclusive_cumsum(send), send, before[me], recv)
  empty = jnp.concatenate([jnp.full((R, X), El, jnp.float32), jnp.zeros((R, X), jnp.float32)], 1)
  meta_r = exchange(meta, empty, exclusive_cumsum(send), send, before[me], recv)
  yr = local(xr, meta_r[:, :X].astype(jnp.int32), meta_r[:, X:].astype(w.dtype), wg, wu, wd)
  back = exchange(yr.astype(combine_dtype), jnp.zeros((S, D), combine_dtype), before[:, me], recv,
                  exclusive_cumsum(counts, 1)[:, me], send)  # [S, D] in the send buffer's rows
  y = jnp.zeros((n, D), combine_dtype).at[row_token].add(back, mode="drop")
  y, load = _finish(y, tensor_axis), _load(ids, num_experts, token_axes)
  if capacity is not None:
    # Every device raises (one that raises stops its program, and its peers would wait for it at
    # their next collective); the call raises the first error, jax prints the others at exit.
    # A host callback per call, only with a capacity.
    jax.debug.callback(functools.partial(_raise_overflow, capacity=R, axis=expert_axis, ep=ep, n=n),
                       worst_any)
  return y, load


def _raise_overflow(worst, *, capacity, axis, ep, n):
  if int(worst) > capacity:
    raise RuntimeError(
        f"expert-parallel exchange over capacity: {int(worst)} rows routed to one device, capacity "
        f"{capacity} (mesh axis {axis!r} of size {ep}, {n} tokens per device; the dropless worst "
        f"case is {ep * n}). Raise capacity or pass None.")
