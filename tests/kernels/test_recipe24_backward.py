"""recipe24_backward: the 2:4 activation recipe's backward GEMMs from y1 and dy2, XLA (CPU) and cuSPARSELt.

The oracle is numpy: the 2:4 mask of relu(y1) along F (two largest, ties to the lower index), r = relu(y1) masked,
h = r^2 and dy1 = 2 dy2 r rounded to the dtype, then float64 products with h and dy1 masked 2:4 along T by
magnitude except on the ``n_dense`` features with the most non-zero r (ties: the higher index is denser).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from tests.kernels.test_sparse_matmul import DTYPES, IMPLS, _check, _mask_k, _x


def _oracle(y1, dy2, x, dout, w1, n_dense, activation_24=True):
  y = np.asarray(y1, np.float32)
  keep = _mask_k(np.maximum(y, 0), 1) if activation_24 else True  # relu keys; the inputs have no NaN
  r = np.where(keep, np.maximum(y, 0), 0).astype(np.float32)
  dtype = np.asarray(y1).dtype
  h = np.asarray(jnp.asarray(r * r).astype(dtype), np.float64)
  dy1 = np.asarray(jnp.asarray(2 * np.asarray(dy2, np.float32) * r).astype(dtype), np.float64)
  counts = (r > 0).sum(0)
  dense = np.argsort(counts, kind="stable")[len(counts) - n_dense:] if n_dense else np.zeros(0, int)

  def token24(a):
    out = np.where(_mask_k(a, 0), a, 0)
    out[:, dense] = a[:, dense]
    return out

  x64, dout64, w64 = (np.asarray(a, np.float64) for a in (x, dout, w1))
  return dy1 @ w64.T, (token24(dy1).T @ x64).T, token24(h).T @ dout64


def _inputs(T, D, F, dtype):
  return (_x((T, F), dtype, 1), _x((T, F), dtype, 2), _x((T, D), dtype, 3), _x((T, D), dtype, 4),
          _x((D, F), dtype, 5, scale=0.1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_dense,activation_24", [(0, True), (64, True), (64, False)])
def test_matches_the_recipe_composition(impl, dtype, n_dense, activation_24):
  # activation_24=False: no 2:4 mask on relu(y1) (S-STE weights with the token-wise 2:4 weight gradients), dx dense.
  T, D, F = 256, 64, 192
  args = _inputs(T, D, F, dtype)
  f = jax.jit(lambda *a: jsparse.recipe24_backward(*a, n_dense=n_dense, activation_24=activation_24,
                                                   implementation=impl))
  dx, dw1, dw2 = f(*args)
  assert (dx.shape, dw1.shape, dw2.shape) == ((T, D), (D, F), (F, D))
  assert dx.dtype == dw1.dtype == dw2.dtype == dtype
  for got, want in zip((dx, dw1, dw2), _oracle(*args, n_dense, activation_24)):
    _check(got, want, dtype)


@pytest.mark.parametrize("activation_24", [True, False])
def test_dense_features_are_the_ones_with_most_nonzeros(activation_24):
  T, D, F = 64, 16, 32
  y1 = np.full((T, F), -1.0, np.float32)
  y1[:40, 7] = 2.0  # feature 7: 40 tokens; feature 20: 30 tokens; the rest none
  y1[:30, 20] = 2.0
  y1, dy2, x, dout, w1 = jnp.asarray(y1), *_inputs(T, D, F, jnp.float32)[1:]
  _, _, dw2 = jsparse.recipe24_backward(y1, dy2, x, dout, w1, n_dense=2, activation_24=activation_24,
                                        implementation="xla")
  h = np.where(np.asarray(y1) > 0, 4.0, 0.0)
  want = h.T @ np.asarray(dout, np.float64)  # features 7 and 20 dense: all their tokens count
  np.testing.assert_allclose(np.asarray(dw2)[[7, 20]], want[[7, 20]], rtol=1e-5)
  pruned = np.where(_mask_k(h, 0), h, 0).T @ np.asarray(dout, np.float64)
  assert np.abs(pruned[7] - want[7]).max() > 1e-3  # pruning along T would have changed them


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_dense=64), r"n_dense must be in \[0, F=64\)"),
    (dict(n_dense=-1), "n_dense"),
    (dict(n_dense=0, implementation="tpu"), "implementation"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
  args = _inputs(64, 16, 64, jnp.float32)
  with pytest.raises(ValueError, match=match):
    jsparse.recipe24_backward(*args, **kwargs)


def test_bad_shapes_and_dtypes_raise_value_error():
  y1, dy2, x, dout, w1 = _inputs(64, 16, 64, jnp.float32)
  with pytest.raises(ValueError, match="want y1"):
    jsparse.recipe24_backward(y1, dy2, x, dout, w1.T, n_dense=0, implementation="xla")
  with pytest.raises(ValueError, match="one dtype"):
    jsparse.recipe24_backward(y1.astype(jnp.bfloat16), dy2, x, dout, w1, n_dense=0, implementation="xla")
  with pytest.raises(ValueError, match="multiple of 64"):
    b = [a.astype(jnp.bfloat16) for a in _inputs(96, 16, 64, jnp.float32)]
    jsparse.recipe24_backward(*b, n_dense=0, implementation="cusparselt")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["auto", "library"])  # library: the layout-mismatch fallback, forced
def test_fused_operands_are_bit_identical_to_the_unfused_kernels(dtype, method):
  from jsparse.kernels.activation.reference import masked_relu
  from jsparse.kernels.cusparselt import ops

  T, F = 320, 192  # 5 x 3 tiles of 64
  y1, dy2 = _x((T, F), dtype, 1), _x((T, F), dtype, 2)
  # Ties: equal pre-activations (the selection's tie rule) and zero gradients at kept positions (dy1's own zeros then
  # tie with the masked ones in its magnitude selection).
  y1 = y1.at[:, 8:12].set(jnp.asarray(0.5, dtype)).at[::3, 16:20].set(jnp.asarray(-1.0, dtype))
  dy2 = dy2.at[::2].set(jnp.asarray(0.0, dtype))
  rows = jnp.asarray([5, 64, 191], jnp.int32)
  slot = jnp.full((F,), -1, jnp.int32).at[rows].set(jnp.arange(3, dtype=jnp.int32))

  def unfused(y1, dy2):
    r, _ = masked_relu(y1)
    h, dy1 = (r * r).astype(dtype), (2.0 * dy2.astype(jnp.float32) * r).astype(dtype)
    return ops.compress(dy1), *ops.compress_t(h, slot, 3), *ops.compress_t(dy1, slot, 3), h, dy1

  got = jax.jit(lambda y, d: ops.recipe_backward(y, d, slot, 3, method))(y1, dy2)
  dx_p, h_p, h_rows, g_p, g_rows, h, dy1 = jax.jit(unfused)(y1, dy2)
  if method == "auto":
    for a, b in zip(got, (dx_p, h_p, g_p)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  else:
    # The library places the metadata of a group with fewer than two non-zeros its own way, so the bytes may differ
    # where the operand is ambiguous; the products may not.
    w_FxN, x_TxN = _x((F, 32), dtype, 8), _x((T, 32), dtype, 9)
    mm = jax.jit(lambda p, b, m, k: ops.matmul(p, b, m=m, k=k, mode=0), static_argnums=(2, 3))
    for a, b, dense, (m, k) in ((got[0], dx_p, w_FxN, (T, F)), (got[1], h_p, x_TxN, (F, T)),
                                (got[2], g_p, x_TxN, (F, T))):
      np.testing.assert_array_equal(np.asarray(mm(a, dense, m, k), np.float32),
                                    np.asarray(mm(b, dense, m, k), np.float32))
  np.testing.assert_array_equal(np.asarray(got[3], np.float32), np.asarray(h.T[rows], np.float32))
  np.testing.assert_array_equal(np.asarray(got[4], np.float32), np.asarray(dy1.T[rows], np.float32))
  np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(h_rows))
  np.testing.assert_array_equal(np.asarray(got[4]), np.asarray(g_rows))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["auto", "library"])
def test_unmasked_operands_are_bit_identical_to_the_unfused_kernels(dtype, method):
  # mask24=False: dy1 = 2 dy2 relu(y1) comes back dense, exactly as XLA rounds it; h^T and dy1^T as compress_t's.
  from jsparse.kernels.cusparselt import ops

  T, F = 320, 192
  y1 = _x((T, F), dtype, 1).at[:, 8:12].set(jnp.asarray(0.5, dtype))
  dy2 = _x((T, F), dtype, 2).at[::2].set(jnp.asarray(0.0, dtype))
  rows = jnp.asarray([5, 64, 191], jnp.int32)
  slot = jnp.full((F,), -1, jnp.int32).at[rows].set(jnp.arange(3, dtype=jnp.int32))

  def unfused(y1, dy2):
    r = jnp.maximum(y1.astype(jnp.float32), 0.0)
    h, dy1 = (r * r).astype(dtype), (2.0 * dy2.astype(jnp.float32) * r).astype(dtype)
    return dy1, ops.compress_t(h, slot, 3)[0], ops.compress_t(dy1, slot, 3)[0], h, dy1

  got = jax.jit(lambda y, d: ops.recipe_backward(y, d, slot, 3, method, mask24=False))(y1, dy2)
  dy1_want, h_p, g_p, h, dy1 = jax.jit(unfused)(y1, dy2)
  assert got[0].shape == (T, F) and got[0].dtype == dtype
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(dy1_want))
  if method == "auto":
    for a, b in zip(got[1:3], (h_p, g_p)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  else:  # the library's metadata of ambiguous groups may differ; the products may not
    x_TxN = _x((T, 32), dtype, 9)
    mm = jax.jit(lambda p, b: ops.matmul(p, b, m=F, k=T, mode=0))
    for a, b in zip(got[1:3], (h_p, g_p)):
      np.testing.assert_array_equal(np.asarray(mm(a, x_TxN), np.float32), np.asarray(mm(b, x_TxN), np.float32))
  np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(h.T[rows]))
  np.testing.assert_array_equal(np.asarray(got[4]), np.asarray(dy1.T[rows]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES + [jnp.float32])
def test_squared_relu_counts_is_the_squared_relu_and_its_positive_counts(impl, dtype):
  if impl != "xla" and dtype == jnp.float32:
    pytest.skip("the cuSPARSELt path takes 16-bit floats")
  y = _x((300, 192), dtype, 12).at[7, 9].set(jnp.nan).at[:, 3].set(jnp.asarray(-0.0, dtype))  # 300: partial block
  h, counts = jax.jit(lambda y: jsparse.squared_relu_counts(y, implementation=impl))(y)
  r = jnp.maximum(y.astype(jnp.float32), 0.0)
  assert h.dtype == dtype and counts.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray((r * r).astype(dtype), np.float32))
  y32 = np.asarray(y, np.float32)
  np.testing.assert_array_equal(np.asarray(counts), (y32 > 0).sum(0))
  assert np.isnan(np.asarray(h, np.float32)[7, 9]) and np.asarray(counts)[3] == 0


def test_squared_relu_counts_bad_input_raises_value_error():
  with pytest.raises(ValueError, match="rank"):
    jsparse.squared_relu_counts(jnp.zeros((4, 4, 4)), implementation="xla")
  with pytest.raises(ValueError, match="floating"):
    jsparse.squared_relu_counts(jnp.zeros((4, 4), jnp.int32), implementation="xla")
  with pytest.raises(ValueError, match="multiple of 64"):
    jsparse.squared_relu_counts(jnp.zeros((64, 96), jnp.bfloat16), implementation="cusparselt")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu24_counts_count_kept_positive_relu(dtype):
  from jsparse.kernels.activation.reference import masked_relu
  from jsparse.kernels.cusparselt import ops

  y1 = _x((300, 192), dtype, 6).at[7, 9].set(jnp.nan)  # 300: a partial block of 256 tokens; NaN is not > 0
  got = jax.jit(ops.relu24_counts)(y1)
  r, _ = masked_relu(y1)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.sum(r > 0, axis=0)))
  unmasked = jax.jit(lambda y: ops.relu24_counts(y, mask24=False))(y1)  # without the 2:4 activation: y > 0
  np.testing.assert_array_equal(np.asarray(unmasked), (np.asarray(y1, np.float32) > 0).sum(0))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_squared_relu_24_compress_counts_kept_positive_features(impl, dtype):
  y = _x((320, 192), dtype, 10).at[:, 4:8].set(jnp.asarray(0.25, dtype))  # ties: the two lower indices are kept
  h24, counts = jax.jit(lambda y: jsparse.squared_relu_24_compress(y, return_counts=True,
                                                                   implementation=impl))(y)
  y32 = np.asarray(y, np.float32)
  keep = _mask_k(np.maximum(y32, 0), 1)
  np.testing.assert_array_equal(np.asarray(counts), ((y32 > 0) & keep).sum(0))
  assert np.asarray(counts)[4:8].tolist() == [320, 320, 0, 0]
  plain = jsparse.squared_relu_24_compress(y, implementation=impl)
  np.testing.assert_array_equal(np.asarray(h24.to_dense(), np.float32), np.asarray(plain.to_dense(), np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_compress_counts_is_bit_identical_to_the_squared_relu_compress(dtype):
  from jsparse.kernels.cusparselt import ops

  y = _x((320, 192), dtype, 11)  # 320 tokens: a partial last block of 256
  packed, counts = jax.jit(ops.compress_counts)(y)
  np.testing.assert_array_equal(np.asarray(packed), np.asarray(jax.jit(
      lambda y: ops.compress(y, activation="squared_relu"))(y)))
  np.testing.assert_array_equal(np.asarray(counts), np.asarray(jax.jit(ops.relu24_counts)(y)))
