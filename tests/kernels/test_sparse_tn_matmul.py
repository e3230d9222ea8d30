"""sparse_tn_matmul: ``a.T @ b`` with ``a`` 2:4 along its first axis and dense rows kept, XLA (CPU) and cuSPARSELt.

The oracle is numpy: ``a`` masked 2:4 along axis 0 by magnitude (ties to the lower index), the ``dense_rows``
columns of ``a`` left unpruned, then a float64 product.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from tests.kernels.test_sparse_matmul import DTYPES, IMPLS, _check, _mask_k, _x


def _oracle(a, b, dense_rows=None):
  a64 = np.where(_mask_k(a, 0), np.asarray(a, np.float64), 0)
  if dense_rows is not None:
    a64[:, np.asarray(dense_rows)] = np.asarray(a, np.float64)[:, np.asarray(dense_rows)]
  return a64.T @ np.asarray(b, np.float64)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_dense", [0, 3, 64])
def test_matches_token_wise_masked_product(impl, dtype, n_dense):
  K, M, N = 256, 192, 48
  a, b = _x((K, M), dtype, 1), _x((K, N), dtype, 2)
  rows = np.random.default_rng(3).permutation(M)[:n_dense].astype(np.int32) if n_dense else None
  f = jax.jit(lambda a, b, r: jsparse.sparse_tn_matmul(a, b, dense_rows=r, implementation=impl))
  out = f(a, b, None if rows is None else jnp.asarray(rows))
  assert out.shape == (M, N) and out.dtype == dtype
  _check(out, _oracle(a, b, rows), dtype)
  if n_dense:  # the dense rows really are unpruned: they differ from the all-pruned product
    pruned = _oracle(a, b)
    assert np.abs(np.asarray(out, np.float64)[rows] - pruned[rows]).max() > 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_agrees_with_the_masked_weight_gradient(impl):
  # The recipe's two split strategies compute the same dW; "overwrite" is this op.
  from jsparse.models import recipe

  T, D, F = 256, 64, 128
  h = jnp.square(jax.nn.relu(_x((T, F), jnp.bfloat16, 4)))
  lhs = _x((T, D), jnp.bfloat16, 5)
  density = jnp.mean(h > 0, axis=0)
  masked = recipe.split_weight_grad(lhs, h, density, 8, strategy="masked", gemm_impl="xla")
  over = recipe.split_weight_grad(lhs, h, density, 8, strategy="overwrite", gemm_impl=impl)
  _check(over, np.asarray(masked, np.float64), jnp.bfloat16)


@pytest.mark.parametrize("call,match", [
    (lambda: jsparse.sparse_tn_matmul(jnp.ones((8, 4)), jnp.ones((4, 4)), implementation="xla"), "first axis"),
    (lambda: jsparse.sparse_tn_matmul(jnp.ones((6, 4)), jnp.ones((6, 4)), implementation="xla"), "multiple of"),
    (lambda: jsparse.sparse_tn_matmul(jnp.ones((8, 4)), jnp.ones((8, 4), jnp.bfloat16), implementation="xla"),
     "same dtype"),
    (lambda: jsparse.sparse_tn_matmul(jnp.ones((8, 4)), jnp.ones((8, 4)), dense_rows=jnp.ones((2, 2), jnp.int32),
                                      implementation="xla"), "1-D integer"),
    (lambda: jsparse.sparse_tn_matmul(jnp.ones((8, 4)), jnp.ones((8, 4)), implementation="tpu"), "implementation"),
])
def test_bad_inputs_raise_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_cusparselt_needs_aligned_16bit_operands():
  with pytest.raises(ValueError, match="multiple of 64"):
    jsparse.sparse_tn_matmul(jnp.ones((96, 64), jnp.bfloat16), jnp.ones((96, 16), jnp.bfloat16),
                             implementation="cusparselt")
  with pytest.raises(ValueError, match="bfloat16 and float16"):
    jsparse.sparse_tn_matmul(jnp.ones((64, 64)), jnp.ones((64, 16)), implementation="cusparselt")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["auto", "jsparse", "library"])  # library: the layout-mismatch fallback, forced
def test_transposed_compress_is_bit_identical_to_compressing_the_transpose(dtype, method):
  from jsparse.kernels.cusparselt import ops

  K, M = 320, 192  # 5 x 3 tiles of 64
  x = _x((K, M), dtype, 7)
  rows = jnp.asarray([5, 64, 191], jnp.int32)
  slot = jnp.full((M,), -1, jnp.int32).at[rows].set(jnp.arange(3, dtype=jnp.int32))
  packed_t, dense = jax.jit(lambda x, s: ops.compress_t(x, s, 3, method))(x, slot)
  packed = jax.jit(lambda x: ops.compress(x.T, method="jsparse"))(x)
  np.testing.assert_array_equal(np.asarray(packed_t), np.asarray(packed))
  np.testing.assert_array_equal(np.asarray(dense, np.float32), np.asarray(x.T[rows], np.float32))
