"""The device mesh of a run: its sizes (`MeshConfig`, an experiment's `mesh.*` overrides), its
construction over every process's devices, and the check that a model and a batch divide it
(docs/parallelism.md).

Axes (ling_jax.axes.MESH_AXES), outermost first: `data` (replicas), `fsdp` (parameters split by
their model width, gathered per layer), `expert` (routed experts split, tokens exchanged), `tensor`
(heads and ffn widths split). The batch is split over the product of the first three
(`BATCH_AXES`), as the expert-parallel layer expects its tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Sequence

from ling_jax.config import LingConfig

if TYPE_CHECKING:
  import jax
  from jax.sharding import NamedSharding

# MeshConfig is an experiment's config section, which builds without jax (`--help` stays
# instant): jax and ling_jax.axes are imported where they are used.

BATCH_AXES = ("data", "fsdp", "expert")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes. One axis may be -1: it takes every device the others leave. The
  default (data=-1, the rest 1) is pure data parallelism over all devices; `mesh.data=1
  mesh.fsdp=-1` is FSDP over all of them."""

  data: int = -1    # replicas: the batch split, parameters whole (-1: the devices left)
  fsdp: int = 1     # the batch split, parameters split by their model width
  expert: int = 1   # the batch split, routed experts split (tokens exchanged)
  tensor: int = 1   # heads, ffn widths and the vocabulary split

  def __post_init__(self):
    sizes = self.sizes()
    bad = [f"{a}={v!r}" for a, v in sizes.items()
           if isinstance(v, bool) or not isinstance(v, int) or not (v == -1 or v >= 1)]
    if bad:
      raise ValueError(f"invalid MeshConfig: {', '.join(bad)}; each axis size is an integer >= 1, "
                       "or -1 for the devices the other axes leave")
    absorb = [a for a, v in sizes.items() if v == -1]
    if len(absorb) > 1:
      raise ValueError(f"invalid MeshConfig: {' and '.join(absorb)} are both -1; at most one axis "
                       "takes the remaining devices (e.g. mesh.data=1 mesh.fsdp=-1)")

  def sizes(self) -> dict[str, int]:
    """The four sizes as written, -1 unresolved, in ling_jax.axes.MESH_AXES order (the fields'
    order; a test checks the two agree)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def resolve(self, num_devices: int) -> dict[str, int]:
    """Every axis' size on `num_devices` devices; a ValueError naming the sizes if they do not
    fit exactly."""
    sizes = self.sizes()
    written = " x ".join(f"{a}={v}" for a, v in sizes.items())
    fixed = math.prod(v for v in sizes.values() if v != -1)
    absorb = [a for a, v in sizes.items() if v == -1]
    if fixed > num_devices:
      raise ValueError(f"mesh {written} needs {fixed} devices; only {num_devices} are present")
    if absorb:
      if num_devices % fixed:
        raise ValueError(f"mesh {written}: the fixed axes' {fixed} devices do not divide the "
                         f"{num_devices} present, so {absorb[0]}=-1 has no whole size")
      sizes[absorb[0]] = num_devices // fixed
    elif fixed != num_devices:
      raise ValueError(f"mesh {written} uses {fixed} of the {num_devices} devices present; make "
                       "the product equal, or set one axis to -1 to take the rest")
    return sizes


def build_mesh(mesh_config: MeshConfig = MeshConfig(),
               devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The mesh of `mesh_config` over `devices` (default: every device of every process)."""
  import jax
  from ling_jax import axes as ax
  devices = list(devices if devices is not None else jax.devices())
  return ax.make_mesh(mesh_config.resolve(len(devices)), devices)


def batch_axes_size(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch is split: the product of the mesh's BATCH_AXES."""
  return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The batch's sharding: rows over BATCH_AXES, every other dimension whole."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def check_mesh(cfg: LingConfig, mesh: jax.sharding.Mesh, batch_size: int | None = None, *,
               rules=None) -> None:
  """Refuse a mesh the model (under `rules`, default ling_jax.axes.RULES_FSDP_TP_EP) or the
  batch does not divide: one ValueError listing each mesh axis, its size and the size it fails
  to divide. Run it before building anything."""
  from ling_jax import axes as ax
  table = dict(ax.RULES_FSDP_TP_EP if rules is None else rules)
  errors = []

  def axis(logical):
    mesh_axis = table.get(logical)
    names = mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,) if mesh_axis else ()
    return "*".join(names), math.prod(mesh.shape.get(a, 1) for a in names)

  dims = [("num_attention_heads", cfg.num_attention_heads, ax.HEADS),
          ("vocab_size", cfg.vocab_size, ax.VOCAB),
          ("hidden_size", cfg.hidden_size, ax.EMBED),
          ("num_experts", cfg.num_experts, ax.EXPERT),
          ("moe_intermediate_size", cfg.moe_intermediate_size, ax.MLP),
          ("kv_lora_rank", cfg.kv_lora_rank, ax.KV_LORA)]
  if cfg.shared_expert_intermediate_size:
    dims.append(("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size, ax.MLP))
  if cfg.first_k_dense_replace > 0:
    dims.append(("intermediate_size", cfg.intermediate_size, ax.MLP))
  if cfg.q_lora_rank is not None:
    dims.append(("q_lora_rank", cfg.q_lora_rank, ax.Q_LORA))
  for field, size, logical in dims:
    name, n = axis(logical)
    if size % n:
      errors.append(f"mesh axis {name!r} of size {n} does not divide {field}={size}")

  # GroupRMSNorm normalises group_norm_size equal slices of the flattened heads. With the heads
  # split `tensor` ways, a slice must lie inside one device's heads (tensor divides the groups) or
  # span whole devices (the groups divide tensor: XLA all-reduces the statistics, [B, T, groups]
  # floats). Otherwise slices straddle devices and XLA gathers the whole attention output.
  name, t = axis(ax.HEADS)
  g = cfg.group_norm_size
  if t > 1 and g % t and t % g:
    errors.append(f"mesh axis {name!r} of size {t} splits GroupRMSNorm's group_norm_size={g} "
                  f"groups across devices; use a {name} size that divides {g} or a multiple of it")

  if batch_size is not None:
    n = batch_axes_size(mesh)
    if batch_size % n:
      sizes = " x ".join(f"{a}={mesh.shape.get(a, 1)}" for a in BATCH_AXES)
      errors.append(f"the batch of {batch_size} rows does not split over {sizes} = {n} devices")
  if errors:
    raise ValueError(f"mesh {dict(mesh.shape)} does not fit the model or batch: "
                     + "; ".join(errors))
