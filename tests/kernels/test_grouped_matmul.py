"""Grouped GEMMs of the routed FFN: the jnp reference against a per-tile loop, and the Mosaic GPU kernels against it.

The kernels' CPU twin runs Pallas' Mosaic GPU interpreter (JAX 0.10's ``InterpretGPUParams``), which cannot apply a
transposed SMEM view to ``wgmma``: only ``transpose_rhs=False`` runs interpreted, and the transposed GEMMs (dY W^T and
the weight gradients) are tested on the GPU only (class ``gpu``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.kernels.grouped_matmul import api as gmm_api
from jsparse.kernels.grouped_matmul import pallas as gmm_pallas
from jsparse.kernels.grouped_matmul import reference as ref
from tests.helpers import assert_close, implementation


def _bf(shape, seed, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.bfloat16)


def _loop_reference(lhs, rhs, tile_group, E, group_axis, transpose_rhs, epilogue=None, aux=None):
  """float64 numpy, one tile at a time: the definition in words."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  rt = lhs.shape[0] // len(tile_group)
  b_full = rhs.T if transpose_rhs else rhs
  out = []
  for r, g in enumerate(np.asarray(tile_group)):
    rows = lhs[r * rt:(r + 1) * rt]
    if g >= E:
      n = b_full.shape[1] // E if group_axis == "n" else b_full.shape[1]
      out.append(np.zeros((rt, n)))
      continue
    if group_axis == "n":
      n = b_full.shape[1] // E
      b = b_full[:, g * n:(g + 1) * n]
    else:
      k = b_full.shape[0] // E
      b = b_full[g * k:(g + 1) * k]
    out.append(rows @ b)
  y = np.concatenate(out)
  if epilogue == "square_relu":
    y = np.maximum(y, 0) ** 2
  if epilogue == "square_relu_grad":
    y = y * 2 * np.sqrt(np.asarray(aux, np.float64))
  return y


CASES = [  # (group_axis, transpose_rhs, epilogue)
    ("n", False, "square_relu"),
    ("k", False, None),
    ("n", True, "square_relu_grad"),
    ("k", True, None),
]
# Tile 2 is an empty/unused tile (group E), group 1 has no tile at all.
TILE_GROUP = [2, 0, 3, 2, 0]


def _case(group_axis, transpose_rhs, epilogue, row_tile, K, N, E=3, seed=0):
  tg = jnp.array([g if g < 3 else E for g in TILE_GROUP], jnp.int32)
  P = row_tile * len(TILE_GROUP)
  lhs = _bf((P, K), seed)
  if group_axis == "n":
    shape = (K, E * N)
  else:
    shape = (E * K, N)
  rhs = _bf(shape[::-1] if transpose_rhs else shape, seed + 1, scale=1 / np.sqrt(K))
  aux = jnp.square(_bf((P, N), seed + 2)) if epilogue == "square_relu_grad" else None
  return lhs, rhs, tg, aux


@pytest.mark.parametrize("group_axis,transpose_rhs,epilogue", CASES)
def test_reference_matches_tile_loop(group_axis, transpose_rhs, epilogue):
  lhs, rhs, tg, aux = _case(group_axis, transpose_rhs, epilogue, row_tile=8, K=16, N=24)
  got = ref.grouped_matmul(lhs.astype(jnp.float32), rhs.astype(jnp.float32), tg, num_groups=3,
                           group_axis=group_axis, transpose_rhs=transpose_rhs, epilogue=epilogue,
                           aux_PxN=None if aux is None else aux.astype(jnp.float32))
  want = _loop_reference(lhs, rhs, tg, 3, group_axis, transpose_rhs, epilogue, aux)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_axis", ["n", "m"])
