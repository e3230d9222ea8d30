"""Builds the cuSPARSELt FFI library on first use: toolchain discovery, the cache key, the nvcc command, the disk cache.

The C++/CUDA sources ship in ``csrc/``. On the first GPU use they are compiled with ``nvcc`` against the cuSPARSELt
headers (from the ``nvidia-cusparselt-cu13`` wheel: ``nvidia/cu13`` since 0.10, ``nvidia/cusparselt`` before) and
JAX's FFI headers (``jax.ffi.include_dir()``), linked to the versioned ``libcusparseLt.so.0`` by full path with an
rpath, and cached under ``~/.cache/jsparse/cusparselt/<key>/`` (``$JSPARSE_CACHE_DIR`` overrides the root). The key
hashes the sources, the compile flags, and the jaxlib, cuSPARSELt, nvcc and GPU-architecture versions, so any change
rebuilds and nothing stale is ever loaded.

Overrides: ``$JSPARSE_NVCC`` (the compiler), ``$JSPARSE_CUSPARSELT_DIR`` (a folder with ``include/cusparseLt.h`` and
``lib/libcusparseLt.so.0``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
MAIN_SOURCE = "jsparse_cusparselt.cu"
SHIM_SOURCE = "cusparse_shim.h"
LIB_NAME = "libjsparse_cusparselt.so"
# Host/device flags; part of the cache key. The FFI headers warn about ignored always_inline and missing returns in
# their operator<< overloads and ByteWidth (benign, measured notes §6): those diagnostics are silenced.
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wno-attributes", "-Xcompiler",
              "-Wno-return-type", "-diag-suppress", "2473,940", "-lineinfo")
INSTALL_HINT = ("install the cuSPARSELt wheel (pip install nvidia-cusparselt-cu13) and the CUDA compiler nvcc (a CUDA "
                "toolkit on PATH, or pip install nvidia-cuda-nvcc-cu13), or set JSPARSE_CUSPARSELT_DIR / JSPARSE_NVCC")


class CuSparseLtUnavailableError(RuntimeError):
  """The cuSPARSELt path cannot run here (no GPU, no nvcc, no cuSPARSELt, or the build failed)."""


@dataclasses.dataclass(frozen=True)
class Toolchain:
  """Everything the build needs, and the versions that key its cache."""

  nvcc: str
  nvcc_version: str
  cusparselt_include: str
  cusparselt_library: str
  cusparselt_version: str
  cusparse_include: str | None  # folder with cusparse.h (cusparseLt.h includes it); None: the shipped shim is used
  ffi_include: str
  jaxlib_version: str


# ----------------------------------------------------------------------------------------------------------------------
# Discovery


def _wheel_dirs(package: str) -> list[Path]:
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    return []
  if spec is None or spec.submodule_search_locations is None:  # namespace packages have no __file__
    return []
  return [Path(p) for p in spec.submodule_search_locations]


def cusparselt_candidates() -> list[Path]:
  """Folders that may hold ``include/cusparseLt.h`` and ``lib/libcusparseLt.so.0``, in search order."""
  out = []
  if os.environ.get("JSPARSE_CUSPARSELT_DIR"):
    out.append(Path(os.environ["JSPARSE_CUSPARSELT_DIR"]))
  for package in ("nvidia.cusparselt", "nvidia.cu13", "nvidia.cu12"):
    out.extend(_wheel_dirs(package))
  return out


def find_cusparselt() -> tuple[str, str]:
  """(include folder, full path of the versioned shared library).

  Raises:
    CuSparseLtUnavailableError: no folder has both files.
  """
  searched = []
  for root in cusparselt_candidates():
    header = root / "include" / "cusparseLt.h"
    libs = sorted((root / "lib").glob("libcusparseLt.so.0*")) if (root / "lib").is_dir() else []
    searched.append(str(root))
    if header.is_file() and libs:
      return str(header.parent), str(libs[0])
  where = ", ".join(searched) or "no nvidia.cusparselt / nvidia.cu13 package"
  raise CuSparseLtUnavailableError(f"cuSPARSELt headers/library not found (searched: {where}); {INSTALL_HINT}")


def header_version(include_dir: str) -> str:
  """``"MAJOR.MINOR.PATCH"`` read from ``cusparseLt.h`` (the wheel has no version attribute)."""
  text = Path(include_dir, "cusparseLt.h").read_text(errors="replace")
  parts = []
  for field in ("MAJOR", "MINOR", "PATCH"):
    m = re.search(rf"#define\s+CUSPARSELT_VER_{field}\s+(\d+)", text)
    parts.append(m.group(1) if m else "?")
  return ".".join(parts)


def nvcc_candidates() -> list[str]:
  """Places nvcc may be, in search order."""
  candidates = [os.environ.get("JSPARSE_NVCC"), shutil.which("nvcc")]
  for var in ("CUDA_HOME", "CUDA_PATH"):
    if os.environ.get(var):
      candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
  candidates.append("/usr/local/cuda/bin/nvcc")
  for package in ("nvidia.cu13", "nvidia.cuda_nvcc"):
    candidates.extend(str(d / "bin" / "nvcc") for d in _wheel_dirs(package))
  return [c for c in candidates if c]


def find_nvcc() -> str:
  """Path of nvcc.

  Raises:
    CuSparseLtUnavailableError: none found.
  """
  for c in nvcc_candidates():
    if os.path.isfile(c) and os.access(c, os.X_OK):
      return c
  raise CuSparseLtUnavailableError(f"nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda, nvidia-cuda-nvcc); "
                                   f"{INSTALL_HINT}")


def find_cusparse_include(nvcc: str) -> str | None:
  """A folder with ``cusparse.h``: the compiler's toolkit, ``$CUDA_HOME``, or the ``nvidia-cusparse`` wheel.

  ``cusparseLt.h`` includes ``cusparse.h`` for three enums only; without one, the build uses ``csrc/cusparse_shim.h``.
  """
  candidates = [os.path.join(os.path.dirname(os.path.realpath(nvcc)), "..", "include")]
  for var in ("CUDA_HOME", "CUDA_PATH"):
    if os.environ.get(var):
      candidates.append(os.path.join(os.environ[var], "include"))
  candidates.append("/usr/local/cuda/include")
  for package in ("nvidia.cu13", "nvidia.cusparse", "nvidia.cu12"):
    candidates.extend(str(d / "include") for d in _wheel_dirs(package))
  for c in candidates:
    if os.path.isfile(os.path.join(c, "cusparse.h")):
      return os.path.normpath(c)
  return None


def _nvcc_version(nvcc: str) -> str:
  try:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise CuSparseLtUnavailableError(f"nvcc at {nvcc} does not run ({e}); {INSTALL_HINT}") from e
  m = re.search(r"release\s+([\d.]+),\s*V([\d.]+)", out)
  return m.group(2) if m else out.strip().splitlines()[-1] if out.strip() else "unknown"


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source builds
    import jax
    return jax.__version__


def find_toolchain() -> Toolchain:
  """Locates nvcc, cuSPARSELt and the FFI headers.

  Raises:
    CuSparseLtUnavailableError: something is missing; the message says what to install.
  """
  import jax

  include, library = find_cusparselt()
  nvcc = find_nvcc()
  return Toolchain(nvcc=nvcc, nvcc_version=_nvcc_version(nvcc), cusparselt_include=include,
                   cusparselt_library=library, cusparselt_version=header_version(include),
                   cusparse_include=find_cusparse_include(nvcc), ffi_include=jax.ffi.include_dir(),
                   jaxlib_version=_jaxlib_version())


# ----------------------------------------------------------------------------------------------------------------------
# Cache key, command, build


def source_files() -> list[Path]:
  """The shipped sources, sorted: every ``.cu``/``.cc``/``.h`` in ``csrc/`` (all of them key the cache)."""
  return sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cc", ".h"))


def cache_key(sources: dict[str, bytes], toolchain: Toolchain, arch: str) -> str:
  """Hex digest identifying one build: sources, flags, jaxlib / cuSPARSELt / nvcc versions, GPU architecture.

  ``toolchain`` paths are deliberately left out (the same versions at another path give the same binary), except the
  library's file name, which carries its soname version.
  """
  h = hashlib.sha256()
  for name in sorted(sources):
    h.update(name.encode() + b"\0" + sources[name] + b"\0")
  for part in (" ".join(NVCC_FLAGS), toolchain.jaxlib_version, toolchain.cusparselt_version, toolchain.nvcc_version,
               os.path.basename(toolchain.cusparselt_library), str(toolchain.cusparse_include is None), arch):
    h.update(part.encode() + b"\0")
  return h.hexdigest()[:20]


def cache_root() -> Path:
  if os.environ.get("JSPARSE_CACHE_DIR"):
    return Path(os.environ["JSPARSE_CACHE_DIR"]) / "cusparselt"
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "jsparse" / "cusparselt"


def arch_flags(arch: str) -> list[str]:
  """``-gencode`` for compute capability ``arch`` ("90" for sm_90), with PTX so newer GPUs can JIT it."""
  if not arch.isdigit():
    raise ValueError(f"arch_flags: arch must be digits like '90', got {arch!r}")
  return [f"-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]"]


def nvcc_command(toolchain: Toolchain, arch: str, source: Path, output: Path,
                 shim_dir: Path | None = None) -> list[str]:
  """The full compile-and-link command line (``shim_dir``: a folder holding ``cusparse.h`` from the shim)."""
  lib_dir = os.path.dirname(toolchain.cusparselt_library)
  cusparse = toolchain.cusparse_include or (str(shim_dir) if shim_dir else None)
  extra = ["-I", cusparse] if cusparse else []
  return [toolchain.nvcc, *NVCC_FLAGS, *arch_flags(arch), "-I", toolchain.ffi_include, "-I",
          toolchain.cusparselt_include, *extra, "-I", str(source.parent), str(source), "-L", lib_dir,
          f"-l:{os.path.basename(toolchain.cusparselt_library)}", "-Xlinker", f"-rpath={lib_dir}", "-o", str(output)]


def build(toolchain: Toolchain, arch: str) -> Path:
  """Returns the cached library for this toolchain and arch, compiling it first if needed.

  Raises:
    CuSparseLtUnavailableError: the compile failed (the message holds the end of nvcc's output).
  """
  sources = {p.name: p.read_bytes() for p in source_files()}
  folder = cache_root() / cache_key(sources, toolchain, arch)
  target = folder / LIB_NAME
  if target.is_file():
    return target
  folder.mkdir(parents=True, exist_ok=True)
  # Build into a private temporary folder from a snapshot of the sources, then move the result in atomically:
  # concurrent first uses (several processes) never load a half-written file.
  with tempfile.TemporaryDirectory(dir=folder) as tmp:
    for name, data in sources.items():
      Path(tmp, name).write_bytes(data)
    shim = None
    if toolchain.cusparse_include is None:
      shim = Path(tmp, "shim")
      shim.mkdir()
      (shim / "cusparse.h").write_bytes(sources[SHIM_SOURCE])
    out = Path(tmp, LIB_NAME)
    cmd = nvcc_command(toolchain, arch, Path(tmp, MAIN_SOURCE), out, shim)
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
      raise CuSparseLtUnavailableError(f"building the cuSPARSELt FFI library failed to start: {e}") from e
    if proc.returncode != 0 or not out.is_file():
      log = (proc.stdout + proc.stderr)[-4000:]
      raise CuSparseLtUnavailableError(f"building the cuSPARSELt FFI library failed (nvcc rc={proc.returncode}):\n"
                                       f"{' '.join(cmd)}\n{log}")
    (folder / "build.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    os.replace(out, target)
  return target
