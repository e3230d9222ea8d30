"""Pure-jnp 2:4 sparse matmul: the spec, the CPU/non-Hopper path and the test oracle.

The numerics contract shared by every implementation:

* The sparse operand is pruned 2:4 along the contraction axis K with :func:`jsparse.nm_prune`'s rule (the two
  largest |x| of every 4, ties to the lower index, NaN kept). For an operand that already is 2:4 this is the identity.
* The product accumulates in float32 and is rounded once to the operands' dtype.
* Gradients: the pruning is straight-through (the cotangent of the sparse operand is the dense ``g @ b.T`` or
  ``a.T @ g``), so a pattern chosen upstream (S-STE, squared-ReLU 2:4) decides its own gradient rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.kernels.activation.api import squared_relu_nm
from jsparse.kernels.nm.api import nm_prune

ACTIVATIONS = ("none", "squared_relu")


def prune_24(x: jax.Array, axis: int) -> jax.Array:
  """2:4 pruning of ``x`` along ``axis`` with the straight-through gradient."""
  return nm_prune(x, 2, 4, axis=axis, gradient="ste", implementation="xla")


def dense_operand(source: jax.Array, activation: str, axis: int) -> jax.Array:
  """The dense 2:4 operand a ``Compressed24`` stands for, as a differentiable function of its source.

  ``"none"``: ``source`` pruned 2:4 along ``axis``. ``"squared_relu"``: ``relu(source)**2`` with the 2:4 pattern of
  :func:`jsparse.squared_relu_nm` (along the last axis, masked gradient).
  """
  if activation == "none":
    return prune_24(source, axis)
  if activation == "squared_relu":
    return squared_relu_nm(source, 2, 4)
  raise ValueError(f"dense_operand: unknown activation {activation!r}")


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a (..., K) @ b (K, N)`` accumulated in float32, rounded to ``a.dtype``.

  float32 operands use full precision (XLA on GPU would otherwise round them to TF32); 16-bit operands are exact in
  the float32 products already, and asking for more would only slow them down.
  """
  precision = jax.lax.Precision.HIGHEST if jnp.dtype(a.dtype) == jnp.float32 else None
  out = jnp.matmul(a, b, preferred_element_type=jnp.float32, precision=precision)
  return out.astype(a.dtype)


def sparse_matmul(a: jax.Array, b: jax.Array, sparse_operand: str = "a") -> jax.Array:
  """The reference product: the ``sparse_operand`` pruned 2:4 along K, then a float32-accumulated matmul."""
  if sparse_operand == "a":
    a = prune_24(a, -1)
  else:
    b = prune_24(b, 0)
  return matmul(a, b)
