"""The plain-XLA routed FFN paths: padded ``einsum`` (the CPU default) and ``jax.lax.ragged_dot``.

Both take the weights already in the router's neuron order (``w1g_DxF``: group g = columns ``g*F/E:(g+1)*F/E``,
``w2g_FxD`` likewise by rows) and differentiate by autodiff.

* **Padded einsum**: every group gets ``capacity`` token slots (a static multiple of ``row_tile``); tokens are gathered
  into ``[E, capacity, D]``, multiplied by ``[E, D, F/E]`` and ``[E, F/E, D]`` batched GEMMs and gathered back. Exact
  when ``capacity`` >= the largest group (``capacity = T``, the default, is always exact but costs a dense FFN); a
  token ranked past ``capacity`` in its group is dropped (output 0), as in capacity-limited MoE layers.
* **ragged_dot**: tokens sorted by group without padding, two ``lax.ragged_dot`` calls. No V:N:M (its blocks need
  the tile-aligned layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.kernels.routed_ffn import layout as lay
from jsparse.kernels.routed_ffn import reference as ref


def routed_ffn_einsum(x_TxD: jax.Array, w1g_DxF: jax.Array, w2g_FxD: jax.Array, groups_T: jax.Array,
                      num_groups: int, capacity: int, *, vnm=None) -> jax.Array:
  T, D = x_TxD.shape
  F = w1g_DxF.shape[1]
  E, C = num_groups, capacity
  Fe = F // E
  dtype = x_TxD.dtype
  groups_T = groups_T.astype(jnp.int32)
  rank_T, _ = lay._counting_sort(groups_T, E)
  slot_T = jnp.where(rank_T < C, groups_T * C + rank_T, E * C)  # E*C: dropped
  token_of_slot = jnp.full((E * C,), T, jnp.int32).at[slot_T].set(jnp.arange(T, dtype=jnp.int32), mode="drop")
  x_ExCxD = lay.move_rows(x_TxD, token_of_slot, slot_T).reshape(E, C, D)
  w1_ExDxF = w1g_DxF.astype(dtype).reshape(D, E, Fe).transpose(1, 0, 2)
  y = jnp.einsum("ecd,edf->ecf", x_ExCxD, w1_ExDxF, preferred_element_type=jnp.float32)
  h = jnp.square(jax.nn.relu(y)).astype(dtype)
  if vnm is not None:
    h2 = h.reshape(E * C, Fe)
    h = jnp.where(ref.vnm_keep_rows(h2, vnm), h2, jnp.zeros((), dtype)).reshape(E, C, Fe)
  out = jnp.einsum("ecf,efd->ecd", h, w2g_FxD.astype(dtype).reshape(E, Fe, D), preferred_element_type=jnp.float32)
  out = out.astype(dtype).reshape(E * C, D)
  return lay.move_rows(out, slot_T, token_of_slot)


def routed_ffn_ragged(x_TxD: jax.Array, w1g_DxF: jax.Array, w2g_FxD: jax.Array, groups_T: jax.Array,
                      num_groups: int) -> jax.Array:
  T, D = x_TxD.shape
  F = w1g_DxF.shape[1]
  E = num_groups
  Fe = F // E
  dtype = x_TxD.dtype
  pos_T, order_T, counts_E = lay.contiguous_order(groups_T, E)
  xs = lay.move_rows(x_TxD, order_T, pos_T)
  w1_ExDxF = w1g_DxF.astype(dtype).reshape(D, E, Fe).transpose(1, 0, 2)
  y = jax.lax.ragged_dot(xs, w1_ExDxF, counts_E, preferred_element_type=jnp.float32)
  h = jnp.square(jax.nn.relu(y)).astype(dtype)
  out = jax.lax.ragged_dot(h, w2g_FxD.astype(dtype).reshape(E, Fe, D), counts_E, preferred_element_type=jnp.float32)
  return lay.move_rows(out.astype(dtype), pos_T, order_T)
