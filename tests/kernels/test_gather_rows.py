"""Row gather: the kernel against the reference bit for bit (index edge cases, dtypes, odd shapes), its gradient, its
config and input errors, and the routed layout's moves through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.kernels.gather_rows import api
from jsparse.kernels.gather_rows import reference as ref
from jsparse.kernels.routed_ffn import layout as lay
from tests.helpers import IMPLEMENTATIONS, assert_bitwise_equal, implementation


def _expected(src, idx):
  a, i = np.asarray(src), np.asarray(idx)
  ok = (i >= 0) & (i < a.shape[0])
  out = np.zeros((i.shape[0], a.shape[1]), a.dtype)
  out[ok] = a[i[ok]]
  return out


def _src(S, D, dtype, seed=0):
  x = jax.random.normal(jax.random.key(seed), (S, D), jnp.float32) * 100
  return x.astype(dtype)


# Repeats, both ends, and out-of-range on both sides (negative, S, far past S).
EDGE_IDX = [3, -1, 36, 37, 0, 5, 5, 1000, -7, 36, 2, 2, 0, 17, 37, 9]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.int32])
def test_matches_reference_bitwise(impl, dtype):
  src = _src(37, 256, dtype)
  idx = jnp.asarray(EDGE_IDX * 2, jnp.int32)
  with implementation(impl) as im:
    out = api.gather_rows(src, idx, implementation=im, config=api.GatherConfig(block_rows=4, block_cols=128))
  assert_bitwise_equal(out, _expected(src, idx))
  assert_bitwise_equal(ref.gather_rows(src, idx), _expected(src, idx))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_blocks_fitted_to_odd_shapes(impl):
  # P = 13 (prime: one row per program) and D = 384 (not a multiple of the default 1024 columns).
  src = _src(20, 384, jnp.bfloat16, seed=1)
  idx = jnp.asarray([19, 0, 20, 7, 7, 3, -2, 11, 5, 18, 1, 2, 6], jnp.int32)
  with implementation(impl) as im:
    out = api.gather_rows(src, idx, implementation=im)
  assert_bitwise_equal(out, _expected(src, idx))
  assert api.GatherConfig().fit(13, 384) == api.GatherConfig(block_rows=1, block_cols=128)
  assert api.GatherConfig().fit(17408, 4096) == api.GatherConfig()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gradient_is_scatter_add(impl):
  src = _src(37, 128, jnp.float32, seed=2)
  idx = jnp.asarray(EDGE_IDX, jnp.int32)
  ct = jax.random.normal(jax.random.key(3), (len(EDGE_IDX), 128), jnp.float32)
  with implementation(impl) as im:
    got = jax.vjp(lambda s: api.gather_rows(s, idx, implementation=im), src)[1](ct)[0]
  want = jax.vjp(lambda s: ref.gather_rows(s, idx), src)[1](ct)[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(want[5]), np.asarray(ct[5] + ct[6]), rtol=1e-6)  # repeats add up
  assert float(jnp.abs(want[4]).max()) == float(jnp.abs(want[30]).max()) == 0  # unused rows; -7 does not wrap to 30


@pytest.mark.gpu
def test_routed_sized_move_on_gpu():
  src = _src(16384, 4096, jnp.bfloat16, seed=4)
  perm = jax.random.permutation(jax.random.key(5), 17408).astype(jnp.int32)  # ids >= 16384 are padding rows
  out = jax.jit(lambda s, i: api.gather_rows(s, i, implementation="pallas"))(src, perm)
  assert_bitwise_equal(out, _expected(src, perm))


def test_config_errors():
  for bad in (dict(block_rows=3), dict(block_cols=0), dict(num_warps=6), dict(block_rows=2.0)):
    with pytest.raises(ValueError, match="GatherConfig"):
      api.GatherConfig(**bad)


def test_input_errors():
  src = _src(8, 16, jnp.float32)
  with pytest.raises(ValueError, match="gather_rows: src must have rank 2"):
    api.gather_rows(src[0], jnp.arange(3))
  with pytest.raises(ValueError, match="gather_rows: idx must be a 1-D integer array"):
    api.gather_rows(src, jnp.arange(3.0))
  with pytest.raises(ValueError, match="gather_rows: idx must be a 1-D integer array"):
    api.gather_rows(src, jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(ValueError, match="config must be a GatherConfig"):
    api.gather_rows(src, jnp.arange(3), config=(8, 128))
  with jsparse.pallas_interpret(), pytest.raises(ValueError, match="not a multiple of 16 bytes"):
    api.gather_rows(_src(8, 3, jnp.float32), jnp.arange(3), implementation="pallas")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_layout_moves_through_the_kernel(impl):
  # to_padded's forward and from_padded's gradient move rows into the layout: through the kernel with
  # gather="pallas", the same bits as the XLA moves; the moves back to token order stay XLA gathers.
  groups = jnp.array([2, 0, 2, 2, 3, 0, 2, 2, 2, 1, 3, 3, 0], jnp.int32)
  T, D = groups.shape[0], 64
  x = _src(T, D, jnp.bfloat16, seed=6)
  layout = lay.make_layout(groups, 4, 4)
  ct_T = _src(T, D, jnp.bfloat16, seed=7)
  ct_P = _src(layout.num_rows, D, jnp.bfloat16, seed=8)

  def run(gather):
    xp, to_vjp = jax.vjp(lambda a: lay.to_padded(a, layout, gather), x)
    back, from_vjp = jax.vjp(lambda a: lay.from_padded(a, layout, gather), xp)
    return xp, back, to_vjp(ct_P)[0], from_vjp(ct_T)[0]

  want = run("xla")
  with implementation(impl):
    got = run("pallas") if impl != "xla" else run("xla")
  for a, b in zip(got, want):
    assert_bitwise_equal(a, b)
  assert_bitwise_equal(want[1], x)
  with pytest.raises(ValueError, match="gather must be one of"):
    lay.to_padded(x, layout, "triton")
