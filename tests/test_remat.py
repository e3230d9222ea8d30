"""Compressed remat: gradients of every policy, residual sizes, densities, overflow, store/load, policies."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse import remat
from jsparse.remat import saved_residuals
from jsparse.kernels.compress import format as fmt
from tests.helpers import assert_bitwise_equal, assert_close, implementation

T, D, F = 64, 32, 256
POLICIES = list(remat.REMAT_POLICIES)


def _inputs(density, dtype=jnp.float32, seed=0):
  """x, w1, w2 with relu(x @ w1) about `density` non-zero: a bias feature (x[:, -1] = 1) shifts y1 by a quantile.

  density=1.0 is the adversarial all-dense case (every pre-activation positive).
  """
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (T, D), jnp.float32).at[:, -1].set(1.0)
  w1 = jax.random.normal(k2, (D, F), jnp.float32) / np.sqrt(D - 1)
  y = x[:, :-1] @ w1[:-1]
  bias = -jnp.quantile(y, 1.0 - density, axis=0) if density < 1.0 else -jnp.min(y, axis=0) + 0.1
  w1 = w1.at[-1].set(bias)
  w2 = jax.random.normal(k3, (F, D), jnp.float32) / np.sqrt(F)
  return x.astype(dtype), w1.astype(dtype), w2.astype(dtype)


def _reference_loss(x, w1, w2):
  return jnp.sum(jnp.square(jax.nn.relu(x @ w1)) @ w2 * jnp.cos(jnp.arange(D, dtype=x.dtype)))


def _loss(policy, capacity=1.0, impl=None, **kw):
  def loss(x, w1, w2):
    out = jsparse.squared_relu_ffn(x, w1, w2, remat=policy, capacity=capacity, implementation=impl, **kw)
    return jnp.sum(out * jnp.cos(jnp.arange(D, dtype=x.dtype)))
  return loss


@functools.cache
def _grad_fn(policy, capacity=1.0, impl=None, nm=None):
  """One jitted gradient per configuration, reused across inputs (keeps the CPU suite's compile time small)."""
  return jax.jit(jax.grad(_loss(policy, capacity, impl, **({} if nm is None else dict(nm=nm))), argnums=(0, 1, 2)))


def _grads(loss, *args):
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)


