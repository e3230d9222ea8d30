"""The padded group layout (:func:`layout.make_layout`) in one Pallas (Triton) kernel.

XLA builds the layout from a handful of small fusions (the one-hot cumulative sum, the counts, the tile starts, the
positions, the scatter of token ids and its initialising broadcast, the tile groups): eight kernels of 1-3 us each at
T=16384, E=8 on the H100, plus a launch gap after each. All of it is a few hundred kilobytes of integers, so one
program does it in three sweeps over ``chunk`` tokens or rows at a time:

1. per-group counts -> tiles, tile starts (a cumulative sum over E lanes);
2. each token's rank in its group (a running per-group count plus a cumulative sum down the chunk's one-hot rows),
   its row ``pos_T`` and the scatter ``row_token_P[pos] = t``;
3. every row that no token lands on (a group's padding, the unused tail) gets the padding id ``T``, and every row tile
   its group: rows the scatter writes and rows this sweep writes are disjoint, so no ordering between the two is
   needed.

Per-group values are picked with one-hot sums (no vector gathers). Output equals :func:`layout.make_layout` exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # Triton-specific masked load/store; absent only in JAX builds without the Triton backend.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pltriton = None

MAX_CHUNK = 2048


def _chunk(n: int) -> int:
  """Largest power of two <= MAX_CHUNK dividing n (chunks never cross the end)."""
  c = MAX_CHUNK
  while n % c:
    c //= 2
  return c


def _pow2(n: int) -> int:
  p = 2
  while p < n:
    p *= 2
  return p


def _layout_kernel(groups_ref, pos_ref, row_token_ref, tile_group_ref, tile_start_ref, tiles_ref, counts_ref, *,
                   T: int, E: int, Ep: int, rt: int, P: int, R: int):
  lanes_E = jax.lax.broadcasted_iota(jnp.int32, (1, Ep), 1)
  real_E = lanes_E < E

  def onehot(g_C):
    return (g_C[:, None] == lanes_E).astype(jnp.int32)

  def pick(onehot_CxE, values_E):
    return jnp.sum(onehot_CxE * values_E, axis=1)

  # 1. counts, tiles, tile starts and ends.
  ct, cp, cr = _chunk(T), _chunk(P), _chunk(R)

  def count_body(i, counts):
    g = groups_ref[pl.ds(pl.multiple_of(i * ct, ct), ct)]
    return counts + jnp.sum(onehot(g), axis=0, keepdims=True)

  counts = jax.lax.fori_loop(0, T // ct, count_body, jnp.zeros((1, Ep), jnp.int32))
  tiles = (counts + rt - 1) // rt
  tile_end = jnp.cumsum(tiles, axis=1)
  tile_start = tile_end - tiles
  start_row = tile_start * rt

  # 2. ranks, positions, token ids scattered to their rows.
  def rank_body(i, seen):
    t0 = pl.multiple_of(i * ct, ct)
    oh = onehot(groups_ref[pl.ds(t0, ct)])
    rank = pick(oh, jnp.cumsum(oh, axis=0) - 1 + seen)
    pos = pick(oh, start_row) + rank
    pos_ref[pl.ds(t0, ct)] = pos
    pltriton.store(row_token_ref.at[pos], t0 + jax.lax.broadcasted_iota(jnp.int32, (ct,), 0))
    return seen + jnp.sum(oh, axis=0, keepdims=True)

  jax.lax.fori_loop(0, T // ct, rank_body, jnp.zeros((1, Ep), jnp.int32))

  def group_of_tile(r_C):
    """Group of each row tile (E past the last group), as make_layout: how many real groups end at or before it."""
    return jnp.sum(((r_C[:, None] >= tile_end) & real_E).astype(jnp.int32), axis=1)

  # 3. rows no token lands on -> T; the group of every row tile.
  def pad_body(i, carry):
    p0 = pl.multiple_of(i * cp, cp)
    p = p0 + jax.lax.broadcasted_iota(jnp.int32, (cp,), 0)
    g = group_of_tile(p // rt)
    oh = onehot(jnp.minimum(g, E - 1))
    empty = (g >= E) | (p - pick(oh, start_row) >= pick(oh, counts))
    pltriton.store(row_token_ref.at[p], jnp.full((cp,), T, jnp.int32), mask=empty)
    return carry

  jax.lax.fori_loop(0, P // cp, pad_body, 0)

  def tile_body(i, carry):
    r0 = pl.multiple_of(i * cr, cr)
    tile_group_ref[pl.ds(r0, cr)] = group_of_tile(r0 + jax.lax.broadcasted_iota(jnp.int32, (cr,), 0))
    return carry

  jax.lax.fori_loop(0, R // cr, tile_body, 0)

  # The E-padding lanes point past the end: Triton never touches masked lanes, and the interpreter's scatter drops
  # out-of-range ones, where an in-range dummy index could overwrite a real lane's store.
  e = jax.lax.broadcasted_iota(jnp.int32, (Ep,), 0)
  lanes = e < E
  for ref, values in ((tile_start_ref, tile_start), (tiles_ref, tiles), (counts_ref, counts)):
    pltriton.store(ref.at[jnp.where(lanes, e, E)], values[0], mask=lanes)


def make_layout_arrays(groups_T: jax.Array, num_groups: int, row_tile: int, num_rows: int, *,
                       num_warps: int = 4, interpret: bool = False):
  """``(pos_T, row_token_P, tile_group_R, tile_start_E, tiles_E, counts_E)`` of :func:`layout.make_layout`."""
  T = groups_T.shape[0]
  E, rt, P = num_groups, row_tile, num_rows
  R = P // rt
  i32 = jnp.int32
  out_shape = [jax.ShapeDtypeStruct((T,), i32), jax.ShapeDtypeStruct((P,), i32), jax.ShapeDtypeStruct((R,), i32),
               jax.ShapeDtypeStruct((E,), i32), jax.ShapeDtypeStruct((E,), i32), jax.ShapeDtypeStruct((E,), i32)]
  whole = lambda n: pl.BlockSpec((n,), lambda i: (0,))
  kernel = functools.partial(_layout_kernel, T=T, E=E, Ep=_pow2(E), rt=rt, P=P, R=R)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(1,), in_specs=[whole(T)],
      out_specs=[whole(T), whole(P), whole(R), whole(E), whole(E), whole(E)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="jsparse_group_layout",
  )(groups_T.astype(i32))
