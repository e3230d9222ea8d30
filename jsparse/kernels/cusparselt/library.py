"""Loads jsparse's CUDA FFI library (building it on first use) and registers its XLA FFI targets.

FFI targets (platform ``CUDA``):

* ``jsparse_cslt_matmul``   -- ``cusparseLtMatmul`` with a plan cached per (device, m, n, k, mode, dtype, search).
* ``jsparse_cslt_compress`` -- the jsparse 2:4 compress kernel (optionally fused with squared-ReLU) writing
  cuSPARSELt's layout, checked bit for bit against ``cusparseLtSpMMACompress`` at first use per shape; or the
  library's own compress.
* ``jsparse_cslt_compress_t`` -- the same for the transpose of its input (2:4 along the input's first axis, no
  transposed copy), also copying out chosen rows unpruned (the 95/5 split's dense features).
* ``jsparse_relu24_counts`` / ``jsparse_cslt_compress_counts`` / ``jsparse_recipe_bwd`` -- the 2:4 activation recipe:
  the features' non-zero counts (alone, or with the forward's squared-ReLU compress), and the backward's three
  compressed operands from ``y1`` and ``dy2`` in one pass (``csrc/recipe24.h``); ``jsparse_squared_relu_counts`` and
  ``jsparse_recipe_bwd``'s ``mask24=0`` do the same for an FFN without the 2:4 activation (token-wise 2:4 weight
  gradients only).
* ``jsparse_bitmask_pack`` / ``_pack_square``, ``jsparse_bitmask_unpack`` / ``_unpack_square`` -- the bitmask
  packer's CUDA kernels (``csrc/bitmask.h``; :mod:`jsparse.kernels.compress.cuda`).

Exported C functions (``ctypes``): compressed sizes, plan-cache statistics, layout-check status, plan info.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import jax
import jax.numpy as jnp

from jsparse.kernels import _common as common
from jsparse.kernels.cusparselt import build
from jsparse.kernels.cusparselt.build import CuSparseLtUnavailableError

TARGETS = {"jsparse_cslt_matmul": "JsparseCsltMatmul", "jsparse_cslt_compress": "JsparseCsltCompress",
           "jsparse_cslt_compress_t": "JsparseCsltCompressT", "jsparse_bitmask_pack": "JsparseBitmaskPack",
           "jsparse_bitmask_pack_square": "JsparseBitmaskPackSquare", "jsparse_bitmask_unpack": "JsparseBitmaskUnpack",
           "jsparse_bitmask_unpack_square": "JsparseBitmaskUnpackSquare", "jsparse_relu24_counts": "JsparseRelu24Counts",
           "jsparse_cslt_compress_counts": "JsparseCsltCompressCounts",
           "jsparse_recipe_bwd": "JsparseRecipeBwd", "jsparse_squared_relu_counts": "JsparseSquaredReluCounts"}
DTYPE_CODES = {jnp.dtype(jnp.bfloat16): 0, jnp.dtype(jnp.float16): 1, jnp.dtype(jnp.float8_e4m3fn): 2}
STATS_FIELDS = ("plans_built", "plan_hits", "plan_evictions", "searches", "layout_checks", "layout_mismatches",
                "live_plans", "compress_jsparse", "compress_library", "matmuls", "async_allocs")
LAYOUT_STATUS = {-1: "unchecked", 0: "mismatch", 1: "verified"}

_lock = threading.Lock()
_loaded: dict[str, object] = {}


class Library:
  """The loaded shared library: FFI targets registered, helper functions typed."""

  def __init__(self, path: str, toolchain: build.Toolchain):
    self.path = path
    self.toolchain = toolchain
    self._lib = ctypes.cdll.LoadLibrary(path)
    i64, i32, p64 = ctypes.c_int64, ctypes.c_int32, ctypes.POINTER(ctypes.c_int64)
    self._sig("jsparse_cslt_version", ctypes.c_int, [])
    self._sig("jsparse_cslt_compressed_size", ctypes.c_int, [i64, i64, i32, p64, p64, ctypes.c_char_p, i64])
    self._sig("jsparse_cslt_stats", None, [p64, i32])
    self._sig("jsparse_cslt_layout_status", ctypes.c_int, [i64, i64, i32])
    self._sig("jsparse_cslt_plan_info", ctypes.c_int, [i64, i64, i64, i32, i32, i32, p64])
    self._sig("jsparse_cslt_clear_plans", i64, [])
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(self._lib, symbol)), platform="CUDA")

  def _sig(self, name, restype, argtypes):
    fn = getattr(self._lib, name)
    fn.restype, fn.argtypes = restype, argtypes

  def version(self) -> int:
    """cuSPARSELt's runtime version as ``major * 1000 + minor * 100 + patch`` (negative on error)."""
    return self._lib.jsparse_cslt_version()

  @functools.lru_cache(maxsize=None)
  def compressed_size(self, rows: int, cols: int, dtype) -> int:
    """Bytes of cuSPARSELt's compressed buffer for a row-major ``rows x cols`` sparse-A operand."""
    size, tmp = ctypes.c_int64(0), ctypes.c_int64(0)
    err = ctypes.create_string_buffer(512)
    rc = self._lib.jsparse_cslt_compressed_size(rows, cols, DTYPE_CODES[jnp.dtype(dtype)], ctypes.byref(size),
                                                ctypes.byref(tmp), err, len(err))
    if rc != 0:
      raise CuSparseLtUnavailableError(f"cuSPARSELt compressed size for {rows}x{cols} {jnp.dtype(dtype)}: "
                                       f"{err.value.decode(errors='replace')}")
    return int(size.value)

  def stats(self) -> dict[str, int]:
    """Process-wide counters of the plan cache and the compress paths."""
    out = (ctypes.c_int64 * len(STATS_FIELDS))()
    self._lib.jsparse_cslt_stats(out, len(STATS_FIELDS))
    return dict(zip(STATS_FIELDS, map(int, out)))

  def layout_status(self, rows: int, cols: int, dtype) -> str:
    """``"verified"``, ``"mismatch"`` (the library's compress is used instead) or ``"unchecked"``."""
    return LAYOUT_STATUS[self._lib.jsparse_cslt_layout_status(rows, cols, DTYPE_CODES[jnp.dtype(dtype)])]

  def plan_info(self, m: int, n: int, k: int, mode: int, dtype, search: int) -> dict[str, int] | None:
    """The cached plan's algorithm choice and workspace, or None if no such plan is cached (on this device)."""
    out = (ctypes.c_int64 * 5)()
    found = self._lib.jsparse_cslt_plan_info(m, n, k, mode, DTYPE_CODES[jnp.dtype(dtype)], int(search), out)
    if not found:
      return None
    return dict(zip(("alg_id", "split_k", "split_k_mode", "workspace_bytes", "alg_max_id"), map(int, out)))

  def clear_plans(self) -> int:
    """Drops every cached plan (they are rebuilt on next use); returns how many were dropped."""
    return int(self._lib.jsparse_cslt_clear_plans())


