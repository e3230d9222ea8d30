"""Dense FFN baselines (flax.nnx): squared-ReLU and SwiGLU, and the parameter-matched SwiGLU width.

Weights are stored ``(in, out)`` and used as ``x @ W``; inputs of any leading shape ``(..., D)``. Initialisation
follows the reference code (``lingua``): W1 (and SwiGLU's W3) ~ truncated normal with std ``D**-0.5``, W2 with std
``F**-0.5``. :class:`jsparse.models.SparseFFN` draws its weights in the same order, so with one seed the dense and the
sparse FFN start from identical parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import jsparse
from jsparse.models import _ops


def swiglu_matched_d_ff(d_ff: int, multiple: int = 128) -> int:
  """The SwiGLU hidden size with the parameter count of a squared-ReLU FFN of width ``d_ff``.

  SwiGLU has three ``D x F'`` matrices, squared-ReLU two ``D x F``: ``F' = 2 F / 3``, rounded to the nearest
  multiple of ``multiple`` (8192 -> 5504, 14336 -> 9600, 256 -> 128 with multiple 128).
  """
  if d_ff < 1 or multiple < 1:
    raise ValueError(f"swiglu_matched_d_ff: d_ff and multiple must be positive, got {d_ff}, {multiple}")
  return max(multiple, int(round(2 * d_ff / 3 / multiple)) * multiple)


def init_weight(rngs: nnx.Rngs, shape: tuple[int, int], std: float, dtype) -> nnx.Param:
  """A ``(in, out)`` weight drawn from a normal truncated at 2 std (``jax.nn.initializers.truncated_normal``)."""
  init = jax.nn.initializers.truncated_normal(stddev=std, dtype=dtype)
  return nnx.Param(init(rngs.params(), shape, dtype))


def flatten_tokens(x: jax.Array, d_model: int, op: str) -> tuple[jax.Array, tuple[int, ...]]:
  if x.shape[-1] != d_model:
    raise ValueError(f"{op}: the last axis of x must be d_model={d_model}, got shape {x.shape}")
  return x.reshape(-1, d_model), x.shape


def squared_relu_ffn(x_TxD: jax.Array, w1_DxF: jax.Array, w2_FxD: jax.Array) -> jax.Array:
  """``relu(x W1)^2 W2`` with checkpoint names on the intermediates (the dense reference)."""
  y1_TxF = checkpoint_name(x_TxD @ w1_DxF, _ops.FFN_HIDDEN)
  h_TxF = jnp.square(jnp.maximum(y1_TxF.astype(jnp.float32), 0.0)).astype(x_TxD.dtype)
  return checkpoint_name(h_TxF @ w2_FxD, _ops.FFN_OUT)


def dense_squared_relu(x_TxD: jax.Array, w1_DxF: jax.Array, w2_FxD: jax.Array, *, remat: str | None = None,
                       capacity: float = 0.25) -> jax.Array:
  """:func:`squared_relu_ffn` under the remat policy ``remat``.

  The remat plug-in's names (``"save_dense"``, ``"compressed"``, ``"offload"``, ``"recompute"``) go through
  :func:`jsparse.squared_relu_ffn`, whose backward saves ``relu(y1)`` as the name says (compressed: a bitmask of
  ``capacity``); a ``jax.checkpoint_policies`` name checkpoints the plain function.
  """
  if remat in _ops.FFN_REMAT_POLICIES:
    return jsparse.squared_relu_ffn(x_TxD, w1_DxF, w2_FxD, remat=remat, capacity=capacity)
  return _ops.checkpoint(squared_relu_ffn, remat)(x_TxD, w1_DxF, w2_FxD)


def swiglu_ffn(x_TxD: jax.Array, w1_DxF: jax.Array, w3_DxF: jax.Array, w2_FxD: jax.Array) -> jax.Array:
  """``(silu(x W1) * x W3) W2`` with checkpoint names on the intermediates."""
  g_TxF = checkpoint_name(x_TxD @ w1_DxF, _ops.FFN_HIDDEN)
  u_TxF = x_TxD @ w3_DxF
  h_TxF = (jax.nn.silu(g_TxF.astype(jnp.float32)) * u_TxF.astype(jnp.float32)).astype(x_TxD.dtype)
  return checkpoint_name(h_TxF @ w2_FxD, _ops.FFN_OUT)


class SquaredReLUFFN(nnx.Module):
  """Dense ``relu(x W1)^2 W2`` (no biases): the baseline that the sparse FFN is measured against.

  Args:
    d_model, d_ff: D and F.
    dtype: compute dtype (``None``: the input's dtype).
    param_dtype: parameter dtype.
    remat: checkpoint policy name for the FFN alone (``None``: none; see :func:`dense_squared_relu`).
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(self, d_model: int, d_ff: int, *, dtype=None, param_dtype=jnp.float32, remat: str | None = None,
               rngs: nnx.Rngs):
    self.d_model, self.d_ff = d_model, d_ff
    self.dtype = dtype
    self.remat = remat
    self.w1 = init_weight(rngs, (d_model, d_ff), d_model ** -0.5, param_dtype)
    self.w2 = init_weight(rngs, (d_ff, d_model), d_ff ** -0.5, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``(..., D) -> (..., D)`` in the compute dtype."""
    x_TxD, shape = flatten_tokens(x, self.d_model, "SquaredReLUFFN")
    dtype = self.dtype or x.dtype
    out_TxD = dense_squared_relu(x_TxD.astype(dtype), self.w1[...].astype(dtype), self.w2[...].astype(dtype),
                                 remat=self.remat)
    return out_TxD.reshape(shape)


class SwiGLUFFN(nnx.Module):
  """Dense SwiGLU ``(silu(x W1) * x W3) W2``; give it ``swiglu_matched_d_ff(F)`` to match a squared-ReLU FFN's
  parameter count. Arguments as :class:`SquaredReLUFFN`."""

  def __init__(self, d_model: int, d_ff: int, *, dtype=None, param_dtype=jnp.float32, remat: str | None = None,
               rngs: nnx.Rngs):
    self.d_model, self.d_ff = d_model, d_ff
    self.dtype = dtype
    self.remat = remat
    self.w1 = init_weight(rngs, (d_model, d_ff), d_model ** -0.5, param_dtype)
    self.w3 = init_weight(rngs, (d_model, d_ff), d_model ** -0.5, param_dtype)
    self.w2 = init_weight(rngs, (d_ff, d_model), d_ff ** -0.5, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``(..., D) -> (..., D)`` in the compute dtype."""
    x_TxD, shape = flatten_tokens(x, self.d_model, "SwiGLUFFN")
    dtype = self.dtype or x.dtype
    fn = _ops.checkpoint(swiglu_ffn, self.remat)
    out_TxD = fn(x_TxD.astype(dtype), self.w1[...].astype(dtype), self.w3[...].astype(dtype),
                 self.w2[...].astype(dtype))
    return out_TxD.reshape(shape)
