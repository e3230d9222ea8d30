"""The FFI calls: ``compress`` / ``compress_t`` (dense 2:4 -> cuSPARSELt's compressed buffer), ``matmul`` (sparse-A
GEMM), and the activation recipe's backward operands (``relu24_counts``, ``recipe_backward``).

Shapes are validated by the public ops (``jsparse.kernels.sparse_matmul.api``); these wrappers only assert.

Product modes (the sparse operand is always cuSPARSELt's A, row-major ``m x k``, 2:4 along k; ``D = A op(B)``):

* bit 0 of ``mode``: ``dense`` is row-major ``(n, k)`` and enters as ``B = dense.T`` (else row-major ``(k, n)``).
* bit 1 of ``mode``: the output is ``D.T``, row-major ``(n, m)`` (cuSPARSELt's column-major D), else ``D (m, n)``.

``sparse_matmul(h, w2)`` uses ``mode=0``: ``out (m, n) = A @ dense``. ``sparse_matmul(x, w, sparse_operand="b")``
uses ``mode=3``: ``out (n, m) = dense @ A.T`` with A = ``w.T`` -- both operands contiguous along K, the layout
cuSPARSELt's sm90 kernels are fastest on (benchmarks/results/sparse_matmul.json, ``ours_b_ms``).

Under ``jax.vmap`` both calls run once per batch element (``vmap_method="sequential"``): each is a full GEMM and the
plan cache makes repeated shapes free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.kernels.cusparselt import library

ACTIVATIONS = {"none": 0, "squared_relu": 1}
# auto: the jsparse kernel if it matches the library bit for bit at this shape (checked at first use), else the
# library's compress after the jsparse selection. jsparse / library: forced (tests and benchmarks); "library" expects
# an input that is already 2:4 and does not prune (exactly what cusparseLtSpMMACompress does).
METHODS = {"auto": 0, "jsparse": 1, "library": 2}


def compress(x_RxK: jax.Array, activation: str = "none", method: str = "auto") -> jax.Array:
  """cuSPARSELt's compressed buffer (``uint8``) of the 2:4 selection of ``x_RxK`` along its last axis.

  Selection: the two largest |x| of every 4 (``activation="none"``) or the two largest relu(x) with values
  ``relu(x)**2`` (``"squared_relu"``); ties to the lower index, NaN kept -- :func:`jsparse.nm_prune` and
  :func:`jsparse.squared_relu_nm` exactly.
  """
  lib = library.load()
  rows, cols = x_RxK.shape
  nbytes = lib.compressed_size(rows, cols, x_RxK.dtype)
  call = jax.ffi.ffi_call("jsparse_cslt_compress", jax.ShapeDtypeStruct((nbytes,), jnp.uint8),
                          vmap_method="sequential")
  return call(x_RxK, activation=np.int32(ACTIVATIONS[activation]), method=np.int32(METHODS[method]))


def compress_t(x_KxM: jax.Array, slot_M: jax.Array, n_dense: int,
               method: str = "auto") -> tuple[jax.Array, jax.Array]:
  """cuSPARSELt's compressed buffer of ``x_KxM.T`` (M x K, 2:4 along K by magnitude, :func:`jsparse.nm_prune`'s
  rule), read from ``x_KxM`` without a transposed copy; and the rows ``r`` of ``x_KxM.T`` with ``slot_M[r] >= 0``,
  unpruned, at row ``slot_M[r]`` of an ``(max(n_dense, 1), K)`` array (row 0 is unwritten when ``n_dense == 0``).

  ``method``: ``"auto"`` (the transposing kernel writes the compressed layout where it matched the library's at this
  shape, else it writes the pruned matrix densely and the library compresses it), ``"jsparse"`` or ``"library"``
  (either path forced; for tests, as the layout check has never failed)."""
  lib = library.load()
  K, M = x_KxM.shape
  nbytes = lib.compressed_size(M, K, x_KxM.dtype)
  call = jax.ffi.ffi_call("jsparse_cslt_compress_t", (jax.ShapeDtypeStruct((nbytes,), jnp.uint8),
                                                      jax.ShapeDtypeStruct((max(n_dense, 1), K), x_KxM.dtype)),
                          vmap_method="sequential")
  return call(x_KxM, slot_M.astype(jnp.int32), method=np.int32(METHODS[method]))


def relu24_counts(y_TxF: jax.Array, mask24: bool = True) -> jax.Array:
  """int32 ``(F,)``: per feature, the tokens whose relu(y) is positive and kept by the 2:4 selection of
  :func:`jsparse.squared_relu_nm` (the activation recipe's density ranking); ``mask24=False``: the tokens with
  ``y > 0`` (the ranking without the 2:4 activation). F a multiple of 64."""
  library.load()  # registers the FFI targets
  call = jax.ffi.ffi_call("jsparse_relu24_counts", jax.ShapeDtypeStruct((y_TxF.shape[1],), jnp.int32),
                          vmap_method="sequential")
  return call(y_TxF, mask24=np.int32(bool(mask24)))


def squared_relu_counts(y_TxF: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(relu(y)**2, counts)`` from one read of ``y``: the squared ReLU dense in ``y``'s dtype (float32, one rounding)
  and int32 ``(F,)`` per feature the tokens with ``y > 0`` (NaN is not). F a multiple of 64."""
  library.load()
  call = jax.ffi.ffi_call("jsparse_squared_relu_counts", (jax.ShapeDtypeStruct(y_TxF.shape, y_TxF.dtype),
                                                          jax.ShapeDtypeStruct((y_TxF.shape[1],), jnp.int32)),
                          vmap_method="sequential")
  return call(y_TxF)


def compress_counts(y_TxF: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(compress(y, "squared_relu"), relu24_counts(y))`` from one read of ``y`` (T and F multiples of 64)."""
  lib = library.load()
  T, F = y_TxF.shape
  call = jax.ffi.ffi_call("jsparse_cslt_compress_counts",
                          (jax.ShapeDtypeStruct((lib.compressed_size(T, F, y_TxF.dtype),), jnp.uint8),
                           jax.ShapeDtypeStruct((F,), jnp.int32)), vmap_method="sequential")
  return call(y_TxF)


def recipe_backward(y1_TxF: jax.Array, dy2_TxF: jax.Array, slot_F: jax.Array, n_dense: int,
                    method: str = "auto", mask24: bool = True) -> tuple[jax.Array, ...]:
  """The activation recipe's compressed backward operands in one pass over ``y1`` and ``dy2`` (``csrc/recipe24.h``).

  Returns ``(dy1, h_t, dy1_t, dense_h, dense_dy1)``: cuSPARSELt's compressed buffers of ``dy1`` (T x F, 2:4 along F),
  ``h.T`` and ``dy1.T`` (F x T, pruned 2:4 along T by magnitude), and the unpruned rows of ``h.T`` / ``dy1.T`` of the
  features with ``slot_F[f] >= 0`` at row ``slot_F[f]`` of ``(max(n_dense, 1), T)`` arrays. ``method`` as
  :func:`compress_t`'s (``"library"``: the kernel writes the pruned operands densely and the library compresses them).
  ``mask24=False``: ``r = relu(y1)`` is not 2:4-masked (an FFN without the 2:4 activation), and ``dy1`` comes back
  dense (T x F in ``y1``'s dtype) for its dense dx GEMM.
  """
  lib = library.load()
  T, F = y1_TxF.shape
  dtype = y1_TxF.dtype
  ft_bytes = lib.compressed_size(F, T, dtype)
  dy1 = (jax.ShapeDtypeStruct((lib.compressed_size(T, F, dtype),), jnp.uint8) if mask24
         else jax.ShapeDtypeStruct((T, F), dtype))
  dense = jax.ShapeDtypeStruct((max(n_dense, 1), T), dtype)
  call = jax.ffi.ffi_call("jsparse_recipe_bwd", (dy1, jax.ShapeDtypeStruct((ft_bytes,), jnp.uint8),
                                                 jax.ShapeDtypeStruct((ft_bytes,), jnp.uint8), dense, dense),
                          vmap_method="sequential")
  return call(y1_TxF, dy2_TxF, slot_F.astype(jnp.int32), method=np.int32(METHODS[method]),
              mask24=np.int32(bool(mask24)))


def matmul(packed: jax.Array, dense: jax.Array, *, m: int, k: int, mode: int, search: int = 0,
           out_dtype=None) -> jax.Array:
  """The sparse GEMM on a compressed A (``m x k``); see the module docstring for ``mode``.

  ``search``: 0 the library's default algorithm, 1 ``cusparseLtMatmulSearch`` -- run once per shape on its first call,
  the choice kept in the cached plan.
  """
  if mode & 1:
    n, kk = dense.shape
  else:
    kk, n = dense.shape
  out_shape = (n, m) if mode & 2 else (m, n)
  assert kk == k, (dense.shape, m, k, mode)
  out_dtype = dense.dtype if out_dtype is None else out_dtype
  call = jax.ffi.ffi_call("jsparse_cslt_matmul", jax.ShapeDtypeStruct(out_shape, out_dtype),
                          vmap_method="sequential")
  return call(packed, dense, m=np.int64(m), n=np.int64(n), k=np.int64(k), mode=np.int32(mode),
              search=np.int32(int(search)))
