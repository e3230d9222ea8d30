"""Row gather: the kernel against the reference bit for bit (index edge cases, dtypes, odd shapes), its gradient, its
config and input errors, and the routed layout's moves through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.kernels.gather_rows import api
from jsparse.kernels.gather_rows import reference as ref
from jsparse.kernels.gather_rows import tma
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
# The two engines: Triton (rows through registers) and Mosaic GPU bulk copies.
ENGINES = {"triton": api.GatherConfig(block_rows=4, block_cols=128), "tma": api.TmaGatherConfig(block_rows=4)}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.int32])
def test_matches_reference_bitwise(impl, engine, dtype):
  src = _src(37, 256, dtype)
  idx = jnp.asarray(EDGE_IDX * 2, jnp.int32)
  with implementation(impl) as im:
    out = api.gather_rows(src, idx, implementation=im, config=ENGINES[engine])
  assert_bitwise_equal(out, _expected(src, idx))
  assert_bitwise_equal(ref.gather_rows(src, idx), _expected(src, idx))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("config", [api.GatherConfig(), api.TmaGatherConfig()], ids=["triton", "tma"])
def test_blocks_fitted_to_odd_shapes(impl, config):
  # P = 13 (prime: one row per program) and D = 384 (not a multiple of the default 1024 columns).
  src = _src(20, 384, jnp.bfloat16, seed=1)
  idx = jnp.asarray([19, 0, 20, 7, 7, 3, -2, 11, 5, 18, 1, 2, 6], jnp.int32)
  with implementation(impl) as im:
    out = api.gather_rows(src, idx, implementation=im, config=config)
  assert_bitwise_equal(out, _expected(src, idx))


def test_config_fit():
  assert api.GatherConfig().fit(13, 384) == api.GatherConfig(block_rows=1, block_cols=128)
  assert api.GatherConfig().fit(17408, 4096) == api.GatherConfig()
  assert api.TmaGatherConfig(16).fit(17408, 8192) == api.TmaGatherConfig(16)  # 128 KiB of SMEM
  assert api.TmaGatherConfig(64).fit(17408, 8192) == api.TmaGatherConfig(16)  # 512 KiB would not fit
  assert api.TmaGatherConfig(8).fit(12, 8192) == api.TmaGatherConfig(4)


def test_tma_engine_lowers_to_bulk_copies():
  # The GPU lowering runs on a CPU too: each row must be a plain bulk copy (a tensor-map TMA would be limited to
  # 256-element boxes and fail for long rows), including for rows of 8 KiB at the 7b width.
  src = jax.ShapeDtypeStruct((16384, 4096), jnp.bfloat16)
  idx = jax.ShapeDtypeStruct((17408,), jnp.int32)
  fn = jax.jit(lambda s, i: tma.gather_rows(s, i))
  text = fn.trace(src, idx).lower(lowering_platforms=("cuda",)).as_text()
  assert "cp.async.bulk.shared::cta.global" in text and "cp.async.bulk.global.shared" in text
  assert "cp.async.bulk.tensor" not in text


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("engine", ENGINES)
def test_gradient_is_scatter_add(impl, engine):
  src = _src(37, 128, jnp.float32, seed=2)
  idx = jnp.asarray(EDGE_IDX, jnp.int32)
  ct = jax.random.normal(jax.random.key(3), (len(EDGE_IDX), 128), jnp.float32)
  with implementation(impl) as im:
    got = jax.vjp(lambda s: api.gather_rows(s, idx, implementation=im, config=ENGINES[engine]), src)[1](ct)[0]
  want = jax.vjp(lambda s: ref.gather_rows(s, idx), src)[1](ct)[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(want[5]), np.asarray(ct[5] + ct[6]), rtol=1e-6)  # repeats add up
  assert float(jnp.abs(want[4]).max()) == float(jnp.abs(want[30]).max()) == 0  # unused rows; -7 does not wrap to 30


@pytest.mark.gpu
@pytest.mark.parametrize("config", [api.GatherConfig(), api.TmaGatherConfig(), api.TmaGatherConfig(16)],
                         ids=["triton", "tma8", "tma16"])
def test_routed_sized_move_on_gpu(config):
  src = _src(16384, 4096, jnp.bfloat16, seed=4)
  perm = jax.random.permutation(jax.random.key(5), 17408).astype(jnp.int32)  # ids >= 16384 are padding rows
  out = jax.jit(lambda s, i: api.gather_rows(s, i, implementation="pallas", config=config))(src, perm)
  assert_bitwise_equal(out, _expected(src, perm))


def test_config_errors():
  for bad in (dict(block_rows=3), dict(block_cols=0), dict(num_warps=6), dict(block_rows=2.0)):
    with pytest.raises(ValueError, match="GatherConfig"):
      api.GatherConfig(**bad)
  for bad in (0, 12, 4.0):
    with pytest.raises(ValueError, match="TmaGatherConfig: block_rows"):
      api.TmaGatherConfig(bad)


def test_input_errors():
  src = _src(8, 16, jnp.float32)
  with pytest.raises(ValueError, match="gather_rows: src must have rank 2"):
    api.gather_rows(src[0], jnp.arange(3))
  with pytest.raises(ValueError, match="gather_rows: idx must be a 1-D integer array"):
    api.gather_rows(src, jnp.arange(3.0))
  with pytest.raises(ValueError, match="gather_rows: idx must be a 1-D integer array"):
    api.gather_rows(src, jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(ValueError, match="config must be a GatherConfig or TmaGatherConfig"):
    api.gather_rows(src, jnp.arange(3), config=(8, 128))
  with jsparse.pallas_interpret(), pytest.raises(ValueError, match="not a multiple of 16 bytes"):
    api.gather_rows(_src(8, 3, jnp.float32), jnp.arange(3), implementation="pallas")
  with jsparse.pallas_interpret(), pytest.raises(ValueError, match="does not fit the bulk-copy engine"):
    api.gather_rows(jax.ShapeDtypeStruct((4, 2**16), jnp.float32), jnp.arange(3), implementation="pallas",
                    config=api.TmaGatherConfig())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("gather", ["pallas", "pallas_tma"])
def test_layout_moves_through_the_kernel(impl, gather):
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
    got = run(gather) if impl != "xla" else run("xla")
  for a, b in zip(got, want):
    assert_bitwise_equal(a, b)
  assert_bitwise_equal(want[1], x)
  with pytest.raises(ValueError, match="gather must be one of"):
    lay.to_padded(x, layout, "triton")
