"""Public N:M ops: masks, pruning with gradient modes, transposable 2:4 and the S-STE soft threshold."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.kernels import _common as common
from jsparse.kernels._gradient import apply_mask, gradient_mode, select_with_gradient, static_partial
from jsparse.kernels.nm import pallas as nm_pallas
from jsparse.kernels.nm import pallas_common
from jsparse.kernels.nm import pallas_transposable
from jsparse.kernels.nm import reference as ref


def _to_rows(x: jax.Array, axis: int) -> tuple[jax.Array, tuple]:
  """Moves ``axis`` last and flattens the rest: the 2-D (rows, K) view every kernel takes."""
  moved = jnp.moveaxis(x, axis, -1)
  return moved.reshape(-1, moved.shape[-1]), moved.shape


def _from_rows(y_RxK: jax.Array, moved_shape: tuple, axis: int) -> jax.Array:
  return jnp.moveaxis(y_RxK.reshape(moved_shape), -1, axis)


def _check_nm_input(op: str, x: jax.Array, n: int, m: int, axis: int) -> int:
  common.check_floating(op, "x", x)
  common.check_rank(op, "x", x, 1)
  common.check_nm(op, n, m)
  axis = common.normalize_axis(op, axis, jnp.ndim(x))
  common.check_multiple(op, f"axis {axis}", jnp.shape(x)[axis], m, "m")
  return axis


def _nm_impl(op: str, x_RxK: jax.Array, n: int, m: int, implementation: str | None) -> str:
  ok, why = nm_pallas.supports_nm(x_RxK, n, m)
  return common.resolve_implementation(op, implementation, pallas_supports=ok, why_not=why)


def _nm_forward(x: jax.Array, need_mask: bool, *, n: int, m: int, axis: int,
                implementation: str | None) -> tuple[jax.Array, jax.Array | None]:
  """(pruned x, mask or None) through the chosen implementation; the kernel writes the mask only if needed."""
  x_RxK, moved = _to_rows(x, axis)
  if _nm_impl("nm_prune", x_RxK, n, m, implementation) == "pallas":
    outs = nm_pallas.nm_select(x_RxK, n, m, outputs=("y", "bits") if need_mask else ("y",),
                               interpret=common.interpret_enabled())
    y_RxK = outs[0]
    mask_RxK = pallas_common.expand_bits(outs[1], m) if need_mask else None
  else:
    mask_RxK = ref.nm_mask(x_RxK, n, m)
    y_RxK = jnp.where(mask_RxK, x_RxK, jnp.zeros((), x.dtype))
  mask = _from_rows(mask_RxK, moved, axis) if need_mask else None
  return _from_rows(y_RxK, moved, axis), mask


def nm_mask(x: jax.Array, n: int = 2, m: int = 4, *, axis: int = -1, implementation: str | None = None) -> jax.Array:
  """Boolean N:M mask: the ``n`` largest-|x| of every ``m`` consecutive elements along ``axis``.

  Ties go to the lower index, so the mask is deterministic. NaN counts as larger than any number (a NaN is always
  kept and shows up in the pruned output); +-inf are ordinary large magnitudes.

  Args:
    x: floating array of any rank >= 1; ``x.shape[axis]`` a multiple of ``m``.
    n, m: keep n of every m (``0 < n < m``).
    axis: the axis the groups of m run along.
    implementation: ``None`` (Pallas on GPU, XLA elsewhere), ``"pallas"`` or ``"xla"``.

  Returns:
    bool array shaped like ``x`` with exactly ``n`` True per group.

  Raises:
    ValueError: non-floating dtype, ``n >= m``, or the axis not a multiple of ``m``.
  """
  axis = _check_nm_input("nm_mask", x, n, m, axis)
  x = jax.lax.stop_gradient(x)
  x_RxK, moved = _to_rows(x, axis)
  if _nm_impl("nm_mask", x_RxK, n, m, implementation) == "pallas":
    (mask_RxK,) = nm_pallas.nm_select(x_RxK, n, m, outputs=("mask",), interpret=common.interpret_enabled())
  else:
    mask_RxK = ref.nm_mask(x_RxK, n, m)
  return _from_rows(mask_RxK, moved, axis)


def nm_prune(x: jax.Array, n: int = 2, m: int = 4, *, axis: int = -1, gradient: str = "masked",
             kept_scale: float | None = None, pruned_scale: float | None = None,
             implementation: str | None = None) -> jax.Array:
  """``x`` with all but the ``n`` largest-|x| of every ``m`` consecutive elements (along ``axis``) zeroed.

  Args:
    x, n, m, axis, implementation: as :func:`nm_mask`.
    gradient: ``"masked"`` (only kept elements get gradient; the default), ``"ste"`` (all elements do) or
      ``"scaled_ste"`` (kept ones times ``kept_scale``, pruned ones times ``pruned_scale``; both default to 1).

  Returns:
    array shaped and typed like ``x``.
  """
  axis = _check_nm_input("nm_prune", x, n, m, axis)
  mode = gradient_mode("nm_prune", gradient, kept_scale, pruned_scale)
  forward = static_partial(_nm_forward, n=n, m=m, axis=axis, implementation=implementation)
  return select_with_gradient(forward, mode, x)


def nm_prune_like(x: jax.Array, mask: jax.Array, *, gradient: str = "masked", kept_scale: float | None = None,
                  pruned_scale: float | None = None) -> jax.Array:
  """Applies an existing pattern ``mask`` to ``x`` (the gradient, the SwiGLU partner), with a gradient mode.

  Args:
    x: floating array.
    mask: bool array of the same shape (from :func:`nm_mask`, :func:`vnm_mask`, ...).
    gradient, kept_scale, pruned_scale: as :func:`nm_prune`.
  """
  common.check_floating("nm_prune_like", "x", x)
  common.check_same_shape("nm_prune_like", ("x", "mask"), x, mask)
  if jnp.result_type(mask) != jnp.bool_:
    raise ValueError(f"nm_prune_like: mask must be bool, got {jnp.result_type(mask)}")
  mode = gradient_mode("nm_prune_like", gradient, kept_scale, pruned_scale)
  return apply_mask(x, jax.lax.stop_gradient(mask), mode)


# ----------------------------------------------------------------------------------------------------------------------
# Transposable 2:4


def _check_2d_tiles(op: str, x: jax.Array) -> None:
  common.check_floating(op, "x", x)
  common.check_rank(op, "x", x, 2)
  common.check_multiple(op, "axis -2", x.shape[-2], 4, "tile")
  common.check_multiple(op, "axis -1", x.shape[-1], 4, "tile")


def _transposable_select(x: jax.Array, outputs: tuple[str, ...], implementation: str | None, op: str):
  *batch, R, C = x.shape
  x3 = x.reshape(-1, R, C)
  ok, why = pallas_transposable.supports_transposable(x3)
  impl = common.resolve_implementation(op, implementation, pallas_supports=ok, why_not=why)
  if impl == "pallas":
    outs = pallas_transposable.transposable_24_select(x3, outputs=outputs, interpret=common.interpret_enabled())
  else:
    mask = ref.transposable_24_mask(x3)
    outs = tuple(mask if o == "mask" else jnp.where(mask, x3, jnp.zeros((), x.dtype)) for o in outputs)
  return tuple(o.reshape(x.shape) for o in outs)


def _transposable_forward(x: jax.Array, need_mask: bool, *,
                          implementation: str | None) -> tuple[jax.Array, jax.Array | None]:
  outs = _transposable_select(x, ("y", "mask") if need_mask else ("y",), implementation, "transposable_24_prune")
  return outs[0], (outs[1] if need_mask else None)


def transposable_24_mask(x: jax.Array, *, implementation: str | None = None) -> jax.Array:
  """A mask that is 2:4 along rows *and* columns in every 4x4 tile of the last two axes.

  Rule: each tile keeps, among the 90 patterns with exactly two ones in every row and column, one with the largest
  sum of |x| -- an exhaustive search, so it is optimal among them (up to float32 rounding ties; the additions and
  tie-breaks are fixed, see ``reference.transposable_24_mask``). NaN counts as the largest magnitude. Compared with
  xformers' greedy "largest" (visit entries by decreasing |x|, keep one while its row and column hold fewer than two):
  whenever greedy completes a pattern it is one of the 90, so this mask keeps at least as much; greedy can also get
  stuck with 6-7 kept (not 2:4 in every row), and then may hold more mass with fewer elements. On Gaussian data the
  greedy rule gets stuck in ~16% of tiles and keeps ~1.5% less mass in total (``tests/kernels/test_nm.py::test_transposable_beats_greedy``).

  Args:
    x: floating array of rank >= 2 whose last two sizes are multiples of 4.
    implementation: ``None``, ``"pallas"`` or ``"xla"``.

  Returns:
    bool array shaped like ``x``; ``mask`` and ``mask.T`` (last two axes) are both 2:4.
  """
  _check_2d_tiles("transposable_24_mask", x)
  x = jax.lax.stop_gradient(x)
  return _transposable_select(x, ("mask",), implementation, "transposable_24_mask")[0]


def transposable_24_prune(x: jax.Array, *, gradient: str = "masked", kept_scale: float | None = None,
                          pruned_scale: float | None = None, implementation: str | None = None) -> jax.Array:
  """``x`` pruned with :func:`transposable_24_mask` (usable as a 2:4 operand both as W and as W^T)."""
  _check_2d_tiles("transposable_24_prune", x)
  mode = gradient_mode("transposable_24_prune", gradient, kept_scale, pruned_scale)
  forward = static_partial(_transposable_forward, implementation=implementation)
  return select_with_gradient(forward, mode, x)


# ----------------------------------------------------------------------------------------------------------------------
# S-STE soft threshold


def _soft_threshold_forward(w: jax.Array, need_mask: bool, *, axis: int,
                            implementation: str | None) -> tuple[jax.Array, jax.Array | None]:
  w_RxK, moved = _to_rows(w, axis)
  ok, why = nm_pallas.supports_nm(w_RxK, 2, 4)
  impl = common.resolve_implementation("soft_threshold_24", implementation, pallas_supports=ok, why_not=why)
  if impl == "pallas":
    outs = nm_pallas.soft_threshold_24(w_RxK, outputs=("s", "bits") if need_mask else ("s",),
                                       interpret=common.interpret_enabled())
    s_RxK = outs[0]
    mask_RxK = pallas_common.expand_bits(outs[1], 4) if need_mask else None
  else:
    s_RxK = ref.soft_threshold_24(w_RxK)
    mask_RxK = ref.nm_mask(w_RxK, 2, 4) if need_mask else None
  mask = _from_rows(mask_RxK, moved, axis) if need_mask else None
  return _from_rows(s_RxK, moved, axis), mask


def soft_threshold_24(w: jax.Array, *, axis: int = -1, gradient: str = "ste", kept_scale: float | None = None,
                      pruned_scale: float | None = None, implementation: str | None = None) -> jax.Array:
  """S-STE soft threshold (Hu et al. 2024) along ``axis``, in groups of 4.

  In each group, with ``t`` the 3rd-largest |w|: the two largest become ``sign(w) * (|w| - t)``, the other two 0.
  The function is continuous in ``w`` (no jump at ties, unlike hard top-2); exact ties at ``t`` give zeros, so at
  most two entries per group are non-zero. Computed in float32, returned in ``w.dtype``.

  Args:
    w: floating weight, ``w.shape[axis] % 4 == 0``. For ``x @ w`` the groups should run along the contraction axis
      (``axis=0`` for a ``(D, F)`` weight) so that the result is a 2:4 operand for sparse tensor cores.
    gradient: ``"ste"`` (the S-STE rule: the gradient goes straight to the dense weight; default), ``"masked"`` or
      ``"scaled_ste"`` (see :func:`nm_prune`); the pattern is the two largest-|w| of each group.
    implementation: ``None``, ``"pallas"`` or ``"xla"``.
  """
  op = "soft_threshold_24"
  common.check_floating(op, "w", w)
  common.check_rank(op, "w", w, 1)
  axis = common.normalize_axis(op, axis, jnp.ndim(w))
  common.check_multiple(op, f"axis {axis}", w.shape[axis], 4, "m")
  mode = gradient_mode(op, gradient, kept_scale, pruned_scale)
  forward = static_partial(_soft_threshold_forward, axis=axis, implementation=implementation)
  return select_with_gradient(forward, mode, w)


def sste_scale(w: jax.Array, *, axis: int = -1, implementation: str | None = None) -> jax.Array:
  """The S-STE scale beta = <w, S(w)> / <S(w), S(w)>: the least-squares scale of S(w) towards w.

  Compute it once, at the start of the sparse phase, and keep it fixed (recomputing it every step makes it drift
  "unexpectedly large", S-STE Fig. 4b). Returns a float32 scalar (1.0 if S(w) is all zeros). Not differentiated.
  """
  w = jax.lax.stop_gradient(w)
  s = soft_threshold_24(w, axis=axis, implementation=implementation)
  return ref.sste_scale(w, s)
