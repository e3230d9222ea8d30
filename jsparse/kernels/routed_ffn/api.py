"""Public routed (neuron-grouped) squared-ReLU FFN (Madhyastha et al. 2026): ``routed_ffn``."""

from __future__ import annotations


import functools

import jax
import jax.numpy as jnp

from jsparse import router as rt
from jsparse.kernels import _common as common
from jsparse.kernels.grouped_matmul import api as gmm_api
from jsparse.kernels.routed_ffn import baselines
from jsparse.kernels.routed_ffn import grouped
from jsparse.kernels.routed_ffn import layout as lay
from jsparse.kernels.routed_ffn import reference as ref
from jsparse.kernels.vnm import reference as vnm_ref

IMPLEMENTATIONS = (None, "xla", "einsum", "ragged_dot", "pallas")
KERNEL_ROW_TILES = (64, 128)


# ----------------------------------------------------------------------------------------------------------------------
# Neuron permutation of the weights, with gather-only gradients.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _take_neurons(w, perm_F, inv_F, axis):
  """``take(w, perm_F, axis)`` whose gradient is the inverse gather (not a scatter-add)."""
  return jnp.take(w, perm_F, axis=axis, unique_indices=True)


def _take_neurons_fwd(w, perm, inv, axis):
  return _take_neurons(w, perm, inv, axis), inv


def _take_neurons_bwd(axis, inv, g):
  return jnp.take(g, inv, axis=axis, unique_indices=True), None, None


_take_neurons.defvjp(_take_neurons_fwd, _take_neurons_bwd)


def group_weights(w1_DxF: jax.Array, w2_FxD: jax.Array, perm_F: jax.Array) -> tuple[jax.Array, jax.Array]:
  """W1's columns and W2's rows in router order (group g contiguous); the gradient is gathered back."""
  inv_F = jnp.zeros_like(perm_F).at[perm_F].set(jnp.arange(perm_F.shape[0], dtype=perm_F.dtype))
  return _take_neurons(w1_DxF, perm_F, inv_F, 1), _take_neurons(w2_FxD, perm_F, inv_F, 0)


# ----------------------------------------------------------------------------------------------------------------------
# Validation.


def _check_vnm(op: str, vnm, group_size: int, row_tile: int):
  if vnm is None:
    return None
  if not (isinstance(vnm, tuple) and len(vnm) == 3 and all(isinstance(a, int) for a in vnm)):
    raise ValueError(f"{op}: vnm must be None or a tuple of 3 ints (v, n, m), got {vnm!r}")
  v, n, m = vnm
  if v < 1 or row_tile % v:
    raise ValueError(f"{op}: vnm v={v} must divide row_tile={row_tile} (a V-row block must not straddle groups)")
  if m < vnm_ref.SELECTED_COLUMNS or not 1 <= n <= vnm_ref.SELECTED_COLUMNS - 1:
    raise ValueError(f"{op}: vnm needs m >= {vnm_ref.SELECTED_COLUMNS} and 1 <= n <= 3, got n={n}, m={m}")
  if group_size % m:
    raise ValueError(f"{op}: vnm m={m} must divide the group size F/E={group_size}")
  return vnm


def _pallas_support(x_dtype, D: int, group_size: int, row_tile: int) -> tuple[bool, str]:
  if jnp.dtype(x_dtype) not in gmm_api.KERNEL_DTYPES:
    return False, f"the grouped-GEMM kernel takes bfloat16/float16 activations, got {jnp.dtype(x_dtype)}"
  if D % 128:
    return False, f"D={D} is not a multiple of 128"
  if group_size % 128:
    return False, f"F/E={group_size} is not a multiple of 128"
  if row_tile not in KERNEL_ROW_TILES:
    return False, f"row_tile={row_tile} is not one of {KERNEL_ROW_TILES}"
  return True, ""


def _resolve(op: str, implementation, ok: bool, why: str) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation in ("xla", "einsum", "ragged_dot"):
    return implementation
  if implementation == "pallas":
    return common.resolve_implementation(op, "pallas", pallas_supports=ok, why_not=why)
  return "pallas" if (common.on_gpu() and ok) else "einsum"


