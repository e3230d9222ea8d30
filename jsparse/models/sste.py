"""2:4 weights by S-STE (Hu et al. 2024): ``W_fwd = beta * S(W)`` with a straight-through gradient to the dense W.

``S`` is ``jsparse.soft_threshold_24`` along the weight's contraction axis (axis 0 of a ``(in, out)`` weight used as
``x @ W``), so ``W_fwd`` is a 2:4 operand of the forward GEMM. ``beta = <W, S(W)> / <S(W), S(W)>`` is computed once,
at the start of the sparse phase (``models.prepare_sparse_phase``), and then held fixed: recomputing it every step
makes it drift large (S-STE Fig. 4b). The gradient reaching the dense weight is the gradient of ``W_fwd`` itself,
unscaled, as in the reference ``SoftThreshold.backward`` (which returns ``grad_output``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import jsparse


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def sste_weight(w: jax.Array, beta: jax.Array, axis: int = 0, implementation: str | None = None) -> jax.Array:
  """``beta * soft_threshold_24(w, axis)`` in ``w.dtype``; straight-through to ``w``, no gradient to ``beta``.

  Args:
    w: dense weight, ``w.shape[axis] % 4 == 0``.
    beta: float32 scalar scale (an S-STE state variable, fixed during the sparse phase).
    axis: the 2:4 axis (the contraction axis of the GEMM that uses ``w``).
    implementation: for the soft threshold: ``None``, ``"pallas"`` or ``"xla"``.

  Returns:
    the 2:4 forward weight, shaped and typed like ``w``.
  """
  s = jsparse.soft_threshold_24(w, axis=axis, implementation=implementation)
  return (s.astype(jnp.float32) * beta.astype(jnp.float32)).astype(w.dtype)


def _fwd(w, beta, axis, implementation):
  return sste_weight(w, beta, axis, implementation), beta


def _bwd(axis, implementation, beta, g):
  del axis, implementation
  return g, jnp.zeros_like(beta)


sste_weight.defvjp(_fwd, _bwd)


def sste_beta(w: jax.Array, axis: int = 0, implementation: str | None = None) -> jax.Array:
  """The fixed S-STE scale of ``w`` (float32 scalar), from the weight as it is now."""
  return jsparse.sste_scale(w, axis=axis, implementation=implementation)
