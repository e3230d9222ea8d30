"""Public V:N:M (Venom) ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.kernels import _common as common
from jsparse.kernels._gradient import gradient_mode, select_with_gradient, static_partial
from jsparse.kernels.nm import pallas_common
from jsparse.kernels.vnm import pallas as vnm_pallas
from jsparse.kernels.vnm import reference as ref


def check_vnm(op: str, x: jax.Array, v: int, n: int, m: int) -> None:
  """Validates a V:N:M call (shared with the packed format)."""
  common.check_floating(op, "x", x)
  common.check_rank(op, "x", x, 2, 2)
  if not all(isinstance(a, int) for a in (v, n, m)):
    raise ValueError(f"{op}: v, n and m must be Python ints, got v={v!r}, n={n!r}, m={m!r}")
  if v < 1:
    raise ValueError(f"{op}: v must be positive, got v={v}")
  if m < ref.SELECTED_COLUMNS:
    raise ValueError(f"{op}: m must be at least {ref.SELECTED_COLUMNS} (4 columns are selected per block), got m={m}")
  if not 1 <= n <= ref.SELECTED_COLUMNS - 1:
    raise ValueError(f"{op}: n must be 1..3 (n of the 4 selected columns per row), got n={n}")
  common.check_multiple(op, "axis 0 (rows)", x.shape[0], v, "v")
  common.check_multiple(op, "axis 1 (columns)", x.shape[1], m, "m")


def _vnm_impl(op: str, x: jax.Array, v: int, n: int, m: int, implementation: str | None) -> str:
  ok, why = vnm_pallas.supports_vnm(x, v, n, m)
  return common.resolve_implementation(op, implementation, pallas_supports=ok, why_not=why)


def _vnm_forward(x: jax.Array, need_mask: bool, *, v: int, n: int, m: int,
                 implementation: str | None) -> tuple[jax.Array, jax.Array | None]:
  if _vnm_impl("vnm_prune", x, v, n, m, implementation) == "pallas":
    outs = vnm_pallas.vnm_select(x, v, n, m, outputs=("y", "bits") if need_mask else ("y",),
                                 interpret=common.interpret_enabled())
    return outs[0], (pallas_common.expand_bits(outs[1], m) if need_mask else None)
  mask = ref.vnm_mask(x, v, n, m)
  return jnp.where(mask, x, jnp.zeros((), x.dtype)), (mask if need_mask else None)


def vnm_mask(x: jax.Array, v: int = 64, n: int = 2, m: int = 8, *, implementation: str | None = None) -> jax.Array:
  """Boolean V:N:M (Venom) mask of a 2-D array.

  Per block of ``v`` consecutive rows x ``m`` consecutive columns, the 4 columns with the largest summed |x| are
  selected (ties to the lower column), and inside them each row keeps its ``n`` largest-|x| (2:4 for n=2): density
  n/m. Venom's kernels use v in {64, 128} and m in {8, 16, 32}. NaN counts as the largest magnitude.

  Args:
    x: floating (R, C) array, R a multiple of v, C a multiple of m.
    v: rows per block (> 0). n: kept per row among the 4 selected columns (1..3). m: columns per block (>= 4).
    implementation: ``None``, ``"pallas"`` or ``"xla"``.

  Raises:
    ValueError: bad rank/dtype, ``v``/``n``/``m`` out of range, or shapes not multiples of ``v``/``m``.
  """
  check_vnm("vnm_mask", x, v, n, m)
  x = jax.lax.stop_gradient(x)
  if _vnm_impl("vnm_mask", x, v, n, m, implementation) == "pallas":
    return vnm_pallas.vnm_select(x, v, n, m, outputs=("mask",), interpret=common.interpret_enabled())[0]
  return ref.vnm_mask(x, v, n, m)


def vnm_prune(x: jax.Array, v: int = 64, n: int = 2, m: int = 8, *, gradient: str = "masked",
              kept_scale: float | None = None, pruned_scale: float | None = None,
              implementation: str | None = None) -> jax.Array:
  """``x`` with everything outside :func:`vnm_mask` zeroed; ``gradient`` as in :func:`jsparse.nm_prune`."""
  check_vnm("vnm_prune", x, v, n, m)
  mode = gradient_mode("vnm_prune", gradient, kept_scale, pruned_scale)
  forward = static_partial(_vnm_forward, v=v, n=n, m=m, implementation=implementation)
  return select_with_gradient(forward, mode, x)
