"""Bitmask packer: format, exactness, overflow, and the Pallas kernels against the reference (bit for bit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.kernels.compress import format as fmt
from jsparse.kernels.compress import pallas as kernels
from jsparse.kernels.compress import reference as ref
from jsparse.kernels.compress import single_pass
from tests.helpers import IMPLEMENTATIONS, assert_bitwise_equal, implementation

# The packer has CUDA kernels too (jsparse.kernels.compress.cuda): every op-level test runs them on a GPU.
IMPLS = IMPLEMENTATIONS + [pytest.param("cuda", marks=pytest.mark.gpu)]
DENSITIES = [0.5, 0.15, 0.05, 0.01, 1.0]  # 50%, 85%, 95%, 99% zeros, and all dense (adversarial)


def _sparse(shape, density, dtype=jnp.bfloat16, seed=0, positive=False):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, shape, jnp.float32)
  if positive:
    x = jnp.abs(x) + 0.01
  keep = jax.random.uniform(k2, shape) < density
  return jnp.where(keep, x, 0.0).astype(dtype)


def _expected_kept(x, capacity):
  """numpy: the row-major first `capacity` non-zeros of x, the rest zeroed."""
  a = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
  nz = (a != 0) | np.isnan(a)
  order = np.cumsum(nz.reshape(-1)).reshape(nz.shape) - 1
  return np.where(nz & (order < capacity), a, 0.0).reshape(x.shape)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("density", DENSITIES)
def test_roundtrip_exact_at_every_density(impl, density):
  x = _sparse((32, 256), density, seed=int(density * 100))
  nnz = int(jnp.sum(x != 0))
  with implementation(impl) as im:
    packed = jsparse.pack_bitmask(x, min(1.0, density * 1.2 + 0.01), implementation=im)
    back = jsparse.unpack_bitmask(packed, implementation=im)
  assert float(packed.dropped_fraction) == 0.0 and float(packed.nnz) == nnz
  assert_bitwise_equal(back, x)
  expected = ref.pack(x, packed.capacity)
  for a, b in zip(jax.tree.leaves(packed), jax.tree.leaves(expected)):
    assert_bitwise_equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_relu_square_fused(impl, dtype):
  x = jax.random.normal(jax.random.key(3), (4, 8, 96), jnp.float32).astype(dtype)
  x = x.at[0, 0, 5].set(jnp.nan)
  with implementation(impl) as im:
    packed, h = jsparse.pack_bitmask(x, 0.6, relu=True, return_square=True, implementation=im)
    r, h2 = jsparse.unpack_bitmask(packed, return_square=True, implementation=im)
  relu = jnp.where(jnp.isnan(x), x, jnp.maximum(x, 0))
  assert packed.shape == x.shape and r.shape == x.shape
  expected_h = (relu.astype(jnp.float32) ** 2).astype(dtype)
  nan = np.isnan(np.asarray(x, np.float32))
  for got, want in ((r, relu), (h, expected_h), (h2, expected_h)):
    # NaN is stored and comes back as NaN; the GPU may canonicalise its payload (PTX max.NaN gives 0x7fffffff).
    np.testing.assert_array_equal(np.isnan(np.asarray(got, np.float32)), nan)
    assert_bitwise_equal(jnp.where(nan, 0, got), jnp.where(nan, 0, want))


@pytest.mark.parametrize("impl", IMPLS)
def test_overflow_drops_the_row_major_tail_and_reports_it(impl):
  x = _sparse((32, 128), 0.5, seed=7)
  nnz = int(jnp.sum(x != 0))
  capacity = 1024  # < nnz (~2048)
  with implementation(impl) as im:
    packed, h = jsparse.pack_bitmask(x, capacity, return_square=True, implementation=im)
    back = jsparse.unpack_bitmask(packed, implementation=im)
  kept = _expected_kept(x, capacity)
  np.testing.assert_array_equal(np.asarray(back, np.float32), kept)
  assert_bitwise_equal(h, (jnp.asarray(kept, jnp.float32) ** 2).astype(x.dtype))
  np.testing.assert_allclose(float(packed.dropped_fraction), (nnz - capacity) / nnz, rtol=1e-6)
  np.testing.assert_allclose(float(packed.density), nnz / x.size, rtol=1e-6)


@pytest.mark.parametrize("impl,shape,blocks", [
    ("interpret", (8, 224), (4, 32)),  # 7 chunks of 32 columns per band (F = 7 x 2^k, like 14336)
    ("interpret", (6, 256), (2, 128)),  # 3 bands of 2 rows
    pytest.param("gpu", (48, 14336), (8, 1024), marks=pytest.mark.gpu),
    pytest.param("gpu", (64, 8192), (16, 512), marks=pytest.mark.gpu),
])
def test_kernels_walk_chunks_and_bands(impl, shape, blocks):
  """Several column chunks per band (running offsets) and odd row counts, against the reference, bit for bit."""
  x = _sparse(shape, 0.3, jnp.float32, seed=11)
  cap = fmt.capacity_elements("t", shape, 0.25)  # overflows on purpose: tail handling across bands
  interpret = impl == "interpret"
  br, bc = blocks
  counts = kernels.count(x, relu=True, block_rows=br, block_cols=bc, interpret=interpret)
  np.testing.assert_array_equal(counts, ref.row_counts(x, True))
  offsets = fmt.saturating_exclusive_cumsum(counts, cap)
  bits, values, h = kernels.pack(x, offsets, cap, relu=True, square_out=True, block_rows=br, block_cols=bc,
                                 interpret=interpret)
  expected, expected_h = ref.pack(x, cap, relu=True, square_out=True)
  assert_bitwise_equal(bits, expected.bits)
  assert_bitwise_equal(values, expected.values)
  assert_bitwise_equal(h, expected_h)
  r = kernels.unpack(bits, offsets, values, shape, square_out=False, block_rows=br, block_cols=bc,
                     interpret=interpret)
  assert_bitwise_equal(r, ref.unpack(expected))


@pytest.mark.parametrize("placement", ["words", "popc"])
@pytest.mark.parametrize("impl,shape,blocks", [
    ("interpret", (8, 224), (4, 32)),
    ("interpret", (6, 256), (2, 128)),
    pytest.param("gpu", (48, 14336), (4, 1024), marks=pytest.mark.gpu),
])
def test_unpack_placements_match_reference(impl, shape, blocks, placement):
  """The unpack's word-view placements (a lane prefix sum, or popcounts of the bitmask words) against the reference,
  bit for bit, r and h, on a packing that overflowed (saturated row offsets, cleared bits in the last rows)."""
  x = _sparse(shape, 0.3, jnp.bfloat16, seed=12)
  cap = fmt.capacity_elements("t", shape, 0.25)
  expected, _ = ref.pack(x, cap, relu=False, square_out=True)
  br, bc = blocks
  r, h = kernels.unpack(expected.bits, expected.row_offsets, expected.values, shape, square_out=True, block_rows=br,
                        block_cols=bc, **{placement: True}, interpret=impl == "interpret")
  want_r, want_h = ref.unpack(expected, square_out=True)
  assert_bitwise_equal(r, want_r)
  assert_bitwise_equal(h, want_h)
  assert int(jnp.sum(r != 0)) == expected.capacity < float(expected.nnz)  # it really overflowed: the buffer is full


def _single_pass_matches_reference(x, capacity, config, interpret, relu=True, square=True):
  cap = fmt.capacity_elements("t", x.shape, capacity)
  outs = single_pass.pack(x, cap, relu=relu, square_out=square, config=config, interpret=interpret)
  expected = ref.pack(x, cap, relu=relu, square_out=square)
  expected, expected_h = expected if square else (expected, None)
  for got, want in zip(outs[:3], (expected.bits, expected.values, expected.row_offsets)):
    assert_bitwise_equal(got, want)
  np.testing.assert_array_equal(outs[3], ref.row_counts(x, relu))
  if square:
    assert_bitwise_equal(outs[4], expected_h)


SP = single_pass.PackConfig


@pytest.mark.parametrize("impl,shape,config,capacity", [
    # default (split, popc): 7 chunks per band, 2-flag look-back windows over 8 bands, overflow, 2 idle tail zeroers
    ("interpret", (8, 224), SP(1, 32, window=2, zero_span=256), 0.08),
    # split, bitmask words read back, bands held in registers, exact capacity: 3 tail zeroers with real work
    ("interpret", (12, 256), SP(2, 64, hold=True, reload=True, window=4, zero_span=512), 1.0),
    # split with an element prefix sum (2-D chunks), 16 bands of 4 rows, capacity far below the density
    ("interpret", (64, 96), SP(4, 32, place="scan", window=8, zero_span=128), 0.05),
    # not split: count, then pack everything (word view)
    ("interpret", (16, 128), SP(2, 32, split=False, words=True, prefetch=False, window=4, zero_span=256), 0.1),
    # loads 3 chunks ahead (7 chunks: the last iterations re-read the last chunk), and a depth past the chunk count
    ("interpret", (8, 224), SP(1, 32, prefetch=3, window=2, zero_span=256), 0.08),
    ("interpret", (8, 64), SP(2, 32, prefetch=4, split=False, window=2, zero_span=256), 0.2),
    # thousands of bands in flight at once: the look-back under real concurrency, overflowing and not
    pytest.param("gpu", (16384, 1024), SP(), 0.08, marks=pytest.mark.gpu),
    pytest.param("gpu", (16384, 1024), SP(), 1.0, marks=pytest.mark.gpu),
    pytest.param("gpu", (16384, 1024), SP(reload=True, prefetch=False), 0.08, marks=pytest.mark.gpu),
    pytest.param("gpu", (16384, 1024), SP(place="scan"), 0.08, marks=pytest.mark.gpu),
    pytest.param("gpu", (16384, 1024), SP(prefetch=3), 0.08, marks=pytest.mark.gpu),
    pytest.param("gpu", (4096, 8192), SP(split=False), 0.1, marks=pytest.mark.gpu),
    pytest.param("gpu", (48, 14336), SP(1, 2048, num_warps=8, hold=True), 0.2, marks=pytest.mark.gpu),
    pytest.param("gpu", (2048, 8192), SP(2, 1024, num_warps=8, split=False, words=True, zero_span=4096), 0.35,
                 marks=pytest.mark.gpu),
])
def test_single_pass_packer_matches_reference(impl, shape, config, capacity):
  """One kernel with a decoupled look-back across bands: bit for bit the reference, at any band/chunk/window."""
  x = _sparse(shape, 0.3, jnp.float32 if impl == "interpret" else jnp.bfloat16, seed=13) - 0.1  # ~14% after relu
  for _ in range(1 if impl == "interpret" else 3):  # a race would show as a result that changes between runs
    _single_pass_matches_reference(x, capacity, config, impl == "interpret")


def test_single_pass_config_errors():
  with pytest.raises(ValueError, match="place must be"):
    single_pass.fit_config(SP(place="sort"), (8, 64))
  with pytest.raises(ValueError, match="zero_span must be a power of two"):
    single_pass.fit_config(SP(zero_span=1000), (8, 64))
  with pytest.raises(ValueError, match="prefetch must be a depth"):
    single_pass.fit_config(SP(prefetch=5), (8, 64))
  assert single_pass.fit_config(SP(1, 32, prefetch=4), (8, 64)).prefetch == 2  # at most the chunks of a band
  assert SP(prefetch=2).label().endswith("/prefetch2/split-popc") and "/prefetch/" in SP().label()


def test_single_pass_without_relu_or_square():
  x = _sparse((8, 128), 0.4, jnp.bfloat16, seed=5).at[1, 3].set(jnp.nan).at[2, 4].set(-0.0)
  for config in (SP(2, 64, window=2, zero_span=256), SP(2, 64, split=False, zero_span=256)):
    _single_pass_matches_reference(x, 0.5, config, True, relu=False, square=False)


def test_format_sizes_and_layout():
  x = _sparse((8, 8192), 0.05)
  packed = jax.jit(lambda x: jsparse.pack_bitmask(x, 0.055, implementation="xla"))(x)
  assert float(packed.dropped_fraction) == 0.0
  assert packed.bits.shape == (8, 256) and packed.bits.dtype == jnp.uint32
  assert packed.values.shape == (fmt.capacity_elements("t", x.shape, 0.055),)
  assert packed.row_offsets.shape == (8,) and packed.row_offsets.dtype == jnp.int32
  # 16-bit dense is 2 bytes/element; bitmask 1/8 byte + 0.055 x 2 bytes of values (+ offsets): > 8x smaller.
  assert x.nbytes / packed.nbytes > 8.0
  # Bit b of word w is column 32 w + b.
  one = jnp.zeros((1, 64), jnp.float32).at[0, 37].set(2.0)
  p = jsparse.pack_bitmask(one, 1.0, implementation="xla")
  np.testing.assert_array_equal(p.bits, [[0, 1 << 5]])
  assert float(p.values[0]) == 2.0 and float(p.values[1]) == 0.0


def test_saturating_offsets_never_overflow():
  counts = jnp.full((8,), 2**29, jnp.int32)
  limit = fmt.MAX_CAPACITY
  offsets = fmt.saturating_exclusive_cumsum(counts, limit)
  np.testing.assert_array_equal(offsets, [0, 2**29] + [limit] * 6)


@pytest.mark.parametrize("bad,match", [(dict(capacity=0.0), "capacity"), (dict(capacity=1.5), "capacity"),
                                       (dict(capacity="x"), "capacity"), (dict(shape=(4, 48)), "multiple of")])
def test_errors(bad, match):
  x = jnp.ones(bad.get("shape", (4, 64)))
  with pytest.raises(ValueError, match=match):
    jsparse.pack_bitmask(x, bad.get("capacity", 0.5))


def _assert_cuda_pack(got, want, want_h):
  """The CUDA pack's (bits, values, row_offsets, h), bit for bit the reference's."""
  for g, e in zip(got, (want.bits, want.values, want.row_offsets, want_h)):
    assert_bitwise_equal(g, e)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype,capacity,relu", [
    ((16384, 1024), jnp.bfloat16, 0.08, True),  # 1024 bands in flight, overflowing: the look-back under contention
    ((16384, 1024), jnp.bfloat16, 1.0, True),  # exact, the values tail zeroed by many zeroers
    ((48, 14336), jnp.bfloat16, 0.2, True),  # rows straddle bands (the unpack's start from a row's earlier words)
    ((1000, 96), jnp.float32, 0.25, False),  # many short rows per band, 4-element vectors, a partial last band
    ((3, 32), jnp.float16, 1.0, True),  # one partial band
])
def test_cuda_kernels_match_reference(shape, dtype, capacity, relu):
  """The CUDA pack and unpack, bit for bit the reference (bits, values, offsets, nnz, h, r), three times each: a race
  in the look-back would show as a result that changes between runs."""
  from jsparse.kernels.compress import cuda
  x = _sparse(shape, 0.3, dtype, seed=17) - (0.1 if relu else 0.0)  # ~14% non-zero after relu, else 30%
  x = x.at[1, 3].set(-0.0).at[2, 5].set(jnp.nan)  # -0.0 is not stored, NaN is (as a non-zero)
  # squares that are subnormal (bfloat16, float16) or underflow: the packed products must round as float32's do
  x = x.at[0, 7].set(1e-20).at[1, 9].set(0.003).at[2, 11].set(-1e-20)
  cap = fmt.capacity_elements("t", shape, capacity)
  want, want_h = ref.pack(x, cap, relu=relu, square_out=True)
  want_r, want_rh = ref.unpack(want, square_out=True)
  for _ in range(3):
    bits, values, offsets, counts, h = jax.jit(
        lambda a: cuda.pack(a, cap, relu=relu, square_out=True))(x)
    _assert_cuda_pack((bits, values, offsets, h), want, want_h)
    assert int(jnp.sum(counts)) == int(jnp.sum(ref.row_counts(x, relu)))
    r, rh = jax.jit(lambda b, o, v: cuda.unpack(b, o, v, shape, square_out=True))(bits, offsets, values)
    assert_bitwise_equal(r, want_r)
    assert_bitwise_equal(rh, want_rh)
    assert_bitwise_equal(jax.jit(lambda b, o, v: cuda.unpack(b, o, v, shape, square_out=False))(bits, offsets, values),
                         want_r)
  no_h = jax.jit(lambda a: cuda.pack(a, cap, relu=relu, square_out=False))(x)
  assert_bitwise_equal(no_h[1], want.values)
  # variant 1, the default's stand-in before Hopper, for every dtype
  bits, values, offsets, counts, h = jax.jit(lambda a: cuda.pack(a, cap, relu=relu, square_out=True, variant=1))(x)
  _assert_cuda_pack((bits, values, offsets, h), want, want_h)
  assert counts.shape == (cuda.n_bands(shape, dtype),)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,capacity", [((16384, 1024), 0.08), ((16384, 1024), 1.0), ((48, 14336), 0.2)])
def test_cuda_pack_variants_match_reference(shape, capacity):
  """Every launch configuration of the CUDA pack (the ring pack's band sizes, stages, lags and compute groups,
  pack_kernel's register-bound bands), bit for bit the reference, overflowing and not."""
  from jsparse.kernels.compress import cuda
  x = _sparse(shape, 0.3, jnp.bfloat16, seed=19) - 0.1
  x = x.at[0, 7].set(1e-20).at[1, 9].set(0.003).at[2, 5].set(jnp.nan)  # a subnormal square, a NaN
  cap = fmt.capacity_elements("t", shape, capacity)
  want, want_h = ref.pack(x, cap, relu=True, square_out=True)
  for variant in cuda.PACK_VARIANTS:
    for _ in range(2):
      bits, values, offsets, counts, h = jax.jit(
          lambda a, v=variant: cuda.pack(a, cap, relu=True, square_out=True, variant=v))(x)
      _assert_cuda_pack((bits, values, offsets, h), want, want_h)
      assert counts.shape == (cuda.n_bands(shape, x.dtype, variant),)
      assert int(jnp.sum(counts)) == int(jnp.sum(ref.row_counts(x, True)))


def test_cuda_supports_and_band_counts():
  from jsparse.kernels.compress import cuda
  assert cuda.supports((16384, 8192), jnp.bfloat16) == (True, "")
  assert not cuda.supports((4, 64), jnp.int8)[0]
  assert not cuda.supports((4, 48), jnp.float32)[0]  # rows not a multiple of 32
  assert "int32" in cuda.supports((2**20, 2**16), jnp.bfloat16)[1]  # 2**36 bytes: 2**32 vectors
  # bands: 256 threads x vectors per thread x 16 bytes; a partial last band counts
  assert cuda.n_bands((16384, 8192), jnp.bfloat16) == 16384 * 8192 * 2 // (256 * 8 * 16)
  assert cuda.n_bands((3, 32), jnp.float16) == 1
  assert cuda.n_bands((16384, 8192), jnp.bfloat16, 2) == 16384 * 8192 * 2 // (256 * 4 * 16)
  assert cuda.n_bands((16384, 8192), jnp.bfloat16, 5) == -(-16384 * 8192 * 2 // (256 * 6 * 16))  # a partial band


def test_explicit_cuda_without_gpu_raises():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  with pytest.raises(ValueError, match="implementation='cuda' cannot run here"):
    jsparse.pack_bitmask(jnp.ones((4, 64)), implementation="cuda")
  with pytest.raises(ValueError, match="implementation must be one of"):
    jsparse.pack_bitmask(jnp.ones((4, 64)), implementation="triton")


def test_explicit_pallas_without_gpu_raises():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  with pytest.raises(ValueError, match="needs a CUDA GPU"):
    jsparse.pack_bitmask(jnp.ones((4, 64)), implementation="pallas")
