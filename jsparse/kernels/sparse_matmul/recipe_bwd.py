"""The 2:4 activation recipe's backward GEMMs from ``y1`` and ``dy2``: ``recipe24_backward`` (and
``squared_relu_counts``, the forward of the same split without the 2:4 activation).

Haziza et al.'s FFN ``out = relu(y1)^2 W2`` (``y1 = x W1``, 2:4 along F on relu(y1), the mask reused in the backward)
has, for the output gradient's ``dy2 = dout W2^T`` and with ``r = relu(y1) * mask``::

    dy1 = 2 dy2 r                     dx  = dy1 W1^T   2:4 along F (dy1 is, by construction)
    h   = r^2                         dW2 = h^T dout   h 2:4 along T by |.|, except the densest features
                                      dW1 = x^T dy1    dy1 the same

The densest ``n_dense`` features (by the count of tokens with a kept, positive relu(y1); ties to the lower index) keep
dense weight-gradient rows: the 95/5 split. On the cuSPARSELt path two kernels do all the non-GEMM work: one counts
the features' non-zeros, one reads ``y1`` and ``dy2`` once and writes the three compressed operands and the dense
rows (``csrc/recipe24.h``); ``h`` and ``dy1`` never exist densely. The XLA path computes the same numbers from the
dense ``h`` and ``dy1`` with :func:`jsparse.sparse_matmul` and :func:`jsparse.sparse_tn_matmul`, and it is what the
cuSPARSELt path is checked against.

``activation_24=False`` is the same backward for a squared-ReLU FFN whose activation is *not* 2:4 (S-STE weights
with the token-wise 2:4 weight gradients): ``r = relu(y1)`` unmasked, the density ranking counts ``y1 > 0``, and
``dx = dy1 W1^T`` is a dense GEMM (the kernel then writes ``dy1`` densely instead of compressed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.kernels import _common as common
from jsparse.kernels.activation.reference import kept_positive_counts, masked_relu, positive_counts, relu_f32
from jsparse.kernels.sparse_matmul import reference as ref
from jsparse.kernels.sparse_matmul import api


def dense_features(counts_F: jax.Array, n_dense: int) -> jax.Array:
  """The ``n_dense`` densest features (sparsest first, stably, as ``jnp.argsort``), or ``None`` for none."""
  if not n_dense:
    return None
  F = counts_F.shape[0]
  return jnp.argsort(counts_F, stable=True)[F - n_dense:]


def _check(op, y1_TxF, dy2_TxF, x_TxD, dout_TxD, w1_DxF, n_dense) -> None:
  for name, arr in (("y1", y1_TxF), ("dy2", dy2_TxF), ("x", x_TxD), ("dout", dout_TxD), ("w1", w1_DxF)):
    common.check_floating(op, name, arr)
    common.check_rank(op, name, arr, 2, 2)
  T, F = y1_TxF.shape
  D = x_TxD.shape[1]
  if dy2_TxF.shape != (T, F) or x_TxD.shape[0] != T or dout_TxD.shape != (T, D) or w1_DxF.shape != (D, F):
    raise ValueError(f"{op}: want y1, dy2 (T, F), x, dout (T, D), w1 (D, F), got {y1_TxF.shape}, {dy2_TxF.shape}, "
                     f"{x_TxD.shape}, {dout_TxD.shape}, {w1_DxF.shape}")
  dtypes = {jnp.result_type(a) for a in (y1_TxF, dy2_TxF, x_TxD, dout_TxD, w1_DxF)}
  if len(dtypes) != 1:
    raise ValueError(f"{op}: all operands must have one dtype, got {sorted(str(d) for d in dtypes)}")
  common.check_multiple(op, "F", F, 4, "the 2:4 group size")
  common.check_multiple(op, "T", T, 4, "the 2:4 group size")
  if not 0 <= n_dense < F:
    raise ValueError(f"{op}: n_dense must be in [0, F={F}), got {n_dense}")


def recipe24_backward(y1_TxF: jax.Array, dy2_TxF: jax.Array, x_TxD: jax.Array, dout_TxD: jax.Array,
                      w1_DxF: jax.Array, *, n_dense: int, counts_F: jax.Array | None = None,
                      activation_24: bool = True,
                      implementation: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(dx, dW1, dW2)`` of the 2:4 activation recipe's FFN from its saved ``y1`` and the gradient ``dy2``.

  Args:
    y1_TxF: the first GEMM's output ``x W1`` (the forward's 2:4 mask is recomputed from it).
    dy2_TxF: ``dout W2^T``.
    x_TxD, dout_TxD: the FFN's input and output gradient (in the token order the 2:4 groups along T are taken in).
    w1_DxF: the first weight.
    n_dense: features whose weight-gradient rows stay dense (``0 <= n_dense < F``).
    counts_F: optional int ``(F,)``, per feature the tokens with a kept, positive relu(y1), if the forward counted
      them (``squared_relu_24_compress(..., return_counts=True)``, or :func:`squared_relu_counts` without the 2:4
      activation); else they are counted here.
    activation_24: whether the forward pruned relu(y1) 2:4 along F (the activation recipe; its mask is recomputed
      from ``y1``). ``False``: an FFN with only the token-wise 2:4 weight gradients (see the module docstring).
    implementation: ``None``, ``"cusparselt"`` or ``"xla"`` (as :func:`jsparse.sparse_matmul`).

  Returns:
    ``dx (T, D)``, ``dW1 (D, F)``, ``dW2 (F, D)`` in the operands' dtype.

  Raises:
    ValueError: shapes or dtypes that do not fit; ``"cusparselt"`` with T or F not multiples of 64, D not a multiple
      of 16, or a dtype other than bfloat16/float16.
  """
  op = "recipe24_backward"
  _check(op, y1_TxF, dy2_TxF, x_TxD, dout_TxD, w1_DxF, n_dense)
  T, F = y1_TxF.shape
  D = x_TxD.shape[1]
  ok, why = api._cusparselt_supports(op, y1_TxF.dtype, (T, F), D)
  if ok:
    ok, why = api._cusparselt_supports(op, y1_TxF.dtype, (F, T), D)
  impl = api.resolve_implementation(op, implementation, supported=ok, why_not=why)
  if counts_F is not None and (jnp.ndim(counts_F) != 1 or jnp.shape(counts_F)[0] != F):
    raise ValueError(f"{op}: counts_F must have shape ({F},), got {jnp.shape(counts_F)}")
  if impl == "xla":
    return _xla(y1_TxF, dy2_TxF, x_TxD, dout_TxD, w1_DxF, n_dense, counts_F, activation_24)
  from jsparse.kernels.cusparselt import ops

  y1_TxF, dy2_TxF = jax.lax.stop_gradient(y1_TxF), jax.lax.stop_gradient(dy2_TxF)
  if n_dense and counts_F is None:
    counts_F = ops.relu24_counts(y1_TxF, mask24=activation_24)
  dense_idx = dense_features(counts_F, n_dense)
  slot_F = jnp.full((F,), -1, jnp.int32)
  if n_dense:
    slot_F = slot_F.at[dense_idx].set(jnp.arange(n_dense, dtype=jnp.int32), unique_indices=True)
  dy1_any, h_packed, g_packed, dense_h_SxT, dense_g_SxT = ops.recipe_backward(y1_TxF, dy2_TxF, slot_F, n_dense,
                                                                              mask24=activation_24)
  search = api.search_mode()
  if activation_24:
    # dx = dy1 W1^T with W1^T as a row-major B (mode 0): the transposed-B mode (1) is the layout vjp.SPARSE_A_MODE
    # avoids (the library's search crashed on it) and it gave wrong products here on the H100.
    dx_TxD = ops.matmul(dy1_any, w1_DxF.T, m=T, k=F, mode=0, search=search)
  else:
    dx_TxD = ref.matmul(dy1_any, w1_DxF.T)
  dw2_FxD = api.tn_from_packed(h_packed, dense_h_SxT, dout_TxD, dense_idx, m=F, search=search)
  dw1_FxD = api.tn_from_packed(g_packed, dense_g_SxT, x_TxD, dense_idx, m=F, search=search)
  # The barrier keeps the dense-row scatter on the F x D product (in place, like dW2's) before the transpose: XLA
  # otherwise moves the transpose first and scatters columns of a fresh D x F copy (0.18 ms instead of ~5 us at 7b).
  dw1_FxD = jax.lax.optimization_barrier(dw1_FxD)
  return dx_TxD, dw1_FxD.T, dw2_FxD


