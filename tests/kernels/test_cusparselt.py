"""The cuSPARSELt FFI layer: build-on-first-use and its cache (CPU), and on a GPU (marker ``gpu``) the compress kernel
bit for bit against ``cusparseLtSpMMACompress``, the plan cache, the algorithm search and memory over a long loop."""

import dataclasses
import gc
import os
import resource
import stat
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.kernels.cusparselt import CuSparseLtUnavailableError, build, library

# ----------------------------------------------------------------------------------------------------------------------
# CPU: toolchain discovery, the cache key, the build cache, the missing-toolchain messages

TOOLCHAIN = build.Toolchain(nvcc="/opt/cuda/bin/nvcc", nvcc_version="13.0.88", cusparselt_include="/x/include",
                            cusparselt_library="/x/lib/libcusparseLt.so.0", cusparselt_version="0.8.0",
                            cusparse_include="/cuda/include", ffi_include="/jaxlib/include", jaxlib_version="0.11.2")
SOURCES = {"a.cu": b"kernel", "b.h": b"header"}


def test_cache_key_depends_on_sources_versions_and_arch_only():
  key = build.cache_key(SOURCES, TOOLCHAIN, "90")
  assert key == build.cache_key(dict(SOURCES), TOOLCHAIN, "90")
  moved = dataclasses.replace(TOOLCHAIN, nvcc="/elsewhere/nvcc", cusparselt_include="/y/include",
                              ffi_include="/other/include")
  assert build.cache_key(SOURCES, moved, "90") == key  # same versions elsewhere: same binary
  changed = [
      build.cache_key({**SOURCES, "b.h": b"header2"}, TOOLCHAIN, "90"),
      build.cache_key({**SOURCES, "c.h": b""}, TOOLCHAIN, "90"),
      build.cache_key(SOURCES, dataclasses.replace(TOOLCHAIN, jaxlib_version="0.10.2"), "90"),
      build.cache_key(SOURCES, dataclasses.replace(TOOLCHAIN, cusparselt_version="0.10.0"), "90"),
      build.cache_key(SOURCES, dataclasses.replace(TOOLCHAIN, nvcc_version="13.1.0"), "90"),
      build.cache_key(SOURCES, dataclasses.replace(TOOLCHAIN, cusparse_include=None), "90"),
      build.cache_key(SOURCES, TOOLCHAIN, "100"),
  ]
  assert len({key, *changed}) == len(changed) + 1


def test_nvcc_command_links_the_versioned_library_with_an_rpath(tmp_path):
  cmd = build.nvcc_command(TOOLCHAIN, "90", tmp_path / "op.cu", tmp_path / "lib.so")
  assert cmd[0] == TOOLCHAIN.nvcc
  assert "-gencode=arch=compute_90,code=[sm_90,compute_90]" in cmd
  assert "-l:libcusparseLt.so.0" in cmd and "-Xlinker" in cmd and "-rpath=/x/lib" in cmd
  for inc in ("/jaxlib/include", "/x/include", "/cuda/include"):
    assert cmd[cmd.index(inc) - 1] == "-I"
  shimmed = build.nvcc_command(dataclasses.replace(TOOLCHAIN, cusparse_include=None), "90", tmp_path / "op.cu",
                               tmp_path / "lib.so", tmp_path / "shim")
  assert str(tmp_path / "shim") in shimmed
  with pytest.raises(ValueError, match="arch"):
    build.arch_flags("sm_90")


def _fake_nvcc(tmp_path, body):
  script = tmp_path / "nvcc"
  script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return str(script)


def test_build_compiles_once_then_hits_the_disk_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("JSPARSE_CACHE_DIR", str(tmp_path / "cache"))
  calls = tmp_path / "calls"
  # A stand-in compiler: records the call and writes the file named after -o.
  nvcc = _fake_nvcc(tmp_path, f"""
      echo x >> {calls}
      while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then echo lib > "$2"; fi; shift; done
      """)
  toolchain = dataclasses.replace(TOOLCHAIN, nvcc=nvcc, cusparse_include=None)
  first = build.build(toolchain, "90")
  second = build.build(toolchain, "90")
  assert first == second and first.read_text() == "lib\n"
  assert calls.read_text().count("x") == 1
  assert first.parent.parent == tmp_path / "cache" / "cusparselt"
  assert not [p for p in first.parent.iterdir() if p.is_dir()]  # the temporary build folder is gone
  build.build(toolchain, "80")  # another arch: another entry
  assert calls.read_text().count("x") == 2


def test_failed_build_reports_the_compiler_output(tmp_path, monkeypatch):
  monkeypatch.setenv("JSPARSE_CACHE_DIR", str(tmp_path / "cache"))
  nvcc = _fake_nvcc(tmp_path, "echo 'error: boom in op.cu' >&2\nexit 2\n")
  with pytest.raises(CuSparseLtUnavailableError, match=r"(?s)nvcc rc=2.*boom in op.cu"):
    build.build(dataclasses.replace(TOOLCHAIN, nvcc=nvcc), "90")


