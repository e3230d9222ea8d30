"""N:M masks and pruning, gradient modes, transposable 2:4 and the S-STE soft threshold.

Each test is parametrised over ``IMPLEMENTATIONS``: the XLA reference, the Pallas kernels in interpret mode (CPU)
and on the GPU (the same tests, marker ``gpu``). Selections are compared exactly, pruned values bit for bit, computed
values (S-STE) with the tolerance table.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.kernels import _common as common
from jsparse.kernels.nm import pallas as nm_pallas
from jsparse.kernels.nm import pallas_common as pc
from jsparse.kernels.nm import pallas_transposable
from jsparse.kernels.nm import reference as ref
from tests.helpers import FLOAT_DTYPES, IMPLEMENTATIONS, assert_bitwise_equal, assert_close, implementation

KERNELS = IMPLEMENTATIONS[1:]  # interpret and gpu: the cases where a kernel is compared with the reference
GRADIENTS = [("masked", None, None), ("ste", None, None), ("scaled_ste", 2.0, 0.25)]
TINY = pc.BlockConfig(block_rows=2, block_cols=16, num_warps=4)  # many blocks even for small arrays


def _x(shape, dtype=jnp.float32, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _rows(impl, small=8, large=64):
  return large if impl == "gpu" else small


def _cols(impl, small=64, large=2048):
  return large if impl == "gpu" else small


def _grad_kwargs(gradient, kept, pruned):
  return dict(gradient=gradient, kept_scale=kept, pruned_scale=pruned) if gradient == "scaled_ste" else dict(
      gradient=gradient)


def _expected_grad(mask, ct, gradient, kept, pruned):
  if gradient == "ste":
    return ct
  if gradient == "masked":
    return jnp.where(mask, ct, jnp.zeros((), ct.dtype))
  return jnp.where(mask, (ct * kept).astype(ct.dtype), (ct * pruned).astype(ct.dtype))


# --- N:M --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_nm_mask_and_prune(impl, dtype, n, m):
  R, K = _rows(impl), _cols(impl)
  x = _x((R, K), dtype)
  with implementation(impl) as im:
    mask = jsparse.nm_mask(x, n, m, implementation=im)
    y = jsparse.nm_prune(x, n, m, implementation=im)
  g = np.asarray(mask).reshape(R, -1, m)
  assert (g.sum(-1) == n).all()
  a = np.abs(np.asarray(x, np.float32)).reshape(R, -1, m)
  assert (np.where(g, a, np.inf).min(-1) >= np.where(g, -np.inf, a).max(-1)).all()
  np.testing.assert_array_equal(mask, ref.nm_mask(x, n, m))
  assert_bitwise_equal(y, jnp.where(mask, x, jnp.zeros((), dtype)))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_ties_go_to_lower_index(impl):
  x = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, -2.0, 2.0], [0.0, -0.0, 0.0, 0.0, 3.0, 3.0, -3.0, 3.0]])
  with implementation(impl) as im:
    mask = jsparse.nm_mask(x, implementation=im)
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0, 1, 1, 0], [1, 1, 0, 0, 1, 1, 0, 0]])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nan_is_kept_and_inf_is_large(impl):  # (subnormals: test_gpu_kernels_rank_subnormals_exactly)
  x = jnp.array([[0.1, jnp.nan, 3.0, 2.0, -jnp.inf, 1.0, 2.0, 0.5],
                 [jnp.nan, jnp.nan, jnp.nan, 1.0, jnp.inf, jnp.nan, -jnp.inf, 9.0]])
  with implementation(impl) as im:
    mask = jsparse.nm_mask(x, implementation=im)
    y = jsparse.nm_prune(x, implementation=im)
  # NaN ranks as +inf (kept, ties with inf go to the lower index); +-inf are ordinary large magnitudes.
  np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1, 0, 0]])
  np.testing.assert_array_equal(np.isnan(y), [[0, 1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1, 0, 0]])
  assert y[0, 4] == -jnp.inf and y[1, 4] == jnp.inf and y[0, 0] == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_axis(impl, axis):
  x = _x((8, 12, 16))
  with implementation(impl) as im:
    mask = jsparse.nm_mask(x, 2, 4, axis=axis, implementation=im)
    y = jsparse.nm_prune(x, 2, 4, axis=axis, implementation=im)
  expected = jnp.moveaxis(ref.nm_mask(jnp.moveaxis(x, axis, -1), 2, 4), -1, axis)
  np.testing.assert_array_equal(mask, expected)
  assert_bitwise_equal(y, jnp.where(expected, x, 0.0))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nm_gradient_modes(impl, dtype):
  x, ct = _x((_rows(impl), _cols(impl)), dtype), _x((_rows(impl), _cols(impl)), dtype, seed=1)
  mask = ref.nm_mask(x, 2, 4)
  for gradient, kept, pruned in GRADIENTS:
    with implementation(impl) as im:
      y, vjp = jax.vjp(lambda x: jsparse.nm_prune(x, **_grad_kwargs(gradient, kept, pruned), implementation=im), x)
      (dx,) = vjp(ct)
    assert_bitwise_equal(y, jnp.where(mask, x, jnp.zeros((), dtype)))
    assert_close(dx, _expected_grad(mask, ct, gradient, kept, pruned), dtype)


def test_prune_like_reuses_pattern():
  x, other = _x((4, 16)), _x((4, 16), seed=3)
  mask = jsparse.nm_mask(x)
  y = jsparse.nm_prune_like(other, mask)
  np.testing.assert_array_equal(y, jnp.where(mask, other, 0))
  dx = jax.grad(lambda o: jsparse.nm_prune_like(o, mask).sum())(other)
  np.testing.assert_array_equal(dx, mask.astype(jnp.float32))
  dx = jax.grad(lambda o: jsparse.nm_prune_like(o, mask, gradient="ste").sum())(other)
  np.testing.assert_array_equal(dx, jnp.ones_like(other))


# --- bad input (every op of this module) ------------------------------------------------------------------------------

_OPS = {
    "nm_mask": lambda x, **k: jsparse.nm_mask(x, **k),
    "nm_prune": lambda x, **k: jsparse.nm_prune(x, **k),
    "soft_threshold_24": lambda x, **k: jsparse.soft_threshold_24(x, **k),
    "sste_scale": lambda x, **k: jsparse.sste_scale(x, **k),
    "transposable_24_mask": lambda x, **k: jsparse.transposable_24_mask(x, **k),
    "transposable_24_prune": lambda x, **k: jsparse.transposable_24_prune(x, **k),
}
_BAD = [
    ("nm_mask", dict(x=jnp.ones((4, 6))), "nm_mask: axis 1 has size 6, not a multiple of m=4"),
    ("nm_mask", dict(x=jnp.ones((4, 8)), n=4, m=4), "nm_mask: n must be smaller than m"),
    ("nm_mask", dict(x=jnp.ones((4, 8)), n=5, m=4), "nm_mask: n must be smaller than m"),
    ("nm_mask", dict(x=jnp.ones((4, 8), jnp.int32)), "nm_mask: x must have a floating dtype"),
    ("nm_mask", dict(x=jnp.ones(())), "nm_mask: x must have rank at least 1"),
    ("nm_prune", dict(x=jnp.ones((4, 6))), "nm_prune: axis 1 has size 6, not a multiple of m=4"),
    ("nm_prune", dict(x=jnp.ones((4, 8), jnp.int32)), "nm_prune: x must have a floating dtype"),
    ("nm_prune", dict(x=jnp.ones((4, 8), jnp.complex64)), "nm_prune: x must have a floating dtype"),
    ("nm_prune", dict(x=jnp.ones((4, 8)), n=4, m=4), "nm_prune: n must be smaller than m"),
    ("nm_prune", dict(x=jnp.ones((4, 8)), n=0, m=4), "nm_prune: n and m must be positive"),
    ("nm_prune", dict(x=jnp.ones(())), "nm_prune: x must have rank at least 1"),
    ("nm_prune", dict(x=jnp.ones((4, 8)), axis=2), "nm_prune: axis 2 is out of range"),
    ("soft_threshold_24", dict(x=jnp.ones((4, 6))), "soft_threshold_24: axis 1 has size 6, not a multiple of m=4"),
    ("soft_threshold_24", dict(x=jnp.ones((4, 8), jnp.int8)), "soft_threshold_24: w must have a floating dtype"),
    ("soft_threshold_24", dict(x=jnp.ones((4, 8), jnp.complex64)), "soft_threshold_24: w must have a floating"),
    ("soft_threshold_24", dict(x=jnp.ones(())), "soft_threshold_24: w must have rank at least 1"),
    ("sste_scale", dict(x=jnp.ones((3, 6))), "soft_threshold_24: axis 1 has size 6, not a multiple of m=4"),
    ("sste_scale", dict(x=jnp.ones((4, 8), jnp.int32)), "soft_threshold_24: w must have a floating dtype"),
    ("transposable_24_mask", dict(x=jnp.ones((8,))), "transposable_24_mask: x must have rank at least 2"),
    ("transposable_24_mask", dict(x=jnp.ones((6, 8))), "transposable_24_mask: axis -2 has size 6"),
    ("transposable_24_mask", dict(x=jnp.ones((8, 6))), "transposable_24_mask: axis -1 has size 6"),
    ("transposable_24_mask", dict(x=jnp.ones((8, 8), jnp.int32)), "transposable_24_mask: x must have a floating"),
    ("transposable_24_mask", dict(x=jnp.ones((8, 8), jnp.complex64)), "transposable_24_mask: x must have a floa"),
    ("transposable_24_prune", dict(x=jnp.ones((4, 6))), "transposable_24_prune: axis -1 has size 6"),
    ("transposable_24_prune", dict(x=jnp.ones((4,))), "transposable_24_prune: x must have rank at least 2"),
    ("transposable_24_prune", dict(x=jnp.ones((4, 4), jnp.int32)), "transposable_24_prune: x must have a float"),
]


@pytest.mark.parametrize("op,args,match", _BAD, ids=[f"{o}-{i}" for i, (o, _, _) in enumerate(_BAD)])
def test_bad_input(op, args, match):
  args = dict(args)
  x = args.pop("x")
  with pytest.raises(ValueError, match=re.escape(match)) as info:
    _OPS[op](x, **args)
  assert "\n" not in str(info.value)


def test_bad_gradient_and_implementation():
  with pytest.raises(ValueError, match="nm_prune: gradient must be one of"):
    jsparse.nm_prune(jnp.ones((4, 8)), gradient="dense")
  with pytest.raises(ValueError, match="only apply to gradient='scaled_ste'"):
    jsparse.nm_prune(jnp.ones((4, 8)), kept_scale=2.0)
  with pytest.raises(ValueError, match="nm_prune: implementation must be one of"):
    jsparse.nm_prune(jnp.ones((4, 8)), implementation="cuda")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU behaviour")
def test_explicit_pallas_raises_where_it_cannot_run():
  with pytest.raises(ValueError, match="nm_prune: implementation='pallas' needs a CUDA GPU"):
    jsparse.nm_prune(jnp.ones((4, 8)), implementation="pallas")
  with jsparse.pallas_interpret():
    with pytest.raises(ValueError, match="does not support this input: m=6"):
      jsparse.nm_prune(jnp.ones((4, 12)), 2, 6, implementation="pallas")
    assert jsparse.nm_prune(jnp.ones((4, 12)), 2, 6).shape == (4, 12)  # None falls back to XLA off the GPU


# --- transposable 2:4 -------------------------------------------------------------------------------------------------


def _tiles_x(impl, dtype):
  """(2, R, C) data with one NaN, one -inf (in different tiles) and an all-zero tile."""
  R, C = (64, 512) if impl == "gpu" else (16, 32)
  x = _x((2, R, C), jnp.float32, seed=4).at[0, 0, 1].set(jnp.nan).at[1, 2, 5].set(-jnp.inf)
  return x.at[1, 4:8, 8:12].set(0.0).astype(dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_transposable(impl, dtype):
  x = _tiles_x(impl, dtype)
  _, R, C = x.shape
  with implementation(impl) as im:
    mask = jsparse.transposable_24_mask(x, implementation=im)
    y = jsparse.transposable_24_prune(x, implementation=im)
  assert (mask.reshape(2, R, C // 4, 4).sum(-1) == 2).all()
  assert (jnp.swapaxes(mask, -1, -2).reshape(2, C, R // 4, 4).sum(-1) == 2).all()
  np.testing.assert_array_equal(mask, ref.transposable_24_mask(x))
  assert_bitwise_equal(y, jnp.where(mask, x, jnp.zeros((), dtype)))
  # NaN ranks as +inf and -inf as a large magnitude: both kept (one per tile; two would tie at an infinite score).
  assert mask[0, 0, 1] and mask[1, 2, 5] and np.isnan(np.asarray(y[0, 0, 1], np.float32)) and y[1, 2, 5] == -np.inf
  # An all-zero tile ties all 90 patterns: the first (rows keep columns 01, 01, 23, 23) wins.
  np.testing.assert_array_equal(mask[1, 4:8, 8:12], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])


def _brute_force_best(a_4x4):
  return max(sum(a_4x4[r, c] for r, pair in enumerate(choice) for c in ref.ROW_PAIRS[pair])
             for choice in ref.transposable_patterns())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_transposable_is_optimal_per_tile(impl):
  x = _tiles_x(impl, jnp.float32)
  with implementation(impl) as im:
    mask = np.asarray(jsparse.transposable_24_mask(x, implementation=im))
  a = np.abs(np.asarray(x, np.float64))
  for b, i, j in [(0, 4, 0), (0, 12, 28), (1, 0, 16), (1, 8, 4)]:  # finite tiles
    kept = float((a[b, i:i + 4, j:j + 4] * mask[b, i:i + 4, j:j + 4]).sum())
    np.testing.assert_allclose(kept, _brute_force_best(a[b, i:i + 4, j:j + 4]), rtol=1e-6)


def test_transposable_beats_greedy():
  x = _x((32, 64), seed=11)
  a = jnp.abs(x)
  opt = float((a * jsparse.transposable_24_mask(x)).sum())
  greedy = float((a * ref.greedy_transposable_24_mask(x)).sum())
  row_only = float((a * jsparse.nm_mask(x)).sum())
  assert greedy < opt <= row_only  # on Gaussian data the greedy rule leaves mass behind


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_transposable_gradient_modes(impl, dtype):
  x = _tiles_x(impl, dtype)
  ct = _x(x.shape, dtype, seed=1)
  mask = ref.transposable_24_mask(x)
  for gradient, kept, pruned in GRADIENTS:
    with implementation(impl) as im:
      _, vjp = jax.vjp(lambda x: jsparse.transposable_24_prune(x, **_grad_kwargs(gradient, kept, pruned),
                                                               implementation=im), x)
      (dx,) = vjp(ct)
    assert_close(dx, _expected_grad(mask, ct, gradient, kept, pruned), dtype)


# --- S-STE ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_soft_threshold_formula(impl):
  w = jnp.array([[0.5, -2.0, 1.0, -0.25, 3.0, 3.0, 3.0, 1.0],
                 [jnp.nan, 1.0, 2.0, 0.5, -jnp.inf, 1.0, -2.0, 0.0]])
  with implementation(impl) as im:
    s = jsparse.soft_threshold_24(w, implementation=im)
  expected = [[0.0, -1.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0], [np.nan, 0.0, 1.0, 0.0, -np.inf, 0.0, -1.0, 0.0]]
  np.testing.assert_array_equal(s, expected)  # ties at t give 0; NaN stays visible; inf - t = inf


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_soft_threshold_matches_definition(impl, dtype):
  R, K = _cols(impl), _rows(impl)  # axis=0: the kernel sees the same (K, R) rows view as the other S-STE tests
  w = _x((R, K), dtype)
  with implementation(impl) as im:
    s = jsparse.soft_threshold_24(w, axis=0, implementation=im)
  a = np.asarray(w, np.float32).T.reshape(K, R // 4, 4)
  t = np.sort(np.abs(a), -1)[..., 1:2]  # 3rd largest
  expected = np.sign(a) * np.maximum(np.abs(a) - t, 0)
  assert_close(s, expected.reshape(K, R).T, dtype)
  assert (np.count_nonzero(np.asarray(s, np.float32).T.reshape(K, R // 4, 4), -1) <= 2).all()
  assert_close(s, jnp.swapaxes(ref.soft_threshold_24(jnp.swapaxes(w, 0, 1)), 0, 1), dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_soft_threshold_gradient_modes(impl, dtype):
  w, ct = _x((_rows(impl), _cols(impl)), dtype), _x((_rows(impl), _cols(impl)), dtype, seed=2)
  mask = ref.nm_mask(w, 2, 4)
  for gradient, kept, pruned in GRADIENTS:
    with implementation(impl) as im:
      _, vjp = jax.vjp(lambda w: jsparse.soft_threshold_24(w, **_grad_kwargs(gradient, kept, pruned),
                                                           implementation=im), w)
      (dw,) = vjp(ct)
    assert_close(dw, _expected_grad(mask, ct, gradient, kept, pruned), dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_soft_threshold_is_ste_by_default_and_scale_is_least_squares(impl):
  w = _x((_rows(impl), _cols(impl)))
  ct = _x(w.shape, seed=2)
  with implementation(impl) as im:
    _, vjp = jax.vjp(lambda w: jsparse.soft_threshold_24(w, implementation=im), w)
    np.testing.assert_array_equal(vjp(ct)[0], ct)
    beta = float(jsparse.sste_scale(w, implementation=im))
    s = np.asarray(jsparse.soft_threshold_24(w, implementation=im))
  wn = np.asarray(w)
  errs = [np.sum((wn - b * s) ** 2) for b in (beta * 0.99, beta, beta * 1.01)]
  assert errs[1] <= min(errs[0], errs[2])
  assert beta > 1.0  # S shrinks magnitudes, so the scale restores them


# --- kernel plumbing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16])
def test_kernels_tile_the_grid(impl, dtype):
  """Small blocks: many programs, so the index maps and block offsets of every output are exercised."""
  x = _x((8, 64), dtype, seed=5)
  interpret = impl == "interpret"
  y, mask, bits = nm_pallas.nm_select(x, 2, 4, outputs=("y", "mask", "bits"), interpret=interpret, config=TINY)
  expected = ref.nm_mask(x, 2, 4)
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(pc.expand_bits(bits, 4), expected)
  assert_bitwise_equal(y, jnp.where(expected, x, jnp.zeros((), dtype)))
  s, bits = nm_pallas.soft_threshold_24(x, outputs=("s", "bits"), interpret=interpret, config=TINY)
  assert_close(s, ref.soft_threshold_24(x), dtype)
  np.testing.assert_array_equal(pc.expand_bits(bits, 4), expected)
  x3 = _tiles_x(impl, dtype)
  y, mask = pallas_transposable.transposable_24_select(x3, outputs=("y", "mask"), interpret=interpret,
                                                       config=pc.BlockConfig(8, 8, 4))
  np.testing.assert_array_equal(mask, ref.transposable_24_mask(x3))
  assert_bitwise_equal(y, jnp.where(mask, x3, jnp.zeros((), dtype)))


def _pallas_outputs(fn, x):
  """Output counts of the pallas_calls in fn's jaxpr (traced in interpret mode)."""
  with jsparse.pallas_interpret():
    jaxpr = jax.make_jaxpr(fn)(x)
  counts = []

  def walk(obj):
    if hasattr(obj, "eqns"):
      for eqn in obj.eqns:
        if eqn.primitive.name == "pallas_call":
          counts.append(len(eqn.outvars))
        else:
          for v in eqn.params.values():
            walk(v)
    elif hasattr(obj, "jaxpr"):
      walk(obj.jaxpr)
    elif isinstance(obj, (tuple, list)):
      for v in obj:
        walk(v)

  walk(jaxpr)
  return counts


