"""The axis glossary, logical parameter axes, and the rules that map them onto a device mesh.

Activation letters used in einsum strings and shape comments across ling_jax:
  B batch, T time (query), S time (key / cache), D model width, H heads, K qk head dim,
  V v head dim, R rope dim, L MLA latent (kv_lora_rank), Q q-LoRA rank, E experts,
  X experts per token, F ffn width, C chunk, G hybrid group, N tokens (B*T flattened).
Activations are [B, T, H, K] everywhere.

Every parameter carries logical axis names (its `out_sharding` metadata). One rules table per
parallelism preset maps them to mesh axes (MaxText's logical_axis_rules).
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

# Logical parameter axes.
VOCAB = "vocab"
EMBED = "embed"            # model width D
HEADS = "heads"            # attention heads H
HEAD_DIM = "head_dim"      # per-head K / V / rope dims
QKV = "qkv"                # the 3 of the fused Lightning projection
Q_LORA = "q_lora"
KV_LORA = "kv_lora"        # MLA latent (+ rope key) width
MLP = "mlp"                # dense / expert ffn width F
EXPERT = "expert"          # routed experts E
NORM = "norm"              # norm weights (replicated)
LAYERS = "layers"          # stacked hybrid groups (scan axis)
GROUP_LAYERS = "group_layers"  # stacked linear layers inside one group

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axis (or None = replicated). First match wins (flax semantics).
RULES_FSDP_TP_EP: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (HEAD_DIM, None),
    (QKV, None),
    (Q_LORA, None),
    (KV_LORA, None),
    (MLP, "tensor"),
    (EXPERT, "expert"),
    (NORM, None),
    (LAYERS, None),
    (GROUP_LAYERS, None),
)

# Pure data parallelism: everything replicated.
RULES_DP: tuple[tuple[str, None], ...] = tuple((name, None) for name, _ in RULES_FSDP_TP_EP)

PRESETS = {"fsdp_tp_ep": RULES_FSDP_TP_EP, "dp": RULES_DP}


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None):
  """A mesh over MESH_AXES; missing axes get size 1, `data` absorbs the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
  fixed = 1
  for a in MESH_AXES:
    if a != "data":
      fixed *= shape.get(a, 1)
  if "data" not in shape:
    if len(devices) % fixed:
      raise ValueError(f"{len(devices)} devices do not divide by {fixed} (mesh {shape})")
    shape["data"] = len(devices) // fixed
  sizes = tuple(shape.get(a, 1) for a in MESH_AXES)
  n = 1
  for s in sizes:
    n *= s
  if n != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {n} devices, have {len(devices)}")
  # Auto axes: XLA's partitioner propagates shardings from the parameters (GSPMD style).
  return jax.make_mesh(sizes, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_axes(state: nnx.State) -> nnx.State:
  """The logical axis names of every variable in `state` (raises if one has none)."""

  def names(path, var):
    axes = var.get_metadata().get("out_sharding")
    if axes is None or len(axes) != var.get_value().ndim:
      raise ValueError(f"parameter {'.'.join(map(str, path))} with shape {var.get_value().shape} has "
                       f"logical axes {axes}")
    return tuple(axes)

  return nnx.map_state(names, state)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules=RULES_FSDP_TP_EP):
  """NamedShardings for every variable of `state` under `rules` on `mesh`.

  A logical axis whose mesh axis does not divide the dimension falls back to replication, so the
  same rules serve tiny test models and the real presets.
  """
  table = dict(rules)

  def spec(path, var):
    axes = var.get_metadata().get("out_sharding")
    if axes is None:
      raise ValueError(f"parameter {'.'.join(map(str, path))} has no logical axes")
    out = []
    used = set()
    for dim, name in zip(var.get_value().shape, axes):
      if name not in table:
        raise ValueError(f"logical axis {name!r} of {'.'.join(map(str, path))} has no rule")
      mesh_axis = table[name]
      if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis]:
        out.append(None)
      else:
        out.append(mesh_axis)
        used.add(mesh_axis)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*out))

  return nnx.map_state(spec, state)