def test_missing_cusparselt_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setattr(build, "cusparselt_candidates", lambda: [tmp_path])
  with pytest.raises(CuSparseLtUnavailableError, match="pip install nvidia-cusparselt-cu13"):
    build.find_cusparselt()


def test_missing_nvcc_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setattr(build, "nvcc_candidates", lambda: [str(tmp_path / "nvcc")])
  with pytest.raises(CuSparseLtUnavailableError, match="nvcc not found.*nvidia-cuda-nvcc-cu13"):
    build.find_nvcc()


def test_cusparselt_found_through_the_override(monkeypatch, tmp_path):
  (tmp_path / "include").mkdir()
  (tmp_path / "lib").mkdir()
  (tmp_path / "include" / "cusparseLt.h").write_text(
      "#define CUSPARSELT_VER_MAJOR 0\n#define CUSPARSELT_VER_MINOR 10\n#define CUSPARSELT_VER_PATCH 1\n")
  (tmp_path / "lib" / "libcusparseLt.so.0").write_bytes(b"")
  monkeypatch.setenv("JSPARSE_CUSPARSELT_DIR", str(tmp_path))
  include, lib = build.find_cusparselt()
  assert include == str(tmp_path / "include") and lib == str(tmp_path / "lib" / "libcusparseLt.so.0")
  assert build.header_version(include) == "0.10.1"


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the no-GPU error")
def test_require_without_gpu(monkeypatch):
  monkeypatch.setattr(library, "_loaded", {})
  with pytest.raises(CuSparseLtUnavailableError, match="sparse_matmul: implementation='cusparselt' cannot run: "
                                                       "needs a CUDA GPU"):
    library.require("sparse_matmul")
  assert library.available() == (False, "no CUDA GPU (the default backend is 'cpu')")


# ----------------------------------------------------------------------------------------------------------------------
# GPU: the real library