def _assert_matches_reference(got, args, dtype):
  want = jax.grad(_reference_loss, argnums=(0, 1, 2))(*args)
  for g, w in zip(got, want):
    if jnp.dtype(dtype) == jnp.float32:
      assert_close(g, w, dtype)
    else:  # bf16 matmuls may round differently after fusion: compare norms (|err| / |ref| within bf16's 1e-2)
      g32, w32 = np.asarray(g, np.float32), np.asarray(w, np.float32)
      assert np.linalg.norm(g32 - w32) <= 1e-2 * np.linalg.norm(w32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("density", [0.5, 0.15, 0.05, 0.01, 1.0])
def test_every_policy_gives_the_same_gradients(density, dtype):
  """50/85/95/99% zeros and all-dense (adversarial), each with a capacity that holds it."""
  args = _inputs(density, dtype)
  capacity = 0.2 if density < 0.2 else 1.0
  dense = _grad_fn("save_dense")(*args)
  for policy in POLICIES[1:]:
    for got, want in zip(_grad_fn(policy, capacity)(*args), dense):
      assert_bitwise_equal(got, want)  # the backward pass sees exactly the forward's activation
  _assert_matches_reference(dense, args, dtype)  # and the op is the plain FFN
  _, stats = jax.jit(lambda *a: jsparse.squared_relu_ffn(*a, remat="compressed", capacity=capacity,
                                                         return_stats=True))(*args)
  assert float(stats["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(float(stats["density"]), density, atol=0.02)


@pytest.mark.parametrize("impl", ["interpret", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_pallas_path_matches_reference_path(impl):
  args = _inputs(0.15, jnp.bfloat16, seed=2)
  with implementation(impl) as im:
    got = _grads(_loss("compressed", 0.2, im), *args)
  for g, w in zip(got, _grad_fn("compressed", 0.2, "xla")(*args)):
    assert_bitwise_equal(g, w)


def _residuals(policy, capacity, dtype=jnp.bfloat16):
  x, w1, w2 = _inputs(0.05, dtype)
  loss = _loss(policy, capacity)
  # Not the arguments, nor the loss's own (1, D) cosine weights.
  return [aval for aval, src in saved_residuals(loss, x, w1, w2) if "argument" not in src and aval.size != D]


def test_saved_residual_shapes_and_sizes():
  """What each policy saves, read off the saved-residual avals (bf16: dense is 2 bytes/element)."""
  dense_bytes = T * F * 2
  saved = _residuals("save_dense", 1.0)
  assert [(a.shape, a.dtype) for a in saved if a.size > 1] == [((T, F), jnp.bfloat16)]
  assert _residuals("recompute", 1.0) == []
  capacity = fmt.capacity_elements("t", (T, F), 0.055)
  saved = _residuals("compressed", 0.055)
  shapes = sorted((a.shape, str(a.dtype)) for a in saved if a.size > 1)
  assert shapes == sorted([((T, F // 32), "uint32"), ((capacity,), "bfloat16"), ((T,), "int32")])
  nbytes = sum(a.size * a.dtype.itemsize for a in saved)
  # 8x: bitmask (1/16) + 5.5% values; the bar of the issue at 95% zeros. (The 128-element capacity rounding and
  # the per-row offsets matter at this toy F=256: at F=8192 the ratio is 8.5x.)
  assert dense_bytes / nbytes > 7.0
  saved = _residuals("offload", 0.055)
  assert all(a.memory_space != jax.memory.Space.Device for a in saved if a.size > 1) or all(
      "host" in str(a) for a in saved if a.size > 1)


@pytest.mark.parametrize("density", [0.5, 1.0])
def test_overflow_is_exact_for_the_function_computed_and_reported(density):
  args = _inputs(density, jnp.float32, seed=4)
  capacity = 0.25  # half (or, all dense, three quarters) of the non-zeros do not fit
  out, stats = jsparse.squared_relu_ffn(*args, remat="compressed", capacity=capacity, return_stats=True)
  y1 = np.asarray(args[0] @ args[1])
  r = np.maximum(y1, 0).reshape(-1)
  keep = np.cumsum(r > 0) <= fmt.capacity_elements("t", (T, F), capacity)
  r_kept = jnp.asarray(np.where(keep, r, 0).reshape(T, F))
  nnz = (r > 0).sum()
  np.testing.assert_allclose(float(stats["dropped_fraction"]), (nnz - keep[r > 0].sum()) / nnz, rtol=1e-6)
  mask = r_kept != 0

  def computed(x, w1, w2):  # the function the op computes under overflow: dropped activations are zero
    return jnp.sum(jnp.square(jnp.where(mask, jax.nn.relu(x @ w1), 0)) @ w2 * jnp.cos(jnp.arange(D, dtype=x.dtype)))

  np.testing.assert_allclose(out, jnp.square(r_kept) @ args[2], rtol=1e-5, atol=1e-5)
  got = _grad_fn("compressed", capacity)(*args)
  for g, w in zip(got, jax.jit(jax.grad(computed, argnums=(0, 1, 2)))(*args)):
    assert_close(g, w, jnp.float32)


def test_nm_activation_is_masked_in_every_policy():
  args = _inputs(0.5, jnp.float32, seed=5)
  mask = jsparse.nm_mask(jnp.maximum(args[0] @ args[1], 0), 2, 4)  # signed-largest == largest relu here

  def reference(x, w1, w2):
    h = jnp.where(jsparse.squared_relu_nm(x @ w1, 2, 4, return_mask=True)[1], jnp.square(jax.nn.relu(x @ w1)), 0)
    return jnp.sum(h @ w2 * jnp.cos(jnp.arange(D, dtype=x.dtype)))

  want = jax.grad(reference, argnums=(0, 1, 2))(*args)
  for policy in POLICIES:
    for g, w in zip(_grad_fn(policy, 0.6, nm=(2, 4))(*args), want):
      assert_close(g, w, jnp.float32)
  assert mask.shape == (T, F)


@pytest.mark.parametrize("kind", ["dense", "bitmask", "24", "vnm"])
def test_store_load_roundtrip(kind):
  x = jax.random.normal(jax.random.key(6), (64, 128), jnp.float32)
  r = jsparse.vnm_prune(jnp.maximum(x, 0), 64, 2, 8) if kind == "vnm" else jsparse.squared_relu_nm(x, 2, 4)
  store = functools.partial(jsparse.store_activation, kind=kind, capacity=0.6)
  r2, h2 = jax.jit(lambda r: jsparse.load_activation(store(r), return_square=True))(r)
  assert_bitwise_equal(r2, r)
  assert_bitwise_equal(h2, r * r)
  want = remat.FFN_ACT if kind == "dense" else remat.FFN_ACT_COMPRESSED
  jaxpr = str(jax.make_jaxpr(store)(r))
  assert f"name={want}" in jaxpr.replace("'", "").replace('"', "")


def test_block_level_checkpoint_and_nnx_remat():
  """The policy composes with an outer jax.checkpoint and with flax.nnx.remat."""
  from flax import nnx

  x, w1, w2 = _inputs(0.05, jnp.bfloat16)

  def block(x, w1, w2):
    return jnp.sum(jnp.tanh(jsparse.squared_relu_ffn(x, w1, w2, remat="compressed", capacity=0.06)))

  outer = jax.checkpoint(block, policy=jsparse.remat_policy("compressed"))
  saved = [a for a, src in saved_residuals(outer, x, w1, w2) if "argument" not in src]
  assert sorted(a.shape for a in saved if a.size > 1) == sorted([(T, F // 32), (T,), (
      fmt.capacity_elements("t", (T, F), 0.06),)])
  g1 = _grads(outer, x, w1, w2)
  g2 = _grads(nnx.remat(block, policy=jsparse.remat_policy("compressed")), x, w1, w2)
  for a, b in zip(g1, g2):
    assert_bitwise_equal(a, b)


def test_auto_follows_the_enclosing_policy():
  if not hasattr(jax, "custom_remat"):
    with pytest.raises(ValueError, match="custom_remat"):
      jsparse.squared_relu_ffn(*_inputs(0.5), remat="auto")
    return
  args = _inputs(0.15, jnp.float32)
  want = _grad_fn("save_dense")(*args)
  previous = jax.config.jax_remat3
  jax.config.update("jax_remat3", True)
  try:
    for policy in POLICIES:
      loss = jax.checkpoint(_loss("auto", 0.25), policy=jsparse.remat_policy(policy))
      for g, w in zip(_grads(loss, *args), want):
        assert_bitwise_equal(g, w)
    saved = [a for a, src in saved_residuals(jax.checkpoint(_loss("auto", 0.25), policy=jsparse.remat_policy(
        "compressed")), *args) if "argument" not in src]
    assert (T, F // 32) in [a.shape for a in saved]
  finally:
    jax.config.update("jax_remat3", previous)


def test_policies_and_errors():
  assert jsparse.remat_policy("compressed").saveable_names == frozenset({remat.FFN_ACT_COMPRESSED})
  assert jsparse.remat_policy("save_dense").saveable_names == frozenset({remat.FFN_ACT})
  with pytest.raises(ValueError, match="remat_policy: name"):
    jsparse.remat_policy("everything")
  x, w1, w2 = _inputs(0.5)
  with pytest.raises(ValueError, match="remat must be one of"):
    jsparse.squared_relu_ffn(x, w1, w2, remat="full")
  with pytest.raises(ValueError, match="do not chain"):
    jsparse.squared_relu_ffn(x, w1.T, w2)
  with pytest.raises(ValueError, match="multiple of word bits"):
    jsparse.squared_relu_ffn(x, w1[:, :48], w2[:48])
  with pytest.raises(ValueError, match="kind must be one of"):
    jsparse.store_activation(x, kind="zip")
