"""Public 2:4 sparse matmul: ``sparse_matmul``, ``compress_24``, ``squared_relu_24_compress``.

``implementation``:

* ``None``         -- cuSPARSELt on a Hopper GPU when the FFI library builds and the shapes are aligned, else the XLA
  masked-dense path (with a one-time warning saying why).
* ``"cusparselt"`` -- the cuSPARSELt FFI path; raises if it cannot run (no CUDA GPU, nvcc or cuSPARSELt missing,
  unaligned shapes, unsupported dtype). It never silently falls back.
* ``"xla"``        -- the pure-jnp reference (:mod:`jsparse.kernels.sparse_matmul.reference`).

``JSPARSE_CUSPARSELT_SEARCH=1`` (read at trace time) runs ``cusparseLtMatmulSearch`` on the first call of each GEMM
shape and keeps the chosen algorithm in the cached plan. jsparse's benchmarks run with it on (the project's H100
notes found the searched algorithm faster than the default at every FFN shape); it is off by default because it
blocks the first call of every new shape while it times each algorithm, and because on the H100 the search crashed
the process (CUDA_ERROR_ILLEGAL_INSTRUCTION) on a small float16 weight-sparse product (128 x 256 x 192) in the test
suite.
"""

from __future__ import annotations

import math
import os
import warnings

import jax
import jax.numpy as jnp

from jsparse.kernels import _common as common
from jsparse.kernels.activation import reference as act_ref
from jsparse.kernels.sparse_matmul import reference as ref
from jsparse.kernels.sparse_matmul.compressed import Compressed24

IMPLEMENTATIONS = (None, "cusparselt", "xla")
OPERANDS = ("a", "b")
CUSPARSELT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The compress kernel works on 64 x 64 tiles of the sparse-A-role matrix (rows x K); the dense operand's free
# dimension only needs cuSPARSELt's 16-element alignment.
SPARSE_ALIGN = 64
DENSE_ALIGN = 16

