"""``select_with_gradient`` for kernels that can skip writing the pattern.

Like :func:`jsparse.kernels._gradient.select_with_gradient`, but ``forward(x, need_mask)`` is told whether the
pattern is needed: not at all in the primal (a plain forward call), and in the VJP's forward only when the gradient
mode uses it. So the forward op users call writes nothing but its values, and a gradient mode that needs the pattern
gets it in the kernel's compact form (one bit per element), which XLA expands inside the backward's own fusion.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from jsparse.kernels._gradient import GradientMode


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def select_with_gradient(forward: Callable[[jax.Array, bool], tuple[jax.Array, jax.Array | None]],
                         mode: GradientMode, x: jax.Array) -> jax.Array:
  """``forward(x, need_mask) -> (y, mask or None)``; returns y, differentiated with ``mode`` against the mask.

  ``forward`` must be hashable and static (e.g. :func:`jsparse.kernels._gradient.static_partial`).
  """
  return forward(x, False)[0]


def _fwd(forward, mode, x):
  y, mask = forward(x, mode.needs_mask)
  return y, mask


def _bwd(forward, mode, mask, g):
  del forward
  return (mode.apply(g, mask),)


select_with_gradient.defvjp(_fwd, _bwd)
