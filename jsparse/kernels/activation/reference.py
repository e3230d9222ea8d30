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


def squared_relu_nm_grad(x: jax.Array, mask: jax.Array | None, g: jax.Array) -> jax.Array:
  """dx for h = relu(x)^2 [* mask]: 2 relu(x) g, masked when ``mask`` is given."""
  d = 2.0 * jnp.maximum(x.astype(jnp.float32), 0.0) * g.astype(jnp.float32)
  if mask is not None:
    d = jnp.where(mask, d, 0.0)
  return d.astype(x.dtype)
