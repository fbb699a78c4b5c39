"""Routed assignments sorted by group in one Pallas (Triton) kernel: (order, inverse, sizes).

The MoE's dispatch needs, for A assignments of expert ids, the stable order that lists them
expert by expert, each assignment's position in it and each expert's count. In XLA that is a
handful of launches (`pallas_kernels.moe.grouped.sort_by_expert`'s counting sort: ~13 us of an
H100 at ling_small's 256 tokens, a fifth of the layer). Here one launch does it, one program per
group: program g counts the ids below g (its group's first position), then walks the ids again in
chunks, placing each of its own at first + (its rank among them): an exclusive prefix sum of the
chunk's matches. Every program reads all A ids (from L2 after the first) in A / chunk serial
steps, so past some thousands of ids XLA's passes win; `fits` says where the kernel is used.

H100 device time (benchmarks/moe_parts.py, 2026-11-25), us, kernel (chunk 4096, 8 warps)
against XLA's counting sort: 32 groups, A = 1024 / 4096 / 16384 / 65536: 1.6 / 2.3 / 7.7 / 27.7
against 8.6 / 16.4 / 10.8 / 15.8; 256 groups, A = 2048 / 8192 / 32768 / 131072: 2.4 / 5.9 /
20.4 / 77.3 against 16.1 / 15.0 / 18.5 / 40.9.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.grouped_matmul.kernel import _tile

# The kernel's reach (the H100 figures above): at most MAX_IDS ids and MAX_READS = ids x groups.
MAX_IDS, MAX_READS = 16384, 1 << 22


def fits(num_ids: int, num_groups: int) -> bool:
  """Whether `sort_by_group` beats XLA's counting sort (measured on an H100)."""
  return num_ids <= MAX_IDS and num_ids * num_groups <= MAX_READS


def _sort_kernel(ids_ref, order_ref, inverse_ref, sizes_ref, *, A: int, chunk: int):
  g = pl.program_id(0)
  n = pl.cdiv(A, chunk)

  def ids_at(c):  # past A: an id above every group, so below none and matching none
    i = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    return i, plt.load(ids_ref.at[pl.ds(c * chunk, chunk)], mask=i < A,
                       other=jnp.iinfo(jnp.int32).max)

  def count_below(c, below):
    _, ids = ids_at(c)
    return below + jnp.sum((ids < g).astype(jnp.int32))

  first = lax.fori_loop(0, n, count_below, jnp.int32(0))

  def place(c, seen):
    i, ids = ids_at(c)
    mine = ids == g
    m = mine.astype(jnp.int32)
    pos = first + seen + jnp.cumsum(m) - m
    plt.store(inverse_ref.at[pl.ds(c * chunk, chunk)], pos, mask=mine)
    plt.store(order_ref.at[pos], i, mask=mine)
    return seen + jnp.sum(m)

  size = lax.fori_loop(0, n, place, jnp.int32(0))
  plt.store(sizes_ref.at[pl.ds(g, 1)], jnp.full((1,), size, jnp.int32))


@functools.partial(jax.jit, static_argnames=("num_groups", "chunk", "num_warps", "interpret"))
def sort_by_group(ids: jax.Array, num_groups: int, *, chunk: int = 4096, num_warps: int = 8,
                  interpret: bool = False):
  """ids [A] (int, each in [0, num_groups)) -> (order, inverse, sizes), int32.

  order [A] lists the positions of ids group by group, in their original order within each (a
  stable argsort); inverse [A] is each id's place in order; sizes [num_groups] counts each
  group. An id outside [0, num_groups) is in no group: order and inverse are then unspecified.
  """
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype}{list(ids.shape)}")
  if chunk < 16 or chunk & (chunk - 1):
    raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
  A = ids.shape[0]
  chunk = _tile(A, chunk)  # no larger than A needs
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  return pl.pallas_call(
      functools.partial(_sort_kernel, A=A, chunk=chunk), grid=(num_groups,),
      out_shape=(i32(A), i32(A), i32(num_groups)),
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="sort_by_group")(ids.astype(jnp.int32))
