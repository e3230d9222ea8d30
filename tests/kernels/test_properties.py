"""Hypothesis property tests of the sparsify ops, for the reference and the kernels (interpret mode / GPU).

Values are drawn from a small integer grid so that ties (and zeros) are common; shapes are fixed per test so a
kernel compiles once per case. NaN/inf and error cases are covered by the per-op test files.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jsparse
from jsparse.kernels.nm import reference as ref
from tests.helpers import IMPLEMENTATIONS, assert_bitwise_equal, implementation

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


_OPS = {
    "nm_mask": lambda im, n, m: lambda x: jsparse.nm_mask(x, n, m, implementation=im),
    "transposable_24_mask": lambda im: lambda x: jsparse.transposable_24_mask(x, implementation=im),
    "pack_24": lambda im: lambda x: jsparse.pack_24(x, implementation=im),
    "pack_24_mask": lambda im: lambda x, mask: jsparse.pack_24(x, mask, implementation=im),
    "vnm_mask": lambda im, v, n, m: lambda x: jsparse.vnm_mask(x, v, n, m, implementation=im),
}


@functools.cache
def _compiled(impl, op, args, *avals):
  """The op compiled once per implementation and shapes (traced in its interpret context); examples only run it."""
  with implementation(impl) as im:
    return jax.jit(_OPS[op](im, *args)).lower(*avals).compile()


def _run(impl, op, *xs, args=()):
  avals = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs)
  return _compiled(impl, op, args, *avals)(*xs)


def _grid(shape):
  """float32 arrays with values k/2 for small integers k: many exact ties, both signs, zeros."""
  return hnp.arrays(np.float32, shape, elements=st.integers(-6, 6).map(lambda k: np.float32(k / 2)))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (2, 8), (5, 8)])
@SETTINGS
@given(data=st.data())
def test_nm_keeps_exactly_n_largest_with_ties_to_the_lower_index(impl, n, m, data):
  x = data.draw(_grid((4, 32)))
  mask = np.asarray(_run(impl, "nm_mask", jnp.asarray(x), args=(n, m)))
  g, a = mask.reshape(4, -1, m), np.abs(x).reshape(4, -1, m)
  assert (g.sum(-1) == n).all()
  assert (np.where(g, a, np.inf).min(-1) >= np.where(g, -np.inf, a).max(-1)).all()
  # Ties: a dropped element never precedes a kept one of equal magnitude.
  idx = np.arange(m)
  for gi, ai in zip(g.reshape(-1, m), a.reshape(-1, m)):
    for i in idx[~gi]:
      assert not ((ai == ai[i]) & gi & (idx > i)).any()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@SETTINGS
@given(data=st.data())
def test_transposable_is_24_both_ways_optimal_and_beats_full_greedy(impl, data):
  x = data.draw(_grid((8, 16)))
  mask = np.asarray(_run(impl, "transposable_24_mask", jnp.asarray(x)))
  assert (mask.reshape(8, 4, 4).sum(-1) == 2).all() and (mask.T.reshape(16, 2, 4).sum(-1) == 2).all()
  a = np.abs(x).astype(np.float64)
  greedy = np.asarray(_greedy(jnp.asarray(x)))
  patterns = []
  for choice in ref.transposable_patterns():
    p = np.zeros((4, 4))
    for r, t in enumerate(choice):
      p[r, list(ref.ROW_PAIRS[t])] = 1
    patterns.append(p)
  patterns = np.asarray(patterns)
  for i in range(0, 8, 4):
    for j in range(0, 16, 4):
      tile, kept = a[i:i + 4, j:j + 4], (a * mask)[i:i + 4, j:j + 4].sum()
      assert kept == np.max((patterns * tile).sum((-1, -2)))  # half-integers: the sums are exact
      if greedy[i:i + 4, j:j + 4].sum() == 8:  # greedy found a full pattern: it is one of the 90, never better
        assert kept >= (a * greedy)[i:i + 4, j:j + 4].sum()
      # (Greedy can get stuck with 6-7 kept -- a row whose large entries sit in full columns -- and then may hold
      # more mass than any exactly-2:4 pattern; it is then no longer 2:4 in every row and column.)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@SETTINGS
@given(data=st.data())
def test_pack_24_round_trip(impl, data):
  x = jnp.asarray(data.draw(_grid((4, 32))), jnp.bfloat16)
  given_mask = data.draw(st.booleans())
  mask = jsparse.nm_mask(x[:, ::-1])[:, ::-1] if given_mask else None  # some other valid 2:4 pattern
  packed = _run(impl, "pack_24_mask", x, mask) if given_mask else _run(impl, "pack_24", x)
  expected_mask = mask if given_mask else ref.nm_mask(x, 2, 4)
  assert_bitwise_equal(jsparse.unpack_24(packed), jnp.where(expected_mask, x, jnp.zeros((), x.dtype)))


@SETTINGS
@given(data=st.data())
def test_pack_vnm_round_trip(data):
  x = jnp.asarray(data.draw(_grid((16, 32))))
  packed, dense = _pack_vnm_round_trip(x)
  assert_bitwise_equal(dense, jsparse.vnm_prune(x, 8, 2, 8))
  assert packed.values.shape == (16, 8)


@jax.jit
def _pack_vnm_round_trip(x):
  packed = jsparse.pack_vnm(x, 8, 2, 8)
  return packed, jsparse.unpack_vnm(packed)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@SETTINGS
@given(data=st.data())
def test_vnm_density_and_column_rule(impl, data):
  x = data.draw(_grid((16, 32)))
  v, n, m = 8, 2, 8
  mask = np.asarray(_run(impl, "vnm_mask", jnp.asarray(x), args=(v, n, m)))
  blocks = mask.reshape(16 // v, v, 32 // m, m)
  assert (blocks.sum(-1) == n).all()  # density n/m, n per row and group
  used = blocks.any(1)
  assert (used.sum(-1) <= 4).all()  # at most the 4 selected columns carry values
  score = np.abs(x).reshape(16 // v, v, 32 // m, m).sum(1)  # exact: half-integers
  expected = ref.rank_in_groups(jnp.asarray(score)) < 4
  a = np.abs(x).reshape(16 // v, v, 32 // m, m)
  for b in range(16 // v):
    for g in range(32 // m):
      sel = np.asarray(expected[b, g])
      assert not (used[b, g] & ~sel).any()  # kept columns are among the 4 largest sums (ties: lower column)
      kept_min = np.where(blocks[b, :, g], a[b, :, g], np.inf).min(-1)
      other_max = np.where(~blocks[b, :, g] & sel, a[b, :, g], -np.inf).max(-1)
      assert (kept_min >= other_max).all()  # per row: the n largest of the selected columns


_greedy = jax.jit(ref.greedy_transposable_24_mask)