_warned: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    warnings.warn(message, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch


def _cusparselt_supports(op: str, dtype, sparse_shape: tuple[int, int], dense_free: int) -> tuple[bool, str]:
  """Whether the cuSPARSELt path supports a product whose sparse-A-role matrix is ``sparse_shape`` (rows, K)."""
  if jnp.dtype(dtype) not in CUSPARSELT_DTYPES:
    return False, f"{op}: the cuSPARSELt path supports bfloat16 and float16, got {jnp.dtype(dtype)}"
  rows, k = sparse_shape
  for what, size, align in (("the sparse operand's rows", rows, SPARSE_ALIGN), ("K", k, SPARSE_ALIGN),
                            ("the dense operand's free dimension", dense_free, DENSE_ALIGN)):
    if size % align:
      return False, f"{op}: {what} has size {size}, not a multiple of {align} (the cuSPARSELt path's alignment)"
  return True, ""


def resolve_implementation(op: str, implementation: str | None, *, supported: bool, why_not: str,
                           warn: bool = True) -> str:
  """``"cusparselt"`` or ``"xla"`` for the user's ``implementation``.

  ``None`` warns once per reason when it falls back (``warn=False``: the caller chose the XLA path already, e.g. a
  ``Compressed24`` made on it).

  Raises:
    ValueError: unknown implementation, or ``"cusparselt"`` for an input it does not support.
    jsparse.kernels.cusparselt.CuSparseLtUnavailableError: ``"cusparselt"`` where the library cannot run.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "xla":
    return "xla"
  from jsparse.kernels.cusparselt import library  # the FFI layer is only imported when it may be used

  if implementation == "cusparselt":
    if not supported:
      raise ValueError(why_not)
    library.require(op)
    return "cusparselt"
  ok, why = library.available(prefer=True)
  if not ok:
    if warn:
      _warn_once(f"jsparse: cuSPARSELt is not used ({why}); 2:4 products run on the XLA masked-dense path")
    return "xla"
  if not supported:
    if warn:
      _warn_once(f"{why_not}; this product runs on the XLA masked-dense path")
    return "xla"
  return "cusparselt"


# ----------------------------------------------------------------------------------------------------------------------
# Input checks


def _check_operand(op: str, name: str, x: jax.Array) -> None:
  common.check_floating(op, name, x)


def _check_sparse_a(op: str, x: jax.Array) -> tuple[int, int]:
  _check_operand(op, "a", x)
  common.check_rank(op, "a", x, 2)
  common.check_multiple(op, "a's last axis (K)", x.shape[-1], 4, "the 2:4 group size")
  return math.prod(x.shape[:-1]), x.shape[-1]


def _check_sparse_b(op: str, x: jax.Array) -> tuple[int, int]:
  _check_operand(op, "b", x)
  common.check_rank(op, "b", x, 2, 2)
  common.check_multiple(op, "b's first axis (K)", x.shape[0], 4, "the 2:4 group size")
  return x.shape[0], x.shape[1]


# ----------------------------------------------------------------------------------------------------------------------
# Compression


def compress_24(x: jax.Array, *, operand: str = "a", transposable: bool = False,
                implementation: str | None = None) -> Compressed24:
  """Compresses a 2:4 operand once, for any number of :func:`sparse_matmul` calls.

  Compress a weight once per optimizer step and an activation once per use; the product then only runs the sparse
  GEMM. If ``x`` is not 2:4 along K, it is pruned with :func:`jsparse.nm_prune`'s rule (two largest |x| of 4).

  Args:
    x: ``operand="a"``: ``(..., M, K)``, 2:4 along the last axis (leading dims are flattened into rows).
      ``operand="b"``: ``(K, N)``, 2:4 along axis 0 (the contraction axis of ``a @ b``).
    operand: which side of ``a @ b`` it will be.
    transposable: ``operand="b"`` only: ``x`` is 2:4 along *both* axes (e.g. from
      :func:`jsparse.transposable_24_prune`), so the backward ``dx = g @ x.T`` runs sparse too; its packing is made
      here. If ``x`` is not 2:4 along N, that product uses ``x`` pruned along N.
    implementation: ``None``, ``"cusparselt"`` or ``"xla"`` (see the module docstring). On the XLA path only the
      source is kept and the product runs masked-dense.

  Returns:
    :class:`Compressed24` (differentiable in ``x``).

  Raises:
    ValueError: bad operand, dtype, rank or sizes; ``"cusparselt"`` with unaligned sizes or a dtype other than
      bfloat16/float16.
  """
  op = "compress_24"
  if operand not in OPERANDS:
    raise ValueError(f"{op}: operand must be one of {OPERANDS}, got {operand!r}")
  if operand == "a":
    if transposable:
      raise ValueError(f"{op}: transposable=True applies to operand='b' (a weight), got operand='a'")
    rows, k = _check_sparse_a(op, x)
    ok, why = _cusparselt_supports(op, x.dtype, (rows, k), DENSE_ALIGN)
  else:
    k, n = _check_sparse_b(op, x)
    ok, why = _cusparselt_supports(op, x.dtype, (n, k), DENSE_ALIGN)
    if ok and transposable:
      ok, why = _cusparselt_supports(op, x.dtype, (k, n), DENSE_ALIGN)
  impl = resolve_implementation(op, implementation, supported=ok, why_not=why)
  packed = packed_t = None
  if impl == "cusparselt":
    from jsparse.kernels.cusparselt import ops

    src = jax.lax.stop_gradient(x)
    if operand == "a":
      packed = ops.compress(src.reshape(rows, k))
    else:
      # cuSPARSELt's sparse operand is always A with 2:4 rows: b enters the product as b.T (N x K), compressed by the
      # transposing kernel straight from b (a transposed copy cost a pass over the weight: 84 us for 4096 x 14336).
      packed, _ = ops.compress_t(src, jnp.full((n,), -1, jnp.int32), 0)
      if transposable:
        packed_t = ops.compress(src)
  return Compressed24(x, packed, packed_t, tuple(x.shape), operand, "none", bool(transposable))


def squared_relu_24_compress(y: jax.Array, *, return_counts: bool = False,
                             implementation: str | None = None):
  """The FFN activation path in one pass: ``relu(y)**2``, 2:4 selection and compression of the result.

  The pattern and values are exactly :func:`jsparse.squared_relu_nm`'s (n=2, m=4): the two largest pre-activations of
  every 4 along the last axis, ties to the lower index, NaN kept. Use the result as ``a`` in
  ``sparse_matmul(h, w2)``; the gradient reaches ``y`` with the masked rule (``2 relu(y) dh`` where kept).

  Args:
    y: pre-activation ``(..., M, F)``, F a multiple of 4.
    return_counts: also return, per feature, how many rows have a kept, positive ``relu(y)`` (int32 ``(F,)``; the
      activation recipe's density ranking), counted by the same kernel on the cuSPARSELt path.
    implementation: ``None``, ``"cusparselt"`` or ``"xla"``.

  Returns:
    :class:`Compressed24` with ``operand="a"`` and ``activation="squared_relu"``; with ``return_counts``, the pair
    ``(Compressed24, counts_F)``.
  """
  op = "squared_relu_24_compress"
  rows, k = _check_sparse_a(op, y)
  ok, why = _cusparselt_supports(op, y.dtype, (rows, k), DENSE_ALIGN)
  impl = resolve_implementation(op, implementation, supported=ok, why_not=why)
  packed = counts_F = None
  if impl == "cusparselt":
    from jsparse.kernels.cusparselt import ops

    y2 = jax.lax.stop_gradient(y).reshape(rows, k)
    if return_counts:
      packed, counts_F = ops.compress_counts(y2)
    else:
      packed = ops.compress(y2, activation="squared_relu")
  elif return_counts:
    counts_F = act_ref.kept_positive_counts(jax.lax.stop_gradient(y).reshape(rows, k))
  out = Compressed24(y, packed, None, tuple(y.shape), "a", "squared_relu", False)
  return (out, counts_F) if return_counts else out


# ----------------------------------------------------------------------------------------------------------------------
# The product


def search_mode() -> int:
  """``$JSPARSE_CUSPARSELT_SEARCH`` (read at trace time): ``1`` runs ``cusparseLtMatmulSearch`` once per shape (the
  choice is cached with the plan), anything else (default ``0``) uses the library's default algorithm."""
  value = os.environ.get("JSPARSE_CUSPARSELT_SEARCH", "0").strip()
  if value not in ("", "0", "1"):
    raise ValueError(f"JSPARSE_CUSPARSELT_SEARCH must be 0 or 1, got {value!r}")
  return 1 if value == "1" else 0


def sparse_matmul(a, b, *, sparse_operand: str = "a", implementation: str | None = None) -> jax.Array:
  """``a @ b`` with one operand 2:4-sparse along the contraction axis K, on Hopper's sparse tensor cores.

  ``sparse_operand="a"`` is the activation-sparse product (Haziza's FFN2 ``h @ W2``), ``"b"`` the weight-sparse one
  (S-STE's ``x @ S(W)``). The sparse operand is either a dense array with zeros (compressed on every call) or a
  :class:`Compressed24` from :func:`compress_24` / :func:`squared_relu_24_compress` (compressed once). Numerics: the
  sparse operand pruned 2:4 along K (identity if it already is 2:4), float32 accumulation, one rounding.

  Gradients (the dense products run in XLA):

  * sparse ``a``: ``da = g @ b.T`` dense (then through the compress op's rule: identity, or the squared-ReLU mask);
    ``db = a.T @ g`` dense (``a`` is 2:4 along K, not along M).
  * sparse ``b``: ``da = g @ b.T`` *sparse* when ``b`` was compressed with ``transposable=True`` (2:4 along N as
    well), dense otherwise; ``db = a.T @ g`` dense.

  Args:
    a: ``(..., M, K)`` (leading dims flattened into M), or a :class:`Compressed24` with ``operand="a"``.
    b: ``(K, N)``, or a :class:`Compressed24` with ``operand="b"``.
    sparse_operand: ``"a"`` or ``"b"``.
    implementation: ``None``, ``"cusparselt"`` or ``"xla"`` (see the module docstring).

  Returns:
    ``(..., M, N)`` in the operands' dtype.

  Raises:
    ValueError: mismatched shapes or dtypes, K not a multiple of 4, a ``Compressed24`` on the wrong side;
      ``"cusparselt"`` with unaligned sizes (rows of the sparse operand and K multiples of 64, the dense operand's
      free dimension a multiple of 16) or a dtype other than bfloat16/float16.
    jsparse.kernels.cusparselt.CuSparseLtUnavailableError: ``"cusparselt"`` without a CUDA GPU, nvcc or cuSPARSELt.
  """
  op = "sparse_matmul"
  if sparse_operand not in OPERANDS:
    raise ValueError(f"{op}: sparse_operand must be one of {OPERANDS}, got {sparse_operand!r}")
  dense_name = "b" if sparse_operand == "a" else "a"
  dense = b if sparse_operand == "a" else a
  sparse = a if sparse_operand == "a" else b
  if isinstance(dense, Compressed24):
    raise ValueError(f"{op}: {dense_name} is a Compressed24 but sparse_operand={sparse_operand!r}")
  if isinstance(sparse, Compressed24) and sparse.operand != sparse_operand:
    raise ValueError(f"{op}: the Compressed24 was made with operand={sparse.operand!r}, "
                     f"but sparse_operand={sparse_operand!r}")
  a_arr = a.source if isinstance(a, Compressed24) else a
  b_arr = b.source if isinstance(b, Compressed24) else b
  _check_operand(op, "a", a_arr)
  _check_operand(op, "b", b_arr)
  common.check_rank(op, "a", a_arr, 2)
  common.check_rank(op, "b", b_arr, 2, 2)
  if jnp.result_type(a_arr) != jnp.result_type(b_arr):
    raise ValueError(f"{op}: a and b must have the same dtype, got {jnp.result_type(a_arr)} and "
                     f"{jnp.result_type(b_arr)}")
  K = a_arr.shape[-1]
  if b_arr.shape[0] != K:
    raise ValueError(f"{op}: a's last axis (K={K}) must match b's first axis, got a{tuple(a_arr.shape)} "
                     f"and b{tuple(b_arr.shape)}")
  common.check_multiple(op, "K", K, 4, "the 2:4 group size")
  rows = math.prod(a_arr.shape[:-1])
  N = b_arr.shape[1]
  if sparse_operand == "a":
    ok, why = _cusparselt_supports(op, a_arr.dtype, (rows, K), N)
  else:
    ok, why = _cusparselt_supports(op, a_arr.dtype, (N, K), rows)
  if isinstance(sparse, Compressed24) and not sparse.on_device:
    if implementation == "cusparselt":
      raise ValueError(f"{op}: implementation='cusparselt' needs a Compressed24 made on the cuSPARSELt path; this "
                       f"one was compressed on the XLA path (compress_24(..., implementation='cusparselt'))")
    ok, why = False, f"{op}: the Compressed24 operand was compressed on the XLA path"
  impl = resolve_implementation(op, implementation, supported=ok, why_not=why,
                                warn=not (isinstance(sparse, Compressed24) and not sparse.on_device))
  if impl == "xla":
    return _xla_matmul(a, b, sparse_operand)
  from jsparse.kernels.sparse_matmul import vjp

  if not isinstance(sparse, Compressed24):
    sparse = compress_24(sparse, operand=sparse_operand, implementation="cusparselt")
  search = search_mode()
  if sparse_operand == "a":
    out = vjp.sparse_a_matmul(sparse, b_arr, search=search)
  else:
    out = vjp.sparse_b_matmul(a_arr.reshape(rows, K), sparse, search=search)
  return out.reshape(*a_arr.shape[:-1], N)


def sparse_tn_matmul(a, b, *, dense_rows=None, implementation: str | None = None) -> jax.Array:
  """``a.T @ b`` with ``a`` pruned 2:4 along its *first* axis K (the contraction axis), on the sparse tensor cores.

  The weight-gradient product of token-wise 2:4 sparsity: for ``a = h (T x F)`` and ``b = dout (T x D)`` it is
  ``dW2 (F x D)`` with ``h`` 2:4 along tokens. On the cuSPARSELt path one kernel prunes and compresses ``a.T`` while
  reading ``a`` (no transposed copy in memory). Rows of the result listed in ``dense_rows`` are computed from the
  unpruned ``a`` instead (a dense GEMM over those columns of ``a``, written over the sparse result): the activation
  recipe's 95/5 split. Numerics as :func:`sparse_matmul`'s (nm_prune's rule, float32 accumulation, one rounding).

  Not differentiable on the cuSPARSELt path (it is the product of a backward pass); the XLA path is plain ``jnp``.

  Args:
    a: ``(K, M)``.
    b: ``(K, N)``, same dtype.
    dense_rows: optional int vector of distinct row indices into the ``(M, N)`` result (static length).
    implementation: ``None``, ``"cusparselt"`` or ``"xla"`` (see the module docstring).

  Returns:
    ``(M, N)`` in the operands' dtype.

  Raises:
    ValueError: ranks, shapes or dtypes that do not match, K not a multiple of 4; ``"cusparselt"`` with K or M not
      multiples of 64, N not a multiple of 16, or a dtype other than bfloat16/float16.
    jsparse.kernels.cusparselt.CuSparseLtUnavailableError: ``"cusparselt"`` without a CUDA GPU, nvcc or cuSPARSELt.
  """
  op = "sparse_tn_matmul"
  _check_operand(op, "a", a)
  _check_operand(op, "b", b)
  common.check_rank(op, "a", a, 2, 2)
  common.check_rank(op, "b", b, 2, 2)
  if jnp.result_type(a) != jnp.result_type(b):
    raise ValueError(f"{op}: a and b must have the same dtype, got {jnp.result_type(a)} and {jnp.result_type(b)}")
  K, M = a.shape
  if b.shape[0] != K:
    raise ValueError(f"{op}: a's first axis (K={K}) must match b's first axis, got a{tuple(a.shape)} and "
                     f"b{tuple(b.shape)}")
  common.check_multiple(op, "K", K, 4, "the 2:4 group size")
  N = b.shape[1]
  if dense_rows is not None:
    dense_rows = jnp.asarray(dense_rows)
    if dense_rows.ndim != 1 or not jnp.issubdtype(dense_rows.dtype, jnp.integer):
      raise ValueError(f"{op}: dense_rows must be a 1-D integer array, got {dense_rows.dtype}{dense_rows.shape}")
    if dense_rows.shape[0] == 0:
      dense_rows = None
  ok, why = _cusparselt_supports(op, a.dtype, (M, K), N)
  impl = resolve_implementation(op, implementation, supported=ok, why_not=why)
  if impl == "xla":
    pruned_KxM = ref.prune_24(a, 0)
    if dense_rows is not None:
      dense_M = jnp.zeros((M,), bool).at[dense_rows].set(True)
      pruned_KxM = jnp.where(dense_M[None, :], a, pruned_KxM)
    return ref.matmul(pruned_KxM.T, b)
  from jsparse.kernels.cusparselt import ops

  n_dense = 0 if dense_rows is None else dense_rows.shape[0]
  slot_M = jnp.full((M,), -1, jnp.int32)
  if n_dense:
    slot_M = slot_M.at[dense_rows].set(jnp.arange(n_dense, dtype=jnp.int32), unique_indices=True)
  packed, dense_SxK = ops.compress_t(a, slot_M, n_dense)
  return tn_from_packed(packed, dense_SxK, b, dense_rows, m=M, search=search_mode())


def tn_from_packed(packed: jax.Array, dense_SxK: jax.Array, b_KxN: jax.Array, dense_rows: jax.Array | None, *,
                   m: int, search: int) -> jax.Array:
  """:func:`sparse_tn_matmul`'s product from an already compressed ``a.T`` (``m x K``) and its unpruned
  ``dense_rows`` (``dense_SxK``, row ``i`` for result row ``dense_rows[i]``): the sparse GEMM, the dense rows
  recomputed by XLA and written over it."""
  from jsparse.kernels.cusparselt import ops

  out_MxN = ops.matmul(packed, b_KxN, m=m, k=b_KxN.shape[0], mode=0, search=search)
  if dense_rows is not None:
    out_MxN = out_MxN.at[dense_rows].set(ref.matmul(dense_SxK, b_KxN), unique_indices=True)
  return out_MxN


def _xla_matmul(a, b, sparse_operand: str) -> jax.Array:
  if isinstance(a, Compressed24):
    return ref.matmul(a.to_dense(), b)
  if isinstance(b, Compressed24):
    return ref.matmul(a, b.to_dense())
  return ref.sparse_matmul(a, b, sparse_operand)
