"""Packed formats: Sparse24 (pack_24 through the Pallas kernel or XLA) and VNMPacked: layout, exact round trips,
bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.kernels.nm import pallas_common as pc
from jsparse.kernels.nm import pallas_pack
from jsparse.kernels.nm import reference as nm_ref
from tests.helpers import FLOAT_DTYPES, IMPLEMENTATIONS, assert_bitwise_equal, implementation

KERNELS = IMPLEMENTATIONS[1:]


def _x(shape, dtype=jnp.float32, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _shape(impl):
  return (64, 2048) if impl == "gpu" else (8, 64)


def _numpy_pack(x, mask):
  """The documented layout, written out in numpy."""
  a, k = np.asarray(x), np.asarray(mask)
  R, K = a.shape
  values = np.zeros((R, K // 2), a.dtype)
  meta = np.zeros((R, (K + 7) // 8), np.uint8)
  for r in range(R):
    for g in range(K // 4):
      idx = np.flatnonzero(k[r, 4 * g:4 * g + 4])
      values[r, 2 * g:2 * g + 2] = a[r, 4 * g + idx]
      meta[r, g // 2] |= (idx[0] | idx[1] << 2) << (4 * (g % 2))
  return values, meta


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_pack_24_layout_and_round_trip(impl, dtype):
  x = _x(_shape(impl), dtype).at[0, 1].set(jnp.nan).at[1, 2].set(-0.0)
  with implementation(impl) as im:
    packed = jsparse.pack_24(x, implementation=im)
  mask = nm_ref.nm_mask(x, 2, 4)
  values, meta = _numpy_pack(x, mask)
  assert_bitwise_equal(packed.values, values)
  np.testing.assert_array_equal(packed.meta, meta)
  assert packed.shape == x.shape and packed.dtype == dtype
  assert_bitwise_equal(jsparse.unpack_24(packed), jnp.where(mask, x, jnp.zeros((), dtype)))
  assert packed.nbytes == x.size * x.dtype.itemsize // 2 + x.size // 8


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_pack_24_with_a_given_mask(impl):
  x = _x((2, 4, 64), jnp.bfloat16, seed=1)
  h, mask = jsparse.squared_relu_nm(x, return_mask=True)  # a pattern chosen by another op
  with implementation(impl) as im:
    packed = jsparse.pack_24(x, mask, implementation=im)
  assert_bitwise_equal(jsparse.unpack_24(packed), jnp.where(mask, x, jnp.zeros((), x.dtype)))
  values, meta = _numpy_pack(x.reshape(8, 64), mask.reshape(8, 64))
  np.testing.assert_array_equal(packed.meta.reshape(8, 8), meta)


@pytest.mark.parametrize("impl", KERNELS)
def test_pack_24_kernel_tiles_the_grid_and_matches_xla_for_any_mask(impl):
  x = _x((8, 64), jnp.float32, seed=2)
  # Not 2:4 everywhere: empty, single, triple and full groups follow the reference's first/last rule too.
  mask = jax.random.bernoulli(jax.random.key(3), 0.5, x.shape)
  expected = jsparse.pack_24(x, mask, implementation="xla")
  values, meta = pallas_pack.pack_24(x, mask, interpret=impl == "interpret", config=pc.BlockConfig(2, 16, 4))
  assert_bitwise_equal(values, expected.values)
  np.testing.assert_array_equal(meta, expected.meta)


def test_pack_24_odd_group_count_uses_xla():
  x = _x((3, 12))  # 3 groups: the last metadata byte is half used, which the kernel does not write
  packed = jsparse.pack_24(x)
  assert packed.meta.shape == (3, 2)
  assert_bitwise_equal(jsparse.unpack_24(packed), jsparse.nm_prune(x))
  with jsparse.pallas_interpret():
    with pytest.raises(ValueError, match="pack_24: implementation='pallas' does not support this input: K=12"):
      jsparse.pack_24(x, implementation="pallas")


@pytest.mark.parametrize("shape", [(16,), (2, 3, 8)])
def test_pack_24_any_rank(shape):
  x = _x(shape, seed=4)
  with jsparse.pallas_interpret():
    packed = jsparse.pack_24(x, implementation="pallas")
  assert packed.values.shape == (*shape[:-1], shape[-1] // 2) and packed.meta.shape == (*shape[:-1], shape[-1] // 8)
  assert_bitwise_equal(jsparse.unpack_24(packed), jsparse.nm_prune(x))


def test_sparse24_is_a_pytree():
  packed = jsparse.pack_24(_x((4, 16)))
  leaves, tree = jax.tree.flatten(packed)
  assert len(leaves) == 2
  again = jax.tree.unflatten(tree, leaves)
  assert again.shape == packed.shape
  doubled = jax.jit(lambda p: jax.tree.map(lambda a: a, p))(packed)
  assert_bitwise_equal(doubled.to_dense(), packed.to_dense())


# --- V:N:M ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("v,n,m", [(16, 2, 8), (8, 1, 4), (4, 3, 16)])
def test_pack_vnm_round_trip_and_layout(dtype, v, n, m):
  x = _x((32, 64), dtype, seed=5)
  packed = jsparse.pack_vnm(x, v, n, m)
  mask = jsparse.vnm_mask(x, v, n, m)
  assert_bitwise_equal(jsparse.unpack_vnm(packed), jnp.where(mask, x, jnp.zeros((), dtype)))
  assert packed.values.shape == (32, 64 // m * n) and packed.columns.shape == (32 // v, 64 // m, 4)
  cols = np.asarray(packed.columns)
  assert (np.diff(cols, axis=-1) > 0).all() and cols.max() < m  # 4 distinct columns, ascending
  used = np.asarray(mask).reshape(32 // v, v, 64 // m, m).any(1)
  for b in range(32 // v):
    for g in range(64 // m):
      assert set(np.flatnonzero(used[b, g])) <= set(cols[b, g])
  meta = np.asarray(packed.meta)
  pos = [(meta >> (2 * k)) & 3 for k in range(n)]
  for a, b in zip(pos, pos[1:]):
    assert (a < b).all()  # kept positions among the 4, ascending


_BAD = [
    (lambda: jsparse.pack_24(jnp.ones((4, 6))), "pack_24: axis -1 has size 6, not a multiple of m=4"),
    (lambda: jsparse.pack_24(jnp.ones((4, 8), jnp.int32)), "pack_24: x must have a floating dtype"),
    (lambda: jsparse.pack_24(jnp.ones((4, 8), jnp.complex64)), "pack_24: x must have a floating dtype"),
    (lambda: jsparse.pack_24(jnp.ones(())), "pack_24: x must have rank at least 1"),
    (lambda: jsparse.pack_24(jnp.ones((4, 8)), jnp.ones((4, 4), bool)), "pack_24: shapes must match"),
    (lambda: jsparse.pack_24(jnp.ones((4, 8)), jnp.ones((4, 8))), "pack_24: mask must be bool"),
    (lambda: jsparse.pack_24(jnp.ones((4, 8)), implementation="gpu"), "pack_24: implementation must be one of"),
    (lambda: jsparse.pack_vnm(jnp.ones((8,))), "pack_vnm: x must have rank 2"),
    (lambda: jsparse.pack_vnm(jnp.ones((48, 8)), v=32), "pack_vnm: axis 0 (rows) has size 48, not a multiple of v"),
    (lambda: jsparse.pack_vnm(jnp.ones((64, 12))), "pack_vnm: axis 1 (columns) has size 12, not a multiple of m=8"),
    (lambda: jsparse.pack_vnm(jnp.ones((64, 8), jnp.int32)), "pack_vnm: x must have a floating dtype"),
    (lambda: jsparse.pack_vnm(jnp.ones((64, 8), jnp.complex64)), "pack_vnm: x must have a floating dtype"),
    (lambda: jsparse.pack_vnm(jnp.ones((64, 8)), n=4), "pack_vnm: n must be 1..3"),
]


@pytest.mark.parametrize("fn,match", _BAD)
def test_bad_input(fn, match):
  with pytest.raises(ValueError, match=re.escape(match)) as info:
    fn()
  assert "\n" not in str(info.value)
