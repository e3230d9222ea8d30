"""Public bitmask packer: :func:`pack_bitmask` / :func:`unpack_bitmask` (storage, not differentiable)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jsparse.kernels import _common as common
from jsparse.kernels.compress import cuda as compress_cuda
from jsparse.kernels.compress import format as fmt
from jsparse.kernels.compress import pallas as compress_pallas
from jsparse.kernels.compress import reference as ref
from jsparse.kernels.compress import single_pass

BitmaskPacked = fmt.BitmaskPacked


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
  return math.prod(shape[:-1]), shape[-1]


IMPLEMENTATIONS = (None, "cuda", "pallas", "xla")


def _resolve(op: str, shape: tuple[int, ...], dtype, implementation: str | None) -> str:
  """``"cuda"``, ``"pallas"`` or ``"xla"``: ``None`` takes the CUDA kernels where jsparse's CUDA library runs, else
  the Pallas kernels on a GPU, else the reference."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  rows = _rows(shape)
  if implementation == "cuda":
    ok, why = compress_cuda.supports(rows, dtype)
    if not ok:
      raise ValueError(f"{op}: implementation='cuda' does not support this input: {why}")
    ok, why = compress_cuda.available()
    if not ok:
      raise ValueError(f"{op}: implementation='cuda' cannot run here: {why}")
    return "cuda"
  if implementation is None and common.on_gpu() and not common.interpret_enabled():
    if compress_cuda.supports(rows, dtype)[0] and compress_cuda.available()[0]:
      return "cuda"
  ok, why = compress_pallas.supports(rows, dtype)
  return common.resolve_implementation(op, implementation, pallas_supports=ok, why_not=why)


def pack_bitmask(x: jax.Array, capacity: float | int = 0.25, *, relu: bool = False, return_square: bool = False,
                 implementation: str | None = None):
  """Packs the non-zeros of ``x`` (or of ``relu(x)``) into a bitmask + fixed-capacity values buffer.

  One kernel on a GPU (:mod:`jsparse.kernels.compress.cuda`, or the Pallas
  :mod:`jsparse.kernels.compress.single_pass` where jsparse's CUDA library does not build): it reads ``x`` once, finds
  each band's place in the values buffer by a decoupled look-back over the bands before it, and writes the bitmask,
  the values and ``h``. Non-zeros beyond ``capacity`` (the last ones in row-major order) are not stored: check
  ``packed.dropped_fraction``, or size ``capacity`` above the density you expect.

  Args:
    x: floating array of rank >= 1; the last axis is a multiple of 32. Leading axes are flattened into rows.
    capacity: the values buffer: a float in (0, 1] is a fraction of ``x.size`` (the density held without dropping),
      an int an element count. ``1.0`` is always exact (but larger than dense: 1/16 extra for the bitmask).
    relu: pack ``relu(x)`` instead of ``x`` (NaN stays NaN), fused into the same passes.
    return_square: also return ``h = r*r`` (float32 product rounded to ``x.dtype``) of exactly the stored values,
      zeros elsewhere: the squared-ReLU activation, so a forward pass can compute with what the backward will see.
    implementation: ``None`` (the CUDA kernels where jsparse's CUDA library runs, else the Pallas ones on a GPU, else
      the reference), ``"cuda"``, ``"pallas"`` or ``"xla"``.

  Returns:
    :class:`BitmaskPacked` (``.shape`` is ``x.shape``), or ``(packed, h)`` with ``return_square``.

  Raises:
    ValueError: non-floating ``x``, rank 0, last axis not a multiple of 32, a bad ``capacity``, an unknown
      ``implementation``, or one that cannot run here.
  """
  op = "pack_bitmask"
  common.check_floating(op, "x", x)
  common.check_rank(op, "x", x, 1)
  common.check_multiple(op, "axis -1", x.shape[-1], fmt.WORD_BITS, "word bits")
  elements = fmt.capacity_elements(op, x.shape, capacity)
  shape = tuple(x.shape)
  x_RxC = x.reshape(_rows(shape))
  impl = _resolve(op, shape, x.dtype, implementation)
  if impl == "xla":
    out = ref.pack(x_RxC, elements, relu=relu, square_out=return_square)
    packed, h = out if return_square else (out, None)
  elif impl == "cuda":
    outs = compress_cuda.pack(x_RxC, elements, relu=relu, square_out=return_square)
    bits, values, offsets, counts = outs[:4]
    h = outs[4] if return_square else None
    packed = fmt.BitmaskPacked(bits, values, offsets, jnp.sum(counts.astype(jnp.float32)), x_RxC.shape)
  else:
    outs = single_pass.pack(x_RxC, elements, relu=relu, square_out=return_square,
                            interpret=common.interpret_enabled())
    bits, values, offsets, counts = outs[:4]
    h = outs[4] if return_square else None
    packed = fmt.BitmaskPacked(bits, values, offsets, jnp.sum(counts.astype(jnp.float32)), x_RxC.shape)
  packed = fmt.BitmaskPacked(packed.bits, packed.values, packed.row_offsets, packed.nnz, shape)
  if not return_square:
    return packed
  return packed, h.reshape(shape)


def unpack_bitmask(packed: BitmaskPacked, *, return_square: bool = False, implementation: str | None = None):
  """Dense array of a :class:`BitmaskPacked` (zeros where nothing is stored).

  Args:
    packed: from :func:`pack_bitmask`.
    return_square: also return ``r*r`` of it (float32 product rounded), fused into the same pass.
    implementation: as in :func:`pack_bitmask`; any implementation unpacks any packing (one layout).

  Returns:
    ``r`` shaped ``packed.shape``, or ``(r, h)`` with ``return_square``.
  """
  op = "unpack_bitmask"
  if not isinstance(packed, fmt.BitmaskPacked):
    raise ValueError(f"{op}: packed must be a BitmaskPacked, got {type(packed).__name__}")
  shape = packed.shape
  rows = _rows(shape)
  flat = fmt.BitmaskPacked(packed.bits, packed.values, packed.row_offsets, packed.nnz, rows)
  impl = _resolve(op, shape, packed.dtype, implementation)
  if impl == "xla":
    out = ref.unpack(flat, square_out=return_square)
  elif impl == "cuda":
    out = compress_cuda.unpack(packed.bits, packed.row_offsets, packed.values, rows, square_out=return_square)
  else:
    # Two pipeline stages: unpack+square at 0.774x of copy against 0.694x with one on the H100 (benchmarks/results/
    # remat.json: --sections kernels, 16384 x 8192, 85% zeros, 4 x 1024 blocks); the run it replaced there measured
    # 0.777x against 0.768x.
    out = compress_pallas.unpack(packed.bits, packed.row_offsets, packed.values, rows, square_out=return_square,
                                 num_stages=2, interpret=common.interpret_enabled())
  if not return_square:
    return out.reshape(shape)
  return out[0].reshape(shape), out[1].reshape(shape)
