"""Fused squared-ReLU + N:M: forward, mask, both gradient modes, NaN/inf and bad input, for the XLA reference and the
Pallas kernel (interpret mode on CPU, and the GPU)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.kernels.activation import pallas as act_pallas
from jsparse.kernels.activation import reference as ref
from jsparse.kernels.nm import pallas_common as pc
from tests.helpers import FLOAT_DTYPES, IMPLEMENTATIONS, assert_close, implementation

KERNELS = IMPLEMENTATIONS[1:]


def _x(shape, dtype=jnp.float32, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _shape(impl):
  return (64, 2048) if impl == "gpu" else (8, 64)


def _expected(x, n, m):
  """numpy: relu(x)^2 keeping the n largest pre-activations of each group of m (stable: ties to the lower index)."""
  a = np.asarray(x, np.float32)
  g = a.reshape(a.shape[0], -1, m)
  order = np.argsort(-np.where(np.isnan(g), np.inf, np.maximum(g, 0)), axis=-1, kind="stable")
  keep = np.zeros(g.shape, bool)
  np.put_along_axis(keep, order[..., :n], True, axis=-1)
  h = np.where(keep, np.maximum(g, 0) ** 2, 0)
  return h.reshape(a.shape), keep.reshape(a.shape)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_forward_and_mask(impl, dtype, n, m):
  x = _x(_shape(impl), dtype)
  with implementation(impl) as im:
    h, mask = jsparse.squared_relu_nm(x, n, m, return_mask=True, implementation=im)
    h_only = jsparse.squared_relu_nm(x, n, m, implementation=im)
  h_np, keep = _expected(x, n, m)
  np.testing.assert_array_equal(mask, keep)
  assert (np.asarray(mask).reshape(x.shape[0], -1, m).sum(-1) == n).all()
  assert_close(h, h_np, dtype)
  np.testing.assert_array_equal(np.asarray(h_only, np.float32), np.asarray(h, np.float32))
  assert h.dtype == dtype and mask.dtype == jnp.bool_


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gradient_modes(impl, dtype):
  x, g = _x(_shape(impl), dtype), _x(_shape(impl), dtype, seed=1)
  _, keep = _expected(x, 2, 4)
  dense = 2.0 * np.maximum(np.asarray(x, np.float32), 0) * np.asarray(g, np.float32)
  for gradient, expected in [("masked", np.where(keep, dense, 0)), ("ste", dense)]:
    with implementation(impl) as im:
      _, vjp = jax.vjp(lambda x: jsparse.squared_relu_nm(x, gradient=gradient, implementation=im), x)
      (dx,) = vjp(g)
      # With return_mask the mask output carries no gradient and h's cotangent flows the same way.
      _, vjp2 = jax.vjp(lambda x: jsparse.squared_relu_nm(x, gradient=gradient, return_mask=True,
                                                          implementation=im)[0], x)
      (dx2,) = vjp2(g)
    assert_close(dx, expected, dtype)
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx2, np.float32))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nan_inf_and_ties(impl):
  x = jnp.array([[jnp.nan, -1.0, 2.0, 0.5, -jnp.inf, -1.0, -2.0, -3.0],
                 [jnp.inf, 1.0, jnp.nan, 3.0, 0.0, -0.0, 0.0, 1.0]])
  with implementation(impl) as im:
    h, mask = jsparse.squared_relu_nm(x, return_mask=True, implementation=im)
  # NaN ranks first and stays visible; negatives tie at relu = 0 and go to the lower index; -inf is just negative.
  np.testing.assert_array_equal(mask, [[1, 0, 1, 0, 1, 1, 0, 0], [1, 0, 1, 0, 1, 0, 0, 1]])
  np.testing.assert_array_equal(np.isnan(h), [[1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]])
  assert h[0, 2] == 4.0 and h[1, 0] == jnp.inf and h[1, 7] == 1.0 and h[0, 4] == 0.0


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_tiles_the_grid(impl):
  x = _x((8, 64), jnp.bfloat16, seed=3)
  h, mask, bits = act_pallas.squared_relu_nm(x, 2, 4, outputs=("h", "mask", "bits"), interpret=impl == "interpret",
                                             config=pc.BlockConfig(2, 16, 4))
  h_ref, mask_ref = ref.squared_relu_nm(x, 2, 4)
  np.testing.assert_array_equal(mask, mask_ref)
  np.testing.assert_array_equal(pc.expand_bits(bits, 4), mask_ref)
  assert_close(h, h_ref, jnp.bfloat16)


_BAD = [
    (dict(x=jnp.ones((4, 6))), "squared_relu_nm: axis -1 has size 6, not a multiple of m=4"),
    (dict(x=jnp.ones((4, 8), jnp.int32)), "squared_relu_nm: x must have a floating dtype"),
    (dict(x=jnp.ones((4, 8), jnp.complex64)), "squared_relu_nm: x must have a floating dtype"),
    (dict(x=jnp.ones(())), "squared_relu_nm: x must have rank at least 1"),
    (dict(x=jnp.ones((4, 8)), n=4, m=4), "squared_relu_nm: n must be smaller than m"),
    (dict(x=jnp.ones((4, 8)), gradient="scaled_ste"), "squared_relu_nm: gradient must be one of"),
    (dict(x=jnp.ones((4, 8)), implementation="triton"), "squared_relu_nm: implementation must be one of"),
]


@pytest.mark.parametrize("args,match", _BAD)
def test_bad_input(args, match):
  args = dict(args)
  x = args.pop("x")
  with pytest.raises(ValueError, match=re.escape(match)) as info:
    jsparse.squared_relu_nm(x, **args)
  assert "\n" not in str(info.value)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU behaviour")
def test_explicit_pallas_unsupported_raises():
  with jsparse.pallas_interpret():
    with pytest.raises(ValueError, match="squared_relu_nm: implementation='pallas' does not support this input"):
      jsparse.squared_relu_nm(jnp.ones((4, 12)), 2, 6, implementation="pallas")
