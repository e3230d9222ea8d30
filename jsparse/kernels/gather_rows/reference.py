"""The row gather's definition (and the fallback / test oracle)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def past_end(idx_P: jax.Array, num_rows: int) -> jax.Array:
  """``idx_P`` with negative indices moved to ``num_rows``: out of range for ``jnp.take``'s fill and ``.at[]``'s drop
  modes, which would otherwise wrap them around Python-style."""
  return jnp.where(idx_P < 0, num_rows, idx_P)


def gather_rows(src_SxD: jax.Array, idx_P: jax.Array) -> jax.Array:
  """``out[p] = src[idx[p]]`` where ``0 <= idx[p] < S``, else a zero row: (P, D) in src's dtype.

  Negative indices are out of range (zero rows), unlike ``jnp.take``'s Python-style wrap-around.
  """
  return jnp.take(src_SxD, past_end(idx_P, src_SxD.shape[0]), axis=0, mode="fill", fill_value=0)
