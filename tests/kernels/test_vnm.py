"""V:N:M (Venom) selection: the XLA reference and the Pallas kernel (interpret mode on CPU, and the GPU)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.kernels.nm import pallas_common as pc
from jsparse.kernels.vnm import pallas as vnm_pallas
from jsparse.kernels.vnm import reference as ref
from tests.helpers import FLOAT_DTYPES, IMPLEMENTATIONS, assert_bitwise_equal, assert_close, implementation

KERNELS = IMPLEMENTATIONS[1:]


def _x(shape, dtype=jnp.float32, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _case(impl):
  """(shape, v): the Venom default 64:2:8 on the GPU; a smaller v in interpret mode (compile time on a CPU)."""
  return ((256, 1024), 64) if impl == "gpu" else ((32, 64), 16)


def check_vnm_structure(x, mask, v, n, m):
  """Independent of the implementation: density, the 4-column rule and the column choice by summed |x|."""
  R, C = x.shape
  blocks = np.asarray(mask).reshape(R // v, v, C // m, m)
  assert (blocks.sum(-1) == n).all()  # every row keeps n per group of m: density n/m
  used = blocks.any(1)  # (R/v, C/m, m): columns holding a kept element
  assert (used.sum(-1) <= ref.SELECTED_COLUMNS).all()
  a = np.abs(np.asarray(x, np.float64)).reshape(R // v, v, C // m, m)
  a = np.where(np.isnan(a), np.inf, a)
  score = a.sum(1)
  for kept_cols, s in zip(used.reshape(-1, m), score.reshape(-1, m)):
    if kept_cols.sum() == ref.SELECTED_COLUMNS and (~kept_cols).any():  # kept columns: the 4 largest sums
      assert s[kept_cols].min() >= s[~kept_cols].max() * (1 - 1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_vnm_mask_and_prune(impl, dtype):
  shape, v = _case(impl)
  x = _x(shape, dtype)
  with implementation(impl) as im:
    mask = jsparse.vnm_mask(x, v, 2, 8, implementation=im)
    y = jsparse.vnm_prune(x, v, 2, 8, implementation=im)
  check_vnm_structure(x, mask, v, 2, 8)
  np.testing.assert_array_equal(mask, ref.vnm_mask(x, v, 2, 8))
  assert_bitwise_equal(y, jnp.where(mask, x, jnp.zeros((), dtype)))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("v,n,m", [(8, 1, 4), (4, 3, 8)])
def test_vnm_other_shapes(impl, v, n, m):
  x = _x((32, 64), jnp.bfloat16, seed=1)
  with implementation(impl) as im:
    mask = jsparse.vnm_mask(x, v, n, m, implementation=im)
  check_vnm_structure(x, mask, v, n, m)
  np.testing.assert_array_equal(mask, ref.vnm_mask(x, v, n, m))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_vnm_gradient_modes(impl, dtype):
  shape, v = _case(impl)
  x, ct = _x(shape, dtype), _x(shape, dtype, seed=1)
  mask = ref.vnm_mask(x, v, 2, 8)
  cases = [(dict(gradient="masked"), jnp.where(mask, ct, 0)), (dict(gradient="ste"), ct),
           (dict(gradient="scaled_ste", kept_scale=2.0, pruned_scale=0.5),
            jnp.where(mask, (ct * 2.0).astype(dtype), (ct * 0.5).astype(dtype)))]
  for kwargs, expected in cases:
    with implementation(impl) as im:
      _, vjp = jax.vjp(lambda x: jsparse.vnm_prune(x, v, 2, 8, implementation=im, **kwargs), x)
      (dx,) = vjp(ct)
    assert_close(dx, expected.astype(dtype), dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vnm_nan_inf(impl):
  x = _x((32, 64), seed=2).at[3, 5].set(jnp.nan).at[20, 9].set(-jnp.inf)
  with implementation(impl) as im:
    mask = jsparse.vnm_mask(x, 16, 2, 8, implementation=im)
    y = jsparse.vnm_prune(x, 16, 2, 8, implementation=im)
  # A NaN makes its column's sum +inf (selected) and ranks first in its row; -inf is a large magnitude.
  assert mask[3, 5] and mask[20, 9]
  assert np.isnan(y[3, 5]) and y[20, 9] == -jnp.inf and int(np.isnan(y).sum()) == 1
  np.testing.assert_array_equal(mask, ref.vnm_mask(x, 16, 2, 8))


def test_column_sums_use_the_fixed_halving_order():
  a = jnp.asarray(np.random.default_rng(0).random((6, 3)), jnp.float32)
  # 6 rows: [0+3, 1+4, 2+5] -> [(0+3) + (1+4), 2+5] -> ((0+3) + (1+4)) + (2+5)
  np.testing.assert_array_equal(ref.halving_sum(a, 0), ((a[0] + a[3]) + (a[1] + a[4])) + (a[2] + a[5]))
  # 5 rows: [0+2, 1+3, 4] -> [(0+2) + (1+3), 4] -> ((0+2) + (1+3)) + 4
  np.testing.assert_array_equal(ref.halving_sum(a[:5], 0), ((a[0] + a[2]) + (a[1] + a[3])) + a[4])


def test_non_power_of_two_v_uses_the_reference():
  x = _x((24, 16))
  mask = jsparse.vnm_mask(x, 12, 2, 8)
  check_vnm_structure(x, mask, 12, 2, 8)
  with jsparse.pallas_interpret():
    with pytest.raises(ValueError, match="vnm_mask: implementation='pallas' does not support this input: v=12"):
      jsparse.vnm_mask(x, 12, 2, 8, implementation="pallas")


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_tiles_the_grid(impl):
  x = _x((32, 64), jnp.bfloat16, seed=3)
  y, mask, bits = vnm_pallas.vnm_select(x, 8, 2, 8, outputs=("y", "mask", "bits"), interpret=impl == "interpret",
                                        config=pc.BlockConfig(8, 16, 4))
  expected = ref.vnm_mask(x, 8, 2, 8)
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(pc.expand_bits(bits, 8), expected)
  assert_bitwise_equal(y, jnp.where(expected, x, jnp.zeros((), jnp.bfloat16)))


_BAD = [
    ("vnm_mask", dict(x=jnp.ones((8,))), "vnm_mask: x must have rank 2"),
    ("vnm_mask", dict(x=jnp.ones((2, 8, 8))), "vnm_mask: x must have rank 2"),
    ("vnm_mask", dict(x=jnp.ones((48, 8)), v=32), "vnm_mask: axis 0 (rows) has size 48, not a multiple of v=32"),
    ("vnm_mask", dict(x=jnp.ones((64, 12))), "vnm_mask: axis 1 (columns) has size 12, not a multiple of m=8"),
    ("vnm_mask", dict(x=jnp.ones((64, 8), jnp.int32)), "vnm_mask: x must have a floating dtype"),
    ("vnm_mask", dict(x=jnp.ones((64, 8), jnp.complex64)), "vnm_mask: x must have a floating dtype"),
    ("vnm_mask", dict(x=jnp.ones((64, 8)), n=4), "vnm_mask: n must be 1..3"),
    ("vnm_mask", dict(x=jnp.ones((64, 8)), n=8), "vnm_mask: n must be 1..3"),
    ("vnm_mask", dict(x=jnp.ones((64, 8)), m=2), "vnm_mask: m must be at least 4"),
    ("vnm_mask", dict(x=jnp.ones((64, 8)), v=0), "vnm_mask: v must be positive"),
    ("vnm_prune", dict(x=jnp.ones((8,))), "vnm_prune: x must have rank 2"),
    ("vnm_prune", dict(x=jnp.ones((48, 8)), v=32), "vnm_prune: axis 0 (rows) has size 48, not a multiple of v=32"),
    ("vnm_prune", dict(x=jnp.ones((64, 12))), "vnm_prune: axis 1 (columns) has size 12, not a multiple of m=8"),
    ("vnm_prune", dict(x=jnp.ones((64, 8), jnp.int8)), "vnm_prune: x must have a floating dtype"),
    ("vnm_prune", dict(x=jnp.ones((64, 8), jnp.complex64)), "vnm_prune: x must have a floating dtype"),
    ("vnm_prune", dict(x=jnp.ones((64, 8)), n=4), "vnm_prune: n must be 1..3"),
    ("vnm_prune", dict(x=jnp.ones((64, 8)), gradient="none"), "vnm_prune: gradient must be one of"),
]


@pytest.mark.parametrize("op,args,match", _BAD, ids=[f"{o}-{i}" for i, (o, _, _) in enumerate(_BAD)])
def test_bad_input(op, args, match):
  args = dict(args)
  x = args.pop("x")
  fn = jsparse.vnm_mask if op == "vnm_mask" else jsparse.vnm_prune
  with pytest.raises(ValueError, match=re.escape(match)) as info:
    fn(x, **args)
  assert "\n" not in str(info.value)