def test_reference_t_matches_group_loop(group_axis):
  a, b = _bf((40, 16), 0), _bf((40, 24), 1)
  start, tiles = jnp.array([0, 1, 1]), jnp.array([1, 0, 4])  # group 1 empty; rows 8..39 are group 2
  got = np.asarray(jsparse.grouped_matmul_t(a, b, start, tiles, row_tile=8, group_axis=group_axis,
                                            implementation="xla"), np.float32)
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  blocks = [a64[:8].T @ b64[:8], np.zeros((16, 24)), a64[8:].T @ b64[8:]]
  want = np.concatenate(blocks, axis=1 if group_axis == "n" else 0)
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


def test_bad_arguments():
  lhs, rhs, tg, _ = _case("n", False, None, row_tile=8, K=16, N=24)
  with pytest.raises(ValueError, match="group_axis"):
    jsparse.grouped_matmul(lhs, rhs, tg, num_groups=3, group_axis="m")
  with pytest.raises(ValueError, match="not a multiple of num_groups=5"):
    jsparse.grouped_matmul(lhs, rhs, tg, num_groups=5)
  with pytest.raises(ValueError, match="gives K"):
    jsparse.grouped_matmul(lhs[:, :8], rhs, tg, num_groups=3)
  with pytest.raises(ValueError, match="aux_PxN is required"):
    jsparse.grouped_matmul(lhs, rhs, tg, num_groups=3, epilogue="square_relu_grad")
  with pytest.raises(ValueError, match="epilogue"):
    jsparse.grouped_matmul(lhs, rhs, tg, num_groups=3, epilogue="gelu")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
      jsparse.grouped_matmul(lhs, rhs, tg, num_groups=3, implementation="pallas")
  with jsparse.pallas_interpret():  # the kernel takes 16-bit floats only
    with pytest.raises(ValueError, match="bfloat16/float16"):
      jsparse.grouped_matmul(lhs.astype(jnp.float32), rhs, tg, num_groups=3, implementation="pallas")


# ----------------------------------------------------------------------------------------------------------------------
# Kernels. Interpret twin: non-transposed operands, small tiles (the interpreter is slow).


# ("n", "square_relu") and ("k", None) run interpreted in test_routed_ffn.py::test_interpret_twin.
@pytest.mark.parametrize("group_axis,epilogue", [("k", "square_relu_grad")])
def test_kernel_interpret(group_axis, epilogue):
  lhs, rhs, tg, aux = _case(group_axis, False, epilogue, row_tile=64, K=64, N=128)
  with implementation("interpret") as im:
    got = jsparse.grouped_matmul(lhs, rhs, tg, num_groups=3, group_axis=group_axis, epilogue=epilogue, aux_PxN=aux,
                                 implementation=im)
  want = ref.grouped_matmul(lhs, rhs, tg, num_groups=3, group_axis=group_axis, transpose_rhs=False,
                            epilogue=epilogue, aux_PxN=aux)
  assert_close(got, want)


ENGINES = {"base": gmm_pallas.TileConfig(), "n64": gmm_pallas.TileConfig(tile_n=64),
           "static": gmm_pallas.TileConfig(dynamic_grid=False), "simple": gmm_pallas.TileConfig(warp_specialized=False),
           "f1m0": gmm_pallas.TileConfig(mma_in_flight=1, grid_minor_dim=0),
           "clnf1": gmm_pallas.TileConfig(cluster="n", mma_in_flight=1), "clm": gmm_pallas.TileConfig(cluster="m")}


def test_interpret_mma_in_flight():
  """One wgmma group left in flight (stages released a step late): same result as the reference."""
  lhs, rhs, tg, _ = _case("n", False, None, row_tile=64, K=128, N=128)
  cfg = gmm_pallas.TileConfig(tile_m=64, tile_n=64, mma_in_flight=1, grid_minor_dim=0)
  got = gmm_pallas.grouped_matmul(lhs, rhs, tg, num_groups=3, group_axis="n", transpose_rhs=False, epilogue=None,
                                  cfg=cfg, interpret=True)
  assert_close(got, ref.grouped_matmul(lhs, rhs, tg, num_groups=3, group_axis="n", transpose_rhs=False))


