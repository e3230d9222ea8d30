"""Pure-jnp definitions of the N:M selection ops: the spec, the CPU path and the test oracle.

All functions here act on the LAST axis; ``api.py`` moves the user's axis there. Inputs are already validated.

Ordering rule shared by every op (and by the kernels): elements are compared by ``magnitude_key`` (|x| in f32, NaN
as +inf); among equal keys the lower index wins. So the kept set is a deterministic function of the input.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.kernels._common import magnitude_key


def rank_in_groups(key_GxM: jax.Array) -> jax.Array:
  """Rank of each element inside its group along the last axis: 0 for the largest key, ties to the lower index."""
  m = key_GxM.shape[-1]
  ki = key_GxM[..., :, None]
  kj = key_GxM[..., None, :]
  idx = jnp.arange(m)
  before = idx[None, :] < idx[:, None]  # j < i
  beats = (kj > ki) | ((kj == ki) & before)
  return jnp.sum(beats, axis=-1, dtype=jnp.int32)


def nm_mask(x: jax.Array, n: int, m: int) -> jax.Array:
  """Keeps the n largest-|x| of every m consecutive elements of the last axis."""
  shape = x.shape
  key = magnitude_key(x).reshape(*shape[:-1], shape[-1] // m, m)
  return (rank_in_groups(key) < n).reshape(shape)


def soft_threshold_24(w: jax.Array) -> jax.Array:
  """S-STE soft threshold on groups of 4 of the last axis.

  In each group the 3rd-largest |w| (t) is subtracted from the magnitudes of the two largest and the others are zeroed:
  ``S(w)_i = sign(w_i) * (|w_i| - t)`` for the kept two. Ties at t give 0. The arithmetic is done in float32 and the
  result cast back to ``w.dtype``.
  """
  shape = w.shape
  w_Gx4 = w.astype(jnp.float32).reshape(*shape[:-1], shape[-1] // 4, 4)
  key = magnitude_key(w_Gx4)
  rank = rank_in_groups(key)
  a = jnp.abs(w_Gx4)
  third = jnp.sum(jnp.where(rank == 2, a, 0.0), axis=-1, keepdims=True)
  out = jnp.where(rank < 2, jnp.sign(w_Gx4) * (a - third), 0.0)
  # NaN in a group: keep it visible (sign(NaN)*(NaN - t) is NaN already; the others follow the usual rule).
  return out.reshape(shape).astype(w.dtype)


def sste_scale(w: jax.Array, s_w: jax.Array) -> jax.Array:
  """beta = <w, S(w)> / <S(w), S(w)>, the least-squares scale of S(w) towards w (float32 scalar; 1 if S(w) = 0)."""
  w32 = w.astype(jnp.float32)
  s32 = s_w.astype(jnp.float32)
  num = jnp.vdot(w32, s32)
  den = jnp.vdot(s32, s32)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Transposable 2:4: exhaustive search over the 90 4x4 0/1 patterns with two ones in every row and every column.


@functools.cache
def transposable_patterns() -> np.ndarray:
  """The 90 transposable 2:4 patterns of a 4x4 tile as a (90, 4) array of row choices.

  Entry [p, r] is the index (0..5) into ``ROW_PAIRS`` of the two columns that pattern p keeps in row r. Patterns are
  in lexicographic order of their row choices, which fixes the tie-break (the first best pattern wins).
  """
  pairs = list(itertools.combinations(range(4), 2))
  out = []
  for choice in itertools.product(range(6), repeat=4):
    cols = np.zeros(4, np.int32)
    for c in choice:
      for j in pairs[c]:
        cols[j] += 1
    if np.all(cols == 2):
      out.append(choice)
  table = np.asarray(out, np.int32)
  assert table.shape == (90, 4), table.shape
  return table


ROW_PAIRS = tuple(itertools.combinations(range(4), 2))  # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)


def transposable_24_mask(x: jax.Array) -> jax.Array:
  """Optimal transposable 2:4 mask of the last two axes (both multiples of 4).

  Every 4x4 tile keeps the pattern, among the 90 that are 2:4 along rows and columns, with the largest sum of |x|.
  Scores are summed in a fixed order -- per row the pair sum ``key[a] + key[b]``, then rows 0+1, +2, +3 -- so that a
  kernel doing the same additions reproduces the choice bit for bit; ties go to the first pattern in
  :func:`transposable_patterns` order.
  """
  *batch, R, C = x.shape
  key = magnitude_key(x).reshape(*batch, R // 4, 4, C // 4, 4)
  key = jnp.moveaxis(key, -3, -2)  # (..., R/4, C/4, 4 rows, 4 cols)
  pair_sums = jnp.stack([key[..., a] + key[..., b] for a, b in ROW_PAIRS], axis=-1)  # (..., 4 rows, 6 pairs)
  table = transposable_patterns()
  score = None
  for r in range(4):
    term = pair_sums[..., r, :][..., table[:, r]]  # (..., 90)
    score = term if score is None else score + term
  best = jnp.argmax(score, axis=-1)  # first maximum
  pair_mask = np.zeros((6, 4), bool)
  for p, (a, b) in enumerate(ROW_PAIRS):
    pair_mask[p, [a, b]] = True
  tile_masks = jnp.asarray(pair_mask[table])  # (90, 4 rows, 4 cols)
  mask = tile_masks[best]  # (..., R/4, C/4, 4, 4)
  mask = jnp.moveaxis(mask, -2, -3).reshape(*batch, R, C)
  return mask


def greedy_transposable_24_mask(x: jax.Array) -> jax.Array:
  """xformers' "largest" greedy rule, kept as a baseline: visit the 16 entries of a tile in decreasing |x| and keep
  one while its row and its column each hold fewer than two. It can end with 7 kept instead of 8."""
  *batch, R, C = x.shape
  key = magnitude_key(x).reshape(*batch, R // 4, 4, C // 4, 4)
  key = jnp.moveaxis(key, -3, -2).reshape(*batch, R // 4, C // 4, 16)
  order = jnp.argsort(-key, axis=-1, stable=True)

  def step(carry, idx):
    keep, rows, cols = carry
    r, c = idx // 4, idx % 4
    ok = (jnp.take_along_axis(rows, r[..., None], -1)[..., 0] < 2) & (
        jnp.take_along_axis(cols, c[..., None], -1)[..., 0] < 2)
    keep = keep | (jax.nn.one_hot(idx, 16, dtype=bool) & ok[..., None])
    rows = rows + jax.nn.one_hot(r, 4, dtype=jnp.int32) * ok[..., None]
    cols = cols + jax.nn.one_hot(c, 4, dtype=jnp.int32) * ok[..., None]
    return (keep, rows, cols), None

  init = (jnp.zeros(key.shape, bool), jnp.zeros(key.shape[:-1] + (4,), jnp.int32),
          jnp.zeros(key.shape[:-1] + (4,), jnp.int32))
  (keep, _, _), _ = jax.lax.scan(step, init, jnp.moveaxis(order, -1, 0))
  keep = keep.reshape(*batch, R // 4, C // 4, 4, 4)
  return jnp.moveaxis(keep, -2, -3).reshape(*batch, R, C)
