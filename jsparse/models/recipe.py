"""The sparse squared-ReLU FFN as one functional ``custom_vjp``: Haziza et al.'s 2:4 activation recipe, S-STE weights.

Notation: ``x_TxD`` tokens, ``w1_DxF``, ``w2_FxD``; ``y1 = x W1``, ``h = relu(y1)^2``, ``out = h W2``.

Forward (activation sparsity ``"2:4"``): ``y1`` is pruned 2:4 along F *before* the squared ReLU, keeping the two
largest (signed) pre-activations of every four (``jsparse.squared_relu_nm``), so ``h`` is a 2:4 operand of the second
GEMM. The one T x F residual is ``r = relu(y1) * mask`` (itself 2:4-sparse).

Backward -- exactly the recipe (``lingua/transformer.py::_FFNSRelu.backward_sp`` in the paper authors' fork):

==========================  =====================================================================================
``dy2 = dout W2^T``          dense
``dy1 = 2 dy2 * r``          the forward mask is reused: dy1 is zero wherever the forward dropped y1 (ablation
                             ``reuse_mask_in_backward=False``: ``r`` is the unmasked relu(y1))
``dx  = dy1 W1^T``           2:4 along F (dy1 already is, with the mask reused; otherwise it is pruned by |.|)
``dW2 = h^T dout``           token-wise 2:4 (along T) on the sparsest features, dense on the densest
``dW1 = x^T dy1``            ``dense_fraction`` (the "95/5 split"; count rounded to ``dense_multiple``)
==========================  =====================================================================================

Tokens are shuffled first (``perm``) so that a 2:4 group along T takes four unrelated tokens rather than four
neighbours; the shuffle only matters to the backward, so the primal (inference) path skips it.

Weight sparsity ``"2:4-sste"`` enters as already soft-thresholded weights (``sste.py``); here it only decides which
GEMM operand is 2:4: W1 and W2 are 2:4 along their contraction (first) axis, so the two forward GEMMs are sparse;
their transposes in ``dy2``/``dx`` are not (2:4 runs along the wrong axis) and stay dense.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import jsparse
from jsparse.kernels.activation import reference as act_ref
from jsparse.models import _ops
from jsparse.models.config import FFNConfig


@dataclasses.dataclass(frozen=True)
class RecipeSpec:
  """The static part of one FFN call (hashable; a ``custom_vjp`` non-differentiable argument)."""

  activation_24: bool = True
  reuse_mask_in_backward: bool = True
  weight_grads_24: bool = True
  dense_fraction: float = 0.05
  dense_multiple: int = 128
  sparse_w1: bool = False
  sparse_w2: bool = False
  implementation: str | None = None
  stats: bool = True
  storage: str = "dense"  # the residual relu(y1): "dense", "24" or "bitmask" (see FFNConfig.residual_storage)
  capacity: float = 0.25  # bitmask values buffer, fraction of T x F
  split_strategy: str = "auto"  # "auto", "masked" (one GEMM on a pruned copy) or "overwrite" (see split_weight_grad)
  fused_activation: bool | None = None  # None: on the cuSPARSELt path (see _fused_activation); True/False: forced

  @classmethod
  def from_config(cls, config: FFNConfig, **changes) -> "RecipeSpec":
    spec = cls(activation_24=config.activation_24, reuse_mask_in_backward=config.reuse_mask_in_backward,
               weight_grads_24=config.weight_grads_24, dense_fraction=config.dense_fraction,
               dense_multiple=config.dense_multiple, sparse_w1=config.sparse_w1, sparse_w2=config.sparse_w2,
               implementation=config.implementation, stats=config.stats, storage=config.residual_storage,
               capacity=config.remat_capacity)
    return dataclasses.replace(spec, **changes)

  @property
  def op_impl(self) -> str | None:
    return _ops.op_implementation(self.implementation)

  @property
  def gemm_impl(self) -> str | None:
    return _ops.gemm_implementation(self.implementation)


# ----------------------------------------------------------------------------------------------------------------------
# The recipe's pieces (public for tests and for users building their own FFN).


def n_dense_features(d_ff: int, dense_fraction: float, multiple: int = 128) -> int:
  """How many features keep dense weight gradients: ``d_ff`` minus the sparse count.

  The sparse count is ``floor((1 - dense_fraction) * d_ff)`` rounded *up* to a multiple of ``multiple`` (capped at
  ``d_ff``), as in the reference code; so for d_ff=8192 and 5%, 7808 features are 2:4 along tokens and 384 dense.
  """
  n_sparse = int((1.0 - dense_fraction) * d_ff + 1e-9)
  n_sparse = -(-n_sparse // multiple) * multiple
  return d_ff - min(n_sparse, d_ff)


def feature_order(density_F: jax.Array) -> jax.Array:
  """Features from sparsest to densest (stable: equal densities keep index order)."""
  return jnp.argsort(density_F, stable=True)


def dense_feature_mask(density_F: jax.Array, n_dense: int) -> jax.Array:
  """Bool mask of the ``n_dense`` densest features (the ones whose weight-gradient rows stay dense)."""
  F = density_F.shape[0]
  order = feature_order(density_F)
  return jnp.zeros((F,), bool).at[order[F - n_dense:]].set(True)


def token_24(a_TxF: jax.Array, *, implementation: str | None = None) -> jax.Array:
  """2:4 along the token axis (axis 0) by magnitude: the sparse operand of a weight-gradient GEMM."""
  return jsparse.nm_prune(a_TxF, 2, 4, axis=0, implementation=implementation)


def permute_tokens(x_TxD: jax.Array, perm_T: jax.Array) -> jax.Array:
  """Rows of ``x`` in the order ``perm_T`` (a permutation of ``range(T)``)."""
  # In bounds by construction: jnp.take's default "fill" mode adds a select over the whole T x D output, which XLA
  # ran as a fusion of its own at about half of copy speed (0.19 ms for 16384 x 4096 bf16 on the H100, profiled).
  return x_TxD.at[perm_T].get(mode="promise_in_bounds", unique_indices=True)


def unpermute_tokens(y_TxD: jax.Array, perm_T: jax.Array) -> jax.Array:
  """Inverse of :func:`permute_tokens`: ``unpermute_tokens(permute_tokens(x, p), p) == x``.

  A gather through the inverse permutation (a scatter of T indices), not a scatter of the rows, which XLA ran as a
  fusion of its own at about half of copy speed (0.18 ms for 16384 x 4096 bf16 on the H100, profiled)."""
  T = perm_T.shape[0]
  inverse_T = jnp.zeros_like(perm_T).at[perm_T].set(jnp.arange(T, dtype=perm_T.dtype), unique_indices=True)
  return permute_tokens(y_TxD, inverse_T)


def split_weight_grad(lhs_TxA: jax.Array, rhs_TxF: jax.Array, density_F: jax.Array, n_dense: int, *,
                      strategy: str = "masked", op_impl: str | None = None,
                      gemm_impl: str | None = None) -> jax.Array:
  """``lhs^T rhs`` (A x F) with ``rhs`` 2:4 along T on all but the ``n_dense`` densest features.

  ``strategy="masked"`` prunes a copy of ``rhs`` and runs one GEMM (the XLA path). ``"overwrite"`` is the layout a
  2:4 kernel needs: one :func:`jsparse.sparse_tn_matmul` over *all* features, with ``rhs`` pruned along T while it is
  compressed (no separate pruning pass, no transposed copy, no column gather of a T x F matrix -- which XLA runs far
  below HBM speed), and the rows of the ``n_dense`` densest features recomputed densely and written over. The extra
  2:4 work on those rows is ``n_dense / F`` (5%) of one GEMM. Both strategies compute the same numbers.
  """
  T, F = rhs_TxF.shape
  if strategy not in ("masked", "overwrite"):
    raise ValueError(f"split_weight_grad: strategy must be 'masked' or 'overwrite', got {strategy!r}")
  if n_dense == F:
    return _ops.matmul(lhs_TxA.T, rhs_TxF, implementation=gemm_impl)
  if strategy == "masked":
    pruned_TxF = token_24(rhs_TxF, implementation=op_impl)
    if n_dense:
      dense_F = dense_feature_mask(density_F, n_dense)
      pruned_TxF = jnp.where(dense_F[None, :], rhs_TxF, pruned_TxF)
    return _ops.matmul(lhs_TxA.T, pruned_TxF, sparse_operand="b" if not n_dense else None, implementation=gemm_impl)
  dense_idx = feature_order(density_F)[F - n_dense:] if n_dense else None
  out_FxA = jsparse.sparse_tn_matmul(rhs_TxF, lhs_TxA, dense_rows=dense_idx, implementation=gemm_impl)
  return out_FxA.T


# ----------------------------------------------------------------------------------------------------------------------
# The custom_vjp.


def _check(spec: RecipeSpec, x_TxD, w1_DxF, w2_FxD) -> None:
  op = "sparse_ffn"
  if jnp.ndim(x_TxD) != 2 or jnp.ndim(w1_DxF) != 2 or jnp.ndim(w2_FxD) != 2:
    raise ValueError(f"{op}: want x (T, D), w1 (D, F), w2 (F, D), got {jnp.shape(x_TxD)}, {jnp.shape(w1_DxF)}, "
                     f"{jnp.shape(w2_FxD)}")
  T, D = x_TxD.shape
  if w1_DxF.shape[0] != D or w2_FxD.shape != (w1_DxF.shape[1], D):
    raise ValueError(f"{op}: want x (T, D), w1 (D, F), w2 (F, D), got {x_TxD.shape}, {w1_DxF.shape}, "
                     f"{w2_FxD.shape}")
  F = w1_DxF.shape[1]
  if spec.activation_24 and F % 4:
    raise ValueError(f"{op}: d_ff={F} must be a multiple of 4 for 2:4 activations")
  if spec.weight_grads_24 and T % 4:
    raise ValueError(f"{op}: the token count T={T} must be a multiple of 4 for the token-wise 2:4 weight gradients")


def _first_gemm(spec: RecipeSpec, x_TxD, w1_DxF):
  """(y1, h, mask): the first GEMM and the activation (2:4 on y1 before relu^2 in the activation recipe)."""
  y1_TxF = checkpoint_name(
      _ops.matmul(x_TxD, w1_DxF, sparse_operand="b" if spec.sparse_w1 else None, implementation=spec.gemm_impl),
      _ops.FFN_HIDDEN)
  if spec.activation_24:
    h_TxF, mask_TxF = jsparse.squared_relu_nm(y1_TxF, 2, 4, return_mask=True, implementation=spec.op_impl)
    if jnp.dtype(y1_TxF.dtype).itemsize > 4:  # the op squares in float32; keep a float64 FFN float64
      h_TxF = jnp.where(mask_TxF, jnp.square(act_ref.relu_f32(y1_TxF)), 0.0).astype(y1_TxF.dtype)
  else:
    h_TxF, mask_TxF = jnp.square(act_ref.relu_f32(y1_TxF)).astype(x_TxD.dtype), None
  return y1_TxF, h_TxF, mask_TxF


def _second_gemm(spec: RecipeSpec, h_TxF, w2_FxD):
  # Only one operand of a sparse-tensor-core GEMM can be 2:4; with both sparse, the activation is the one used.
  operand = "a" if spec.activation_24 else ("b" if spec.sparse_w2 else None)
  return _ops.matmul(h_TxF, w2_FxD, sparse_operand=operand, implementation=spec.gemm_impl)


def _fused_activation(spec: RecipeSpec) -> bool:
  """Whether the forward runs the activation as one kernel on ``y1`` and the backward's non-GEMM work as another.

  On the cuSPARSELt path the activation recipe's second GEMM only needs ``h`` compressed, so
  :func:`jsparse.squared_relu_24_compress` writes it straight from ``y1`` (one T x F read, half a T x F write) and the
  forward writes no dense ``h``, mask or ``r``. Without the 2:4 activation but with the token-wise 2:4 weight
  gradients (S-STE weights), :func:`jsparse.squared_relu_counts` writes the dense ``h`` the second GEMM takes and
  counts the features' non-zeros in the same pass (instead of a T-reduction of its own, which XLA ran at a quarter of
  HBM speed). Either way the residual is ``y1`` itself (already in memory as the first GEMM's output) and the backward
  is :func:`jsparse.recipe24_backward`: one kernel reads ``y1`` and ``dy2`` and writes the GEMMs' operands. Only with
  dense residual storage (and, for the activation recipe, the reused mask); the other storages keep the separate
  kernels. ``spec.fused_activation`` forces it on or off (where it applies; the XLA path computes the same numbers,
  which is what the CPU tests check).
  """
  if spec.activation_24:
    applies = spec.reuse_mask_in_backward and spec.storage == "dense"
  else:
    applies = spec.weight_grads_24 and spec.storage == "dense"
  if spec.fused_activation is not None:
    return applies and spec.fused_activation
  return applies and spec.gemm_impl == "cusparselt"


# The fused path's mask and residual, recomputed from y1 in the backward (the kernels layer owns them: its
# recipe24_backward computes the same on the cuSPARSELt path).
_mask24_by_relu = act_ref.mask24_by_relu
_masked_relu_from_y1 = act_ref.masked_relu


def _stats(spec: RecipeSpec, y1_TxF, mask_TxF, n_dense: int) -> dict[str, jax.Array]:
  if not spec.stats:
    return {}
  r_TxF = act_ref.relu_f32(jax.lax.stop_gradient(y1_TxF))
  mass_TxF = r_TxF * r_TxF
  total = jnp.sum(mass_TxF)
  if mask_TxF is None:
    dropped = jnp.zeros((), jnp.float32)
  else:
    dropped = jnp.sum(jnp.where(mask_TxF, 0.0, mass_TxF)) / jnp.where(total > 0, total, 1.0)
  return dict(act_density=jnp.mean((r_TxF > 0).astype(jnp.float32)), dropped_mass=dropped,
              dense_features=jnp.asarray(n_dense, jnp.float32))


def _n_dense(spec: RecipeSpec, F: int) -> int:
  if not spec.weight_grads_24:
    return F
  return n_dense_features(F, spec.dense_fraction, spec.dense_multiple)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recipe(spec: RecipeSpec, x_TxD, w1_DxF, w2_FxD, perm_T):
  # Primal (no gradient requested): the token shuffle changes nothing in the forward values, so it is skipped; the
  # residual is not stored, so a bitmask that would overflow does not drop anything either.
  del perm_T
  if _fused_activation(spec):
    _, out_TxD, stats, _ = _fused_forward(spec, x_TxD, w1_DxF, w2_FxD)
    return out_TxD, stats
  y1_TxF, h_TxF, mask_TxF = _first_gemm(spec, x_TxD, w1_DxF)
  out_TxD = _second_gemm(spec, h_TxF, w2_FxD)
  return out_TxD, _stats(spec, y1_TxF, mask_TxF, _n_dense(spec, w1_DxF.shape[1]))


def _fused_forward(spec: RecipeSpec, x_TxD, w1_DxF, w2_FxD, counts: bool = False):
  """(y1, out, stats, counts) on the fused path (:func:`_fused_activation`); ``counts``: the per-feature counts of
  kept positive relu(y1) that rank the 95/5 split, from the activation's own kernel (else None)."""
  y1_TxF = checkpoint_name(
      _ops.matmul(x_TxD, w1_DxF, sparse_operand="b" if spec.sparse_w1 else None, implementation=spec.gemm_impl),
      _ops.FFN_HIDDEN)
  counts_F = mask_TxF = None
  if not spec.activation_24:
    h_TxF, counts_F = jsparse.squared_relu_counts(y1_TxF, implementation=spec.gemm_impl)
    counts_F = counts_F if counts else None
    out_TxD = _second_gemm(spec, h_TxF, w2_FxD)
  else:
    if counts:
      h24, counts_F = jsparse.squared_relu_24_compress(y1_TxF, return_counts=True, implementation=spec.gemm_impl)
    else:
      h24 = jsparse.squared_relu_24_compress(y1_TxF, implementation=spec.gemm_impl)
    out_TxD = jsparse.sparse_matmul(h24, w2_FxD, sparse_operand="a", implementation=spec.gemm_impl)
    mask_TxF = _mask24_by_relu(y1_TxF) if spec.stats else None
  return y1_TxF, out_TxD, _stats(spec, y1_TxF, mask_TxF, _n_dense(spec, w1_DxF.shape[1])), counts_F


def _recipe_fwd(spec: RecipeSpec, x_TxD, w1_DxF, w2_FxD, perm_T):
  dtype = x_TxD.dtype
  xp_TxD = x_TxD if perm_T is None else permute_tokens(x_TxD, perm_T)
  if _fused_activation(spec):
    F = w1_DxF.shape[1]
    y1_TxF, outp_TxD, stats, counts_F = _fused_forward(spec, xp_TxD, w1_DxF, w2_FxD,
                                                       counts=0 < _n_dense(spec, F) < F)
    out_TxD = outp_TxD if perm_T is None else unpermute_tokens(outp_TxD, perm_T)
    stored = jsparse.store_activation(y1_TxF, kind="dense")  # the residual is y1 (tagged as the FFN's activation)
    if counts_F is not None:
      counts_F = checkpoint_name(counts_F, _ops.FFN_ACT)  # kept with the residual, like density_F below
    return (out_TxD, stats), (xp_TxD, w1_DxF, w2_FxD, stored, None, counts_F, perm_T)
  y1_TxF, h_TxF, mask_TxF = _first_gemm(spec, xp_TxD, w1_DxF)
  stats = _stats(spec, y1_TxF, mask_TxF, _n_dense(spec, w1_DxF.shape[1]))

  # The one T x F residual: r = relu(y1), masked when the mask is reused (then h = r^2 carries the mask too).
  r32_TxF = act_ref.relu_f32(y1_TxF)
  if mask_TxF is not None and spec.reuse_mask_in_backward:
    r32_TxF = jnp.where(mask_TxF, r32_TxF, 0.0)
    keep_mask = None
  else:
    keep_mask = mask_TxF  # the ablation: dy1 uses the unmasked r, h still needs the mask
  r_TxF = r32_TxF.astype(dtype)
  if spec.storage == "dense":
    name, stored = _ops.FFN_ACT, jsparse.store_activation(r_TxF, kind="dense")
  elif spec.storage == "24":
    name, stored = _ops.FFN_ACT_COMPRESSED, jsparse.store_activation(r_TxF, kind="24")
  else:
    # The bitmask may drop values past its capacity: compute the forward from what the backward will see.
    stored, hb_TxF = jsparse.pack_bitmask(r_TxF, spec.capacity, return_square=True,
                                          implementation=spec.op_impl)
    h_TxF = hb_TxF if keep_mask is None else jnp.where(keep_mask, hb_TxF, jnp.zeros((), dtype))
    name, stored = _ops.FFN_ACT_COMPRESSED, checkpoint_name(stored, _ops.FFN_ACT_COMPRESSED)
  # Per-feature density (fraction of tokens with a non-zero h): the 95/5 split's ranking. A T-reduction that a fused
  # kernel gets for free in the first GEMM's epilogue; tagged like the residual so that a policy keeping the
  # residual does not recompute x @ W1 for it.
  positive_TxF = r32_TxF > 0 if keep_mask is None else (r32_TxF > 0) & keep_mask
  density_F = checkpoint_name(jnp.mean(positive_TxF.astype(jnp.float32), axis=0), name)
  if keep_mask is not None:
    keep_mask = checkpoint_name(keep_mask, name)

  outp_TxD = _second_gemm(spec, h_TxF, w2_FxD)
  out_TxD = outp_TxD if perm_T is None else unpermute_tokens(outp_TxD, perm_T)
  residuals = (xp_TxD, w1_DxF, w2_FxD, stored, keep_mask, density_F, perm_T)
  return (out_TxD, stats), residuals


def _recipe_bwd(spec: RecipeSpec, residuals, cotangents):
  xp_TxD, w1_DxF, w2_FxD, stored, keep_mask, density_F, perm_T = residuals
  dout_TxD, _ = cotangents  # the statistics are not differentiated
  dtype = xp_TxD.dtype
  F = w1_DxF.shape[1]
  doutp_TxD = (dout_TxD if perm_T is None else permute_tokens(dout_TxD, perm_T)).astype(dtype)

  n_dense = _n_dense(spec, F)
  if _fused_activation(spec) and n_dense < F:
    # Every T x F pass after dy2 in two kernels on the cuSPARSELt path (recipe24_backward); same numbers as below.
    dy2_TxF = _ops.matmul(doutp_TxD, w2_FxD.T, implementation=spec.gemm_impl)
    dxp_TxD, dw1_DxF, dw2_FxD = jsparse.recipe24_backward(
        jsparse.load_activation(stored), dy2_TxF, xp_TxD, doutp_TxD, w1_DxF, n_dense=n_dense,
        counts_F=density_F, activation_24=spec.activation_24,
        implementation=spec.gemm_impl)  # density_F: the forward's counts on this path
    dx_TxD = dxp_TxD if perm_T is None else unpermute_tokens(dxp_TxD, perm_T)
    return (dx_TxD.astype(xp_TxD.dtype), dw1_DxF.astype(w1_DxF.dtype), dw2_FxD.astype(w2_FxD.dtype), None)
  if _fused_activation(spec):  # here n_dense == F: every weight gradient is dense, so no density ranking
    y1_TxF = jsparse.load_activation(stored)
    r32_TxF = _masked_relu_from_y1(y1_TxF)[0] if spec.activation_24 else act_ref.relu_f32(y1_TxF)
  else:
    r32_TxF = jsparse.load_activation(stored, implementation=spec.op_impl).astype(
        jnp.promote_types(dtype, jnp.float32))
  h32_TxF = r32_TxF * r32_TxF
  if keep_mask is not None:
    h32_TxF = jnp.where(keep_mask, h32_TxF, 0.0)
  h_TxF = h32_TxF.astype(dtype)

  dy2_TxF = _ops.matmul(doutp_TxD, w2_FxD.T, implementation=spec.gemm_impl)
  dy1_TxF = (2.0 * dy2_TxF.astype(r32_TxF.dtype) * r32_TxF).astype(dtype)

  if spec.activation_24:
    # With the mask reused, dy1 holds at most two non-zeros in every group of four along F: already a 2:4 operand.
    # In the ablation it does not, and the GEMM needs it pruned (by magnitude, as the reference does).
    dy1_24_TxF = dy1_TxF if spec.reuse_mask_in_backward else jsparse.nm_prune(dy1_TxF, 2, 4,
                                                                              implementation=spec.op_impl)
    dxp_TxD = _ops.matmul(dy1_24_TxF, w1_DxF.T, sparse_operand="a", implementation=spec.gemm_impl)
  else:
    dxp_TxD = _ops.matmul(dy1_TxF, w1_DxF.T, implementation=spec.gemm_impl)

  strategy = spec.split_strategy
  if strategy == "auto":
    # The 2:4 GEMM over all features only pays where a 2:4 kernel can run; the XLA path prunes a copy instead.
    strategy = "masked" if spec.gemm_impl == "xla" else "overwrite"
  split = functools.partial(split_weight_grad, density_F=density_F, n_dense=n_dense, strategy=strategy,
                            op_impl=spec.op_impl, gemm_impl=spec.gemm_impl)
  dw2_DxF = split(doutp_TxD, h_TxF)      # (h^T dout)^T with h 2:4 along T on the sparse features
  dw1_DxF = split(xp_TxD, dy1_TxF)       # x^T dy1 with dy1 2:4 along T on the sparse features

  dx_TxD = dxp_TxD if perm_T is None else unpermute_tokens(dxp_TxD, perm_T)
  return (dx_TxD.astype(xp_TxD.dtype), dw1_DxF.astype(w1_DxF.dtype), dw2_DxF.T.astype(w2_FxD.dtype), None)


_recipe.defvjp(_recipe_fwd, _recipe_bwd)


def sparse_ffn(x_TxD: jax.Array, w1_DxF: jax.Array, w2_FxD: jax.Array, spec: RecipeSpec,
               perm_T: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The sparse squared-ReLU FFN ``relu(x W1)^2 W2`` with the recipe's forward and backward (module docstring).

  Args:
    x_TxD: tokens (already flattened), in the compute dtype.
    w1_DxF, w2_FxD: the forward weights (already soft-thresholded and scaled for S-STE), same dtype as ``x``.
    spec: the static :class:`RecipeSpec`.
    perm_T: optional int32 token permutation applied before the token-wise 2:4 of the weight gradients.

  Returns:
    ``(out_TxD, stats)``; ``stats`` holds float32 scalars ``act_density`` (fraction of relu(y1) > 0 before the 2:4
    mask), ``dropped_mass`` (fraction of the relu(y1)^2 mass the 2:4 mask removed) and ``dense_features`` (features
    whose weight-gradient rows stay dense), or is empty if ``spec.stats`` is off.

  Raises:
    ValueError: shapes that do not fit (rank, d_ff or T not multiples of 4 where 2:4 needs them).
  """
  _check(spec, x_TxD, w1_DxF, w2_FxD)
  if perm_T is not None and perm_T.shape != (x_TxD.shape[0],):
    raise ValueError(f"sparse_ffn: perm_T must have shape ({x_TxD.shape[0]},), got {perm_T.shape}")
  return _recipe(spec, x_TxD, w1_DxF, w2_FxD, perm_T)
