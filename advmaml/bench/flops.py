"""Matmul and convolution FLOPs of a JAX function, counting every loop trip.

XLA's cost analysis (``jit(f).lower(...).compile().cost_analysis()``) counts a
while loop's body once, whatever its trip count, so for a meta-step with an
inner loop (``lax.scan`` over adaptation steps) or an attack loop (PGD's
``fori_loop``) it undercounts the work by up to the trip count. This module
counts from the program JAX traces instead (its jaxpr, which holds the
backward passes ``jax.grad`` built), multiplying each ``scan`` body by its
length. It counts only ``dot_general`` and convolutions: the work a matmul peak
is the yardstick for. Elementwise ops are left out, so on a loop-free program
the count is a little below XLA's (tested in ``tests/test_flops.py``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jex_core


def _dot_general_flops(eqn) -> int:
  """2 * batch * M * N * K for ``dot_general``: output elements times contracted length."""
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  contracted = math.prod(lhs[d] for d in lhs_contract)
  # Every output element is a length-`contracted` dot product.
  return 2 * math.prod(out) * contracted


def _conv_flops(eqn) -> int:
  """2 * output elements * (kernel window * input features per group)."""
  dn = eqn.params["dimension_numbers"]
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  # rhs_spec: (out feature dim, in feature dim, spatial dims...).
  in_features = rhs[dn.rhs_spec[1]]
  window = math.prod(rhs[d] for d in dn.rhs_spec[2:])
  # Exact for feature-grouped convs (the kernel's in-feature dim is already C / groups);
  # batch-grouped ones (weight gradients of grouped convs) are counted alike, unchecked.
  return 2 * math.prod(out) * window * in_features


def _sub_jaxprs(params: dict[str, Any]):
  for value in params.values():
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
      if isinstance(item, jex_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex_core.Jaxpr):
        yield item


def jaxpr_flops(jaxpr) -> int:
  """FLOPs of a (closed) jaxpr: matmuls and convolutions, loop bodies times their trips.

  Raises ValueError for a ``while_loop`` (its trip count is not known when
  tracing; ``fori_loop`` with Python-int bounds traces to a ``scan`` instead).
  ``cond`` counts its most expensive branch.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "while":
      raise ValueError("a while_loop with a trip count unknown at trace time; "
                       "write the loop as lax.scan or fori_loop with static bounds")
    elif name == "cond":
      total += max(jaxpr_flops(branch) for branch in eqn.params["branches"])
    elif name == "shard_map":  # the body sees one device's block: times the devices
      axes = eqn.params.get("newly_manual_axes", eqn.params.get("manual_axes", ()))
      copies = math.prod(eqn.params["mesh"].shape[a] for a in axes)
      total += copies * jaxpr_flops(eqn.params["jaxpr"])
    else:  # pjit, remat, custom_jvp/vjp calls: their inner program once
      total += sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn.params))
  return total


def count_flops(fn: Callable, *args, **kwargs) -> int:
  """Matmul + convolution FLOPs of one call ``fn(*args, **kwargs)``, every loop trip counted."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
