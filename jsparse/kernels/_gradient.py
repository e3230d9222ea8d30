"""Gradient modes of the sparsify ops, as ``jax.custom_vjp`` rules.

A sparsify op ``y = select(x)`` is piecewise constant in its pattern, so its "gradient" is a design choice:

===============  ==================================================================================================
``"ste"``        straight-through: the cotangent passes to every element, kept or pruned.
``"masked"``     only the kept elements receive the cotangent (the derivative with the pattern held fixed).
``"scaled_ste"`` kept elements get ``kept_scale * g`` and pruned ones ``pruned_scale * g`` (xformers' ``bw_mul1`` and
                 ``bw_mul0``); ``scaled_ste`` with (1, 1) is ``ste`` and with (1, 0) is ``masked``.
===============  ==================================================================================================
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

GRADIENTS = ("ste", "masked", "scaled_ste")


@dataclasses.dataclass(frozen=True)
class GradientMode:
  """A gradient rule for a sparsify op (static: hashable, never traced)."""

  kind: str = "masked"
  kept_scale: float = 1.0
  pruned_scale: float = 0.0

  def apply(self, g: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Cotangent of the input given the output cotangent ``g`` and the forward pattern ``mask``."""
    if self.kind == "ste":
      return g
    zero = jnp.zeros((), g.dtype)
    if self.kind == "masked":
      return jnp.where(mask, g, zero)
    kept = (g * self.kept_scale).astype(g.dtype)
    pruned = (g * self.pruned_scale).astype(g.dtype)
    return jnp.where(mask, kept, pruned)

  @property
  def needs_mask(self) -> bool:
    return self.kind != "ste"


def gradient_mode(op: str, gradient: str, kept_scale: float | None = None,
                  pruned_scale: float | None = None) -> GradientMode:
  """Validates the user's gradient arguments and builds the rule."""
  if gradient not in GRADIENTS:
    raise ValueError(f"{op}: gradient must be one of {GRADIENTS}, got {gradient!r}")
  if gradient != "scaled_ste":
    if kept_scale is not None or pruned_scale is not None:
      raise ValueError(f"{op}: kept_scale/pruned_scale only apply to gradient='scaled_ste', got gradient={gradient!r}")
    return GradientMode(gradient)
  return GradientMode("scaled_ste", 1.0 if kept_scale is None else float(kept_scale),
                      1.0 if pruned_scale is None else float(pruned_scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def select_with_gradient(forward: Callable[[jax.Array, bool], tuple[jax.Array, jax.Array | None]],
                         mode: GradientMode, x: jax.Array) -> jax.Array:
  """``forward(x, need_mask) -> (y, mask or None)``; returns y, differentiated with ``mode`` against the mask.

  ``forward`` is told whether the pattern is needed: not at all in the primal (a plain forward call), and in the VJP's
  forward only when the gradient mode uses it -- so the op users call writes nothing but its values, and a mode that
  needs the pattern gets it in the kernel's compact form, expanded inside the backward's own fusion. ``forward``
  must be a hashable static callable (:func:`static_partial` of a module-level function).
  """
  return forward(x, False)[0]


def _select_fwd(forward, mode, x):
  return forward(x, mode.needs_mask)


def _select_bwd(forward, mode, mask, g):
  del forward
  return (mode.apply(g, mask),)


select_with_gradient.defvjp(_select_fwd, _select_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def apply_mask(x: jax.Array, mask: jax.Array, mode: GradientMode) -> jax.Array:
  """``where(mask, x, 0)`` with the gradient rule ``mode`` (the ``*_like`` ops: reuse a pattern on another tensor)."""
  return jnp.where(mask, x, jnp.zeros((), x.dtype))


def _apply_fwd(x, mask, mode):
  return apply_mask(x, mask, mode), mask


def _apply_bwd(mode, mask, g):
  return mode.apply(g, mask), None


apply_mask.defvjp(_apply_fwd, _apply_bwd)


def static_partial(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
  """A hashable ``functools.partial`` whose equality is by function and keyword values (so jit caches hit)."""
  return _StaticPartial(fn, tuple(sorted(kwargs.items())))


@dataclasses.dataclass(frozen=True)
class _StaticPartial:
  fn: Callable[..., Any]
  kwargs: tuple[tuple[str, Any], ...]

  def __call__(self, *args):
    return self.fn(*args, **dict(self.kwargs))
