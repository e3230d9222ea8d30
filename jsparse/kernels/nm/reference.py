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


@functools.cache
def transposable_search_plan() -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[tuple[int, int], ...], ...]]:
  """The search's structure: ``(groups, completions)``.

  ``groups``: the 36 choices ``(t0, t1, need)`` of rows 0 and 1 in lexicographic order (``t`` indexes
  ``ROW_PAIRS``), where ``need`` indexes ``completions``: the distinct lists of ``(t2, t3)`` choices for rows 2 and
  3 that complete rows 0-1 to two ones per column (lexicographic). Rows 0-1 choices with the same column counts share
  a list (18 lists for 36 groups), so a completion's best is found once for all the groups that need it. Together
  they enumerate the 90 transposable patterns.
  """
  def counts(*ts):
    c = [0] * 4
    for t in ts:
      for j in ROW_PAIRS[t]:
        c[j] += 1
    return tuple(c)

  needs: dict[tuple[int, ...], int] = {}
  completions, groups = [], []
  for t0 in range(6):
    for t1 in range(6):
      need = tuple(2 - c for c in counts(t0, t1))
      if need not in needs:
        needs[need] = len(completions)
        completions.append(tuple((t2, t3) for t2 in range(6) for t3 in range(6) if counts(t2, t3) == need))
      groups.append((t0, t1, needs[need]))
  assert sum(len(completions[n]) for _, _, n in groups) == 90
  return tuple(groups), tuple(completions)


def transposable_24_mask(x: jax.Array) -> jax.Array:
  """Optimal transposable 2:4 mask of the last two axes (both multiples of 4).

  Every 4x4 tile keeps, among the 90 patterns that are 2:4 along rows and columns, one with the largest sum of |x|
  (``magnitude_key``), found in two levels with fixed float32 additions, so that a kernel doing the same additions
  reproduces the choice bit for bit:

  1. per row the pair sums ``key[a] + key[b]`` (``ROW_PAIRS`` order);
  2. per completion list of :func:`transposable_search_plan`, its best ``(t2, t3)``: the largest ``row2[t2] +
     row3[t3]``, ties to the first;
  3. per rows-0-1 choice the score ``(row0[t0] + row1[t1]) + best completion``; the first largest score wins.

  Float rounding is monotone, so the winner's score is the largest any pattern reaches (the optimum, up to ties that
  rounding creates). An all-equal tile keeps rows 0-1 columns 0,1 and rows 2-3 columns 2,3.
  """
  *batch, R, C = x.shape
  key = magnitude_key(x).reshape(*batch, R // 4, 4, C // 4, 4)
  key = jnp.moveaxis(key, -3, -2)  # (..., R/4, C/4, 4 rows, 4 cols)
  pair_sums = jnp.stack([key[..., a] + key[..., b] for a, b in ROW_PAIRS], axis=-1)  # (..., 4 rows, 6 pairs)
  groups, completions = transposable_search_plan()
  best_value, best_choice = [], []
  for comps in completions:
    t2, t3 = np.asarray(comps).T
    c = pair_sums[..., 2, :][..., t2] + pair_sums[..., 3, :][..., t3]  # (..., len(comps))
    k = jnp.argmax(c, axis=-1)  # the first maximum
    best_value.append(jnp.take_along_axis(c, k[..., None], axis=-1)[..., 0])
    best_choice.append(jnp.asarray(np.asarray(comps, np.int32))[k])  # (..., 2): (t2, t3)
  t0s, t1s, ns = (np.asarray(v) for v in zip(*groups))
  p01 = pair_sums[..., 0, :][..., t0s] + pair_sums[..., 1, :][..., t1s]  # (..., 36)
  score = p01 + jnp.stack([best_value[n] for n in ns], axis=-1)
  g = jnp.argmax(score, axis=-1)  # the first maximum
  choice23 = jnp.stack([best_choice[n] for n in ns], axis=-2)  # (..., 36, 2)
  t23 = jnp.take_along_axis(choice23, g[..., None, None], axis=-2)[..., 0, :]
  rows = jnp.stack([jnp.asarray(t0s)[g], jnp.asarray(t1s)[g], t23[..., 0], t23[..., 1]], axis=-1)  # (..., 4)
  pair_mask = np.zeros((6, 4), bool)
  for p, (a, b) in enumerate(ROW_PAIRS):
    pair_mask[p, [a, b]] = True
  mask = jnp.asarray(pair_mask)[rows]  # (..., R/4, C/4, 4 rows, 4 cols)
  return jnp.moveaxis(mask, -2, -3).reshape(*batch, R, C)


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
