"""The padded group layout (:func:`layout.make_layout`) in one Pallas (Triton) kernel.

XLA builds the layout from a handful of small fusions (the one-hot cumulative sum, the counts, the tile starts, the
positions, the scatter of token ids and its initialising broadcast, the tile groups); the routed FFN's forward at 7b,
E=8 showed about eight kernels of 1-3.5 us on the H100 besides the GEMMs and gathers (the routing's argmax among
them), each with a launch gap. All of it is a few hundred kilobytes of integers, so one
program does it, a whole chunk of tokens per step (up to ``MAX_CHUNK``, the last chunk masked: all of them at
T=16384), with the E groups unrolled (E vector compares, sums and cumulative sums over the chunk instead of a
(chunk, E) one-hot matrix):

1. per-group counts -> tiles, tile starts;
2. each token's rank in its group (the group's cumulative sum down the chunk plus the count in earlier chunks), its
   row ``pos_T`` and the scatter ``row_token_P[pos] = t``;
3. every row that no token lands on (a group's padding, the unused tail) gets the padding id ``T``, and every row
   tile its group: rows the scatter writes and rows this sweep writes are disjoint, so the two need no ordering.

A step's only global read is its chunk of group ids, so at T=16384 the kernel waits for memory twice (one load per
sweep), where a loop over small chunks would wait once per chunk. Output equals :func:`layout.make_layout` exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # Triton-specific masked store; absent only in JAX builds without the Triton backend.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pltriton = None

MAX_CHUNK = 16384


def _chunk(n: int, limit: int = MAX_CHUNK) -> int:
  """Power-of-two chunk for n elements: n rounded up to a power of two, at most ``limit`` (the last chunk is
  masked where it crosses the end)."""
  return min(_pow2(n), limit)


def _pow2(n: int) -> int:
  p = 2
  while p < n:
    p *= 2
  return p


def _iota(n: int):
  return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _layout_kernel(groups_ref, pos_ref, row_token_ref, tile_group_ref, tile_start_ref, tiles_ref, counts_ref, *,
                   T: int, E: int, rt: int, P: int, R: int, ct: int, cp: int, cr: int):
  groups = range(E)

  def span(i, chunk, n):
    """Indices of chunk i, whether each is below n, and the indices with those past n sent to n (out of range:
    masked lanes never touch memory on a GPU, and the interpreter's scatter drops out-of-range ones)."""
    idx = i * chunk + _iota(chunk)
    ok = idx < n
    return idx, ok, jnp.where(ok, idx, n)

  def load_groups(i):
    t, ok, t_out = span(i, ct, T)
    return t, ok, t_out, pltriton.load(groups_ref.at[jnp.where(ok, t, 0)], mask=ok, other=E)  # E: no group

  # 1. counts (E scalars), tiles, tile starts and ends.
  def count_body(i, counts):
    *_, g = load_groups(i)
    return tuple(c + jnp.sum((g == e).astype(jnp.int32)) for e, c in zip(groups, counts))

  counts = jax.lax.fori_loop(0, pl.cdiv(T, ct), count_body, tuple(jnp.int32(0) for _ in groups))
  tiles = [(c + rt - 1) // rt for c in counts]
  tile_end, total = [], jnp.int32(0)
  for t in tiles:
    total = total + t
    tile_end.append(total)
  tile_start = [end - t for end, t in zip(tile_end, tiles)]

  # 2. ranks, positions, token ids scattered to their rows.
  def rank_body(i, seen):
    t, ok, t_out, g = load_groups(i)
    pos = jnp.zeros((ct,), jnp.int32)
    new_seen = []
    for e in groups:
      mine = (g == e).astype(jnp.int32)
      pos = pos + mine * (tile_start[e] * rt + seen[e] + jnp.cumsum(mine) - 1)
      new_seen.append(seen[e] + jnp.sum(mine))
    pltriton.store(pos_ref.at[t_out], pos, mask=ok)
    pltriton.store(row_token_ref.at[jnp.where(ok, pos, P)], t, mask=ok)
    return tuple(new_seen)

  jax.lax.fori_loop(0, pl.cdiv(T, ct), rank_body, tuple(jnp.int32(0) for _ in groups))

  def group_of_tile(r):
    """Group of each row tile (E past the last group), as make_layout: how many groups end at or before it."""
    return sum((r >= end).astype(jnp.int32) for end in tile_end)

  # 3. rows no token lands on -> T; the group of every row tile.
  def pad_body(i, carry):
    p, ok, _ = span(i, cp, P)
    g = group_of_tile(p // rt)
    kept = jnp.zeros((cp,), jnp.bool_)
    for e in groups:
      kept = kept | ((g == e) & (p - tile_start[e] * rt < counts[e]))
    empty = ok & jnp.logical_not(kept)
    pltriton.store(row_token_ref.at[jnp.where(empty, p, P)], jnp.full((cp,), T, jnp.int32), mask=empty)
    return carry

  jax.lax.fori_loop(0, pl.cdiv(P, cp), pad_body, 0)

  def tile_body(i, carry):
    r, ok, r_out = span(i, cr, R)
    pltriton.store(tile_group_ref.at[r_out], group_of_tile(r), mask=ok)
    return carry

  jax.lax.fori_loop(0, pl.cdiv(R, cr), tile_body, 0)

  # Per-group outputs: E lanes of a power-of-two vector; the padding lanes point past the end (Triton never touches
  # masked lanes, and the interpreter's scatter drops out-of-range ones, where an in-range dummy index could
  # overwrite a real lane's store).
  Ep = _pow2(E)
  e_vec = _iota(Ep)
  lanes = e_vec < E
  for ref, values in ((tile_start_ref, tile_start), (tiles_ref, tiles), (counts_ref, counts)):
    vec = sum(jnp.where(e_vec == e, v, 0) for e, v in zip(groups, values))
    pltriton.store(ref.at[jnp.where(lanes, e_vec, E)], vec, mask=lanes)


def make_layout_arrays(groups_T: jax.Array, num_groups: int, row_tile: int, num_rows: int, *,
                       num_warps: int = 16, interpret: bool = False):
  """``(pos_T, row_token_P, tile_group_R, tile_start_E, tiles_E, counts_E)`` of :func:`layout.make_layout`."""
  T = groups_T.shape[0]
  E, rt, P = num_groups, row_tile, num_rows
  R = P // rt
  i32 = jnp.int32
  out_shape = [jax.ShapeDtypeStruct((T,), i32), jax.ShapeDtypeStruct((P,), i32), jax.ShapeDtypeStruct((R,), i32),
               jax.ShapeDtypeStruct((E,), i32), jax.ShapeDtypeStruct((E,), i32), jax.ShapeDtypeStruct((E,), i32)]
  whole = lambda n: pl.BlockSpec((n,), lambda i: (0,))
  kernel = functools.partial(_layout_kernel, T=T, E=E, rt=rt, P=P, R=R, ct=_chunk(T), cp=_chunk(P, 4096),
                             cr=_chunk(R, 1024))
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(1,), in_specs=[whole(T)],
      out_specs=[whole(T), whole(P), whole(R), whole(E), whole(E), whole(E)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="jsparse_group_layout",
  )(groups_T.astype(i32))
