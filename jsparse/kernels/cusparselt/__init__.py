"""cuSPARSELt through the XLA FFI: C++/CUDA sources (csrc/), build-on-first-use with a disk cache (build.py),
loading and target registration (library.py) and the FFI calls (ops.py). Nothing here is imported by ``import jsparse``
until a cuSPARSELt path is chosen."""

from jsparse.kernels.cusparselt.build import CuSparseLtUnavailableError as CuSparseLtUnavailableError