def _decode(packed, rows, cols, dtype):
  """Dense matrix from cuSPARSELt's sm90 16-bit compressed layout (the layout csrc/sparsify24.h writes)."""
  buf = np.asarray(packed)
  values = buf[:rows * cols].view(np.uint16).reshape(rows, cols // 2)
  meta = buf[rows * cols:rows * cols * 9 // 8]
  r = np.arange(rows)[:, None]
  g = np.arange(cols // 4)[None, :]
  gl = g % 8
  byte = (r // 64) * 8 * cols + (g // 8) * 256 + ((r % 64) // 16) * 64 + (r % 8) * 8 + 2 * (gl % 4) + gl // 4
  nib = (meta[byte] >> (4 * ((r % 16) // 8))) & 0xF
  i0, i1 = nib & 3, nib >> 2
  assert (i0 < i1).all(), "metadata nibbles must name two distinct positions in order"
  dense = np.zeros((rows, cols // 4, 4), np.uint16)
  np.put_along_axis(dense, i0[..., None], values[:, 0::2, None], -1)
  np.put_along_axis(dense, i1[..., None], values[:, 1::2, None], -1)
  return dense.reshape(rows, cols).view(jnp.dtype(dtype))


def _exact_24(shape, dtype, seed):
  """Random values, exactly two non-zeros in every group of 4 (so the compressed form is unique)."""
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  x = np.where(np.abs(x) < 1e-3, 1.0, x)
  order = np.argsort(np.random.default_rng(seed + 1).random((*shape[:-1], shape[-1] // 4, 4)), axis=-1)
  keep = np.zeros(order.shape, bool)
  np.put_along_axis(keep, order[..., :2], True, -1)
  return jnp.asarray(np.where(keep.reshape(shape), x, 0), dtype)


def _bits(x):
  return np.asarray(x).view(np.uint16)


@pytest.fixture(scope="module")
def lib():
  return library.require("test")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", [(64, 64), (128, 256), (320, 192), (1024, 2048)])
def test_compress_kernel_bit_exact_vs_library(lib, dtype, shape):
  from jsparse.kernels.cusparselt import ops
  x = _exact_24(shape, dtype, seed=sum(shape))
  ours = jax.jit(lambda x: ops.compress(x, method="jsparse"))(x)
  theirs = jax.jit(lambda x: ops.compress(x, method="library"))(x)
  assert ours.shape == theirs.shape == (shape[0] * shape[1] * 9 // 8,)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  auto = jax.jit(lambda x: ops.compress(x))(x)
  assert lib.layout_status(*shape, dtype) == "verified"
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(theirs))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_compress_selects_like_nm_prune_and_squared_relu_nm(lib, dtype):
  from jsparse.kernels.cusparselt import ops
  rows, cols = 256, 512
  x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
  x[0, :4] = [1.0, -1.0, 1.0, 0.5]  # ties: lower index wins
  x[1, :4] = [np.nan, 0.1, 0.2, 0.3]  # NaN kept
  x[2, :8] = [0, 0, 0, 0, -1, -2, -3, -4]  # all zero; all negative (squared ReLU keeps the first two)
  x = jnp.asarray(x, dtype)
  packed, packed_relu = jax.jit(lambda x: (ops.compress(x), ops.compress(x, activation="squared_relu")))(x)
  pruned = jax.jit(lambda x: jsparse.nm_prune(x, implementation="xla"))(x)
  h = jax.jit(lambda x: jsparse.squared_relu_nm(x, implementation="xla"))(x)
  np.testing.assert_array_equal(_bits(_decode(packed, rows, cols, dtype)), _bits(pruned))
  np.testing.assert_array_equal(_bits(_decode(packed_relu, rows, cols, dtype)), _bits(h))


@pytest.mark.gpu
def test_plan_cache_hit_on_second_call(lib):
  m, k, n = 192, 320, 48  # a shape no other test uses
  f = jax.jit(lambda a, b: jsparse.sparse_matmul(a, b, implementation="cusparselt"))
  a = _exact_24((m, k), jnp.bfloat16, 1)
  b = jnp.ones((k, n), jnp.bfloat16)
  before = lib.stats()
  jax.block_until_ready(f(a, b))
  mid = lib.stats()
  assert mid["plans_built"] == before["plans_built"] + 1
  assert lib.plan_info(m, n, k, 0, jnp.bfloat16, 0) is not None
  jax.block_until_ready(f(a * 2, b))
  after = lib.stats()
  assert after["plans_built"] == mid["plans_built"]  # no re-init
  assert after["plan_hits"] == mid["plan_hits"] + 1
  assert after["matmuls"] == mid["matmuls"] + 1


@pytest.mark.gpu
def test_long_loop_with_changing_shapes_does_not_leak(lib):
  device = jax.devices()[0]
  shapes = [(64 * i, 64 * j, 16 * (i + j)) for i in (1, 2, 3, 5) for j in (1, 2, 4)]

  def run_all():
    for m, k, n in shapes:
      a = _exact_24((m, k), jnp.bfloat16, m + k)
      b = jnp.ones((k, n), jnp.bfloat16)
      out = jsparse.sparse_matmul(jsparse.compress_24(a, implementation="cusparselt"), b, implementation="cusparselt")
      outb = jsparse.sparse_matmul(b.T, jsparse.compress_24(a.T, operand="b", implementation="cusparselt"),
                                   sparse_operand="b", implementation="cusparselt")
      jax.block_until_ready((out, outb))
      del a, b, out, outb

  run_all()  # warm-up: compiles, plans, layout checks
  gc.collect()
  base_dev = device.memory_stats()["bytes_in_use"]
  base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  plans = lib.stats()["plans_built"]
  for _ in range(5):
    run_all()
  gc.collect()
  assert lib.stats()["plans_built"] == plans  # every shape hit its cached plan
  assert device.memory_stats()["bytes_in_use"] <= base_dev + (1 << 20)
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss < 200 * 1024  # KiB: no host growth per call
  assert lib.stats()["live_plans"] <= 512


@pytest.mark.gpu
def test_library_version_and_build_cache(lib):
  assert lib.version() >= 800  # 0.8.0+: AlgSelectionDestroy and GetErrorString exist
  assert os.path.basename(lib.path) == build.LIB_NAME and os.path.isfile(lib.path)


@pytest.mark.gpu
def test_search_runs_once_per_shape_and_stays_correct(lib, monkeypatch):  # last: a library crash loses nothing else
  monkeypatch.setenv("JSPARSE_CUSPARSELT_SEARCH", "1")
  m, k, n = 256, 512, 128
  a, b = _exact_24((m, k), jnp.bfloat16, 2), jnp.asarray(np.random.default_rng(3).standard_normal((k, n)),
                                                          jnp.bfloat16)
  f = jax.jit(lambda a, b: jsparse.sparse_matmul(a, b, implementation="cusparselt"))
  before = lib.stats()["searches"]
  out1 = f(a, b)
  out2 = f(a, b)
  assert lib.stats()["searches"] == before + 1
  info = lib.plan_info(m, n, k, 0, jnp.bfloat16, 1)
  assert info is not None and 0 <= info["alg_id"] <= info["alg_max_id"]
  expected = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  for out in (out1, out2):
    np.testing.assert_allclose(np.asarray(out, np.float64) / np.abs(expected).max(), expected / np.abs(expected).max(),
                               atol=1.6e-2)
