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

import fnmatch
import math
from typing import Sequence

import jax
import numpy as np
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
    (Q_LORA, "fsdp"),   # q_b_proj / kv_b_proj: their only dimension FSDP can split (MaxText
    (KV_LORA, "fsdp"),  # does the same); in q_a / kv_a_proj `embed` has taken fsdp first
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


# A parameter below this size may stay whole along a dimension its mesh axis does not divide
# (norms, biases, router bias, the tiny test models): replicating it costs at most this much per
# device. Anything larger must divide, or be named in `allow_replicated`.
REPLICATE_BELOW_BYTES = 1 << 20


def _path(path) -> str:
  return ".".join(map(str, path))


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules=RULES_FSDP_TP_EP, *,
                    allow_replicated: Sequence[str] = (),
                    replicate_below_bytes: int = REPLICATE_BELOW_BYTES):
  """NamedShardings for every variable of `state` under `rules` on `mesh`.

  A mesh axis that does not divide the dimension its rule gives it would leave that dimension
  whole on every device. That is allowed only for a parameter of fewer than
  `replicate_below_bytes` bytes, or one whose dotted path (`groups.layers.1.mlp.gate.weight`)
  matches an fnmatch pattern of `allow_replicated`; any other is a ValueError naming each such
  parameter, its shape, the logical axis, the mesh axis and both sizes, raised before anything
  is placed (at scale a silently replicated weight is an out-of-memory or a slowdown).
  """
  table = dict(rules)
  problems = []

  def spec(path, var):
    axes = var.get_metadata().get("out_sharding")
    if axes is None:
      raise ValueError(f"parameter {_path(path)} has no logical axes")
    value = var.get_value()
    out = []
    used = set()
    for dim, name in zip(value.shape, axes):
      if name not in table:
        raise ValueError(f"logical axis {name!r} of {_path(path)} has no rule")
      mesh_axis = table[name]
      if mesh_axis is None or mesh_axis in used:
        out.append(None)
        continue
      size = math.prod(mesh.shape[a] for a in
                       (mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,)))
      if dim % size:
        nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
        if nbytes >= replicate_below_bytes and not any(
            fnmatch.fnmatchcase(_path(path), p) for p in allow_replicated):
          problems.append(f"{_path(path)} {list(value.shape)} ({nbytes / 2**20:.1f} MiB): mesh "
                          f"axis {mesh_axis!r} of size {size} does not divide its logical axis "
                          f"{name!r} of size {dim}")
        out.append(None)
      else:
        out.append(mesh_axis)
        used.add(mesh_axis)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*out))

  shardings = nnx.map_state(spec, state)
  if problems:
    more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
    raise ValueError(
        f"{len(problems)} parameter dimension(s) would stay whole on every device, their mesh axis "
        f"not dividing them (mesh {dict(mesh.shape)}): {'; '.join(problems[:6])}{more}. Choose "
        f"axis sizes that divide them, or "
        f"pass allow_replicated=[path patterns] to replicate them on purpose "
        f"(parameters under {replicate_below_bytes} bytes are always allowed).")
  return shardings
