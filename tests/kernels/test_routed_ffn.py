"""Routed FFN: every implementation equals the masked-dense reference (same routing), forward and grads.

CPU: the einsum and ragged_dot paths and the grouped-GEMM path with the reference GEMMs (the same layout, custom VJP
and fused-epilogue algebra the kernels run), E in {1, 2, 4, 8, 16}, unequal and empty groups, V:N:M; plus an
interpret twin of the kernel path (forward kernels in Pallas' Mosaic GPU interpreter; its four transposed backward
GEMMs use the reference there, see test_grouped_matmul.py). GPU (class ``gpu``): the kernels, fwd and grads.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse import router as rt
from jsparse.kernels.routed_ffn import api
from jsparse.kernels.routed_ffn import layout as lay
from tests.helpers import TOLERANCES, assert_bitwise_equal, implementation


def assert_close(actual, expected, dtype):
  """The dtype's table, with atol taken relative to the tensor's largest magnitude.

  The gradients are sums over tokens: their rounding error scales with the summed terms, not with an element that
  happens to cancel to a small value, so an absolute atol only means something on a tensor scaled to O(1).
  """
  a, e = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  scale = max(float(np.abs(e).max()), 1e-30)
  tol = TOLERANCES[jnp.dtype(dtype)]
  np.testing.assert_allclose(a / scale, e / scale, rtol=tol["rtol"], atol=tol["atol"])


def _setup(T, D, E, group_size, dtype=jnp.float32, seed=0, empty=True, block=None):
  """Tokens, weights, a router state with a random neuron permutation, skewed groups (numpy RNG: no compiles)."""
  rng = np.random.default_rng(seed)
  F = E * group_size
  x = jnp.asarray(rng.standard_normal((T, D)), dtype)
  w1 = jnp.asarray(rng.standard_normal((D, F)) / np.sqrt(D), dtype)
  w2 = jnp.asarray(rng.standard_normal((F, D)) / np.sqrt(group_size), dtype)
  cfg = rt.RouterConfig(num_groups=E, block=block or group_size, kmeans_iters=2)
  # Routing quality does not matter here (test_router.py covers the clustering).
  perm = rng.permutation(F)
  cents = np.asarray(w1, np.float32)[:, perm].reshape(D, E, group_size).mean(axis=2).T
  state = rt.RouterState(jnp.asarray(cents), jnp.asarray(perm, jnp.int32), jnp.full((E,), group_size, jnp.int32),
                         jnp.zeros((), jnp.int32))
  # Unequal groups: a skewed draw; group E-1 left empty when E > 2.
  p = np.arange(1, E + 1, dtype=np.float64) ** 2
  if empty and E > 2:
    p[-1] = 0
  groups = jnp.asarray(rng.choice(E, size=T, p=p / p.sum()), jnp.int32)
  ct = jnp.asarray(rng.standard_normal((T, D)), dtype)
  return x, w1, w2, state, cfg, groups, ct


def _fwd_and_grads(f, x, w1, w2, ct, jit=True):
  def run(x, w1, w2, ct):
    out, vjp = jax.vjp(f, x, w1, w2)
    return (out, *vjp(ct))
  return (jax.jit(run) if jit else run)(x, w1, w2, ct)


def _grouped(state, groups, E, row_tile, vnm=None, gemm="xla"):
  def f(x, w1, w2):
    w1g, w2g = api.group_weights(w1, w2, state.perm_F)
    return api._grouped_path(x, w1g, w2g, groups, E, row_tile, vnm, gemm)
  return f


def _routed(state, cfg, groups, **kw):
  return lambda x, w1, w2: jsparse.routed_ffn(x, w1, w2, state, cfg, groups=groups, **kw)


@pytest.mark.parametrize("E", [1, 2, 4, 8, 16])
def test_paths_equal_reference(E):
  x, w1, w2, state, cfg, groups, ct = _setup(T=72, D=16, E=E, group_size=8, dtype=jnp.bfloat16)
  counts = np.bincount(np.asarray(groups), minlength=E)
  assert E <= 2 or counts[-1] == 0  # an empty group is exercised
  paths = [_routed(state, cfg, groups, row_tile=8, implementation=impl) for impl in ("xla", "einsum", "ragged_dot")]
  paths.append(_grouped(state, groups, E, row_tile=8))
  # One compiled program for all four paths (the suite's CPU time is mostly compilation).
  want, *gots = jax.jit(lambda *a: [_fwd_and_grads(f, *a, jit=False) for f in paths])(x, w1, w2, ct)
  for got in gots:
    for a, b in zip(got, want):
      assert_close(a, b, jnp.bfloat16)


def test_reference_is_the_group_masked_dense_ffn():
  x, w1, w2, state, cfg, groups, _ = _setup(T=40, D=16, E=4, group_size=8)
  out = jsparse.routed_ffn(x, w1, w2, state, cfg, groups=groups, implementation="xla")
  ng = np.asarray(jsparse.neuron_groups(state))
  x64, w164, w264 = (np.asarray(a, np.float64) for a in (x, w1, w2))
  for t in range(40):
    h = np.maximum(x64[t] @ w164, 0) ** 2 * (ng == int(groups[t]))
    np.testing.assert_allclose(np.asarray(out[t]), h @ w264, rtol=1e-4, atol=1e-5)


def test_vnm_option():
  x, w1, w2, state, cfg, groups, ct = _setup(T=64, D=16, E=2, group_size=16, dtype=jnp.bfloat16, empty=False)
  vnm = (4, 2, 8)
  paths = [_routed(state, cfg, groups, row_tile=8, vnm=vnm, implementation="xla"),
           _routed(state, cfg, groups, row_tile=8, vnm=vnm, implementation="einsum"),
           _grouped(state, groups, 2, row_tile=8, vnm=vnm)]
  dense_f = _routed(state, cfg, groups, row_tile=8, implementation="xla")
  (want, *gots), dense = jax.jit(lambda *a: ([_fwd_and_grads(f, *a, jit=False) for f in paths], dense_f(*a[:3])))(
      x, w1, w2, ct)
  assert float(jnp.abs(want[0] - dense).max()) > 1e-3  # the pattern prunes something
  for got in gots:
    for a, b in zip(got, want):
      assert_close(a, b, jnp.bfloat16)


LAYOUT_FIELDS = ("pos_T", "row_token_P", "tile_group_R", "tile_start_E", "tiles_E", "counts_E")


@pytest.mark.parametrize("impl", ["interpret", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("T,E,row_tile", [(9, 4, 4), (72, 8, 8), (1000, 16, 128), (4096, 8, 128), (40, 1, 64),
                                          (333, 2, 64), (16384, 8, 128), (16383, 8, 128)])
def test_layout_kernel_equals_make_layout(impl, T, E, row_tile):
  # Skewed groups with the last one empty (E > 2); T, P and P/row_tile that are not powers of two leave the last
  # chunk of every sweep partly masked.
  rng = np.random.default_rng(T)
  p = np.arange(1, E + 1, dtype=np.float64) ** 2
  if E > 2:
    p[-1] = 0
  groups = jnp.asarray(rng.choice(E, size=T, p=p / p.sum()), jnp.int32)
  want = lay.make_layout(groups, E, row_tile)
  with implementation(impl):
    got = jax.jit(lambda g: lay.make_layout(g, E, row_tile, "pallas"))(groups)
  assert (got.row_tile, got.num_groups, got.num_rows) == (want.row_tile, want.num_groups, want.num_rows)
  for name in LAYOUT_FIELDS:
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def test_make_layout_rejects_unknown_implementations():
  # (The kernel's GPU lowering is checked with all the others in tests/test_gpu_lowering.py.)
  with pytest.raises(ValueError, match="make_layout: implementation must be one of"):
    lay.make_layout(jnp.zeros((8,), jnp.int32), 2, 4, "triton")


def test_layout_and_permutation_inverses():
  groups = jnp.array([2, 0, 2, 2, 3, 0, 2, 2, 2], jnp.int32)  # group 1 empty, group 2 spans two tiles
  T, P = 9, lay.padded_rows(9, 4, 4)
  rng = np.random.default_rng(0)
  x, ct = jnp.asarray(rng.standard_normal((T, 3)), jnp.float32), jnp.asarray(rng.standard_normal((P, 3)), jnp.float32)
  w1, w2 = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32), jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
  perm = jnp.asarray(rng.permutation(8), jnp.int32)

  @jax.jit
  def run(groups, x, ct, w1, w2):
    layout = lay.make_layout(groups, 4, 4)
    xp, vjp = jax.vjp(lambda x: lay.to_padded(x, layout), x)
    back = lay.from_padded(xp, layout)
    w1g, w2g = api.group_weights(w1, w2, perm)
    # The gradient of the weight permutation is the inverse permutation of the cotangent.
    g1, g2 = jax.vjp(lambda a, b: api.group_weights(a, b, perm), w1, w2)[1]((w1g, w2g))
    return layout, xp, back, vjp(ct)[0], lay.contiguous_order(groups, 4), w1g, w2g, g1, g2

  layout, xp, back, dx, (pos, order, counts), w1g, w2g, g1, g2 = run(groups, x, ct, w1, w2)
  assert layout.num_rows == P and P % 4 == 0
  np.testing.assert_array_equal(np.asarray(layout.row_token_P)[np.asarray(layout.pos_T)], np.arange(T))
  np.testing.assert_array_equal(layout.counts_E, [2, 0, 6, 1])
  np.testing.assert_array_equal(layout.tiles_E, [1, 0, 2, 1])
  np.testing.assert_array_equal(layout.tile_start_E, [0, 1, 1, 3])
  np.testing.assert_array_equal(layout.tile_group_R[:4], [0, 2, 2, 3])
  assert (np.asarray(layout.tile_group_R[4:]) == 4).all()
  np.testing.assert_array_equal(np.asarray(layout.tile_group_R)[np.asarray(layout.pos_T) // 4], groups)
  np.testing.assert_array_equal(back, x)
  pad = np.ones(P, bool)
  pad[np.asarray(layout.pos_T)] = False
  assert (np.asarray(xp)[pad] == 0).all()  # padding rows are zero
  np.testing.assert_array_equal(dx, np.asarray(ct)[np.asarray(layout.pos_T)])  # the gradient is the inverse gather
  np.testing.assert_array_equal(np.asarray(order)[np.asarray(pos)], np.arange(T))
  assert (np.diff(np.asarray(groups)[np.asarray(order)]) >= 0).all()
  np.testing.assert_array_equal(w1g, np.asarray(w1)[:, np.asarray(perm)])
  np.testing.assert_array_equal(w2g, np.asarray(w2)[np.asarray(perm)])
  np.testing.assert_array_equal(g1, w1)
  np.testing.assert_array_equal(g2, w2)


def test_defaults_batch_dims_and_grouped_weights():
  x, w1, w2, state, cfg, _, _ = _setup(T=48, D=16, E=2, group_size=8)
  xb = x.reshape(4, 12, 16)
  out = jsparse.routed_ffn(xb, w1, w2, state, cfg, row_tile=8)  # CPU default: einsum, routed by the state
  groups = jsparse.route_tokens(x, state, cfg)
  want = jsparse.routed_ffn(x, w1, w2, state, cfg, groups=groups, row_tile=8, implementation="xla")
  assert out.shape == xb.shape
  assert_close(out.reshape(48, 16), want, jnp.float32)
  # A model keeping its weights in router order: settle the permutation into the weights once.
  settled, perm = jsparse.settle_permutation(state)
  w1g, w2g = jsparse.take_neurons(w1, perm, 1), jsparse.take_neurons(w2, perm, 0)
  for impl in ("einsum", "xla"):
    got = jsparse.routed_ffn(x, w1g, w2g, settled, cfg, row_tile=8, weights_grouped=True, implementation=impl)
    assert_close(got, want, jnp.float32)


def test_einsum_capacity_drops_overflow():
  x, w1, w2, state, cfg, _, _ = _setup(T=24, D=16, E=2, group_size=8)
  groups = jnp.array([0] * 20 + [1] * 4, jnp.int32)
  want = jsparse.routed_ffn(x, w1, w2, state, cfg, groups=groups, row_tile=8, implementation="xla")
  got = jsparse.routed_ffn(x, w1, w2, state, cfg, groups=groups, row_tile=8, capacity=16, implementation="einsum")
  assert_close(got[:16], want[:16], jnp.float32)
  assert_close(got[20:], want[20:], jnp.float32)
  np.testing.assert_array_equal(got[16:20], 0)  # ranks 16..19 of group 0 are past the capacity


def test_bad_configs():
  x, w1, w2, state, cfg, groups, _ = _setup(T=16, D=16, E=2, group_size=8)
  call = lambda **kw: jsparse.routed_ffn(x, w1, w2, state, cfg, groups=groups, row_tile=8, **kw)
  with pytest.raises(ValueError, match="do not split"):
    jsparse.routed_ffn(x, w1[:, :15], w2[:15], state, rt.RouterConfig(num_groups=2, block=1))
  with pytest.raises(ValueError, match="not a multiple of block=128"):
    jsparse.routed_ffn(x, w1, w2, state, rt.RouterConfig(num_groups=2))
  with pytest.raises(ValueError, match="need x"):
    jsparse.routed_ffn(x[:, :8], w1, w2, state, cfg)
  with pytest.raises(ValueError, match="router state"):
    jsparse.routed_ffn(x, w1, w2, state, rt.RouterConfig(num_groups=4, block=4))
  with pytest.raises(ValueError, match="must divide row_tile"):
    call(vnm=(3, 2, 8))
  with pytest.raises(ValueError, match="must divide the group size"):
    call(vnm=(4, 2, 16))
  with pytest.raises(ValueError, match="tile-aligned"):
    call(vnm=(4, 2, 8), implementation="ragged_dot")
  with pytest.raises(ValueError, match="capacity only applies"):
    call(capacity=16, implementation="xla")
  with pytest.raises(ValueError, match="multiple of row_tile"):
    call(capacity=12, implementation="einsum")
  with pytest.raises(ValueError, match="implementation must be one of"):
    call(implementation="cutlass")
  with pytest.raises(ValueError, match="groups must be an int array"):
    jsparse.routed_ffn(x, w1, w2, state, cfg, groups=groups[:8])
  with pytest.raises(ValueError, match="gather must be one of"):
    call(gather="cuda")
  with pytest.raises(ValueError, match="grouped-GEMM path only"):
    call(gather="pallas", implementation="einsum")
  with pytest.raises(ValueError, match="layout must be one of"):
    call(layout="cuda")
  with pytest.raises(ValueError, match="grouped-GEMM path only"):
    call(layout="pallas", implementation="xla")
  with jsparse.pallas_interpret():
    with pytest.raises(ValueError, match="bfloat16/float16"):
      call(implementation="pallas")  # float32 activations
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
      call(implementation="pallas")


def test_interpret_twin():
  x, w1, w2, state, cfg, groups, ct = _setup(T=40, D=128, E=2, group_size=128, dtype=jnp.bfloat16, empty=False)
  want = _fwd_and_grads(_routed(state, cfg, groups, row_tile=64, implementation="xla"), x, w1, w2, ct)
  with implementation("interpret") as im:
    got = _fwd_and_grads(_routed(state, cfg, groups, row_tile=64, implementation=im), x, w1, w2, ct)
  for a, b in zip(got, want):
    assert_close(a, b, jnp.bfloat16)
  # Row moves through the gather kernels, the layout from its kernel: exact, so the same bits.
  for gather, layout in (("pallas", "xla"), ("pallas_tma", "pallas")):
    with implementation("interpret") as im:
      moved = _fwd_and_grads(_routed(state, cfg, groups, row_tile=64, implementation=im, gather=gather,
                                     layout=layout), x, w1, w2, ct)
    for a, b in zip(moved, got):
      assert_bitwise_equal(a, b)


# ----------------------------------------------------------------------------------------------------------------------
# GPU: the Mosaic GPU kernels end to end.


@pytest.mark.gpu
@pytest.mark.parametrize("E", [1, 2, 4, 8, 16])
def test_pallas_equals_reference_gpu(E):
  group_size = 256 if E <= 4 else 128
  x, w1, w2, state, cfg, groups, ct = _setup(T=1000, D=256, E=E, group_size=group_size, dtype=jnp.bfloat16)
  want = _fwd_and_grads(_routed(state, cfg, groups, implementation="xla"), x, w1, w2, ct)
  got = _fwd_and_grads(jax.jit(_routed(state, cfg, groups, implementation="pallas")), x, w1, w2, ct)
  default = jax.jit(_routed(state, cfg, groups))(x, w1, w2)  # None resolves to the kernel on a GPU
  assert_close(default, got[0], jnp.bfloat16)
  for a, b in zip(got, want):
    assert_close(a, b, jnp.bfloat16)
  # The gather kernels move rows exactly and the layout kernel builds the same layout: same bits as XLA's.
  for gather, layout in (("pallas", "xla"), ("pallas_tma", "pallas")):
    moved = _fwd_and_grads(jax.jit(_routed(state, cfg, groups, implementation="pallas", gather=gather,
                                           layout=layout)), x, w1, w2, ct)
    for a, b in zip(moved, got):
      assert_bitwise_equal(a, b)


@pytest.mark.gpu
def test_pallas_vnm_gpu():
  x, w1, w2, state, cfg, groups, ct = _setup(T=600, D=128, E=4, group_size=128, dtype=jnp.bfloat16)
  want = _fwd_and_grads(_routed(state, cfg, groups, vnm=(64, 2, 8), implementation="xla"), x, w1, w2, ct)
  got = _fwd_and_grads(jax.jit(_routed(state, cfg, groups, vnm=(64, 2, 8), implementation="pallas")), x, w1, w2, ct)
  for a, b in zip(got, want):
    assert_close(a, b, jnp.bfloat16)
