"""sparse_matmul / compress_24 / squared_relu_24_compress: the XLA reference (CPU) and the cuSPARSELt path (GPU).

Every numerics test runs for each implementation: ``"xla"`` everywhere, ``"cusparselt"`` on a GPU (marker ``gpu``),
against the same oracle -- the masked-dense product in float32 accumulation -- with the shared tolerance table.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.kernels.cusparselt import CuSparseLtUnavailableError
from jsparse.kernels.nm import reference as nm_ref
from jsparse.kernels.sparse_matmul import api
from tests.helpers import TOLERANCES, assert_close

IMPLS = ["xla", pytest.param("cusparselt", marks=pytest.mark.gpu)]
DTYPES = [jnp.bfloat16, jnp.float16]


def _x(shape, dtype=jnp.bfloat16, seed=0, scale=1.0):
  # numpy draws: no per-shape compilation on the CPU test budget
  return jnp.asarray((scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)).astype(dtype)


def _mask_k(x, axis):
  """The 2:4 pattern along ``axis`` computed in numpy (an oracle independent of jsparse's own ops)."""
  a = np.moveaxis(np.abs(np.asarray(x, np.float32)), axis, -1)
  g = a.reshape(*a.shape[:-1], -1, 4)
  order = np.argsort(-g, axis=-1, kind="stable")  # descending, ties to the lower index
  keep = np.zeros_like(g, bool)
  np.put_along_axis(keep, order[..., :2], True, axis=-1)
  return np.moveaxis(keep.reshape(a.shape), -1, axis)


def _oracle(a, b, sparse_operand="a"):
  a32, b32 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if sparse_operand == "a":
    a32 = np.where(_mask_k(a, -1), a32, 0)
  else:
    b32 = np.where(_mask_k(b, 0), b32, 0)
  return a32 @ b32


def _check(out, expected, dtype):
  """Relative-error check on the output's scale: bf16/fp16 rounding of the result dominates."""
  out = np.asarray(out, np.float64)
  scale = np.abs(expected).max() + 1e-30
  tol = TOLERANCES[jnp.dtype(dtype)]
  np.testing.assert_allclose(out / scale, expected / scale, rtol=tol["rtol"], atol=tol["rtol"])


# ----------------------------------------------------------------------------------------------------------------------
# Forward numerics


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparse_operand", ["a", "b"])
def test_forward_matches_masked_dense(impl, dtype, sparse_operand):
  M, K, N = 128, 256, 192
  a = _x((M, K), dtype, 0, K ** -0.5)
  b = _x((K, N), dtype, 1)
  out = jax.jit(lambda a, b: jsparse.sparse_matmul(a, b, sparse_operand=sparse_operand, implementation=impl))(a, b)
  assert out.shape == (M, N) and out.dtype == dtype
  _check(out, _oracle(a, b, sparse_operand), dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_already_24_operand_is_exact_product(impl):
  # A 2:4 operand with few distinct values: the float32-accumulated product is exact, then rounded once.
  K = 128
  a = np.where(_mask_k(_x((64, K), seed=3), -1), np.round(np.asarray(_x((64, K), seed=4), np.float32) * 4) / 4, 0)
  a = jnp.asarray(a, jnp.bfloat16)
  b = jnp.asarray(np.round(np.asarray(_x((K, 64), seed=5), np.float32) * 4) / 4, jnp.bfloat16)
  out = jax.jit(lambda a, b: jsparse.sparse_matmul(a, b, implementation=impl))(a, b)
  expected = (np.asarray(a, np.float64) @ np.asarray(b, np.float64)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_batch_dims_are_rows(impl):
  a = _x((2, 64, 128), seed=6, scale=0.1)
  b = _x((128, 64), seed=7)
  f = jax.jit(lambda a, b: (jsparse.sparse_matmul(a, b, implementation=impl),
                            jsparse.sparse_matmul(a, b, sparse_operand="b", implementation=impl)))
  out, out_b = f(a, b[:, :64])
  assert out.shape == (2, 64, 64)
  _check(out.reshape(128, 64), _oracle(a.reshape(128, 128), b[:, :64]), jnp.bfloat16)
  _check(out_b.reshape(128, 64), _oracle(a.reshape(128, 128), b[:, :64], "b"), jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_compressed_operand_is_reusable(impl):
  a, b1, b2 = _x((128, 128), seed=8, scale=0.1), _x((128, 64), seed=9), _x((128, 128), seed=10)
  ca = jax.jit(lambda a: jsparse.compress_24(a, implementation=impl))(a)
  assert isinstance(ca, jsparse.Compressed24) and ca.on_device == (impl == "cusparselt")
  mm = jax.jit(lambda c, b: jsparse.sparse_matmul(c, b, implementation=impl))
  _check(mm(ca, b1), _oracle(a, b1), jnp.bfloat16)
  _check(mm(ca, b2), _oracle(a, b2), jnp.bfloat16)
  cw = jsparse.compress_24(b2, operand="b", implementation=impl)
  out = jax.jit(lambda a, c: jsparse.sparse_matmul(a, c, sparse_operand="b", implementation=impl))(a, cw)
  _check(out, _oracle(a, b2, "b"), jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_squared_relu_compress_agrees_with_squared_relu_nm(impl):
  y = _x((128, 256), seed=11)
  y = y.at[0, 1].set(jnp.nan).at[3, 4:8].set(0.0).at[5, 8:12].set(-1.0)  # NaN kept, all-zero and all-negative groups
  w = _x((256, 64), seed=12, scale=256 ** -0.5)
  out, expected = jax.jit(lambda y, w: (
      jsparse.sparse_matmul(jsparse.squared_relu_24_compress(y, implementation=impl), w, implementation=impl),
      jsparse.sparse_matmul(jsparse.squared_relu_nm(y, 2, 4), w, implementation="xla")))(y, w)
  assert np.isnan(np.asarray(out[0], np.float32)).all() and np.isnan(np.asarray(expected[0], np.float32)).all()
  _check(out[1:], np.asarray(expected[1:], np.float64), jnp.bfloat16)


# ----------------------------------------------------------------------------------------------------------------------
# Gradients


def _loss(fn, ct):
  return lambda *args: jnp.sum(fn(*args).astype(jnp.float32) * ct)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sparse_operand", ["a", "b"])
def test_gradients_match_reference(impl, sparse_operand):
  M, K, N = 128, 128, 128
  a, b = _x((M, K), seed=13, scale=0.3), _x((K, N), seed=14, scale=0.3)
  ct = _x((M, N), jnp.float32, seed=15)
  f = lambda a, b: jsparse.sparse_matmul(a, b, sparse_operand=sparse_operand, implementation=impl)
  da, db = jax.jit(jax.grad(_loss(f, ct), argnums=(0, 1)))(a, b)
  # The contract: straight-through pruning; the other operand sees the pruned one.
  g = np.asarray(ct.astype(jnp.bfloat16), np.float64)
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if sparse_operand == "a":
    da_ref, db_ref = g @ b64.T, np.where(_mask_k(a, -1), a64, 0).T @ g
  else:
    da_ref, db_ref = g @ np.where(_mask_k(b, 0), b64, 0).T, a64.T @ g
  _check(da, da_ref, jnp.bfloat16)
  _check(db, db_ref, jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_transposable_weight_gradients(impl):
  x = _x((128, 128), seed=16, scale=0.3)
  w0 = _x((128, 128), seed=17)
  w = jnp.where(jax.jit(nm_ref.transposable_24_mask)(w0), w0, 0)  # 2:4 along both axes
  ct = _x((128, 128), jnp.float32, seed=18)
  f = lambda x, w: jsparse.sparse_matmul(x, jsparse.compress_24(w, operand="b", transposable=True,
                                                                 implementation=impl),
                                         sparse_operand="b", implementation=impl)
  dx, dw = jax.jit(jax.grad(_loss(f, ct), argnums=(0, 1)))(x, w)
  g = np.asarray(ct.astype(jnp.bfloat16), np.float64)
  _check(dx, g @ np.asarray(w, np.float64).T, jnp.bfloat16)
  _check(dw, np.asarray(x, np.float64).T @ g, jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_squared_relu_path_gradients(impl):
  y, w = _x((128, 128), seed=19), _x((128, 64), seed=20, scale=0.1)
  ct = _x((128, 64), jnp.float32, seed=21)
  ours = lambda y, w: jsparse.sparse_matmul(jsparse.squared_relu_24_compress(y, implementation=impl), w,
                                            implementation=impl)
  ref = lambda y, w: jsparse.sparse_matmul(jsparse.squared_relu_nm(y), w, implementation="xla")
  dy, dw = jax.jit(jax.grad(_loss(ours, ct), argnums=(0, 1)))(y, w)
  dy_ref, dw_ref = jax.jit(jax.grad(_loss(ref, ct), argnums=(0, 1)))(y, w)
  _check(dy, np.asarray(dy_ref, np.float64), jnp.bfloat16)
  _check(dw, np.asarray(dw_ref, np.float64), jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_over_leading_batch(impl):
  a = _x((3, 64, 128), seed=22, scale=0.1)
  b = _x((128, 64), seed=23)
  out, out_b = jax.jit(jax.vmap(lambda a: (jsparse.sparse_matmul(a, b, implementation=impl),
                                            jsparse.sparse_matmul(a, b, sparse_operand="b", implementation=impl))))(a)
  for i in range(3):
    _check(out[i], _oracle(a[i], b), jnp.bfloat16)
  _check(out_b[1], _oracle(a[1], b, "b"), jnp.bfloat16)


# ----------------------------------------------------------------------------------------------------------------------
# Errors (trace time, one line, naming the op and argument)


@pytest.mark.parametrize("call,match", [
    (lambda: jsparse.sparse_matmul(_x((64, 128)), _x((64, 64))), "must match b's first axis"),
    (lambda: jsparse.sparse_matmul(_x((64, 128)), _x((128, 64), jnp.float16)), "same dtype"),
    (lambda: jsparse.sparse_matmul(jnp.ones((64, 128), jnp.int32), jnp.ones((128, 64), jnp.int32)), "floating"),
    (lambda: jsparse.sparse_matmul(_x((64, 126)), _x((126, 64))), "not a multiple of the 2:4 group size"),
    (lambda: jsparse.sparse_matmul(_x((64, 128)), _x((2, 128, 64))), "b must have rank 2"),
    (lambda: jsparse.sparse_matmul(_x((64, 128)), _x((128, 64)), sparse_operand="c"), "sparse_operand"),
    (lambda: jsparse.sparse_matmul(_x((64, 128)), _x((128, 64)), implementation="pallas"), "implementation"),
    (lambda: jsparse.sparse_matmul(_x((64, 128)), jsparse.compress_24(_x((128, 64)), operand="b",
                                                                      implementation="xla")),
     "b is a Compressed24 but sparse_operand='a'"),
    (lambda: jsparse.compress_24(_x((64, 128)), transposable=True), "transposable"),
    (lambda: jsparse.compress_24(_x((128, 64)), operand="c"), "operand must be"),
    (lambda: jsparse.squared_relu_24_compress(_x((64, 126))), "group size"),
])
def test_bad_inputs_raise_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("shape_a,shape_b,sparse_operand,match", [
    ((96, 128), (128, 64), "a", "rows has size 96, not a multiple of 64"),
    ((128, 96), (96, 64), "a", "K has size 96, not a multiple of 64"),
    ((128, 128), (128, 40), "a", "free dimension has size 40, not a multiple of 16"),
    ((40, 128), (128, 64), "b", "free dimension has size 40, not a multiple of 16"),
    ((64, 128), (128, 96), "b", "rows has size 96, not a multiple of 64"),
])
def test_cusparselt_alignment_errors(shape_a, shape_b, sparse_operand, match):
  with pytest.raises(ValueError, match=match):
    jsparse.sparse_matmul(_x(shape_a), _x(shape_b), sparse_operand=sparse_operand, implementation="cusparselt")


def test_cusparselt_rejects_float32_and_xla_compressed():
  with pytest.raises(ValueError, match="bfloat16 and float16, got float32"):
    jsparse.sparse_matmul(_x((64, 128), jnp.float32), _x((128, 64), jnp.float32), implementation="cusparselt")
  c = jsparse.compress_24(_x((64, 128)), implementation="xla")
  with pytest.raises(ValueError, match="compressed on the XLA path"):
    jsparse.sparse_matmul(c, _x((128, 64)), implementation="cusparselt")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the no-GPU error")
def test_cusparselt_without_gpu_says_what_is_missing():
  with pytest.raises(CuSparseLtUnavailableError, match="implementation='cusparselt' cannot run: needs a CUDA GPU"):
    jsparse.sparse_matmul(_x((64, 128)), _x((128, 64)), implementation="cusparselt")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU fallback")
def test_default_falls_back_with_one_warning(monkeypatch):
  monkeypatch.setattr(api, "_warned", set())
  a, b = _x((64, 128)), _x((128, 64))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    both = lambda a, b: (jsparse.sparse_matmul(a, b), jsparse.sparse_matmul(jsparse.compress_24(a), b))
    out1, out2 = jax.jit(both)(a, b)
  msgs = [str(w.message) for w in caught if "cuSPARSELt is not used" in str(w.message)]
  assert len(msgs) == 1, msgs
  assert "XLA masked-dense path" in msgs[0]
  np.testing.assert_array_equal(np.asarray(out1, np.float32), np.asarray(out2, np.float32))


def test_xla_path_f32_and_compressed_pytree():
  a, b = _x((8, 16), jnp.float32, seed=24), _x((16, 4), jnp.float32, seed=25)
  np.testing.assert_allclose(jax.jit(lambda a, b: jsparse.sparse_matmul(a, b, implementation="xla"))(a, b),
                             _oracle(a, b), rtol=1e-5, atol=1e-5)
  c = jsparse.compress_24(b, operand="b", implementation="xla")
  leaves, treedef = jax.tree.flatten(c)
  assert len(leaves) == 1  # only the source: no packed buffers on the XLA path
  c2 = jax.tree.unflatten(treedef, leaves)
  assert c2.operand == "b" and c2.shape == (16, 4)
  np.testing.assert_allclose(jax.jit(lambda c: jsparse.sparse_matmul(a, c, sparse_operand="b",
                                                                       implementation="xla"))(c2),
                             _oracle(a, b, "b"), rtol=1e-5, atol=1e-5)


def test_search_mode_from_the_environment(monkeypatch):
  for value, mode in (("", 0), ("0", 0), ("1", 1)):
    monkeypatch.setenv("JSPARSE_CUSPARSELT_SEARCH", value)
    assert api.search_mode() == mode
  monkeypatch.delenv("JSPARSE_CUSPARSELT_SEARCH")
  assert api.search_mode() == 0
  monkeypatch.setenv("JSPARSE_CUSPARSELT_SEARCH", "yes")
  with pytest.raises(ValueError, match="JSPARSE_CUSPARSELT_SEARCH must be 0 or 1"):
    api.search_mode()
