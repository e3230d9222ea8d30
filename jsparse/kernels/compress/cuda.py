"""CUDA kernels of the bitmask packer, called through the XLA FFI (``csrc/bitmask.h`` and ``csrc/pack_ring.h`` in
jsparse's CUDA library).

The Pallas kernels (:mod:`.single_pass`, :mod:`.pallas`) place every kept value with its own predicated store: Triton
has no warp shuffles and no shared-memory staging, and the packer stays near half of copy bandwidth on the H100.
These kernels compact each band (32 KiB for the pack's default, 16 KiB for the unpack) with warp scans, stage its
values in shared memory and write them as aligned 16-byte vectors; the pack finds its bands' places in the values
buffer with a decoupled look-back, in one pass. Its default launch is warp-specialised: per SM, a producer warp keeps
bands in flight with bulk copies into a ring in shared memory and a look-back warp finds each band's place while the
compute warps go on to the next bands. Same layout as the reference, bit for bit (:mod:`.format`). H100,
16384 x 8192 bf16, 85% / 95% zeros (``benchmarks/results/remat.json``): pack 0.85x of copy bandwidth end to end
(Pallas 0.50-0.51x), unpack + square 0.94-0.96x (Pallas 0.82-0.84x).

They run where jsparse's CUDA library builds (a CUDA GPU, nvcc and the cuSPARSELt wheel it links:
:func:`jsparse.kernels.cusparselt.library.available`); elsewhere the ops use the Pallas kernels or the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.kernels.compress import format as fmt

# The pack's launch configurations (jsparse_cusparselt.cu, visit_pack_variant). The ring pack's (pack_ring.h,
# ring=True): vectors per compute thread, bands in shared memory, the lag (in a group's bands) between a band's scan
# and its values' write, and compute groups. pack_kernel's (bitmask.h): vectors per thread and blocks per SM the
# registers must allow. 0 is the default; 1 (pack_kernel's bands of the same size) stands in for it before Hopper,
# where the ring's bulk copies do not exist; the others are bfloat16-only, for the benchmark's sweep. The
# measurements behind the default, and the configurations measured and dropped, are in visit_pack_variant's comment
# and benchmarks/results/remat_pack_variants.json.
PACK_VARIANTS = {
    0: dict(items=8, stages=6, lag=3, groups=1, ring=True),
    1: dict(items=8, min_blocks=2),
    2: dict(items=4, min_blocks=4),
    3: dict(items=8, stages=6, lag=2, groups=1, ring=True),
    4: dict(items=12, stages=4, lag=2, groups=1, ring=True),
    5: dict(items=6, stages=8, lag=2, groups=2, ring=True),
}
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def supports(shape: tuple[int, int], dtype) -> tuple[bool, str]:
  """Whether the kernels take a ``(rows, cols)`` array of this dtype (the caller checked ``cols % 32 == 0``)."""
  if jnp.dtype(dtype) not in DTYPES:
    return False, f"dtype {jnp.dtype(dtype)} is not one of bfloat16, float16, float32"
  if len(shape) != 2 or shape[0] < 1 or shape[1] < fmt.WORD_BITS or shape[1] % fmt.WORD_BITS:
    return False, f"expects a non-empty 2-D array with rows a multiple of 32 long, got shape {shape}"
  vectors = shape[0] * shape[1] * jnp.dtype(dtype).itemsize // 16
  if vectors >= 2**31 - 2 * 256 * 8:  # the pack indexes 16-byte vectors in int32 (jsparse_cusparselt.cu checks it too)
    return False, f"{shape[0] * shape[1]} elements: the CUDA pack indexes 16-byte vectors in int32"
  return True, ""


def available() -> tuple[bool, str]:
  """(whether the CUDA library runs here, why not)."""
  from jsparse.kernels.cusparselt import library
  return library.available()


def n_bands(shape: tuple[int, int], dtype, variant: int = 0) -> int:
  """Bands the pack cuts the flat array into (its per-band counts): 256 threads x the variant's vectors per thread x
  16 bytes each."""
  per_band = 16 * 256 * PACK_VARIANTS[variant]["items"] // jnp.dtype(dtype).itemsize
  return -(-(shape[0] * shape[1]) // per_band)


def pack(x_RxC: jax.Array, capacity: int, *, relu: bool, square_out: bool, variant: int = 0):
  """Packs ``activation(x)`` in one kernel.

  Returns:
    ``(bits, values, row_offsets, band_counts)`` and, with ``square_out``, ``h``; ``band_counts`` are the non-zeros
    of each band (before capacity), whose sum is ``nnz``.
  """
  from jsparse.kernels.cusparselt import library
  library.load()
  R, C = x_RxC.shape
  dt = x_RxC.dtype
  out = [jax.ShapeDtypeStruct((R, C // fmt.WORD_BITS), jnp.uint32), jax.ShapeDtypeStruct((capacity,), dt),
         jax.ShapeDtypeStruct((R,), jnp.int32), jax.ShapeDtypeStruct((n_bands((R, C), dt, variant),), jnp.int32)]
  if square_out:
    out.append(jax.ShapeDtypeStruct((R, C), dt))
  target = "jsparse_bitmask_pack_square" if square_out else "jsparse_bitmask_pack"
  call = jax.ffi.ffi_call(target, tuple(out), vmap_method="sequential")
  return call(x_RxC, relu=np.int32(relu), variant=np.int32(variant))


def unpack(bits: jax.Array, row_offsets: jax.Array, values: jax.Array, shape: tuple[int, int], *, square_out: bool):
  """Dense ``r`` (and ``h`` with ``square_out``) of the packed arrays."""
  from jsparse.kernels.cusparselt import library
  library.load()
  dense = jax.ShapeDtypeStruct(tuple(shape), values.dtype)
  target = "jsparse_bitmask_unpack_square" if square_out else "jsparse_bitmask_unpack"
  call = jax.ffi.ffi_call(target, (dense, dense) if square_out else dense, vmap_method="sequential")
  return call(bits, row_offsets, values)
