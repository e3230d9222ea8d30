"""Every Pallas GPU kernel lowers for CUDA on this (CPU) machine.

Pallas' Triton and Mosaic GPU lowerings run in Python, before any GPU is involved: they build the kernel's IR and
check block shapes, layouts, copies and barriers. Lowering each kernel here, at a realistic size and with
``interpret=False``, catches a kernel that a JAX upgrade or an edit broke without waiting for a GPU session (the
interpret twins run a different path, the interpreter's). Compiling the IR to PTX and running it stays with the
GPU-marked tests.
"""

import jax
import jax.numpy as jnp
import pytest

from jsparse.kernels.activation import pallas as act
from jsparse.kernels.compress import pallas as compress
from jsparse.kernels.compress import single_pass
from jsparse.kernels.gather_rows import pallas as gather_triton
from jsparse.kernels.gather_rows import tma as gather_tma
from jsparse.kernels.grouped_matmul import pallas as gmm
from jsparse.kernels.nm import pallas as nm
from jsparse.kernels.nm import pallas_pack
from jsparse.kernels.nm import pallas_transposable
from jsparse.kernels.routed_ffn import layout_pallas
from jsparse.kernels.vnm import pallas as vnm

S = jax.ShapeDtypeStruct
BF16, I32, U32 = jnp.bfloat16, jnp.int32, jnp.uint32
R, C = 1024, 4096  # rows x columns of the element-wise kernels' input

KERNELS = {
    "nm_select": (lambda x: nm.nm_select(x, 2, 4), [S((R, C), BF16)], "triton"),
    "soft_threshold_24": (lambda w: nm.soft_threshold_24(w), [S((R, C), BF16)], "triton"),
    "pack_24": (lambda x: pallas_pack.pack_24(x), [S((R, C), BF16)], "triton"),
    "transposable_24": (lambda x: pallas_transposable.transposable_24_select(x), [S((1, R, C), BF16)], "triton"),
    "vnm_select": (lambda x: vnm.vnm_select(x, 64, 2, 8), [S((R, C), BF16)], "triton"),
    "squared_relu_24": (lambda x: act.squared_relu_nm(x, 2, 4), [S((R, C), BF16)], "triton"),
    "bitmask_count": (lambda x: compress.count(x, relu=True), [S((R, C), BF16)], "triton"),
    "bitmask_pack": (lambda x, o: compress.pack(x, o, R * C // 4, relu=True, square_out=True),
                     [S((R, C), BF16), S((R,), I32)], "triton"),
    "bitmask_unpack": (lambda b, o, v: compress.unpack(b, o, v, (R, C), square_out=True),
                       [S((R, C // 32), U32), S((R,), I32), S((R * C // 4,), BF16)], "triton"),
    "bitmask_unpack_popc": (lambda b, o, v: compress.unpack(b, o, v, (R, C), square_out=True, popc=True),
                            [S((R, C // 32), U32), S((R,), I32), S((R * C // 4,), BF16)], "triton"),
    "bitmask_single_pass": (lambda x: single_pass.pack(x, R * C // 4, relu=True, square_out=True),
                            [S((R, C), BF16)], "triton"),
    "gather_rows_triton": (lambda s, i: gather_triton.gather_rows(s, i), [S((16384, 4096), BF16), S((17408,), I32)],
                           "triton"),
    "gather_rows_tma": (lambda s, i: gather_tma.gather_rows(s, i), [S((16384, 4096), BF16), S((17408,), I32)],
                        "mosaic"),
    "group_layout": (lambda g: layout_pallas.make_layout_arrays(g, 8, 128, 17408), [S((16384,), I32)], "triton"),
    "grouped_matmul_up": (lambda x, w, t: gmm.grouped_matmul(x, w, t, num_groups=8, group_axis="n",
                                                             transpose_rhs=False, epilogue="square_relu"),
                          [S((17408, 2048), BF16), S((2048, 8192), BF16), S((136,), I32)], "mosaic"),
    "grouped_matmul_dx": (lambda d, w, t: gmm.grouped_matmul(d, w, t, num_groups=8, group_axis="k",
                                                             transpose_rhs=True, epilogue=None),
                          [S((17408, 1024), BF16), S((2048, 8192), BF16), S((136,), I32)], "mosaic"),
    "grouped_matmul_up_chained_split_m": (
        lambda x, w, t: gmm.grouped_matmul(x, w, t, num_groups=8, group_axis="n", transpose_rhs=False,
                                           epilogue="square_relu",
                                           cfg=gmm.TileConfig(chain=True, wg_split="m", tile_n=256)),
        [S((17408, 2048), BF16), S((2048, 8192), BF16), S((136,), I32)], "mosaic"),
    "grouped_matmul_t": (lambda a, b, s, t: gmm.grouped_matmul_t(a, b, s, t, row_tile=128, group_axis="n"),
                         [S((17408, 2048), BF16), S((17408, 1024), BF16), S((8,), I32), S((8,), I32)], "mosaic"),
}
MARKERS = {"triton": "xla.gpu.triton", "mosaic": "mosaic_gpu"}


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_lowers_for_cuda(name):
  fn, args, backend = KERNELS[name]
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert MARKERS[backend] in text
