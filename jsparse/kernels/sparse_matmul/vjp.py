"""The cuSPARSELt path of ``sparse_matmul`` as ``custom_vjp`` rules.

Forward: one sparse GEMM on the packed operand. Backward (``g`` the output cotangent):

=================  ==============================================  ============================================
product            ``da``                                          ``db``
=================  ==============================================  ============================================
sparse ``a``       ``g @ b.T``: dense (XLA)                          ``a.T @ g``: dense (a is 2:4 along K, not M)
sparse ``b``       ``g @ b.T``: sparse if ``b`` is transposable      ``a.T @ g``: dense
                   (packed along N as well), else dense
=================  ==============================================  ============================================

The dense operand is read back from the ``Compressed24``'s source (pruned, or squared-ReLU'd and masked, by the
XLA reference), and the source's cotangent goes through that function's VJP -- so the compress ops keep their
gradient rules (straight-through pruning, masked squared-ReLU). The packed buffers get no cotangent.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from jsparse.kernels.cusparselt import ops
from jsparse.kernels.sparse_matmul import reference as ref
from jsparse.kernels.sparse_matmul.compressed import Compressed24


@dataclasses.dataclass(frozen=True)
class _Spec:
  rows: int
  k: int
  n: int
  activation: str
  search: int


def _dense_and_pullback(source, activation: str, axis: int):
  return jax.vjp(lambda s: ref.dense_operand(s, activation, axis), source)


# ----------------------------------------------------------------------------------------------------------------------
# Sparse a: out (rows, N) = a (rows, K) @ b (K, N)


# b enters as it is (row-major K x N, op N; output row-major). cuSPARSELt 0.8.0 on the H100 segfaulted in
# cusparseLtMatmulSearch with b transposed and a row-major output (mode 1) at 4096^3, so that layout is not used.
SPARSE_A_MODE = 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_a(spec: _Spec, source, packed, b):
  dense = b.T if SPARSE_A_MODE & 1 else b
  return ops.matmul(packed, dense, m=spec.rows, k=spec.k, mode=SPARSE_A_MODE, search=spec.search)


def _sparse_a_fwd(spec, source, packed, b):
  return _sparse_a(spec, source, packed, b), (source, b)


def _sparse_a_bwd(spec, res, g):
  source, b = res
  a_dense, pull = _dense_and_pullback(source, spec.activation, -1)
  da = ref.matmul(g, b.T)
  (dsource,) = pull(da.reshape(source.shape))
  db = ref.matmul(a_dense.reshape(spec.rows, spec.k).T, g)
  return dsource, None, db


_sparse_a.defvjp(_sparse_a_fwd, _sparse_a_bwd)


def sparse_a_matmul(a: Compressed24, b: jax.Array, *, search: int) -> jax.Array:
  """``a @ b`` for a packed ``a`` (rows, K) and dense ``b`` (K, N); returns (rows, N)."""
  k = a.shape[-1]
  rows = a.source.size // k
  spec = _Spec(rows, k, b.shape[1], a.activation, search)
  return _sparse_a(spec, a.source, a.packed, b)


# ----------------------------------------------------------------------------------------------------------------------
# Sparse b: out (rows, N) = x (rows, K) @ w (K, N), computed as (w.T @ x.T).T with A = w.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_b(spec: _Spec, x, source, packed, packed_t):
  return ops.matmul(packed, x, m=spec.n, k=spec.k, mode=3, search=spec.search)


def _sparse_b_fwd(spec, x, source, packed, packed_t):
  return _sparse_b(spec, x, source, packed, packed_t), (x, source, packed_t)


def _sparse_b_bwd(spec, res, g):
  x, source, packed_t = res
  w_dense, pull = _dense_and_pullback(source, "none", 0)
  if packed_t is not None:
    # dx (rows, K) = g (rows, N) @ w.T: sparse with A = w (K x N, 2:4 along N), contraction over N.
    dx = ops.matmul(packed_t, g, m=spec.k, k=spec.n, mode=3, search=spec.search)
  else:
    dx = ref.matmul(g, w_dense.T)
  (dsource,) = pull(ref.matmul(x.T, g))
  return dx, dsource, None, None


_sparse_b.defvjp(_sparse_b_fwd, _sparse_b_bwd)


def sparse_b_matmul(x: jax.Array, w: Compressed24, *, search: int) -> jax.Array:
  """``x @ w`` for dense ``x`` (rows, K) and a packed ``w`` (K, N); returns (rows, N)."""
  k, n = w.shape
  spec = _Spec(x.shape[0], k, n, "none", search)
  return _sparse_b(spec, x, w.source, w.packed, w.packed_t)
