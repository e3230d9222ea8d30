"""Masked-dense reference of the routed squared-ReLU FFN: the spec and the test oracle (T x F work, no savings).

``out_t = sum_{f in group(t)} keep_tf * relu(x_t . w1_f)^2 * w2_f``: the dense FFN with every neuron outside the
token's group masked off. Precision follows the kernels: pre-activations accumulate in float32, the activation is
rounded to the compute dtype, the second product accumulates in float32.

**V:N:M option** (``vnm=(v, n, m)``): on top of the group mask, each token's group activations (its F/E neurons, in
the router's neuron order) are V:N:M-pruned (:func:`jsparse.vnm_mask`) with blocks of ``v`` consecutive tokens of the
padded group layout (``layout.py``: tokens sorted by group, each group starting on a ``row_tile`` boundary, so a
block never mixes groups; ``v`` must divide ``row_tile``). The pattern is chosen on the activation magnitudes and the
gradient flows through the kept entries only (gradient mode ``"masked"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.kernels.routed_ffn import layout as lay
from jsparse.kernels.vnm import reference as vnm_ref


def vnm_keep_rows(h_RxC: jax.Array, vnm: tuple[int, int, int]) -> jax.Array:
  """Bool V:N:M pattern of an activation block (chosen on magnitudes, no gradient)."""
  v, n, m = vnm
  return vnm_ref.vnm_mask(jax.lax.stop_gradient(h_RxC), v, n, m)


def routed_ffn_reference(x_TxD: jax.Array, w1_DxF: jax.Array, w2_FxD: jax.Array, perm_F: jax.Array,
                         groups_T: jax.Array, num_groups: int, *, vnm: tuple[int, int, int] | None = None,
                         row_tile: int = 128) -> jax.Array:
  """(T, D) routed FFN output, computed densely and masked (see the module docstring)."""
  T = x_TxD.shape[0]
  F = w1_DxF.shape[1]
  E = num_groups
  Fe = F // E
  dtype = x_TxD.dtype
  neuron_group_F = jnp.zeros((F,), jnp.int32).at[perm_F].set(jnp.arange(F, dtype=jnp.int32) // Fe)
  inside_TxF = neuron_group_F[None, :] == groups_T[:, None]
  y_TxF = jnp.dot(x_TxD, w1_DxF.astype(dtype), preferred_element_type=jnp.float32)
  h_TxF = jnp.where(inside_TxF, jnp.square(jax.nn.relu(y_TxF)), 0.0).astype(dtype)
  if vnm is not None:
    # Each token's group block in router order, in the padded layout, V:N:M-selected, mapped back to [T, F].
    h_sel_TxFe = jnp.take_along_axis(h_TxF[:, perm_F].reshape(T, E, Fe), groups_T[:, None, None], axis=1)[:, 0]
    layout = lay.make_layout(groups_T, E, row_tile)
    keep_P = vnm_keep_rows(lay.to_padded(h_sel_TxFe, layout), vnm)
    keep_sel_TxFe = jnp.take(keep_P, layout.pos_T, axis=0)
    keep_perm_TxF = ((jnp.arange(E)[None, :, None] == groups_T[:, None, None]) & keep_sel_TxFe[:, None, :])
    keep_TxF = jnp.zeros((T, F), bool).at[:, perm_F].set(keep_perm_TxF.reshape(T, F))
    h_TxF = jnp.where(keep_TxF, h_TxF, jnp.zeros((), dtype))
  out = jnp.dot(h_TxF, w2_FxD.astype(dtype), preferred_element_type=jnp.float32)
  return out.astype(dtype)
