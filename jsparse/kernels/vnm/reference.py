"""Pure-jnp V:N:M (Venom) selection on a 2-D (R, C) array: the spec, CPU path and test oracle.

Blocks are ``v`` consecutive rows x ``m`` consecutive columns. In each block the 4 columns with the largest summed
|x| (float32, NaN as +inf; ties to the lower column) are selected; inside them every row keeps its ``n`` largest-|x|
(ties to the lower column). Density is n/m.

The column sums are added in a fixed order (:func:`halving_sum`: the top half of the rows plus the bottom half,
repeated), not by a ``reduce`` whose order the compiler picks, so that the Pallas kernel, which does the same
additions, reproduces every selection bit for bit -- also where two columns' sums differ only in the last bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.kernels._common import magnitude_key
from jsparse.kernels.nm.reference import rank_in_groups

SELECTED_COLUMNS = 4  # Venom's m_fixed: the 2:4 sparse tensor-core operand is 4 columns wide.


def halving_sum(a: jax.Array, axis: int) -> jax.Array:
  """Sum over ``axis`` in a fixed order: ``a[:h] + a[h:2h]`` (h = size // 2; an odd last row is carried along),
  repeated until one row is left. Each step is plain elementwise adds, so no compiler reorders them."""
  a = jnp.moveaxis(a, axis, 0)
  while a.shape[0] > 1:
    h = a.shape[0] // 2
    a = jnp.concatenate([a[:h] + a[h:2 * h], a[2 * h:]], axis=0) if a.shape[0] % 2 else a[:h] + a[h:]
  return a[0]


def vnm_columns(x: jax.Array, v: int, m: int) -> jax.Array:
  """Bool (R/v, C/m, m): which columns of each v x m block are selected."""
  R, C = x.shape
  key = magnitude_key(x).reshape(R // v, v, C // m, m)
  col_score = halving_sum(key, axis=1)  # (R/v, C/m, m); inf if any NaN in the column
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
