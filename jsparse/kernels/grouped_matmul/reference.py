"""Pure-jnp grouped GEMMs: the spec, the CPU path and the test oracle of ``pallas.py``.

Rows come in tiles of ``row_tile``; tile r belongs to group ``tile_group[r]`` (``== num_groups``: unused, output 0).
The right-hand side is one 2-D weight whose group blocks are contiguous along ``group_axis``:

* ``group_axis="n"``: rhs is ``[K, E*N]`` (``[E*N, K]`` with ``transpose_rhs``); group g uses columns ``g*N:(g+1)*N``.
* ``group_axis="k"``: rhs is ``[E*K, N]`` (``[N, E*K]`` with ``transpose_rhs``); group g uses rows ``g*K:(g+1)*K``.

Epilogues (applied to the float32 accumulator ``acc`` before the cast to the lhs dtype):

* ``None``: ``acc``;
* ``"square_relu"``: ``relu(acc)**2`` (the routed FFN's activation);
* ``"square_relu_grad"``: ``2 * sqrt(aux) * acc`` with ``aux = relu(y)**2`` saved by the forward, i.e. the
  squared-ReLU derivative ``2 relu(y) * acc`` without keeping ``y``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPILOGUES = (None, "square_relu", "square_relu_grad")


def apply_epilogue(acc: jax.Array, epilogue: str | None, aux: jax.Array | None) -> jax.Array:
  if epilogue == "square_relu":
    return jnp.square(jnp.maximum(acc, 0.0))
  if epilogue == "square_relu_grad":
    return acc * 2.0 * jnp.sqrt(aux.astype(jnp.float32))
  return acc


def _blocks(rhs: jax.Array, num_groups: int, group_axis: str, transpose_rhs: bool) -> jax.Array:
  """All group operands as one (E, K, N) array."""
  b = rhs.T if transpose_rhs else rhs
  E = num_groups
  if group_axis == "n":
    K, n_total = b.shape
    return b.reshape(K, E, n_total // E).transpose(1, 0, 2)
  k_total, N = b.shape
  return b.reshape(E, k_total // E, N)


def grouped_matmul(lhs_PxK: jax.Array, rhs: jax.Array, tile_group_R: jax.Array, *, num_groups: int, group_axis: str,
                   transpose_rhs: bool, epilogue: str | None = None, aux_PxN: jax.Array | None = None) -> jax.Array:
  """``out[rows of tile r] = epilogue(lhs[rows] @ B_{tile_group[r]})``; unused tiles give 0. f32 accumulation.

  Written for clarity, not speed: every row is multiplied by every group's block (E x the work), then each row keeps
  its own group's product.
  """
  P = lhs_PxK.shape[0]
  row_tile = P // tile_group_R.shape[0]
  row_group_P = jnp.repeat(tile_group_R, row_tile, total_repeat_length=P)
  y_ExPxN = jnp.einsum("pk,ekn->epn", lhs_PxK, _blocks(rhs, num_groups, group_axis, transpose_rhs),
                       preferred_element_type=jnp.float32)
  out = jnp.take_along_axis(y_ExPxN, jnp.minimum(row_group_P, num_groups - 1)[None, :, None], axis=0)[0]
  out = apply_epilogue(out, epilogue, aux_PxN)
  out = jnp.where((row_group_P < num_groups)[:, None], out, 0.0)
  return out.astype(lhs_PxK.dtype)


def row_groups(group_tile_start_E: jax.Array, group_tiles_E: jax.Array, num_rows: int, row_tile: int) -> jax.Array:
  """int32 (P,): the group of each row (``num_groups`` outside every group's range)."""
  E = group_tile_start_E.shape[0]
  tile_R = jnp.arange(num_rows, dtype=jnp.int32) // row_tile
  inside = (tile_R[:, None] >= group_tile_start_E[None, :]) & (
      tile_R[:, None] < (group_tile_start_E + group_tiles_E)[None, :])
  return jnp.where(inside.any(axis=1), jnp.argmax(inside, axis=1), E).astype(jnp.int32)


def grouped_matmul_t(lhs_PxM: jax.Array, rhs_PxN: jax.Array, group_tile_start_E: jax.Array,
                     group_tiles_E: jax.Array, *, row_tile: int, group_axis: str) -> jax.Array:
  """Per group g, ``lhs[rows_g].T @ rhs[rows_g]``, laid side by side: ``[M, E*N]`` ("n") or ``[E*M, N]`` ("m")."""
  E = group_tile_start_E.shape[0]
  M, N = lhs_PxM.shape[1], rhs_PxN.shape[1]
  rg = row_groups(group_tile_start_E, group_tiles_E, lhs_PxM.shape[0], row_tile)
  onehot_PxE = (rg[:, None] == jnp.arange(E, dtype=jnp.int32)[None, :]).astype(lhs_PxM.dtype)
  out_ExMxN = jnp.einsum("pe,pm,pn->emn", onehot_PxE, lhs_PxM, rhs_PxN, preferred_element_type=jnp.float32)
  if group_axis == "n":
    out = out_ExMxN.transpose(1, 0, 2).reshape(M, E * N)
  else:
    out = out_ExMxN.reshape(E * M, N)
  return out.astype(lhs_PxM.dtype)
