"""Pure-jnp V:N:M (Venom) selection on a 2-D (R, C) array: the spec, CPU path and test oracle.

Blocks are ``v`` consecutive rows x ``m`` consecutive columns. In each block the 4 columns with the largest summed
|x| (float32, NaN as +inf; ties to the lower column) are selected; inside them every row keeps its ``n`` largest-|x|
(ties to the lower column). Density is n/m.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.kernels._common import magnitude_key
from jsparse.kernels.nm.reference import rank_in_groups

SELECTED_COLUMNS = 4  # Venom's m_fixed: the 2:4 sparse tensor-core operand is 4 columns wide.


def vnm_columns(x: jax.Array, v: int, m: int) -> jax.Array:
  """Bool (R/v, C/m, m): which columns of each v x m block are selected."""
  R, C = x.shape
  key = magnitude_key(x).reshape(R // v, v, C // m, m)
  col_score = jnp.sum(key, axis=1)  # (R/v, C/m, m); inf if any NaN in the column
  return rank_in_groups(col_score) < SELECTED_COLUMNS


def vnm_mask(x: jax.Array, v: int, n: int, m: int) -> jax.Array:
  """Bool (R, C) V:N:M mask."""
  R, C = x.shape
  selected = vnm_columns(x, v, m)  # (R/v, C/m, m)
  key = magnitude_key(x).reshape(R // v, v, C // m, m)
  sel = jnp.broadcast_to(selected[:, None], key.shape)
  # Unselected columns rank behind every selected one: their key is -1 (all real keys are >= 0).
  ranked = rank_in_groups(jnp.where(sel, key, -1.0))
  return ((ranked < n) & sel).reshape(R, C)