def test_forward_writes_the_pattern_only_when_needed():
  x = _x((8, 64))
  nm = lambda **k: (lambda x: jsparse.nm_prune(x, implementation="pallas", **k))
  assert _pallas_outputs(nm(), x) == [1]  # the plain forward: values only
  assert _pallas_outputs(lambda x: jax.vjp(nm(), x)[0], x) == [2]  # masked gradient: values + packed bits
  assert _pallas_outputs(lambda x: jax.vjp(nm(gradient="ste"), x)[0], x) == [1]  # ste needs no pattern
  assert _pallas_outputs(lambda x: jsparse.nm_mask(x, implementation="pallas"), x) == [1]


_LOWERED_OPS = {
    "nm_prune": lambda x: jsparse.nm_prune(x),
    "nm_mask": lambda x: jsparse.nm_mask(x, 2, 8),
    "soft_threshold_24": lambda x: jsparse.soft_threshold_24(x),
    "transposable_24_mask": lambda x: jsparse.transposable_24_mask(x),
    "squared_relu_nm": lambda x: jsparse.squared_relu_nm(x),
    "vnm_prune": lambda x: jsparse.vnm_prune(x, 64, 2, 8),
    "pack_24": lambda x: jsparse.pack_24(x).values,
}


@pytest.mark.parametrize("op", sorted(_LOWERED_OPS))
def test_kernels_lower_to_pallas_triton(op, monkeypatch):
  """Fails loudly if the Pallas Triton backend (our kernels' backend) disappears or stops being chosen."""
  x = jax.ShapeDtypeStruct((128, 256), jnp.bfloat16)
  fn = _LOWERED_OPS[op]
  if jax.default_backend() == "gpu":
    text = jax.jit(fn).trace(x).lower().as_text()
  else:
    # The Triton lowering is Python, so it runs for the CUDA platform on a CPU machine too; pretend the kernel can run
    # (on a CPU it otherwise refuses outside interpret mode) and lower for "cuda" only.
    monkeypatch.setattr(common, "on_gpu", lambda: True)
    try:
      text = jax.jit(fn).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:
      if "No supported GPU devices" in str(e):  # newer JAX wants a (possibly abstract) GPU to lower for
        pytest.skip("this JAX lowers Pallas-Triton only with a GPU present")
      raise
  assert f"custom_call @{pc.TRITON_CUSTOM_CALL}" in text.replace('"', "")


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(_LOWERED_OPS))
def test_gpu_default_is_the_triton_kernel(op):
  """On the GPU, implementation=None must run the Pallas-Triton kernel: the compiled executable holds it."""
  x = _x((128, 256), jnp.bfloat16)
  compiled = jax.jit(_LOWERED_OPS[op]).lower(x).compile().as_text()
  assert "triton" in compiled.lower(), compiled[:2000]


@pytest.mark.gpu
def test_gpu_kernels_rank_subnormals_exactly():
  """Triton's fabsf flushes subnormals (FTZ); the kernels take |x| from the bits, so tiny magnitudes still rank."""
  x = jnp.array([[1e-40, 3e-40, 2e-40, 0.0, 5e-39, -6e-39, 1e-45, 0.0]] * 4, jnp.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    mask = jsparse.nm_mask(x.astype(dtype), implementation="pallas")
    np.testing.assert_array_equal(mask[0], [0, 1, 1, 0, 1, 1, 0, 0])
    s = jsparse.soft_threshold_24(x.astype(dtype), implementation="pallas")
    assert (np.asarray(s[0], np.float32)[[1, 2]] > 0).all()
