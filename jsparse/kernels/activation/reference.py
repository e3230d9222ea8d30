"""Pure-jnp squared-ReLU + N:M (Haziza et al. 2025's forward): the spec, CPU path and test oracle.

The pattern is chosen on relu(x) (float32, NaN as +inf) -- the n largest *signed* pre-activations of each group of m,
which is the paper's "largest" rule since negative entries die in the ReLU anyway; ties (e.g. several non-positive
entries) go to the lower index. ``h = relu(x)^2`` is computed in float32 and cast to ``x.dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.kernels.nm.reference import rank_in_groups


def selection_key(x: jax.Array) -> jax.Array:
  """The key the squared-ReLU selection ranks by: relu(x) in float32, NaN as +inf."""
  r = jnp.maximum(x.astype(jnp.float32), 0.0)
  return jnp.where(jnp.isnan(x), jnp.inf, r)


def squared_relu_nm(x: jax.Array, n: int, m: int) -> tuple[jax.Array, jax.Array]:
  """(relu(x)^2 with all but the n largest of every m zeroed, mask) along the last axis."""
  shape = x.shape
  key = selection_key(x).reshape(*shape[:-1], shape[-1] // m, m)
  mask = (rank_in_groups(key) < n).reshape(shape)
  r = jnp.maximum(x.astype(jnp.float32), 0.0)
  r = jnp.where(jnp.isnan(x), x.astype(jnp.float32), r)
  h = jnp.where(mask, r * r, 0.0).astype(x.dtype)
  return h, mask


def mask24_by_relu(y1_TxF: jax.Array) -> jax.Array:
  """The 2:4 mask of :func:`jsparse.squared_relu_nm` (the two largest relu(y1) of each 4 along the last axis, NaN as
  +inf, ties to the lower index) as six comparisons per group -- element-wise, so XLA fuses it into its consumers. (The
  reference's rank-by-reduction form became a 7.5 ms reduction kernel of its own at the 1b shape on the H100.)"""
  *lead, F = y1_TxF.shape
  key = selection_key(y1_TxF).reshape(*lead, F // 4, 4)
  k0, k1, k2, k3 = (key[..., i] for i in range(4))
  c01, c02, c03 = (k1 > k0).astype(jnp.int32), (k2 > k0).astype(jnp.int32), (k3 > k0).astype(jnp.int32)
  c12, c13, c23 = (k2 > k1).astype(jnp.int32), (k3 > k1).astype(jnp.int32), (k3 > k2).astype(jnp.int32)
  # rank = how many of the other three beat it (j beats i: key_j > key_i, or equal with j < i)
  ranks = (c01 + c02 + c03, 1 - c01 + c12 + c13, 2 - c02 - c12 + c23, 3 - c03 - c13 - c23)
  return jnp.stack([r < 2 for r in ranks], axis=-1).reshape(y1_TxF.shape)


def relu_f32(y: jax.Array) -> jax.Array:
  """``relu(y)`` in float32, or in ``y``'s dtype if that is wider (float64 checks stay float64); NaN stays NaN."""
  return jnp.maximum(y.astype(jnp.promote_types(y.dtype, jnp.float32)), 0.0)


def masked_relu(y1_TxF: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(r, mask): ``relu(y1)`` with the 2:4 mask applied, in float32 (or wider, for a float64 ``y1``)."""
  mask_TxF = mask24_by_relu(y1_TxF)
  return jnp.where(mask_TxF, relu_f32(y1_TxF), 0.0), mask_TxF


def kept_positive_counts(y_TxF: jax.Array) -> jax.Array:
  """int32 ``(F,)``: per feature (last axis), the rows whose relu(y) is positive and kept by the 2:4 selection -- the
  activation recipe's density ranking, as ``jsparse.kernels.cusparselt.ops.relu24_counts`` counts it."""
  r_TxF, _ = masked_relu(y_TxF)
  return jnp.sum((r_TxF > 0).astype(jnp.int32), axis=0)


def squared_relu_nm_grad(x: jax.Array, mask: jax.Array | None, g: jax.Array) -> jax.Array:
  """dx for h = relu(x)^2 [* mask]: 2 relu(x) g, masked when ``mask`` is given."""
  d = 2.0 * jnp.maximum(x.astype(jnp.float32), 0.0) * g.astype(jnp.float32)
  if mask is not None:
    d = jnp.where(mask, d, 0.0)
  return d.astype(x.dtype)


def positive_counts(y_TxF: jax.Array) -> jax.Array:
  """int32 ``(F,)``: per feature (last axis), the rows with ``y > 0`` (NaN is not) -- the density ranking of an FFN
  without the 2:4 activation, as ``jsparse.kernels.cusparselt.ops.squared_relu_counts`` counts it."""
  return jnp.sum((y_TxF > 0).astype(jnp.int32), axis=0)
