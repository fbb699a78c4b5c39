"""Where the grouped-matmul kernels' work items come from, shared by the Triton (kernel.py) and
Mosaic GPU (mosaic.py) kernels: each group's row bounds and the visit table of (row tile,
group) pairs (kernel.py's docstring explains visits)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def group_bounds(group_sizes: jax.Array, m: int):
  """(starts, ends) [G] int32 of each group's rows, clipped to the m rows there are."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]]), ends


def visit_table(group_sizes: jax.Array, m: int, bm: int, *, group_rows: bool = False) -> jax.Array:
  """[4, V] int32 rows: tile, group (G = past the last group), row lo, row hi.

  Visits are ordered by group then tile, so consecutive programs share a group's weights.
  By default visits are the (bm-row tile, group) pairs that overlap (V = cdiv(m, bm) + G): a
  tile straddling k group boundaries is visited k + 1 times. With `group_rows` every group is cut
  into bm-row pieces from its own first row instead (V = cdiv(m, bm) + G + 1): no piece holds two
  groups' rows, so a group's weights are read once per piece rather than once per tile it
  touches; lo is the piece's first row and tile is lo // bm (unaligned: kernels read from lo).
  """
  G = group_sizes.shape[0]
  starts, ends = group_bounds(group_sizes, m)
  starts = jnp.concatenate([starts, ends[-1:]])             # + pseudo-group [total, m)
  ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
  if group_rows:
    n_tiles = (ends - starts + bm - 1) // bm
  else:
    n_tiles = jnp.where(ends > starts, (ends - 1) // bm - starts // bm + 1, 0)
  last = jnp.cumsum(n_tiles)
  first = last - n_tiles
  V = pl.cdiv(m, bm) + G + int(group_rows)
  v = jnp.arange(V, dtype=jnp.int32)
  # compare_all: one fused reduction. The default binary search is a loop of small launches:
  # 13.7 us of an H100 at ling_small / 4096 tokens, against under 3 for this.
  grp = jnp.searchsorted(last, v, side="right", method="compare_all")
  grp = jnp.minimum(grp, G).astype(jnp.int32)
  used = v < last[-1]
  if group_rows:
    lo = starts[grp] + (v - first[grp]) * bm
    tile = lo // bm
  else:
    tile = starts[grp] // bm + v - first[grp]
    lo = jnp.maximum(starts[grp], tile * bm)
  hi = jnp.minimum(ends[grp], (lo if group_rows else tile * bm) + bm)
  zero = jnp.zeros_like(v)
  return jnp.stack([jnp.where(used, tile, zero), jnp.where(used, grp, G),
                    jnp.where(used, lo, zero), jnp.where(used, hi, zero)])
