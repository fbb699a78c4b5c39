"""Aux-loss-free load balancing (docs/architecture.md §3.7.3; DeepSeek-V3 section 2.1.2).

After every step each MoE layer's router bias moves by a fixed amount against its observed load:
    b_e <- b_e + u * sign(mean_e(load) - load_e)
so overloaded experts become less likely to be picked and idle ones more likely. The bias only
steers top-k selection; the combine weights use the unbiased scores, so no gradient flows through
it and the optimizer never sees it (it is an `ExpertBias` variable, not an `nnx.Param`).

`LingOutput.expert_load` stacks the main stack's MoE layers in forward order: prefix groups,
then the scanned groups (group-major, then layer within the group), then the tail layers.
`moe_rows` lists the bias variables in that same order; a test checks the pairing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_SECTIONS = {"prefix": 0, "groups": 1, "tail": 2}


def moe_rows(expert_bias: nnx.State) -> list[tuple[tuple, int | None]]:
  """(path, index into a stacked [n_groups, E] bias or None) of each expert_load row."""
  rows = []
  for path, var in nnx.to_flat_state(expert_bias):
    if path[0] == "mtp":
      continue
    if path[0] not in _SECTIONS:
      raise ValueError(f"unexpected expert bias at {'.'.join(map(str, path))}")
    ints = tuple(p for p in path if isinstance(p, int))
    if path[0] == "groups":  # stacked: one row per scanned group, ints = (layer in group,)
      rows += [((1, g) + ints, path, g) for g in range(var.get_value().shape[0])]
    else:
      rows.append(((_SECTIONS[path[0]],) + ints, path, None))
  rows.sort(key=lambda r: r[0])
  return [(path, g) for _, path, g in rows]


def sign_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """One layer: bias [E] + rate * sign(mean(load) - load) (an exactly balanced layer stays put)."""
  load = load.astype(jnp.float32)
  return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load)


def update_expert_bias(expert_bias: nnx.State, expert_load: jax.Array,
                       mtp_load: jax.Array | None, rate: float) -> nnx.State:
  """The new biases after one step's loads ([n_moe_layers, E] and the MTP layer's [E])."""
  flat = dict(nnx.to_flat_state(expert_bias))
  values = {path: var.get_value() for path, var in flat.items()}
  rows = moe_rows(expert_bias)
  if expert_load.shape[0] != len(rows):
    raise ValueError(f"expert_load has {expert_load.shape[0]} rows for {len(rows)} MoE layers")
  for i, (path, g) in enumerate(rows):
    if g is None:
      values[path] = sign_update(values[path], expert_load[i], rate)
    else:
      values[path] = values[path].at[g].set(sign_update(values[path][g], expert_load[i], rate))
  mtp_paths = [p for p in flat if p[0] == "mtp"]
  if mtp_load is not None and mtp_paths:
    values[mtp_paths[0]] = sign_update(values[mtp_paths[0]], mtp_load, rate)
  return nnx.from_flat_state([(p, flat[p].replace(values[p])) for p in flat])