def routed_ffn(x: jax.Array, w1_DxF: jax.Array, w2_FxD: jax.Array, state: rt.RouterState,
               config: rt.RouterConfig, *, groups: jax.Array | None = None,
               vnm: tuple[int, int, int] | None = None, row_tile: int = 128, capacity: int | None = None,
               weights_grouped: bool = False, implementation: str | None = None, gather: str = "xla",
               layout: str = "xla") -> jax.Array:
  """Routed squared-ReLU FFN: each token uses only its group's F/E neurons.

  ``out_t = relu(x_t @ W1[:, G])^2 @ W2[G, :]`` with ``G`` the neurons of the token's group (router state), i.e. the
  masked-dense FFN computed as grouped GEMMs over (token group g, neuron group g) tiles. Differentiable in x, w1, w2
  (the routing itself has no gradient).

  Args:
    x: (..., D) tokens (bfloat16/float16 for the GPU kernel; the weights are cast to x's dtype).
    w1_DxF, w2_FxD: FFN weights in their original neuron order (or in router order with ``weights_grouped``).
    state: :class:`jsparse.RouterState` (centroids, neuron permutation). config: its :class:`jsparse.RouterConfig`.
    groups: optional int (...,) group of every token; default :func:`jsparse.route_tokens` (x, state, config).
    vnm: optional ``(v, n, m)``: V:N:M-prune each token's group activations (blocks of v consecutive routed tokens;
      see ``routed_ffn/reference.py``). A quality/format option: in JAX on Hopper the second GEMM still runs on dense
      tensor cores, so it saves no time.
    row_tile: token rows per tile of the padded group layout (groups start on multiples of it); the kernel takes 64
      or 128.
    capacity: ``"einsum"`` only: token slots per group (a multiple of row_tile; default T rounded up = exact). Tokens
      past it are dropped.
    weights_grouped: w1's columns / w2's rows are already in router order (the caller permuted its parameters, and
      their optimizer state, when it re-clustered), which skips the per-step weight permutation.
    implementation: ``None`` (the grouped-GEMM kernel on a GPU where supported, else ``"einsum"``), ``"pallas"``,
      ``"einsum"`` (padded batched GEMMs), ``"ragged_dot"`` (``jax.lax.ragged_dot``) or ``"xla"`` (the masked-dense
      reference: T x F work).
    gather: ``"pallas"`` path only: how tokens move into the group layout (the forward's ``x`` and the backward's
      ``dOut``): ``"xla"`` (a ``jnp.take``, the default until a Pallas kernel is measured faster on the H100),
      ``"pallas"`` or ``"pallas_tma"`` (:func:`jsparse.kernels.gather_rows.api.gather_rows`, Triton or Mosaic GPU
      bulk-copy engine). Moves back to token order are always XLA gathers, which XLA fuses into their consumers.
    layout: ``"pallas"`` path only: how the group layout (rows of tokens, tile groups) is built: ``"xla"`` (small
      XLA fusions, the default until the kernel is measured faster) or ``"pallas"`` (one Triton kernel).

  Returns:
    Array shaped like x.

  Raises:
    ValueError: bad shapes/dtypes, F not splitting into E groups of a multiple of ``config.block``, a state that does
      not match, a bad vnm/capacity/row_tile/gather/layout, vnm with ``"ragged_dot"``, or an explicit ``"pallas"``
      that cannot run.
  """
  op = "routed_ffn"
  common.check_floating(op, "x", x)
  common.check_rank(op, "x", x, 2)
  common.check_rank(op, "w1", w1_DxF, 2, 2)
  common.check_rank(op, "w2", w2_FxD, 2, 2)
  D = x.shape[-1]
  F = w1_DxF.shape[1]
  if w1_DxF.shape[0] != D or w2_FxD.shape != (F, D):
    raise ValueError(f"{op}: need x (..., D), w1 (D, F), w2 (F, D); got x{tuple(x.shape)}, w1{tuple(w1_DxF.shape)}, "
                     f"w2{tuple(w2_FxD.shape)}")
  Fe = config.group_size(F)
  E = config.num_groups
  if state.centroids_ExD.shape != (E, D) or state.perm_F.shape != (F,):
    raise ValueError(f"{op}: router state has centroids {tuple(state.centroids_ExD.shape)} and perm "
                     f"{tuple(state.perm_F.shape)}, expected {(E, D)} and {(F,)}")
  if not isinstance(row_tile, int) or row_tile < 1:
    raise ValueError(f"{op}: row_tile must be a positive int, got {row_tile!r}")
  vnm = _check_vnm(op, vnm, Fe, row_tile)
  lead = x.shape[:-1]
  x_TxD = x.reshape(-1, D)
  T = x_TxD.shape[0]
  if groups is None:
    groups_T = rt.route_tokens(x_TxD, state, config)
  else:
    if tuple(groups.shape) != tuple(lead) or not jnp.issubdtype(groups.dtype, jnp.integer):
      raise ValueError(f"{op}: groups must be an int array of shape {tuple(lead)}, got {groups.dtype}{groups.shape}")
    groups_T = groups.reshape(-1).astype(jnp.int32)
  ok, why = _pallas_support(x.dtype, D, Fe, row_tile)
  impl = _resolve(op, implementation, ok, why)
  if impl == "ragged_dot" and vnm is not None:
    raise ValueError(f"{op}: vnm needs the tile-aligned group layout; use implementation 'pallas', 'einsum' or 'xla'")
  if capacity is not None and impl != "einsum":
    raise ValueError(f"{op}: capacity only applies to implementation='einsum', got {impl!r}")
  if gather not in lay.GATHER_IMPLEMENTATIONS:
    raise ValueError(f"{op}: gather must be one of {lay.GATHER_IMPLEMENTATIONS}, got {gather!r}")
  if gather != "xla" and impl != "pallas":
    raise ValueError(f"{op}: gather={gather!r} applies to the grouped-GEMM path only, not implementation={impl!r}")
  if layout not in lay.LAYOUT_IMPLEMENTATIONS:
    raise ValueError(f"{op}: layout must be one of {lay.LAYOUT_IMPLEMENTATIONS}, got {layout!r}")
  if layout != "xla" and impl != "pallas":
    raise ValueError(f"{op}: layout={layout!r} applies to the grouped-GEMM path only, not implementation={impl!r}")

  if impl == "xla":
    perm = jnp.arange(F, dtype=jnp.int32) if weights_grouped else state.perm_F
    out = ref.routed_ffn_reference(x_TxD, w1_DxF, w2_FxD, perm, groups_T, E, vnm=vnm, row_tile=row_tile)
    return out.reshape(x.shape)

  if weights_grouped:
    w1g, w2g = w1_DxF, w2_FxD
  else:
    w1g, w2g = group_weights(w1_DxF, w2_FxD, state.perm_F)
  if impl == "einsum":
    cap = -(-T // row_tile) * row_tile if capacity is None else capacity
    if not isinstance(cap, int) or cap < 1 or cap % row_tile:
      raise ValueError(f"{op}: capacity must be a positive multiple of row_tile={row_tile}, got {capacity!r}")
    out = baselines.routed_ffn_einsum(x_TxD, w1g, w2g, groups_T, E, cap, vnm=vnm)
  elif impl == "ragged_dot":
    out = baselines.routed_ffn_ragged(x_TxD, w1g, w2g, groups_T, E)
  else:
    out = _grouped_path(x_TxD, w1g, w2g, groups_T, E, row_tile, vnm, "pallas", gather, layout)
  return out.reshape(x.shape)


def _grouped_path(x_TxD, w1g_DxF, w2g_FxD, groups_T, num_groups, row_tile, vnm, gemm_impl, gather="xla",
                  layout_impl="xla"):
  """Layout, grouped GEMMs, back to token order (also run with the reference GEMMs by the tests)."""
  layout = lay.make_layout(groups_T, num_groups, row_tile, layout_impl)
  x_PxD = lay.to_padded(x_TxD, layout, gather)
  spec = grouped.GroupedSpec(num_groups, row_tile, vnm, gemm_impl)
  dtype = x_TxD.dtype
  out_PxD = grouped.grouped_ffn(x_PxD, w1g_DxF.astype(dtype), w2g_FxD.astype(dtype), layout.tile_group_R,
                                layout.tile_start_E, layout.tiles_E, spec)
  return lay.from_padded(out_PxD, layout, gather)
