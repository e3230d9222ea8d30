"""N:M masks, pruning, gradient modes, transposable 2:4 and the S-STE soft threshold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.kernels.nm import reference as ref
from tests.helpers import FLOAT_DTYPES, assert_close, implementation

IMPLS = ["xla"]


def _x(shape, dtype=jnp.float32, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_nm_mask_counts_and_largest(impl, dtype, n, m):
  x = _x((16, 64), dtype)
  with implementation(impl) as im:
    mask = jsparse.nm_mask(x, n, m, implementation=im)
  g = mask.reshape(16, -1, m)
  assert (g.sum(-1) == n).all()
  a = np.abs(np.asarray(x, np.float32)).reshape(16, -1, m)
  kept_min = np.where(g, a, np.inf).min(-1)
  dropped_max = np.where(g, -np.inf, a).max(-1)
  assert (kept_min >= dropped_max).all()


def test_ties_go_to_lower_index():
  x = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, -2.0, 2.0]])
  np.testing.assert_array_equal(jsparse.nm_mask(x), [[1, 1, 0, 0, 0, 1, 1, 0]])


def test_nan_is_kept_and_propagates():
  x = jnp.array([[0.1, jnp.nan, 3.0, 2.0]])
  np.testing.assert_array_equal(jsparse.nm_mask(x), [[0, 1, 1, 0]])
  y = jsparse.nm_prune(x)
  assert np.isnan(y[0, 1]) and y[0, 2] == 3.0 and y[0, 0] == 0 and y[0, 3] == 0


def test_inf_is_a_large_magnitude():
  x = jnp.array([[-jnp.inf, 1.0, 2.0, 0.5]])
  np.testing.assert_array_equal(jsparse.nm_mask(x), [[1, 0, 1, 0]])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_axis(axis):
  x = _x((8, 12, 16))
  mask = jsparse.nm_mask(x, 2, 4, axis=axis)
  expected = jnp.moveaxis(ref.nm_mask(jnp.moveaxis(x, axis, -1), 2, 4), -1, axis)
  np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("gradient,kept,pruned", [("masked", 1.0, 0.0), ("ste", 1.0, 1.0), ("scaled_ste", 2.0, 0.25)])
def test_gradient_modes(gradient, kept, pruned):
  x = _x((8, 32))
  kw = dict(kept_scale=kept, pruned_scale=pruned) if gradient == "scaled_ste" else {}
  ct = _x((8, 32), seed=1)
  _, vjp = jax.vjp(lambda x: jsparse.nm_prune(x, gradient=gradient, **kw), x)
  (dx,) = vjp(ct)
  mask = jsparse.nm_mask(x)
  np.testing.assert_allclose(dx, jnp.where(mask, kept * ct, pruned * ct), rtol=1e-6)


def test_prune_like_reuses_pattern():
  x, other = _x((4, 16)), _x((4, 16), seed=3)
  mask = jsparse.nm_mask(x)
  y = jsparse.nm_prune_like(other, mask)
  np.testing.assert_array_equal(y, jnp.where(mask, other, 0))
  dx = jax.grad(lambda o: jsparse.nm_prune_like(o, mask).sum())(other)
  np.testing.assert_array_equal(dx, mask.astype(jnp.float32))
  dx = jax.grad(lambda o: jsparse.nm_prune_like(o, mask, gradient="ste").sum())(other)
  np.testing.assert_array_equal(dx, jnp.ones_like(other))


@pytest.mark.parametrize("bad,match", [
    (dict(x=jnp.ones((4, 6))), "not a multiple of m=4"),
    (dict(x=jnp.ones((4, 8), jnp.int32)), "floating dtype"),
    (dict(x=jnp.ones((4, 8), jnp.complex64)), "floating dtype"),
    (dict(x=jnp.ones((4, 8)), n=4, m=4), "n must be smaller than m"),
    (dict(x=jnp.ones(())), "rank at least 1"),
    (dict(x=jnp.ones((4, 8)), axis=2), "out of range"),
])
def test_bad_input(bad, match):
  args = dict(n=2, m=4) | bad
  x = args.pop("x")
  with pytest.raises(ValueError, match=match):
    jsparse.nm_prune(x, **args)


def test_bad_gradient():
  with pytest.raises(ValueError, match="gradient must be one of"):
    jsparse.nm_prune(jnp.ones((4, 8)), gradient="dense")
  with pytest.raises(ValueError, match="only apply to gradient='scaled_ste'"):
    jsparse.nm_prune(jnp.ones((4, 8)), kept_scale=2.0)


# --- transposable 2:4 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_transposable_is_24_both_ways(impl):
  x = _x((2, 32, 48))
  with implementation(impl) as im:
    mask = jsparse.transposable_24_mask(x, implementation=im)
  assert (mask.reshape(2, 32, 12, 4).sum(-1) == 2).all()
  assert (jnp.swapaxes(mask, -1, -2).reshape(2, 48, 8, 4).sum(-1) == 2).all()


def test_transposable_is_optimal_per_tile():
  x = _x((4, 4), seed=7)
  mask = jsparse.transposable_24_mask(x)
  a = np.abs(np.asarray(x))
  best = max(sum(a[r, c] for r, pair in enumerate(choice) for c in ref.ROW_PAIRS[pair])
             for choice in ref.transposable_patterns())
  np.testing.assert_allclose(float((a * mask).sum()), best, rtol=1e-6)


def test_transposable_beats_greedy():
  x = _x((256, 256), seed=11)
  a = jnp.abs(x)
  opt = float((a * jsparse.transposable_24_mask(x)).sum())
  greedy = float((a * ref.greedy_transposable_24_mask(x)).sum())
  row_only = float((a * jsparse.nm_mask(x)).sum())
  assert greedy <= opt + 1e-3 <= row_only + 1e-3


# --- S-STE ------------------------------------------------------------------------------------------------------------


def test_soft_threshold_formula():
  w = jnp.array([[0.5, -2.0, 1.0, -0.25, 3.0, 3.0, 3.0, 1.0]])
  s = jsparse.soft_threshold_24(w)
  np.testing.assert_allclose(s, [[0.0, -1.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_soft_threshold_matches_definition(impl, dtype):
  w = _x((32, 64), dtype)
  with implementation(impl) as im:
    s = jsparse.soft_threshold_24(w, axis=0, implementation=im)
  a = np.asarray(w, np.float32).T.reshape(64, 8, 4)
  t = np.sort(np.abs(a), -1)[..., 1:2]  # 3rd largest
  expected = np.sign(a) * np.maximum(np.abs(a) - t, 0)
  assert_close(s, expected.reshape(64, 32).T, dtype)
  assert (np.count_nonzero(np.asarray(s, np.float32).T.reshape(64, 8, 4), -1) <= 2).all()


def test_soft_threshold_is_ste_by_default_and_scale_is_least_squares():
  w = _x((16, 16))
  ct = _x((16, 16), seed=2)
  _, vjp = jax.vjp(jsparse.soft_threshold_24, w)
  np.testing.assert_array_equal(vjp(ct)[0], ct)
  beta = float(jsparse.sste_scale(w))
  s = np.asarray(jsparse.soft_threshold_24(w))
  wn = np.asarray(w)
  errs = [np.sum((wn - b * s) ** 2) for b in (beta * 0.99, beta, beta * 1.01)]
  assert errs[1] <= min(errs[0], errs[2])
  assert beta > 1.0  # S shrinks magnitudes, so the scale restores them