def test_tile_config_and_tuning():
  with pytest.raises(ValueError, match="cluster"):
    gmm_pallas.TileConfig(cluster="k")
  with pytest.raises(ValueError, match="mma_in_flight"):
    gmm_pallas.TileConfig(mma_in_flight=2)
  with pytest.raises(ValueError, match="warp-specialised"):
    gmm_pallas.TileConfig(warp_specialized=False, cluster="n")
  lhs, rhs, tg, _ = _case("n", False, None, row_tile=64, K=64, N=128)
  with pytest.raises(ValueError, match="cluster='m' is not supported"):  # row tiles of different groups
    gmm_pallas.grouped_matmul(lhs, rhs, tg, num_groups=3, group_axis="n", transpose_rhs=False, epilogue=None,
                              cfg=gmm_pallas.TileConfig(tile_m=64, tile_n=64, cluster="m"))
  with pytest.raises(ValueError, match="even number of tiles"):
    gmm_pallas.grouped_matmul(lhs, rhs, tg, num_groups=3, group_axis="n", transpose_rhs=False, epilogue=None,
                              cfg=gmm_pallas.TileConfig(tile_m=64, tile_n=64, cluster="n"))
  with pytest.raises(ValueError, match="unknown GEMMs"):
    with gmm_api.tuning(upp={}):
      pass
  with gmm_api.tuning(up=dict(cluster="n", stages=3)):
    assert gmm_api.kernel_config("up", 128, 1024, 512) == gmm_pallas.TileConfig(tile_m=128, stages=3, cluster="n")
    # An odd number of column tiles (or an "m" cluster of row tiles) drops the cluster.
    assert gmm_api.kernel_config("up", 128, 1024, 768).cluster is None
  assert gmm_api.kernel_config("up", 128, 1024, 512).stages == gmm_pallas.TileConfig().stages


@pytest.mark.gpu
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("group_axis,transpose_rhs,epilogue", CASES)
def test_kernel_gpu(group_axis, transpose_rhs, epilogue, engine):
  cfg = dataclasses.replace(ENGINES[engine], tile_m=128)
  if cfg.cluster == "m":
    pytest.skip("row-tile GEMMs take no 'm' clusters")
  N = 512 if cfg.cluster else 256  # a cluster needs an even number of column tiles
  lhs, rhs, tg, aux = _case(group_axis, transpose_rhs, epilogue, row_tile=128, K=256, N=N)
  got = gmm_pallas.grouped_matmul(lhs, rhs, tg, aux, num_groups=3, group_axis=group_axis,
                                  transpose_rhs=transpose_rhs, epilogue=epilogue, cfg=cfg)
  want = ref.grouped_matmul(lhs, rhs, tg, num_groups=3, group_axis=group_axis, transpose_rhs=transpose_rhs,
                            epilogue=epilogue, aux_PxN=aux)
  assert_close(got, want)
  # The public op picks the kernel on a GPU.
  api = jsparse.grouped_matmul(lhs, rhs, tg, num_groups=3, group_axis=group_axis, transpose_rhs=transpose_rhs,
                               epilogue=epilogue, aux_PxN=aux, implementation="pallas")
  assert_close(api, want)


@pytest.mark.gpu
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("group_axis", ["n", "m"])
def test_kernel_t_gpu(group_axis, engine):
  cfg = ENGINES[engine]
  a, b = _bf((128 * 6, 256), 0), _bf((128 * 6, 512), 1)
  start, tiles = jnp.array([0, 1, 1, 5]), jnp.array([1, 0, 4, 1])  # group 1 empty
  got = gmm_pallas.grouped_matmul_t(a, b, start, tiles, row_tile=128, group_axis=group_axis, cfg=cfg)
  want = ref.grouped_matmul_t(a, b, start, tiles, row_tile=128, group_axis=group_axis)
  assert_close(got, want)
