"""Public fused squared-ReLU + N:M activation."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jsparse.kernels import _common as common
from jsparse.kernels.activation import pallas as act_pallas
from jsparse.kernels.activation import reference as ref
from jsparse.kernels.nm import pallas_common

_GRADIENTS = ("masked", "ste")


@dataclasses.dataclass(frozen=True)
class _Spec:
  n: int
  m: int
  gradient: str
  return_mask: bool
  implementation: str | None


def _forward_rows(x_RxK: jax.Array, spec: _Spec, need_mask: bool) -> tuple[jax.Array, jax.Array | None]:
  """(h, mask or None); the kernel writes the pattern only when it is needed (compactly, for the gradient)."""
  ok, why = act_pallas.supports(x_RxK, spec.n, spec.m)
  impl = common.resolve_implementation("squared_relu_nm", spec.implementation, pallas_supports=ok, why_not=why)
  if impl == "pallas":
    interpret = common.interpret_enabled()
    if not need_mask:
      return act_pallas.squared_relu_nm(x_RxK, spec.n, spec.m, outputs=("h",), interpret=interpret)[0], None
    if spec.return_mask:  # the caller wants the bool mask itself: write it directly
      return act_pallas.squared_relu_nm(x_RxK, spec.n, spec.m, outputs=("h", "mask"), interpret=interpret)
    h, bits = act_pallas.squared_relu_nm(x_RxK, spec.n, spec.m, outputs=("h", "bits"), interpret=interpret)
    return h, pallas_common.expand_bits(bits, spec.m)
  h, mask = ref.squared_relu_nm(x_RxK, spec.n, spec.m)
  return h, (mask if need_mask else None)


def _outputs(h, mask, spec: _Spec):
  return (h, mask) if spec.return_mask else h


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _squared_relu_nm(x_RxK: jax.Array, spec: _Spec):
  return _outputs(*_forward_rows(x_RxK, spec, spec.return_mask), spec)


def _fwd(x_RxK, spec):
  h, mask = _forward_rows(x_RxK, spec, spec.return_mask or spec.gradient == "masked")
  return _outputs(h, mask, spec), (x_RxK, mask if spec.gradient == "masked" else None)


def _bwd(spec, res, cts):
  x_RxK, mask = res
  g = cts[0] if spec.return_mask else cts
  return (ref.squared_relu_nm_grad(x_RxK, mask, g),)


_squared_relu_nm.defvjp(_fwd, _bwd)


def squared_relu_nm(x: jax.Array, n: int = 2, m: int = 4, *, gradient: str = "masked", return_mask: bool = False,
                    implementation: str | None = None):
  """Fused ``relu(x)**2`` then N:M along the last axis, in one pass (Haziza et al.'s activation forward).

  The pattern keeps the ``n`` largest pre-activations of every ``m`` (the paper's signed "largest" rule; ties to the
  lower index; NaN kept). Because the mask is applied before the square's derivative, ``gradient="masked"`` gives
  dx = 2 relu(x) g only where kept -- the paper's "reuse the forward mask in the backward" -- while ``"ste"`` gives
  2 relu(x) g everywhere (the "no backward mask" ablation, which diverges in the paper).

  Args:
    x: floating array, last axis a multiple of ``m``.
    n, m: keep n of m (``0 < n < m``).
    gradient: ``"masked"`` (default) or ``"ste"``.
    return_mask: also return the bool mask (to reuse the pattern elsewhere).
    implementation: ``None``, ``"pallas"`` or ``"xla"``.

  Returns:
    ``h`` shaped and typed like ``x``, or ``(h, mask)`` if ``return_mask``.
  """
  op = "squared_relu_nm"
  common.check_floating(op, "x", x)
  common.check_rank(op, "x", x, 1)
  common.check_nm(op, n, m)
  common.check_multiple(op, "axis -1", x.shape[-1], m, "m")
  if gradient not in _GRADIENTS:
    raise ValueError(f"{op}: gradient must be one of {_GRADIENTS}, got {gradient!r}")
  shape = x.shape
  out = _squared_relu_nm(x.reshape(-1, shape[-1]), _Spec(n, m, gradient, bool(return_mask), implementation))
  if not return_mask:
    return out.reshape(shape)
  h, mask = out
  return h.reshape(shape), jax.lax.stop_gradient(mask.reshape(shape))
