"""A ragged all-to-all over one mesh axis, inside `jax.shard_map`: `jax.lax.ragged_all_to_all`, or
the same exchange through a dense `all_to_all` of padded blocks where XLA has no ragged one.

Semantics (jax.lax.ragged_all_to_all's): on each device, rows
`operand[input_offsets[j] : input_offsets[j] + send_sizes[j]]` go to device j of the axis, where
they are written at `output[output_offsets[j] : ...]` (the offset is the *sender's* choice);
`recv_sizes[i]` counts the rows this device gets from device i. Rows of `output` that nothing is
written to keep their values.

XLA:CPU does not implement the ragged collective (jax 0.11.2: "UNIMPLEMENTED: HLO opcode
`ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter"), so `padded=True` emulates it: each
device sends every peer a block of `max_send` rows (its slice, zero-padded), one `all_to_all`
moves the blocks and their output offsets, and each receiver scatters the valid rows of each
block into `output`. Same values, same gradients (both are linear in operand and output; autodiff
transposes the gathers, scatters and the all_to_all), but it moves axis_size x max_send rows per
device whatever the slices hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def exclusive_cumsum(a: jax.Array, axis: int = 0) -> jax.Array:
  """The sum of the entries before each along `axis` (int32)."""
  return jnp.cumsum(a, axis=axis, dtype=jnp.int32) - a.astype(jnp.int32)


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                      axis_name: str, max_send: int, padded: bool):
  """`jax.lax.ragged_all_to_all` (padded=False), or its emulation by a padded all_to_all.

  operand [S, ...], output [R, ...]; the four offset / size vectors [axis size] int32. max_send is
  a static bound on every send_sizes[j] (the padded blocks' rows; unused by the ragged collective).
  """
  if not padded:
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                     recv_sizes, axis_name=axis_name)
  n, P = send_sizes.shape[0], max_send
  S, R = operand.shape[0], output.shape[0]
  r = jnp.arange(P, dtype=jnp.int32)
  src = input_offsets[:, None] + r  # [n, P] operand row of each block row
  sent = r < send_sizes[:, None]
  rows = jnp.take(operand, jnp.clip(src, 0, S - 1).reshape(-1), axis=0)  # [n P, ...]
  mask = sent.reshape((n * P,) + (1,) * (operand.ndim - 1))
  blocks = jnp.where(mask, rows, jnp.zeros((), operand.dtype))
  got = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)  # block i: sender i's rows for me
  at = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # sender i's offset here
  dst = jnp.where(r < recv_sizes[:, None], at[:, None] + r, R)  # [n, P], R = not a row: dropped
  return output.at[dst.reshape(-1)].set(got, mode="drop")
