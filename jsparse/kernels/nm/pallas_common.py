"""Plumbing shared by jsparse's Pallas-Triton selection kernels (N:M, S-STE, transposable, V:N:M, squared-ReLU, pack).

Why Triton: on JAX 0.11.2 ``pl.pallas_call`` lowers on GPU only through the (deprecated) Triton backend, and these
kernels are memory-bound elementwise/grouped passes, which Triton vectorises well. Selecting
``jax.experimental.pallas.triton.CompilerParams`` picks that backend on both supported JAX versions (0.10.2 would
otherwise default to Mosaic GPU). ``tests/kernels/test_nm.py::test_kernels_lower_to_pallas_triton`` fails if the
backend disappears.

The lane idiom: a group of ``m`` consecutive elements along the last axis is split into ``m`` "lanes" (lane ``i``
holds element ``i`` of every group) by repeated reshape-to-(..., 2) + ``lax.unstack`` -- Triton's ``tt.split``,
which stays in registers because the 2-axis sits inside one thread -- and joined back by ``lax.stack`` (``tt.join``).
Every per-group computation is then elementwise over lanes: no cross-thread traffic, 16-byte loads and stores.
"""

from __future__ import annotations

import dataclasses
import fractions
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # Present on every jaxlib with CUDA support; absent pieces only matter on a GPU.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - exotic builds
  pltriton = None

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# The StableHLO custom call a Pallas-Triton kernel lowers to (exported as a constant from JAX 0.11 on).
TRITON_CUSTOM_CALL = getattr(pltriton, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")

# Triton tensors hold at most 2**20 elements; keep blocks far below that so registers do not spill.
MAX_BLOCK_ELEMENTS = 1 << 16


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Static launch configuration of a kernel: block shape (rows x columns of the 2-D view) and Triton knobs.

  Block sizes are upper bounds: each is reduced to the largest power of two that divides the array's dimension.
  """

  block_rows: int = 32
  block_cols: int = 1024
  num_warps: int = 4
  num_stages: int = 1


def pow2_block(size: int, target: int) -> int:
  """Largest power of two <= ``target`` that divides ``size`` (Triton tensor dims must be powers of two)."""
  b = 1
  while b * 2 <= target and size % (b * 2) == 0:
    b *= 2
  return b


def is_pow2(v: int) -> bool:
  return v >= 1 and (v & (v - 1)) == 0


def dtype_supported(x: jax.Array) -> tuple[bool, str]:
  dtype = jnp.dtype(jnp.result_type(x))
  if dtype not in SUPPORTED_DTYPES:
    return False, f"dtype {dtype} (the kernels take float32, bfloat16 and float16)"
  return True, ""


def pallas_call(kernel: Callable[..., None], *, out_shape: Any, grid: tuple[int, ...], in_specs: Any, out_specs: Any,
                config: BlockConfig, interpret: bool, name: str) -> Callable[..., Any]:
  """``pl.pallas_call`` on the Triton backend, with its deprecation warning silenced (it is a deliberate choice)."""
  params = None
  if not interpret:
    if pltriton is None:  # pragma: no cover
      raise ValueError(f"{name}: this jaxlib has no Pallas Triton backend")
    params = pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
  call = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        interpret=interpret, compiler_params=params, name=name)

  def run(*args):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      return call(*args)

  return run


# ----------------------------------------------------------------------------------------------------------------------
# Lanes: groups of m consecutive elements of the last axis as m separate arrays.


def deinterleave(x: jax.Array, m: int) -> list[jax.Array]:
  """``[x[..., i::m] for i in range(m)]`` for a power-of-two ``m``, built from 2-way splits (Triton ``tt.split``)."""
  if m == 1:
    return [x]
  *lead, k = x.shape
  even, odd = jax.lax.unstack(x.reshape(*lead, k // 2, 2), axis=-1)
  lanes_even, lanes_odd = deinterleave(even, m // 2), deinterleave(odd, m // 2)
  # even[..., j::m/2] is x[..., 2j::m]: lane 2j comes from the even half, lane 2j+1 from the odd one.
  return [(lanes_even if i % 2 == 0 else lanes_odd)[i // 2] for i in range(m)]


def interleave(lanes: Sequence[jax.Array]) -> jax.Array:
  """Inverse of :func:`deinterleave`: lane ``i`` becomes element ``i`` of every group."""
  m = len(lanes)
  if m == 1:
    return lanes[0]
  even, odd = interleave(lanes[0::2]), interleave(lanes[1::2])
  *lead, g = even.shape
  return jax.lax.stack([even, odd], axis=-1).reshape(*lead, 2 * g)


def keep_top_n(keys: Sequence[jax.Array], n: int) -> list[jax.Array]:
  """Which lanes hold the ``n`` largest keys of their group; ties go to the lower lane (the reference's rule)."""
  m = len(keys)
  # beats[i][j] (i < j): lane i ranks ahead of lane j.
  beats = {(i, j): keys[i] >= keys[j] for i in range(m) for j in range(i + 1, m)}
  if m == 4:
    # Boolean form for the common case: a lane is kept while fewer than n of the other three rank ahead of it.
    keep = []
    for i in range(4):
      ahead = [(~beats[(i, j)]) if i < j else beats[(j, i)] for j in range(4) if j != i]
      a, b, c = ahead
      if n == 1:
        keep.append(~(a | b | c))
      elif n == 2:
        keep.append(~((a & b) | (a & c) | (b & c)))
      else:
        keep.append(~(a & b & c))
    return keep
  ranks = [jnp.zeros(keys[0].shape, jnp.int32) for _ in range(m)]
  for (i, j), b in beats.items():
    bi = b.astype(jnp.int32)
    ranks[j] = ranks[j] + bi
    ranks[i] = ranks[i] + (1 - bi)
  return [r < n for r in ranks]


# ----------------------------------------------------------------------------------------------------------------------
# Selection keys from the bits. Same values as the reference's float formulas, but exact on every platform: under
# Triton, libdevice's fabsf flushes subnormals to zero (FTZ), which would turn tiny magnitudes into ties. Integer ops
# on the bit pattern never flush, cost the same, and for bfloat16 the f32 value is just a shift.

_BITS = {  # dtype -> (unsigned view, sign bit, +inf bits)
    jnp.dtype(jnp.bfloat16): (jnp.uint16, 0x8000, 0x7F80),
    jnp.dtype(jnp.float16): (jnp.uint16, 0x8000, 0x7C00),
    jnp.dtype(jnp.float32): (jnp.uint32, 0x80000000, 0x7F800000),
}


def _bits_to_f32(bits: jax.Array, dtype) -> jax.Array:
  """The f32 value of non-negative ``dtype`` bit patterns (exact: every bf16/f16 value is an f32)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16:
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16, jnp.float32)
  if dtype == jnp.float16:
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def magnitude_key(x: jax.Array) -> jax.Array:
  """``jsparse.kernels._common.magnitude_key`` (|x| in f32, NaN as +inf) from the bit pattern."""
  view, sign, inf = _BITS[jnp.dtype(x.dtype)]
  mag = jax.lax.bitcast_convert_type(x, view) & view(sign - 1)
  return _bits_to_f32(jnp.minimum(mag, view(inf)), x.dtype)


def relu_key(x: jax.Array) -> jax.Array:
  """``activation.reference.selection_key`` (relu(x) in f32, NaN as +inf) from the bit pattern."""
  view, sign, inf = _BITS[jnp.dtype(x.dtype)]
  bits = jax.lax.bitcast_convert_type(x, view)
  mag = bits & view(sign - 1)
  key = jnp.where(mag > view(inf), view(inf), jnp.where(bits >= view(sign), view(0), bits))
  return _bits_to_f32(key, x.dtype)


def abs_f32(x32: jax.Array) -> jax.Array:
  """|x| of an f32 array by clearing the sign bit (never flushes subnormals)."""
  bits = jax.lax.bitcast_convert_type(x32, jnp.uint32) & jnp.uint32(0x7FFFFFFF)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def bits_dtype(m: int):
  """Smallest unsigned dtype with one bit per element of a group of ``m``."""
  if m <= 8:
    return jnp.uint8
  if m <= 16:
    return jnp.uint16
  return jnp.uint32


def output_specs(op: str, dtype, m: int, outputs: Sequence[str], value: str = "y") -> list[tuple[Any, fractions.Fraction]]:
  """``(dtype, fraction of the input's columns)`` of each requested output of a row-wise selection kernel.

  ``value`` (the op's own result, named ``"y"``, ``"h"`` or ``"s"``) is shaped like the input, ``"mask"`` is one bool
  per element and ``"bits"`` one bit per element packed per group of ``m``.

  Raises:
    ValueError: an output name the op does not have.
  """
  specs = []
  for o in outputs:
    if o == value:
      specs.append((dtype, fractions.Fraction(1)))
    elif o == "mask":
      specs.append((jnp.bool_, fractions.Fraction(1)))
    elif o == "bits":
      specs.append((bits_dtype(m), fractions.Fraction(1, m)))
    else:
      raise ValueError(f"{op}: unknown output {o!r}; expected some of {(value, 'mask', 'bits')}")
  return specs


def pack_bits(keep: Sequence[jax.Array]) -> jax.Array:
  """Bit i of the result is lane i's keep flag (the compact pattern a gradient mode expands on demand)."""
  dtype = bits_dtype(len(keep))
  out = keep[0].astype(dtype)
  for i, k in enumerate(keep[1:], start=1):
    out = out | (k.astype(dtype) << i)
  return out


def expand_bits(bits_RxG: jax.Array, m: int) -> jax.Array:
  """Bool (R, G*m) mask from the per-group bits (an XLA op, fused into its consumer where it is used)."""
  shifts = jnp.arange(m, dtype=bits_RxG.dtype)
  mask = ((bits_RxG[..., None] >> shifts) & 1).astype(jnp.bool_)
  return mask.reshape(*bits_RxG.shape[:-1], bits_RxG.shape[-1] * m)
