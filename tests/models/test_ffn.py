"""The FFN modules: dense baselines, SparseFFN's modes, the sparse/dense switch, S-STE state, stats, Linen bridge."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import jsparse
from jsparse import models
from jsparse.models import recipe
from tests.helpers import assert_bitwise_equal, assert_close

D, F = 32, 64
ACT24 = models.FFNConfig(kind="sparse", activation_sparsity="2:4", dense_multiple=4)
SSTE = models.FFNConfig(kind="sparse", weight_sparsity="2:4-sste")


def _x(shape=(2, 16, D), seed=1, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _loss(model, x):
  return jnp.sum(jnp.sin(model(x)))


@jax.jit
def _dense_reference(x, w1, w2):
  return jnp.square(jax.nn.relu(x @ w1)) @ w2


@pytest.mark.parametrize("config", [models.FFNConfig(kind="sparse"), ACT24.replace(sparse=False),
                                    SSTE.replace(sparse=False)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sparsity_off_is_exactly_the_dense_ffn(config, dtype):
  dense = models.SquaredReLUFFN(D, F, dtype=dtype, rngs=nnx.Rngs(0))
  sparse = models.SparseFFN(D, F, config, dtype=dtype, rngs=nnx.Rngs(0))
  assert_bitwise_equal(sparse.w1[...], dense.w1[...])  # same seed, same starting weights
  assert_bitwise_equal(sparse.w2[...], dense.w2[...])
  x = _x(dtype=dtype)
  step = nnx.jit(lambda m, x: (m(x), nnx.grad(_loss)(m, x)))
  (y_d, g_d), (y_s, g_s) = step(dense, x), step(sparse, x)
  assert_bitwise_equal(y_s, y_d)
  assert_bitwise_equal(g_s["w1"][...], g_d["w1"][...])
  assert_bitwise_equal(g_s["w2"][...], g_d["w2"][...])


def test_swiglu_is_its_formula_and_parameter_matched():
  m = models.SwiGLUFFN(D, 48, rngs=nnx.Rngs(0))
  x = _x()
  want = (jax.nn.silu(x @ m.w1[...]) * (x @ m.w3[...])) @ m.w2[...]
  assert_close(m(x), want)
  assert models.swiglu_matched_d_ff(8192) == 5504 and models.swiglu_matched_d_ff(14336) == 9600
  for f in (8192, 14336):  # within one rounding step (128 columns) of the squared-ReLU parameter count
    assert abs(3 * models.swiglu_matched_d_ff(f) - 2 * f) <= 3 * 64


def test_sparse_modes_forward_equals_their_reference_composition():
  x = _x()
  x_TxD = x.reshape(-1, D)
  m = models.SparseFFN(D, F, ACT24, rngs=nnx.Rngs(0))
  w1, w2 = m.w1[...], m.w2[...]
  assert_close(m(x).reshape(-1, D), jsparse.squared_relu_nm(x_TxD @ w1) @ w2)
  for on in ("w1", "w2", "both"):
    for act in (None, "2:4"):
      cfg = SSTE.replace(weight_sparsity_on=on, activation_sparsity=act)
      m = models.SparseFFN(D, F, cfg, rngs=nnx.Rngs(0))
      w1, w2 = m.w1[...], m.w2[...]
      if on in ("w1", "both"):
        w1 = jsparse.sste_scale(w1, axis=0) * jsparse.soft_threshold_24(w1, axis=0)
      if on in ("w2", "both"):
        w2 = jsparse.sste_scale(w2, axis=0) * jsparse.soft_threshold_24(w2, axis=0)
      act_fn = jsparse.squared_relu_nm if act else (lambda y: jnp.square(jax.nn.relu(y)))
      assert_close(m(x).reshape(-1, D), act_fn(x_TxD @ w1) @ w2)


def test_sste_gradient_is_straight_through_to_the_dense_weight():
  m = models.SparseFFN(D, F, SSTE.replace(token_24_weight_grads=False), rngs=nnx.Rngs(0))
  x = _x()
  g = nnx.grad(_loss)(m, x)
  w1f, w2f = m.forward_weights()
  # The gradient of the dense weight is the gradient of the forward (2:4) weight itself, unscaled by beta.
  dw1f, dw2f = jax.grad(lambda a, b: jnp.sum(jnp.sin(_dense_reference(x, a, b))), argnums=(0, 1))(w1f, w2f)
  assert_close(g["w1"][...], dw1f)
  assert_close(g["w2"][...], dw2f)
  assert "beta1" not in g and "beta2" not in g  # the scales are state, not parameters


def test_switch_keeps_params_and_compiles_once_per_mode():
  m = models.SparseFFN(D, F, ACT24, rngs=nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.state(m, nnx.Param))
  traces = []

  @nnx.jit
  def step(m, x):
    traces.append(m.sparse)
    return m(x)

  x = _x()
  for sparse in (True, False, True, False):
    models.set_sparse(m, sparse)
    y = step(m, x)
    assert m.sparse == sparse
    models.collect_stats(m)  # popping the sown values keeps the module's structure (and the jit cache key) fixed
  assert traces == [True, False]
  after = jax.tree.map(np.asarray, nnx.state(m, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  models.set_sparse(m, True)
  assert not np.array_equal(step(m, x), y)  # the two modes compute different things


def test_prepare_sparse_phase_fixes_beta():
  m = models.SparseFFN(D, F, SSTE, rngs=nnx.Rngs(0))
  m.w1[...] = m.w1[...] * 1.5 + 0.01
  models.prepare_sparse_phase(m)
  beta = float(m.beta1[...])
  assert beta == pytest.approx(float(jsparse.sste_scale(m.w1[...], axis=0)), rel=1e-6)
  m.w1[...] = m.w1[...] * 3.0  # training moves the weights; beta stays until the next prepare_sparse_phase
  m(_x())
  assert float(m.beta1[...]) == beta
  assert isinstance(m.beta1, models.SparsityState)


def test_stats_are_sown_and_collected():
  m = models.SparseFFN(D, F, ACT24, rngs=nnx.Rngs(0))
  x = _x()
  nnx.jit(lambda m, x: m(x))(m, x)
  stats = models.collect_stats(m)
  y1 = np.asarray(x.reshape(-1, D) @ m.w1[...])
  r = np.maximum(y1, 0)
  _, mask = jsparse.squared_relu_nm(jnp.asarray(y1), return_mask=True)
  mass = r ** 2
  assert stats["act_density"] == pytest.approx((r > 0).mean(), rel=1e-6)
  assert stats["dropped_mass"] == pytest.approx(mass[~np.asarray(mask)].sum() / mass.sum(), rel=1e-5)
  assert stats["dense_features"] == recipe.n_dense_features(F, 0.05, 4)
  assert models.collect_stats(m) == {}  # popped
  models.set_sparse(m, False)  # the dense phase reports what the mask would drop, and F dense features
  m(x)
  dense_stats = models.collect_stats(m)
  assert dense_stats["dropped_mass"] == pytest.approx(stats["dropped_mass"], rel=1e-5)
  assert dense_stats["dense_features"] == F


def test_permutation_stream_advances_and_fixed_is_fixed():
  m = models.SparseFFN(D, F, ACT24, rngs=nnx.Rngs(0, permute=3))
  p1, p2 = m._permutation(32), m._permutation(32)
  assert not np.array_equal(p1, p2) and sorted(np.asarray(p1)) == list(range(32))
  f = models.SparseFFN(D, F, ACT24.replace(permutation="fixed"), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(f._permutation(32), f._permutation(32))


# implementation="xla": the module must compute exactly the functional op with its own router state.
ROUTED = models.FFNConfig(kind="sparse", activation_sparsity="vnm", num_groups=4, router_block=8,
                          implementation="xla")


def test_routed_forward_is_routed_ffn_with_the_module_router():
  m = models.SparseFFN(D, F, ROUTED, rngs=nnx.Rngs(0))
  x_TxD = _x(shape=(32, D))
  state = m.router_state()
  assert state.centroids_ExD.shape == (4, D) and sorted(np.asarray(state.perm_F)) == list(range(F))
  expected = jsparse.routed_ffn(x_TxD, m.w1[...], m.w2[...], state, ROUTED.router_config(), implementation="xla")
  assert_close(m(x_TxD), expected)
  stats = models.collect_stats(m)
  assert 0.0 < stats["dropped_mass"] < 1.0 and stats["dense_features"] == 0
  # Each token only sees its group's neurons: the routed output differs from the dense FFN.
  assert not np.allclose(m(x_TxD), _dense_reference(x_TxD, m.w1[...], m.w2[...]), atol=1e-3)
  models.set_sparse(m, False)
  np.testing.assert_array_equal(m(x_TxD), models.SquaredReLUFFN(D, F, rngs=nnx.Rngs(0))(x_TxD))


def test_routed_gradients_match_the_reference():
  m = models.SparseFFN(D, F, ROUTED.replace(stats=False), rngs=nnx.Rngs(0))
  x_TxD = _x(shape=(32, D))
  g = nnx.grad(lambda mod, x: jnp.sum(jnp.sin(mod(x))))(m, x_TxD)
  state, rcfg = m.router_state(), ROUTED.router_config()
  ref = jax.grad(lambda w1, w2: jnp.sum(jnp.sin(jsparse.routed_ffn(x_TxD, w1, w2, state, rcfg,
                                                                    implementation="xla"))), (0, 1))(m.w1[...], m.w2[...])
  assert_close(g["w1"][...], ref[0])
  assert_close(g["w2"][...], ref[1])


def test_router_state_is_reclustered_and_stepped():
  m = models.SparseFFN(D, F, ROUTED.replace(recluster_every=2), rngs=nnx.Rngs(0))
  before = m.router_state()
  m.w1[...] = jax.random.normal(jax.random.key(5), (D, F))
  models.prepare_sparse_phase(m)  # re-clusters from the current W1
  after = m.router_state()
  assert not np.allclose(before.centroids_ExD, after.centroids_ExD)
  models.after_optimizer_step(m)
  assert int(m.router_state().step) == 1
  m.w1[...] = jax.random.normal(jax.random.key(6), (D, F))
  models.after_optimizer_step(m)  # step 2: re-clusters
  assert int(m.router_state().step) == 2
  assert not np.allclose(after.centroids_ExD, m.router_state().centroids_ExD)
  models.set_sparse(m, False)
  models.after_optimizer_step(m)  # a dense phase leaves the router alone
  assert int(m.router_state().step) == 2


def test_vnm_bad_configs_and_other_bad_configs_raise():
  with pytest.raises(ValueError, match="multiple of\\s+block=128|not a multiple of block"):
    models.SparseFFN(D, F, models.FFNConfig(kind="sparse", activation_sparsity="vnm"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="vnm_blocks"):
    models.FFNConfig(kind="sparse", activation_sparsity="vnm", vnm_blocks=(64, 2))
  with pytest.raises(ValueError, match="weight_sparsity"):
    models.FFNConfig(kind="sparse", activation_sparsity="vnm", weight_sparsity="2:4-sste")
  with pytest.raises(ValueError, match="activation_sparsity"):
    models.FFNConfig(kind="sparse", activation_sparsity="1:4")
  with pytest.raises(ValueError, match="kind='sparse'"):
    models.FFNConfig(kind="squared_relu", activation_sparsity="2:4")
  with pytest.raises(ValueError, match="unknown policy"):
    models.FFNConfig(kind="sparse", remat="everything_please")
  with pytest.raises(ValueError, match="multiple of 4"):
    models.SparseFFN(D, 30, ACT24, rngs=nnx.Rngs(0))


def test_remat_policies_give_the_same_gradients():
  x = _x(shape=(4, 8, D))
  grads = []
  for remat in (None, "compressed", "recompute"):
    m = models.SparseFFN(D, F, ACT24.replace(remat=remat), rngs=nnx.Rngs(0, permute=1))
    grads.append(nnx.jit(nnx.grad(_loss))(m, x))
  for g in grads[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), g, grads[0])


def test_compressed_remat_saves_only_the_packed_residual():
  x_TxD = _x(shape=(64, D)).reshape(64, D)
  m = models.SparseFFN(D, F, ACT24.replace(remat="compressed", stats=False), rngs=nnx.Rngs(0))
  w1, w2 = m.forward_weights()
  spec = recipe.RecipeSpec.from_config(m.config)
  fn = jax.checkpoint(lambda x, a, b: jnp.sum(recipe.sparse_ffn(x, a, b, spec)[0]),
                      policy=jsparse.remat_policy("compressed"))
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(fn, x_TxD, w1, w2)
  lines = buf.getvalue().strip().splitlines()
  saved = [ln for ln in lines if "from the argument" not in ln]
  assert saved and all("named 'ffn_act_compressed'" in ln for ln in saved), lines
  # Nothing T x F is saved dense: only the 2:4 values (T x F/2), their indices and the per-feature density.
  assert not any(f"[64,{F}]" in ln for ln in saved), lines
  assert any(f"[64,{F // 2}]" in ln for ln in saved), lines


def test_linen_bridge():
  cfg = ACT24.replace(stats=False)
  layer = nnx.bridge.to_linen(models.SparseFFN, D, F, cfg)
  x = _x()
  variables = layer.init(jax.random.key(0), x)
  y = layer.apply(variables, x)
  assert y.shape == x.shape
  params = variables["params"]
  w1 = params["w1"].value if hasattr(params["w1"], "value") else params["w1"]
  w2 = params["w2"].value if hasattr(params["w2"], "value") else params["w2"]
  assert_close(y.reshape(-1, D), jsparse.squared_relu_nm(x.reshape(-1, D) @ w1) @ w2)

  class Net(linen.Module):
    @linen.compact
    def __call__(self, x):
      return linen.Dense(D)(nnx.bridge.to_linen(models.SparseFFN, D, F, cfg)(x))

  net_vars = Net().init(jax.random.key(1), x)
  grads = jax.grad(lambda v: jnp.sum(Net().apply(v, x) ** 2))(net_vars)
  assert jax.tree.leaves(grads)