def _xla(y1_TxF, dy2_TxF, x_TxD, dout_TxD, w1_DxF, n_dense, counts_F, activation_24):
  dtype = x_TxD.dtype
  r_TxF = masked_relu(y1_TxF)[0] if activation_24 else relu_f32(y1_TxF)
  h_TxF = (r_TxF * r_TxF).astype(dtype)
  dy1_TxF = (2.0 * dy2_TxF.astype(r_TxF.dtype) * r_TxF).astype(dtype)
  if counts_F is None:
    counts_F = kept_positive_counts(y1_TxF) if activation_24 else positive_counts(y1_TxF)
  dense_idx = dense_features(counts_F, n_dense)
  if activation_24:
    dx_TxD = api.sparse_matmul(dy1_TxF, w1_DxF.T, sparse_operand="a", implementation="xla")
  else:
    dx_TxD = ref.matmul(dy1_TxF, w1_DxF.T)
  dw2_FxD = api.sparse_tn_matmul(h_TxF, dout_TxD, dense_rows=dense_idx, implementation="xla")
  dw1_FxD = api.sparse_tn_matmul(dy1_TxF, x_TxD, dense_rows=dense_idx, implementation="xla")
  return dx_TxD, dw1_FxD.T, dw2_FxD


def squared_relu_counts(y_TxF: jax.Array, *, implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
  """``(relu(y)**2, counts)``: the squared ReLU (float32, rounded once to ``y``'s dtype, NaN stays NaN) and per
  feature the tokens with ``y > 0`` -- the forward of an FFN with the token-wise 2:4 weight gradients but no 2:4
  activation, whose counts rank :func:`recipe24_backward`'s 95/5 split (``activation_24=False``).

  On the cuSPARSELt path (a CUDA GPU, ``F`` a multiple of 64, bfloat16/float16) one kernel reads ``y`` once; the XLA
  path is the same arithmetic in ``jnp``.

  Args:
    y_TxF: ``(T, F)`` pre-activations.
    implementation: ``None``, ``"cusparselt"`` or ``"xla"`` (as :func:`jsparse.sparse_matmul`).

  Returns:
    ``h (T, F)`` in ``y``'s dtype and int32 ``counts (F,)``.

  Raises:
    ValueError: ``y`` not a 2-D floating array; ``"cusparselt"`` where it cannot run.
  """
  op = "squared_relu_counts"
  common.check_floating(op, "y", y_TxF)
  common.check_rank(op, "y", y_TxF, 2, 2)
  F = y_TxF.shape[1]
  # Any token count: the kernel's blocks of 256 tokens guard their rows; features go in tiles of 64.
  ok, why = api._cusparselt_supports(op, y_TxF.dtype, (api.SPARSE_ALIGN, F), api.DENSE_ALIGN)
  impl = api.resolve_implementation(op, implementation, supported=ok, why_not=why)
  if impl == "xla":
    r_TxF = relu_f32(y_TxF)
    return (r_TxF * r_TxF).astype(y_TxF.dtype), positive_counts(y_TxF)
  from jsparse.kernels.cusparselt import ops

  return ops.squared_relu_counts(jax.lax.stop_gradient(y_TxF))
