"""The :class:`BitmaskPacked` layout: a bitmask plus the kept non-zeros packed into one fixed-capacity buffer.

JAX needs static shapes, so the packed values live in a buffer of ``capacity`` elements fixed at trace time. The
buffer is *global* (one for the whole tensor) and every row finds its slice through a prefix sum of the per-row
counts: a per-block capacity would have to be sized for the densest block, a global one only for the average
density, which for 85-98%-zero activations is several times less memory at the same overflow risk.

Layout of a ``(R, C)`` array (``C`` a multiple of 32):

* ``bits``: ``(R, C/32)`` uint32 -- bit ``b`` of word ``w`` in row ``i`` is set iff element ``(i, 32w + b)`` is
  stored. Storage is 1/16 of a 16-bit dense array.
* ``values``: ``(capacity,)`` -- the stored elements in row-major order. Entries past the last stored one are zero.
* ``row_offsets``: ``(R,)`` int32 -- position in ``values`` of row ``i``'s first stored element (an exclusive prefix
  sum of the per-row counts, saturated at ``capacity``).
* ``nnz``: ``()`` float32 -- how many non-zeros the input had (before capacity): the overflow metric's numerator.

Overflow: when the input has more than ``capacity`` non-zeros, the ones whose row-major position is ``>= capacity``
(a suffix: the last rows) are not stored and their bits are cleared, so ``unpack`` returns them as zeros. Ops that
compute with the stored values (``squared_relu_ffn``) therefore stay exact for the function they computed;
``dropped_fraction`` reports the loss. ``capacity = R * C`` never drops anything.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

WORD_BITS = 32
# Saturating prefix sums add two numbers <= MAX_CAPACITY, whose sum must fit in int32.
MAX_CAPACITY = 2**30 - 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BitmaskPacked:
  """A bitmask-compressed 2-D array (layout in the module docstring). ``shape`` is the dense shape."""

  bits: jax.Array
  values: jax.Array
  row_offsets: jax.Array
  nnz: jax.Array
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

  @property
  def dtype(self):
    return self.values.dtype

  @property
  def capacity(self) -> int:
    return self.values.shape[0]

  @property
  def nbytes(self) -> int:
    """Bytes held: bitmask + values buffer + row offsets (+ the 4-byte count)."""
    return (self.bits.size * 4 + self.values.size * self.values.dtype.itemsize + self.row_offsets.size * 4 + 4)

  @property
  def density(self) -> jax.Array:
    """Fraction of the input's elements that were non-zero."""
    return self.nnz / float(math.prod(self.shape))  # a Python float: T*F may exceed int32

  @property
  def dropped_fraction(self) -> jax.Array:
    """Fraction of the input's non-zeros that did not fit in ``capacity`` (0 when nothing was dropped)."""
    return jnp.maximum(self.nnz - self.capacity, 0.0) / jnp.maximum(self.nnz, 1.0)


def capacity_elements(op: str, shape: tuple[int, ...], capacity: float | int) -> int:
  """Turns the user's ``capacity`` into a number of elements.

  A float in (0, 1] is a fraction of the elements (the density the buffer holds without dropping); an int is an
  element count. Rounded up to a multiple of 128 so buffers stay aligned.

  Raises:
    ValueError: capacity out of range.
  """
  size = math.prod(shape)
  if isinstance(capacity, bool) or not isinstance(capacity, (int, float)):
    raise ValueError(f"{op}: capacity must be a float fraction in (0, 1] or an int element count, got {capacity!r}")
  if isinstance(capacity, float):
    if not 0.0 < capacity <= 1.0:
      raise ValueError(f"{op}: capacity as a fraction must be in (0, 1], got {capacity}")
    elements = math.ceil(capacity * size)
  else:
    if capacity < 1:
      raise ValueError(f"{op}: capacity must be positive, got {capacity}")
    elements = capacity
  elements = min(-(-elements // 128) * 128, max(size, 1))
  if elements > MAX_CAPACITY:
    raise ValueError(f"{op}: capacity of {elements} elements exceeds {MAX_CAPACITY}; compress smaller slices")
  return elements


def saturating_exclusive_cumsum(counts: jax.Array, limit: int) -> jax.Array:
  """Exclusive prefix sum of non-negative int32 ``counts``, saturated at ``limit`` (never overflows int32).

  Offsets past the capacity are all equivalent (nothing there is stored), so saturating keeps the arithmetic in
  int32 even for tensors of more than 2**31 elements.
  """
  if not 0 < limit <= MAX_CAPACITY:
    raise ValueError(f"saturating_exclusive_cumsum: limit must be in (0, {MAX_CAPACITY}], got {limit}")
  counts = jnp.minimum(counts.astype(jnp.int32), limit)
  inclusive = jax.lax.associative_scan(lambda a, b: jnp.minimum(a + b, limit), counts)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), inclusive[:-1]])


def pack_bits(keep_RxC: jax.Array) -> jax.Array:
  """(R, C) bool -> (R, C/32) uint32, bit b of word w <- column 32w + b."""
  R, C = keep_RxC.shape
  lanes = keep_RxC.reshape(R, C // WORD_BITS, WORD_BITS).astype(jnp.uint32)
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  return jnp.sum(lanes << shifts, axis=-1, dtype=jnp.uint32)


def unpack_bits(bits_RxW: jax.Array) -> jax.Array:
  """(R, W) uint32 -> (R, 32 W) bool (inverse of :func:`pack_bits`)."""
  R, W = bits_RxW.shape
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  return ((bits_RxW[..., None] >> shifts) & 1).astype(bool).reshape(R, W * WORD_BITS)
