"""Where the grouped-matmul kernels' work items come from, shared by the Triton (kernel.py) and
Mosaic GPU (mosaic.py) kernels: each group's row bounds and the visits of (row block, group)
pairs (kernel.py's docstring explains visits).

Two layouts. Aligned tiles (`visit_table`, the Mosaic gmm's and `Config.group_rows=False`):
bm-row tiles visited once for each group they hold rows of, a table built in XLA. Group pieces
(`piece`, `Config.group_rows`): every group cut into bm-row pieces from its own first row,
decoded inside the kernel from the group sizes alone, so no XLA op runs between the routing and
the matmuls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def group_bounds(group_sizes: jax.Array, m: int, *, pseudo: bool = False):
  """(starts, ends) [G] int32 of each group's rows, clipped to the m rows there are; [G + 1]
  with `pseudo`, the last entry the pseudo-group of rows [sum(sizes), m)."""
  G = group_sizes.shape[0]
  _, starts, ends = _bounds(jnp.pad(group_sizes, (0, 1)), G, m)
  return (starts, ends) if pseudo else (starts[:G], ends[:G])


def pieces(m: int, bm: int, G: int) -> int:
  """How many visits the group-piece layout has: cdiv(m, bm) + min(G, m) slots (some left
  empty). At decode, where m (tokens x top-k) is far below G, the grid shrinks with it: one
  token's 8 rows over 256 experts take 1 + 8 slots, not 1 + 256."""
  return max(1, pl.cdiv(m, bm) + min(G, m))


def padded_groups(G: int) -> int:
  """The power-of-two length (>= G + 1: the groups and the pseudo-group) `piece` reads sizes in."""
  return 1 << G.bit_length()


def _bounds(sizes: jax.Array, G: int, m: int):
  """(index, starts, ends) [P] int32 of sizes [P > G] (entries past G ignored): each group's rows
  clipped to m as in `group_bounds`, and at index G the pseudo-group [sum(sizes), m)."""
  g = lax.broadcasted_iota(jnp.int32, sizes.shape, 0)
  s = jnp.where(g < G, sizes.astype(jnp.int32), 0)
  ends = jnp.cumsum(s)
  return g, jnp.minimum(ends - s, m), jnp.where(g < G, jnp.minimum(ends, m), m)


def _pick(g, i, a):
  """a[i] of a vector as a scalar (a masked sum: a gather-free form Triton lowers)."""
  return jnp.sum(jnp.where(g == i, a, 0))


def piece(sizes: jax.Array, v, *, G: int, m: int, bm: int):
  """Visit v of the group-piece layout: (group, row lo, row hi), int32 scalars; lo >= hi when
  the slot is empty.

  sizes [P] holds the G group sizes then anything (ignored; P = padded_groups(G)); group G is the
  pseudo-group of rows [sum(sizes), m), whose visits store zeros. Group g's pieces take the
  slots first_g + p for p < cdiv(size_g, bm), first_g = start_g // bm + r_g, r_g the number of
  non-empty groups before g: the slot ranges of consecutive non-empty groups never overlap
  (first_{g'} - first_g >= floor(size_g / bm) + 1 >= the pieces of g), an empty group's range is
  empty (it shares its first slot with the next non-empty group, which the count below picks, being
  the later one), and the last slot used is below cdiv(m, bm) + (the non-empty groups, at most
  min(G, m)) = `pieces(m, bm, G)`. Plain jnp on a vector and a scalar: the kernels run it on their
  program id (O(G) work, no table in HBM).
  """
  g, starts, ends = _bounds(sizes, G, m)
  full = ((ends > starts) & (g < G)).astype(jnp.int32)
  before = jnp.cumsum(full) - full  # r_g; the pseudo-group's is the count of non-empty groups
  first = jnp.where(g <= G, lax.div(starts, jnp.int32(bm)) + before, jnp.iinfo(jnp.int32).max)
  grp = jnp.sum((first <= v).astype(jnp.int32)) - 1  # first[0] = 0 <= v
  lo = _pick(g, grp, starts + (v - first) * bm)
  return grp, lo, jnp.minimum(_pick(g, grp, ends), lo + bm)


def group_rows_of(sizes: jax.Array, g, *, G: int, m: int):
  """Group g's rows [lo, hi) as int32 scalars, clipped to m, from sizes [P > G] (entries past G
  ignored): `group_bounds` for one group, in plain jnp for the kernels (O(G), no XLA op)."""
  i, starts, ends = _bounds(sizes, G, m)
  return _pick(i, g, starts), _pick(i, g, ends)


def visit_table(group_sizes: jax.Array, m: int, bm: int) -> jax.Array:
  """[4, cdiv(m, bm) + G] int32 rows of the aligned-tile layout: tile, group (G = past the last
  group), row lo, row hi.

  Visits are ordered by group then tile, so consecutive programs share a group's weights. They
  are the (bm-row tile, group) pairs that overlap: a tile straddling k group boundaries is
  visited k + 1 times; unused entries come last, empty.
  """
  G = group_sizes.shape[0]
  starts, ends = group_bounds(group_sizes, m, pseudo=True)
  n_tiles = jnp.where(ends > starts, (ends - 1) // bm - starts // bm + 1, 0)
  last = jnp.cumsum(n_tiles)
  first = last - n_tiles
  V = pl.cdiv(m, bm) + G
  v = jnp.arange(V, dtype=jnp.int32)
  # compare_all: one fused reduction. The default binary search is a loop of small launches:
  # 13.7 us of an H100 at ling_small / 4096 tokens, against under 3 for this.
  grp = jnp.searchsorted(last, v, side="right", method="compare_all")
  grp = jnp.minimum(grp, G).astype(jnp.int32)
  used = v < last[-1]
  tile = starts[grp] // bm + v - first[grp]
  lo = jnp.maximum(starts[grp], tile * bm)
  hi = jnp.minimum(ends[grp], tile * bm + bm)
  zero = jnp.zeros_like(v)
  return jnp.stack([jnp.where(used, tile, zero), jnp.where(used, grp, G),
                    jnp.where(used, lo, zero), jnp.where(used, hi, zero)])
