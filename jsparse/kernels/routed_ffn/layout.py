"""Token layouts of the routed FFN: where each token sits once tokens are grouped by their routed group.

* **Padded** (the grouped-GEMM kernels and the padded einsum): tokens sorted by group (stable), every group starting
  on a ``row_tile`` boundary and padded with zero rows to a multiple of ``row_tile``. ``P`` (static) is the worst case
  ``round_up(T + E (row_tile - 1), row_tile)``, so every row tile belongs to exactly one group (or is unused) and the
  kernels never mask rows. The padding costs at most ``E (row_tile - 1)`` rows of compute (<= 6% at T=16384, E=8).
* **Contiguous** (``jax.lax.ragged_dot``): the same order without padding.

Positions come from a counting sort (a ``[T, E]`` cumulative sum), not a comparison sort. Moving rows in and out of a
layout is a gather whose transpose is the gather by the inverse map (``custom_vjp``), so the backward never emits a
scatter-add. The moves into the layout can run on the Pallas row-gather kernel (``gather="pallas"``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jsparse.kernels import _common as common
from jsparse.kernels.gather_rows import api as gather_api
from jsparse.kernels.routed_ffn import layout_pallas


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupLayout:
  """A padded group layout (all arrays int32).

  Attributes:
    pos_T: row of each token.
    row_token_P: token of each row (``T`` for padding rows).
    tile_group_R: group of each ``row_tile``-row tile (``E`` for unused tiles).
    tile_start_E: first tile of each group. tiles_E: tiles of each group (0 for an empty group).
    counts_E: tokens routed to each group.
    row_tile, num_groups: static.
  """

  pos_T: jax.Array
  row_token_P: jax.Array
  tile_group_R: jax.Array
  tile_start_E: jax.Array
  tiles_E: jax.Array
  counts_E: jax.Array
  row_tile: int = dataclasses.field(metadata=dict(static=True))
  num_groups: int = dataclasses.field(metadata=dict(static=True))

  @property
  def num_rows(self) -> int:
    return self.row_token_P.shape[0]


def padded_rows(num_tokens: int, num_groups: int, row_tile: int) -> int:
  """Static row count P of the padded layout."""
  worst = num_tokens + num_groups * (row_tile - 1)
  return -(-worst // row_tile) * row_tile


def _counting_sort(groups_T: jax.Array, num_groups: int):
  """Rank of each token inside its group (stable) and the group counts."""
  onehot_TxE = (groups_T[:, None] == jnp.arange(num_groups, dtype=jnp.int32)[None, :]).astype(jnp.int32)
  csum_TxE = jnp.cumsum(onehot_TxE, axis=0)
  rank_T = jnp.take_along_axis(csum_TxE, groups_T[:, None], axis=1)[:, 0] - 1
  return rank_T, csum_TxE[-1]


LAYOUT_IMPLEMENTATIONS = ("xla", "pallas")


def make_layout(groups_T: jax.Array, num_groups: int, row_tile: int, implementation: str = "xla") -> GroupLayout:
  """The padded layout of tokens routed to ``groups_T`` (int (T,), values in [0, num_groups)).

  ``implementation="pallas"`` builds the same arrays in one Triton kernel (:mod:`layout_pallas`) instead of XLA's
  handful of small fusions.
  """
  if implementation not in LAYOUT_IMPLEMENTATIONS:
    raise ValueError(f"make_layout: implementation must be one of {LAYOUT_IMPLEMENTATIONS}, got {implementation!r}")
  T = groups_T.shape[0]
  E = num_groups
  groups_T = groups_T.astype(jnp.int32)
  if implementation == "pallas":
    arrays = layout_pallas.make_layout_arrays(groups_T, E, row_tile, padded_rows(T, E, row_tile),
                                              interpret=common.interpret_enabled())
    return GroupLayout(*arrays, row_tile, E)
  rank_T, counts_E = _counting_sort(groups_T, E)
  tiles_E = (counts_E + row_tile - 1) // row_tile
  tile_end_E = jnp.cumsum(tiles_E)
  tile_start_E = tile_end_E - tiles_E
  pos_T = tile_start_E[groups_T] * row_tile + rank_T
  P = padded_rows(T, E, row_tile)
  row_token_P = jnp.full((P,), T, jnp.int32).at[pos_T].set(jnp.arange(T, dtype=jnp.int32), unique_indices=True)
  tile_R = jnp.arange(P // row_tile, dtype=jnp.int32)
  tile_group_R = jnp.sum(tile_R[:, None] >= tile_end_E[None, :], axis=1).astype(jnp.int32)  # E past the last group
  return GroupLayout(pos_T.astype(jnp.int32), row_token_P, tile_group_R, tile_start_E.astype(jnp.int32),
                     tiles_E.astype(jnp.int32), counts_E.astype(jnp.int32), row_tile, E)


def contiguous_order(groups_T: jax.Array, num_groups: int):
  """(pos_T, order_T, counts_E): row of each token and token of each row when sorted by group without padding."""
  T = groups_T.shape[0]
  groups_T = groups_T.astype(jnp.int32)
  rank_T, counts_E = _counting_sort(groups_T, num_groups)
  start_E = jnp.cumsum(counts_E) - counts_E
  pos_T = (start_E[groups_T] + rank_T).astype(jnp.int32)
  order_T = jnp.zeros((T,), jnp.int32).at[pos_T].set(jnp.arange(T, dtype=jnp.int32), unique_indices=True)
  return pos_T, order_T, counts_E.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------------
# Row moves with gather-only gradients.

# How rows move: XLA's gather, the Triton row-gather kernel, or the Mosaic GPU bulk-copy one.
GATHER_IMPLEMENTATIONS = ("xla", "pallas", "pallas_tma")


def _take_rows(x, rows, impl: str):
  if impl == "pallas_tma":
    return gather_api.gather_rows(x, rows, implementation="pallas", config=gather_api.TmaGatherConfig())
  return gather_api.gather_rows(x, rows, implementation=impl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def move_rows(x_SxD: jax.Array, src_of_dest: jax.Array, dest_of_src: jax.Array, fwd_impl: str = "xla",
              bwd_impl: str = "xla") -> jax.Array:
  """``x[src_of_dest]`` with zero rows where the index is out of range.

  ``dest_of_src`` is the inverse map (the output row of every source row, out of range if dropped); the gradient is
  the gather ``g[dest_of_src]``, valid because every source row lands in at most one output row. The integer maps get
  no gradient. ``fwd_impl`` / ``bwd_impl``: the :func:`jsparse.kernels.gather_rows.api.gather_rows` implementation of
  the forward and of the gradient gather.
  """
  return _take_rows(x_SxD, src_of_dest, fwd_impl)


def _move_fwd(x, src_of_dest, dest_of_src, fwd_impl, bwd_impl):
  return _take_rows(x, src_of_dest, fwd_impl), dest_of_src


def _move_bwd(fwd_impl, bwd_impl, dest_of_src, g):
  return _take_rows(g, dest_of_src, bwd_impl), None, None


move_rows.defvjp(_move_fwd, _move_bwd)


def _check_gather(gather: str) -> str:
  if gather not in GATHER_IMPLEMENTATIONS:
    raise ValueError(f"gather must be one of {GATHER_IMPLEMENTATIONS}, got {gather!r}")
  return gather


def to_padded(x_TxD: jax.Array, layout: GroupLayout, gather: str = "xla") -> jax.Array:
  """(P, D): tokens in layout order, zero rows for padding.

  ``gather="pallas"`` / ``"pallas_tma"`` moves the rows with a Pallas gather kernel (Triton / Mosaic GPU bulk
  copies); only the move *into* the layout does (here the forward; in :func:`from_padded` the gradient's): its
  consumer is a grouped-GEMM kernel anyway, while a move back to token order stays an XLA gather that XLA can fuse
  into its consumer (the residual add, the loss).
  """
  return move_rows(x_TxD, layout.row_token_P, layout.pos_T, _check_gather(gather), "xla")


def from_padded(y_PxD: jax.Array, layout: GroupLayout, gather: str = "xla") -> jax.Array:
  """(T, D): rows back in token order (``gather``: as in :func:`to_padded`, used by the gradient's move)."""
  return move_rows(y_PxD, layout.pos_T, layout.row_token_P, "xla", _check_gather(gather))