def _gpu_arch() -> str:
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if not cc:
    raise CuSparseLtUnavailableError("cannot read the GPU's compute capability")
  return str(cc).replace(".", "")


def load() -> Library:
  """The library, built (or taken from the disk cache) and registered on first call.

  Raises:
    CuSparseLtUnavailableError: no CUDA GPU, a missing toolchain (the message says what to install), or a failed build.
  """
  with _lock:
    if "lib" in _loaded:
      return _loaded["lib"]
    if "error" in _loaded:
      raise CuSparseLtUnavailableError(_loaded["error"])
    try:
      if not common.on_gpu():
        raise CuSparseLtUnavailableError(f"needs a CUDA GPU; the default backend here is {jax.default_backend()!r}")
      toolchain = build.find_toolchain()
      path = build.build(toolchain, _gpu_arch())
      _loaded["lib"] = Library(str(path), toolchain)
    except CuSparseLtUnavailableError as e:
      _loaded["error"] = str(e)
      raise
    return _loaded["lib"]


def available(prefer: bool = False) -> tuple[bool, str]:
  """(whether the cuSPARSELt path can run here, why not). ``prefer``: only on Hopper (the default choice)."""
  if not common.on_gpu():
    return False, f"no CUDA GPU (the default backend is {jax.default_backend()!r})"
  try:
    arch = _gpu_arch()
  except CuSparseLtUnavailableError as e:
    return False, str(e)
  if prefer and not arch.startswith("9"):
    return False, f"the GPU is sm_{arch}; cuSPARSELt is the default only on Hopper (sm_90)"
  try:
    load()
  except CuSparseLtUnavailableError as e:
    return False, str(e)
  return True, ""


def require(op: str) -> Library:
  """The library, or a clear error for an explicit ``implementation="cusparselt"``.

  Raises:
    CuSparseLtUnavailableError: it cannot run here.
  """
  try:
    return load()
  except CuSparseLtUnavailableError as e:
    raise CuSparseLtUnavailableError(f"{op}: implementation='cusparselt' cannot run: {e}") from None
