"""The functional sparse FFN (Haziza et al.'s 2:4 recipe, S-STE weights): forward, backward and the recipe's pieces.

The backward is checked against an independent float64 NumPy transcription of the reference code
(``lingua/transformer.py::_FFNSRelu``: sparsify y1, save it, dense dy2, token-wise 2:4 split dW, 2:4 dX), and the
parts that are true derivatives against finite differences.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.models import recipe
from jsparse.models.recipe import RecipeSpec
from tests.helpers import IMPLEMENTATIONS, assert_close, implementation

T, D, F = 32, 16, 64


def _inputs(seed=0, dtype=jnp.float32, t=T):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k1, (t, D), jnp.float32).astype(dtype)
  # A positive shift on some features makes their activations dense, so the 95/5 split has something to choose.
  w1 = (jax.random.normal(k2, (D, F)) * D ** -0.5 + 0.4 * (jnp.arange(F) % 5 == 0)).astype(dtype)
  w2 = (jax.random.normal(k3, (F, D)) * F ** -0.5).astype(dtype)
  g = jax.random.normal(k4, (t, D), jnp.float32).astype(dtype)
  return x, w1, w2, g


# ----------------------------------------------------------------------------------------------------------------------
# NumPy transcription of the reference recipe (float64).


def _np_prune24_last(a):
  """2:4 along the last axis by |a|, ties to the lower index."""
  g = a.reshape(*a.shape[:-1], -1, 4)
  order = np.argsort(-np.abs(g), axis=-1, kind="stable")
  keep = np.zeros(g.shape, bool)
  np.put_along_axis(keep, order[..., :2], True, axis=-1)
  return np.where(keep, g, 0).reshape(a.shape)


def _np_signed_mask(y):
  """The forward mask: the two largest signed values of every 4 along the last axis (ties to the lower index)."""
  g = np.maximum(y, 0).reshape(*y.shape[:-1], -1, 4)
  order = np.argsort(-g, axis=-1, kind="stable")
  keep = np.zeros(g.shape, bool)
  np.put_along_axis(keep, order[..., :2], True, axis=-1)
  return keep.reshape(y.shape)


def _np_recipe(x, w1, w2, g, *, perm=None, activation_24=True, reuse=True, n_dense=None, grads_24=True):
  x, w1, w2, g = (np.asarray(a, np.float64) for a in (x, w1, w2, g))
  t = x.shape[0]
  perm = np.arange(t) if perm is None else np.asarray(perm)
  xp, gp = x[perm], g[perm]
  y1 = xp @ w1
  mask = _np_signed_mask(y1) if activation_24 else np.ones_like(y1, bool)
  y1m = np.where(mask, y1, 0.0)
  h = np.maximum(y1m, 0) ** 2
  out = np.empty_like(gp)
  out[perm] = h @ w2
  dy2 = gp @ w2.T
  dy1 = 2 * dy2 * np.maximum(y1m if reuse else y1, 0)
  dxp = (_np_prune24_last(dy1) if activation_24 else dy1) @ w1.T
  dx = np.empty_like(dxp)
  dx[perm] = dxp
  n_f = w1.shape[1]
  if grads_24:
    density = (y1m > 0).mean(0)
    order = np.argsort(density, kind="stable")  # sparsest first
    sparse_idx = order[:n_f - n_dense]

    def split(a):  # a: T x F -> columns of sparse features pruned 2:4 along T
      a = a.copy()
      a[:, sparse_idx] = _np_prune24_last(a[:, sparse_idx].T).T
      return a

    dw2 = split(h).T @ gp
    dw1 = xp.T @ split(dy1)
  else:
    dw2, dw1 = h.T @ gp, xp.T @ dy1
  return out, dx, dw1, dw2


@functools.partial(jax.jit, static_argnums=0)
def _vjp(spec, x, w1, w2, g, perm=None):
  (out, _), pull = jax.vjp(lambda x, w1, w2: recipe.sparse_ffn(x, w1, w2, spec, perm), x, w1, w2)
  dx, dw1, dw2 = pull((g, jax.tree.map(jnp.zeros_like, _)))
  return out, dx, dw1, dw2


def _spec(**kw):
  base = dict(activation_24=True, reuse_mask_in_backward=True, weight_grads_24=True, dense_fraction=0.25,
              dense_multiple=4, implementation="xla")
  base.update(kw)
  return RecipeSpec(**base)


# ----------------------------------------------------------------------------------------------------------------------
# The pieces


def test_n_dense_features_matches_the_reference_rounding():
  assert recipe.n_dense_features(8192, 0.05, 128) == 384      # 7782 sparse -> 7808
  assert recipe.n_dense_features(14336, 0.05, 128) == 640     # 13619 -> 13696
  assert recipe.n_dense_features(256, 0.05, 128) == 0         # 243 -> 256: all sparse
  assert recipe.n_dense_features(64, 0.25, 4) == 16
  assert recipe.n_dense_features(64, 0.0, 4) == 0
  assert recipe.n_dense_features(64, 1.0, 4) == 64


def test_dense_feature_mask_picks_the_densest_with_stable_ties():
  density = jnp.array([0.1, 0.9, 0.5, 0.9, 0.0, 0.5, 0.3, 0.9])
  np.testing.assert_array_equal(recipe.dense_feature_mask(density, 3), [0, 1, 0, 1, 0, 0, 0, 1])
  # Ties: of the two 0.5 features the later index counts as the denser (stable ascending order).
  np.testing.assert_array_equal(recipe.dense_feature_mask(density, 4), [0, 1, 0, 1, 0, 1, 0, 1])
  assert not recipe.dense_feature_mask(density, 0).any() and recipe.dense_feature_mask(density, 8).all()


def test_permutation_inverse():
  x = jax.random.normal(jax.random.key(1), (T, D))
  perm = jax.random.permutation(jax.random.key(2), T)
  np.testing.assert_array_equal(recipe.unpermute_tokens(recipe.permute_tokens(x, perm), perm), x)
  np.testing.assert_array_equal(recipe.permute_tokens(recipe.unpermute_tokens(x, perm), perm), x)
  assert not np.array_equal(recipe.permute_tokens(x, perm), x)


@pytest.mark.parametrize("n_dense", [0, 16, 64])
def test_split_strategies_agree_and_dense_rows_are_exact(n_dense):
  x, w1, w2, _ = _inputs()
  h = jnp.square(jax.nn.relu(x @ w1))
  lhs = jax.random.normal(jax.random.key(3), (T, D))
  density = jnp.mean(h > 0, axis=0)
  masked = recipe.split_weight_grad(lhs, h, density, n_dense, strategy="masked", gemm_impl="xla")
  overwritten = recipe.split_weight_grad(lhs, h, density, n_dense, strategy="overwrite", gemm_impl="xla")
  assert_close(overwritten, masked)
  dense_f = np.asarray(recipe.dense_feature_mask(density, n_dense))
  exact = np.asarray(lhs.T @ h)
  pruned = np.asarray(lhs.T @ jsparse.nm_prune(h, axis=0))
  assert_close(np.asarray(masked)[:, dense_f], exact[:, dense_f])
  assert_close(np.asarray(masked)[:, ~dense_f], pruned[:, ~dense_f])
  if 0 < n_dense < F:  # the densest features really are the ones kept dense
    assert np.asarray(density)[dense_f].min() >= np.asarray(density)[~dense_f].max()


def test_mask_reuse_zeroes_dy1_where_the_forward_dropped():
  # With x = identity (T = D) and no token pruning, dW1 = x^T dy1 = dy1: the backward's dy1 becomes visible.
  x = jnp.eye(D)
  _, w1, w2, _ = _inputs()
  g = jax.random.normal(jax.random.key(5), (D, D))
  y1 = np.asarray(x @ w1)
  mask = _np_signed_mask(y1)
  dropped_positive = (~mask) & (y1 > 0)
  assert dropped_positive.any()
  for reuse in (True, False):
    spec = _spec(reuse_mask_in_backward=reuse, weight_grads_24=False)
    _, _, dy1, _ = _vjp(spec, x, w1, w2, g)
    dy1 = np.asarray(dy1)
    if reuse:
      assert (dy1[~mask] == 0).all()
    else:
      assert (dy1[dropped_positive] != 0).all()
    assert (dy1[mask & (y1 > 0)] != 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# Forward = reference composition; backward = the reference recipe


def test_forward_matches_the_composition_of_public_ops():
  x, w1, w2, _ = _inputs()
  beta1, beta2 = jsparse.sste_scale(w1, axis=0), jsparse.sste_scale(w2, axis=0)
  s1 = beta1 * jsparse.soft_threshold_24(w1, axis=0)
  s2 = beta2 * jsparse.soft_threshold_24(w2, axis=0)
  act = lambda y: jsparse.squared_relu_nm(y)
  relu2 = lambda y: jnp.square(jax.nn.relu(y))
  cases = [(_spec(), w1, w2, act(x @ w1) @ w2),
           (_spec(activation_24=False, sparse_w1=True, sparse_w2=True), s1, s2, relu2(x @ s1) @ s2),
           (_spec(sparse_w1=True, sparse_w2=True), s1, s2, act(x @ s1) @ s2),
           (_spec(sparse_w1=True), s1, w2, act(x @ s1) @ w2)]
  perm = jax.random.permutation(jax.random.key(4), T)
  for spec, a, b, want in cases:
    out, _ = recipe.sparse_ffn(x, a, b, spec)
    assert_close(out, want)
    out_fwd, *_ = _vjp(spec, x, a, b, jnp.zeros_like(x), perm)  # the differentiated path shuffles the tokens
    assert_close(out_fwd, want)


@pytest.mark.parametrize("reuse,permute,activation_24", [(True, True, True), (True, False, True),
                                                         (False, True, True), (True, True, False)])
@pytest.mark.parametrize("dense_fraction", [0.0, 0.25])
def test_backward_is_the_reference_recipe(reuse, permute, activation_24, dense_fraction):
  x, w1, w2, g = _inputs(seed=7)
  perm = jax.random.permutation(jax.random.key(8), T) if permute else None
  spec = _spec(reuse_mask_in_backward=reuse, activation_24=activation_24, dense_fraction=dense_fraction)
  n_dense = recipe.n_dense_features(F, dense_fraction, 4)
  got = _vjp(spec, x, w1, w2, g, perm)
  want = _np_recipe(x, w1, w2, g, perm=perm, activation_24=activation_24, reuse=reuse, n_dense=n_dense)
  for name, a, b in zip(("out", "dx", "dw1", "dw2"), got, want):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2e-5, atol=2e-5, err_msg=name)


def test_elementwise_24_mask_is_squared_relu_nms():
  # Ties (zeros, repeated values, -0.0), NaN and infinities included.
  y = np.array(jax.random.normal(jax.random.key(13), (64, 64)), np.float32)
  y[::3, ::5] = 0.0
  y[1::4, 2::7] = y[1::4, 3::7]
  y[5, :8] = [np.nan, 1.0, np.nan, 2.0, -np.inf, np.inf, -0.0, 0.0]
  y[6, :4] = np.inf
  for dtype in (jnp.float32, jnp.bfloat16):
    yd = jnp.asarray(y).astype(dtype)
    _, want = jsparse.squared_relu_nm(yd, 2, 4, return_mask=True, implementation="xla")
    np.testing.assert_array_equal(recipe._mask24_by_relu(yd), want)


@pytest.mark.parametrize("permute", [True, False])
@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("activation_24", [True, False])
def test_fused_activation_path_is_the_reference_recipe(permute, stats, activation_24):
  # The cuSPARSELt path's forward (squared ReLU -- with the 2:4 selection and compression in the activation recipe,
  # with the split's counts without it -- in one op, y1 as the residual, the mask recomputed in the backward), forced
  # on the XLA path: same forward, same statistics, same gradients. activation_24=False: the weight-sparse FFN's
  # token-wise 2:4 weight gradients.
  x, w1, w2, g = _inputs(seed=11)
  perm = jax.random.permutation(jax.random.key(12), T) if permute else None
  fused = _spec(fused_activation=True, stats=stats, activation_24=activation_24)
  plain = _spec(stats=stats, activation_24=activation_24)
  assert recipe._fused_activation(fused) and not recipe._fused_activation(plain)
  assert not recipe._fused_activation(_spec(fused_activation=True, reuse_mask_in_backward=False))
  assert not recipe._fused_activation(_spec(fused_activation=True, activation_24=False, weight_grads_24=False))
  got = _vjp(fused, x, w1, w2, g, perm)
  want = _np_recipe(x, w1, w2, g, perm=perm, activation_24=activation_24, reuse=True,
                    n_dense=recipe.n_dense_features(F, 0.25, 4))
  for name, a, b in zip(("out", "dx", "dw1", "dw2"), got, want):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2e-5, atol=2e-5, err_msg=name)
  out_f, stats_f = recipe.sparse_ffn(x, w1, w2, fused)
  out_p, stats_p = recipe.sparse_ffn(x, w1, w2, plain)
  assert_close(out_f, out_p)
  assert stats_f.keys() == stats_p.keys()
  for k in stats_p:
    assert_close(stats_f[k], stats_p[k])


@pytest.mark.gpu
@pytest.mark.parametrize("permute", [True, False])
@pytest.mark.parametrize("activation_24", [True, False])
def test_cusparselt_recipe_matches_the_oracle(permute, activation_24):
  # The fused path on cuSPARSELt (the forward's one-kernel activation and counts, the backward's recipe24_backward
  # kernels and 2:4 GEMMs) in bfloat16 at cuSPARSELt-aligned sizes, against the float64 transcription fed with the
  # device's own y1 and dy2 (dense GEMMs both paths share). Not against XLA on the GPU: with excess precision (XLA's
  # GPU default) that path ranks dy1 before rounding it to bfloat16 and so breaks bfloat16 ties along T differently.
  # activation_24=False: S-STE-style dense activation with the token-wise 2:4 weight gradients (dense weights here:
  # the weights' own 2:4 GEMMs are sparse_matmul's, tested there).
  from tests.kernels.test_recipe24_backward import _oracle
  from tests.kernels.test_sparse_matmul import _check, _mask_k

  t, d, f = 256, 64, 512
  k1, k2, k3, k4 = jax.random.split(jax.random.key(21), 4)
  x = jax.random.normal(k1, (t, d)).astype(jnp.bfloat16)
  w1 = (jax.random.normal(k2, (d, f)) * d ** -0.5 + 0.4 * (jnp.arange(f) % 5 == 0)).astype(jnp.bfloat16)
  w2 = (jax.random.normal(k3, (f, d)) * f ** -0.5).astype(jnp.bfloat16)
  g = jax.random.normal(k4, (t, d)).astype(jnp.bfloat16)
  perm = np.asarray(jax.random.permutation(jax.random.key(22), t)) if permute else np.arange(t)
  spec = RecipeSpec(activation_24=activation_24, weight_grads_24=True, dense_fraction=0.25, dense_multiple=64,
                    implementation="cusparselt", stats=False)
  assert recipe._fused_activation(spec) and recipe._n_dense(spec, f) == 128
  got = _vjp(spec, x, w1, w2, g, jnp.asarray(perm) if permute else None)

  xp, gp = x[perm], g[perm]
  y1 = np.asarray(jax.jit(jnp.matmul)(xp, w1), np.float32)
  dy2 = jax.jit(lambda a, b: a @ b.T)(gp, w2)
  dxp, dw1, dw2 = _oracle(jnp.asarray(y1, jnp.bfloat16), dy2, xp, gp, w1, 128, activation_24)
  keep = _mask_k(np.maximum(y1, 0), 1) if activation_24 else True
  r = np.where(keep, np.maximum(y1, 0), 0).astype(np.float32)
  h = np.asarray(jnp.asarray(r * r).astype(jnp.bfloat16), np.float64)
  out, dx = np.empty((t, d)), np.empty((t, d))
  out[perm], dx[perm] = h @ np.asarray(w2, np.float64), dxp
  for name, a, b in zip(("out", "dx", "dw1", "dw2"), got, (out, dx, dw1, dw2)):
    assert a.dtype == jnp.bfloat16, name
    _check(a, b, jnp.bfloat16)


@pytest.mark.parametrize("storage", ["24", "bitmask"])
def test_packed_residuals_give_the_same_gradients(storage):
  x, w1, w2, g = _inputs(seed=9)
  base = _vjp(_spec(), x, w1, w2, g)
  packed = _vjp(_spec(storage=storage, capacity=1.0), x, w1, w2, g)
  for a, b in zip(base, packed):
    np.testing.assert_array_equal(a, b)


def test_bitmask_overflow_keeps_forward_and_backward_consistent():
  # A capacity far below the density drops values; the forward must then compute with what the backward sees.
  x, w1, w2, g = _inputs(seed=10)
  spec = _spec(activation_24=False, weight_grads_24=False, storage="bitmask", capacity=0.05)
  out, dx, dw1, dw2 = _vjp(spec, x, w1, w2, g)
  (full, _) = recipe.sparse_ffn(x, w1, w2, spec)
  assert not np.allclose(out, full)  # something was dropped
  f = jax.jit(lambda w2_: jnp.vdot(_vjp(spec, x, w1, w2_, g)[0], g))
  eps = 1e-2
  v = jax.random.normal(jax.random.key(11), w2.shape)
  fd = (f(w2 + eps * v) - f(w2 - eps * v)) / (2 * eps)  # out is linear in w2 with r fixed
  np.testing.assert_allclose(fd, jnp.vdot(dw2, v), rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# Finite differences where the backward is a true derivative


def _fd_check(spec, seed, perm=None, eps=1e-6):
  """Central differences along random directions, in float64 (a step this small never flips a 2:4 choice here)."""
  with jax.enable_x64(True):
    x, w1, w2, g = (a.astype(jnp.float64) for a in _inputs(seed=seed))
    f = jax.jit(lambda x, w1, w2: jnp.vdot(recipe.sparse_ffn(x, w1, w2, spec)[0], g))
    _, *grads = _vjp(spec, x, w1, w2, g, perm)
    args = (x, w1, w2)
    for i, (a, ga) in enumerate(zip(args, grads)):
      v = jax.random.normal(jax.random.key(seed + i), a.shape, jnp.float64)
      moved = lambda s: f(*[b + s * v if j == i else b for j, b in enumerate(args)])
      fd = (moved(eps) - moved(-eps)) / (2 * eps)
      np.testing.assert_allclose(fd, jnp.vdot(ga, v), rtol=1e-6, err_msg=f"argument {i}")


@pytest.mark.parametrize("activation_24", [True, False])
def test_grads_match_finite_differences_without_token_pruning(activation_24):
  # With the weight gradients dense (no token-wise 2:4) the recipe's backward is the derivative of the function
  # with the 2:4 pattern held fixed (mask reused), which finite differences see away from ties.
  _fd_check(_spec(activation_24=activation_24, weight_grads_24=False), seed=12,
            perm=jax.random.permutation(jax.random.key(0), T))


def test_grads_match_finite_differences_all_features_dense():
  _fd_check(_spec(dense_fraction=1.0), seed=13)  # token-wise 2:4 on, but every feature in the dense set


def test_token_count_and_shape_errors():
  x, w1, w2, _ = _inputs(t=30)
  with pytest.raises(ValueError, match="multiple of 4"):
    recipe.sparse_ffn(x, w1, w2, _spec())
  recipe.sparse_ffn(x, w1, w2, _spec(weight_grads_24=False))  # fine without the token-wise 2:4
  with pytest.raises(ValueError, match="want x"):
    recipe.sparse_ffn(x, w1.T, w2, _spec())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_implementations_agree(impl):
  # float32: in bfloat16, XLA may fuse x @ W1 into the reference selection without rounding y1 to bfloat16 first,
  # which flips near-tied 2:4 choices against a kernel that reads the rounded y1 -- a difference of inputs, not of ops.
  x, w1, w2, g = _inputs(seed=14, t=64)
  want = _vjp(_spec(), x, w1, w2, g)
  with implementation(impl) as im:
    got = _vjp(_spec(implementation=im), x, w1, w2, g)  # "pallas": the Pallas sparsify kernels, XLA GEMMs
  for a, b in zip(got, want):
    assert_close(a, b)
