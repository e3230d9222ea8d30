"""Chunk-level pieces shared by the bitmask kernels (traced inside Pallas kernels, Triton backend).

A *chunk* is a ``(br, bc)`` tile of the input (``br`` rows of a band, ``bc`` columns), or its ``(br, bc/32, 32)``
view whose last axis is one bitmask word. Positions are a running per-row count plus a prefix sum along the chunk,
which is the row-major order of :mod:`jsparse.kernels.compress.reference`, so every kernel agrees with it bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.kernels.compress import format as fmt

try:  # Triton-specific masked load/store; absent only in JAX builds without the Triton backend.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pltriton = None


def square(r):
  """``r*r`` in float32, rounded to ``r.dtype`` (as :func:`jsparse.kernels.compress.reference.square`)."""
  r32 = r.astype(jnp.float32)
  return (r32 * r32).astype(r.dtype)


def nonzero(x, relu: bool):
  """Where ``reference.activation(x) != 0`` (what is stored), in one compare: with relu, ``x > 0`` or NaN, which is
  ``not x <= 0``; without, ``x != 0`` (NaN included, -0.0 not)."""
  return ~(x <= 0) if relu else x != 0


def lane_bits(shape):
  """``1 << lane`` (uint32) for a ``(br, bw, 32)`` word view: the bit each element owns in its word."""
  return jnp.uint32(1) << jax.lax.broadcasted_iota(jnp.uint32, shape, 2)


def popcount(words):
  """Set bits of uint32 words, as int32 (Triton's popc takes int32)."""
  return jax.lax.population_count(jax.lax.bitcast_convert_type(words, jnp.int32))


def word_positions(words, start):
  """Where a chunk's elements go in the values buffer, from its bitmask words alone (no prefix sum over elements).

  Args:
    words: uint32 ``(br, bw)``, the chunk's bitmask.
    start: int32 ``(br,)``, each row's position of its first element in this chunk.

  Returns:
    ``(pos, keep, next_start)``: int32 and bool ``(br, bw, 32)`` (the word view) -- the popcount of the words before
    plus that of the lanes below in the word -- and ``start`` plus the chunk's per-row count.
  """
  shape = words.shape + (fmt.WORD_BITS,)
  bits = lane_bits(shape)
  word_nz = popcount(words)
  wb = jnp.broadcast_to(words[:, :, None], shape)
  pos = start[:, None, None] + _exclusive_prefix(word_nz, 1)[:, :, None] + popcount(wb & (bits - 1))
  return pos, (wb & bits) != 0, start + jnp.sum(word_nz, axis=1)


def nonzero_count(x, relu: bool):
  """Per-row non-zeros of ``reference.activation(x)`` for a 2-D or word-shaped 3-D chunk: int32 ``(br,)``."""
  nz = nonzero(x, relu).astype(jnp.int32)
  while nz.ndim > 1:
    nz = jnp.sum(nz, axis=-1)
  return nz


def _exclusive_prefix(nz_i32, axis: int):
  return jnp.cumsum(nz_i32, axis=axis) - nz_i32


def pack_words(keep):
  """(br, bc) or (br, bw, 32) bool -> (br, bc/32) uint32, bit b of word w <- column 32w + b."""
  if keep.ndim == 2:
    br, bc = keep.shape
    keep = keep.reshape(br, bc // fmt.WORD_BITS, fmt.WORD_BITS)
  lanes = keep.astype(jnp.uint32)
  shifts = jax.lax.broadcasted_iota(jnp.uint32, lanes.shape, 2)
  return jnp.sum(lanes << shifts, axis=2)


def unpack_words(words, br: int, bc: int):
  """(br, bc/32) uint32 -> (br, bc) bool (inverse of :func:`pack_words` for 2-D chunks)."""
  shape = (br, bc // fmt.WORD_BITS, fmt.WORD_BITS)
  shifts = jax.lax.broadcasted_iota(jnp.uint32, shape, 2)
  lanes = (jnp.broadcast_to(words[:, :, None], shape) >> shifts) & jnp.uint32(1)
  return lanes.reshape(br, bc) != 0


def pack_chunk(x, start, capacity: int, relu: bool):
  """Positions of one chunk's non-zeros in the global values buffer.

  Args:
    x: the chunk, ``(br, bc)`` or ``(br, bw, 32)``.
    start: int32 ``(br,)``, each row's position of its first element in this chunk (row offset + earlier chunks).
    capacity: the values buffer's size; positions at or past it are not stored.
    relu: pack ``relu(x)``.

  Returns:
    ``(r, pos, keep, words, next_start)``: the values to store (``x`` itself: ``relu(x) == x`` wherever it is
    non-zero), their positions, which are stored, the chunk's bitmask words ``(br, bw)`` and ``start`` plus the
    chunk's per-row non-zeros.
  """
  r = x
  nz = nonzero(x, relu).astype(jnp.int32)
  if x.ndim == 2:
    within = _exclusive_prefix(nz, 1)
    row_nz = jnp.sum(nz, axis=1)
    pos = start[:, None] + within
  else:  # word view: prefix over each word's 32 lanes plus the words before it (no reshape in the kernel)
    word_nz = jnp.sum(nz, axis=2)
    within = _exclusive_prefix(word_nz, 1)[:, :, None] + _exclusive_prefix(nz, 2)
    row_nz = jnp.sum(word_nz, axis=1)
    pos = start[:, None, None] + within
  keep = (nz != 0) & (pos < capacity)
  return r, pos, keep, pack_words(keep), start + row_nz


def store_chunk(values_ref, r, pos, keep, capacity: int):
  """Scatters the kept ``r`` into the values buffer (masked-off lanes point past it: Triton never touches them, and
  the interpreter's scatter drops them, where an in-bounds dummy index could race a real store to that slot)."""
  pltriton.store(values_ref.at[jnp.where(keep, pos, capacity)], r, mask=keep)


def kept_square(r, keep):
  """``h``: the square of the stored values, zeros elsewhere."""
  return jnp.where(keep, square(r), jnp.zeros((), r.dtype))
