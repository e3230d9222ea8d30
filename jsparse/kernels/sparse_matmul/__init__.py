"""2:4-sparse GEMM: ``sparse_matmul``, the ``Compressed24`` operand and its compress ops (api.py), the XLA reference
(reference.py) and the cuSPARSELt path's gradients (vjp.py). The FFI library itself lives in ``kernels/cusparselt``."""
