"""The row gather's definition (and the fallback / test oracle)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_rows(src_SxD: jax.Array, idx_P: jax.Array) -> jax.Array:
  """``out[p] = src[idx[p]]`` where ``0 <= idx[p] < S``, else a zero row: (P, D) in src's dtype.

  Negative indices are out of range (zero rows), unlike ``jnp.take``'s Python-style wrap-around.
  """
  S = src_SxD.shape[0]
  idx_P = jnp.where(idx_P < 0, S, idx_P)
  return jnp.take(src_SxD, idx_P, axis=0, mode="fill", fill_value=0)
