"""Matmul FLOPs read off a jaxpr: an independent check of `LingConfig.flops_per_token`.

`weight_matmul_flops(fn, params, *args)` traces fn(params, *args) and sums 2 x (output elements)
x (contracted size) over every dot_general and ragged_dot (2 x rows x K x N: each row against its
own group's matrix) that has a weight operand, i.e. a value computed from `params` alone (casts,
reshapes, concatenations of parameters; not an activation scaled by a norm weight, not an
embedding row looked up by token). Sub-jaxprs are followed (jit, custom_vjp/jvp, checkpoint,
cond: the largest branch), a scan's body counting `length` times.
"""

from __future__ import annotations

import jax
from jax.extend import core as jcore

_DOTS = ("dot_general", "ragged_dot", "ragged_dot_general")


def _dot_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  out = 1
  for d in eqn.outvars[0].aval.shape:
    out *= d
  if eqn.primitive.name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    k = 1
    for d in contract:
      k *= lhs[d]
    return 2 * out * k
  # ragged_dot: lhs [M, K], rhs [G, K, N] -> [M, N]; each row meets one group's [K, N]
  return 2 * out * lhs[1]


def _callees(eqn):
  """(jaxpr, the eqn's operands bound to its invars, repeat count) of each callee: a scan's body
  `length` times, each branch of a cond (the largest counts), else the one call."""
  p, name = eqn.params, eqn.primitive.name
  if name == "scan":
    return [(p["jaxpr"].jaxpr, eqn.invars, p["length"])]
  if name == "cond":
    return [(b.jaxpr, eqn.invars[1:], 1) for b in p["branches"]]
  if name == "while":
    raise NotImplementedError("a while loop's trip count is not static")
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = getattr(p.get(key), "jaxpr", p.get(key))
    if isinstance(j, jcore.Jaxpr):
      return [(j, eqn.invars, 1)]
  return []


def _count(jaxpr, weights: set) -> int:
  """Weight-matmul FLOPs of jaxpr; adds the weight-derived values it defines to `weights`."""
  total = 0
  for eqn in jaxpr.eqns:
    ins = [v for v in eqn.invars if isinstance(v, jcore.Var)]
    if eqn.primitive.name in _DOTS:
      total += _dot_flops(eqn) if any(v in weights for v in ins) else 0
      continue
    callees = _callees(eqn)
    if callees:
      counts = []
      for j, operands, n in callees:
        inner = {iv for iv, ov in zip(j.invars, operands)
                 if isinstance(ov, jcore.Var) and ov in weights}
        counts.append(n * _count(j, inner))
        if len(callees) == 1:  # a call returning a weight-only value (a cast) returns a weight
          weights.update(o for o, io in zip(eqn.outvars, j.outvars) if io in inner)
      total += max(counts)
      continue
    # Elementwise and layout ops: a weight only if every array operand is one (x * norm weight
    # is an activation, so is an embedding row gathered by token ids).
    arrays = [v for v in ins if v.aval.shape]
    if ins and all(v in weights for v in arrays) and any(v in weights for v in ins):
      weights.update(eqn.outvars)
  return total


def weight_matmul_flops(fn, params, *args) -> int:
  closed = jax.make_jaxpr(fn)(params, *args)
  n = len(jax.tree.leaves(params))
  return _count(closed.jaxpr, set(closed.jaxpr.invars[:n]))
