"""The model's shard_map islands: the ops GSPMD cannot partition, run per device on its rows (the
batch, over `ROWS`) and its heads (over `TENSOR`) under the mesh of the enclosing
`jax.set_mesh(mesh)` (docs/parallelism.md §4).

No mesh object crosses the model: each op asks `active_mesh()`, the abstract mesh of the
enclosing `jax.set_mesh` when it has more than one device, else None. With None every function
here is the op itself, called as the layer called it before, so a run without a mesh or on a
one-device mesh traces the single-device program (tests/parallel/test_parallel_train.py compares the
jaxprs). With a mesh the islands run whatever the op's `impl`, the XLA forms included, so the CPU
tests on fake devices exercise the structure a GPU runs with the Pallas kernels inside.

Why islands: a Pallas call is opaque to XLA's partitioner, which gathers its operands onto every
device (or fails). Everything else (the projections, norms, the router, the shared expert, the
embedding and the LM head's logits) stays with GSPMD, which partitions it from the parameters'
shardings (ling_jax.axes) and the row constraints at the layer boundaries (`constrain_rows`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ling_jax.parallel.mesh import BATCH_AXES
from pallas_kernels import attention, qk_norm_rope as qk_op, simple_gla as gla_op

ROWS = BATCH_AXES       # the batch's rows (and tokens) are split over these mesh axes
TENSOR = "tensor"       # heads, ffn widths and the vocabulary are split over this one
_BTHK = P(ROWS, None, TENSOR, None)  # [B, T, H, K]: rows and heads
# The decode caches: Lightning states [B, H, K, V] by rows and heads, MLA latents [B, S, L + R]
# by rows (every head reads the whole latent).
LIGHTNING_STATE = P(ROWS, TENSOR)
LATENT_CACHE = P(ROWS)


def active_mesh():
  """The abstract mesh of the enclosing `jax.set_mesh`, or None where there is none or it has
  one device (then the model runs its single-device code)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  missing = [a for a in ROWS + (TENSOR,) if a not in mesh.shape]
  if missing:
    raise ValueError(f"the active mesh {dict(mesh.shape)} lacks the axes {missing}: build it with "
                     "ling_jax.parallel.mesh.build_mesh (axes data, fsdp, expert, tensor)")
  return mesh


def constrain(x: jax.Array, spec: P) -> jax.Array:
  """x laid out by `spec` on the active mesh (a GSPMD constraint); x itself without one."""
  if active_mesh() is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec)


def constrain_rows(x: jax.Array) -> jax.Array:
  """x [B, ...] with its rows over ROWS and every other dimension whole (where the layers hand
  activations on: GSPMD then gathers FSDP weights rather than moving activations); x itself
  without a mesh."""
  return constrain(x, P(ROWS))


def embed(table: jax.Array, tokens: jax.Array) -> jax.Array:
  """table [V, D][tokens [B, T]] -> [B, T, D]. Under a mesh, vocabulary-parallel (Megatron): each
  device looks up the tokens in its V / tensor rows of the table (D gathered over fsdp), zeros
  the others', and a psum over `tensor` completes them; GSPMD, given the take, replicates the
  whole table instead."""
  mesh = active_mesh()
  if mesh is None:
    return jnp.take(table, tokens, axis=0)

  def fn(w, ids):
    rows = w.shape[0]
    local = ids - jax.lax.axis_index(TENSOR) * rows
    mine = (local >= 0) & (local < rows)
    e = jnp.take(w, jnp.where(mine, local, 0), axis=0)
    return jax.lax.psum(jnp.where(mine[..., None], e, jnp.zeros((), e.dtype)), TENSOR)

  return island(fn, (table, tokens), (P(TENSOR, None), P(ROWS)), P(ROWS))


def island(fn, args, in_specs, out_specs):
  """fn(*args) on each device's part under `jax.shard_map` on the active mesh (fn(*args) itself
  without one). An argument that is None stays None (its spec is ignored).

  check_vma=False: a Pallas call under check_vma needs its out_shape's varying axes declared
  (jax 0.11), which the kernels do not do. Autodiff through the island psums the cotangents of
  inputs replicated over an axis (the decay over the rows, the norm scales over everything), so
  every gradient is the single-device one (the tests compare them)."""
  mesh = active_mesh()
  if mesh is None:
    return fn(*args)
  given = [i for i, a in enumerate(args) if a is not None]

  def body(*xs):
    full = [None] * len(args)
    for i, x in zip(given, xs):
      full[i] = x
    return fn(*full)

  run = jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs[i] for i in given),
                      out_specs=out_specs, check_vma=False)
  return run(*(args[i] for i in given))


def qk_norm_rope(qkv, wq, wk, cos, sin, *, eps: float, dtype, impl: str):
  """pallas_kernels.qk_norm_rope per device: qkv [B, T, 3, H, K] by rows and heads, the norm
  scales [K] whole, cos / sin [B, T, R/2] by rows -> (q, k, v) [B, T, H, K] by rows and heads."""
  fn = functools.partial(qk_op.qk_norm_rope, eps=eps, dtype=dtype, impl=impl)
  return island(fn, (qkv, wq, wk, cos, sin),
                (P(ROWS, None, None, TENSOR, None), P(), P(), P(ROWS), P(ROWS)), (_BTHK,) * 3)


def simple_gla(q, k, v, g, *, initial_state=None, segment_ids=None, impl: str):
  """pallas_kernels.simple_gla per device: q, k, v [B, T, H, K] and the state [B, H, K, V] by
  rows and heads, the per-head decay g [H] by heads, segment ids [B, T] by rows -> (o, state)."""
  def fn(q, k, v, g, s, seg):
    return gla_op.simple_gla(q, k, v, g, initial_state=s, segment_ids=seg, impl=impl)

  state = P(ROWS, TENSOR)
  return island(fn, (q, k, v, g, initial_state, segment_ids),
                (_BTHK, _BTHK, _BTHK, P(TENSOR), state, P(ROWS)), (_BTHK, state))


def causal_attention(q, k, v, *, scale: float, q_rope=None, k_rope=None, segment_ids=None,
                     positions=None, impl: str):
  """pallas_kernels.attention.causal_attention per device: q, k, v, q_rope [B, T, H, *] by rows
  and heads; the shared rope key k_rope [B, T, R], segment ids and positions [B, T] by rows."""
  def fn(q, k, v, qr, kr, seg, pos):
    return attention.causal_attention(q, k, v, scale=scale, q_rope=qr, k_rope=kr,
                                      segment_ids=seg, positions=pos, impl=impl)

  return island(fn, (q, k, v, q_rope, k_rope, segment_ids, positions),
                (_BTHK, _BTHK, _BTHK, _BTHK, P(ROWS), P(ROWS), P(ROWS)), _BTHK)
