"""Pure-jnp bitmask compression: the spec of the :class:`~jsparse.kernels.compress.format.BitmaskPacked` layout,
the CPU path and the test oracle of the Pallas kernels.

``pack(x)`` stores the non-zeros of ``x`` (NaN counts as non-zero and is stored). With ``relu=True`` the op packs
``relu(x)`` instead, and with ``square=True`` it also returns ``h = where(stored, r*r, 0)`` (the squared-ReLU FFN's
activation, computed in float32 and rounded to ``x.dtype``) -- computed from exactly the stored values, so a forward
pass using ``h`` stays consistent with the backward pass that unpacks ``r`` even when capacity overflows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.kernels.compress import format as fmt


def activation(x: jax.Array, relu: bool) -> jax.Array:
  """``relu(x)`` (NaN kept as NaN) or ``x``: the values the packer stores."""
  if not relu:
    return x
  return jnp.where(x > 0, x, jnp.where(jnp.isnan(x), x, jnp.zeros((), x.dtype)))


def nonzero(r: jax.Array) -> jax.Array:
  """Elements to store: everything not equal to zero (NaN included)."""
  return r != 0


def square(r: jax.Array) -> jax.Array:
  """``r*r`` in float32, rounded to ``r.dtype`` (the rounding every squared-ReLU path in jsparse uses)."""
  r32 = r.astype(jnp.float32)
  return (r32 * r32).astype(r.dtype)


def row_counts(x_RxC: jax.Array, relu: bool) -> jax.Array:
  """Non-zeros per row of ``activation(x)`` (int32): pass 1 of the two-pass packer."""
  return jnp.sum(nonzero(activation(x_RxC, relu)), axis=1, dtype=jnp.int32)


def pack(x_RxC: jax.Array, capacity: int, *, relu: bool = False, square_out: bool = False):
  """Packs ``activation(x)`` into a :class:`BitmaskPacked` of ``capacity`` elements.

  Returns:
    ``packed`` or, with ``square_out``, ``(packed, h)`` where ``h`` is ``square`` of the stored values (dense).
  """
  R, C = x_RxC.shape
  r = activation(x_RxC, relu)
  nz = nonzero(r)
  counts = jnp.sum(nz, axis=1, dtype=jnp.int32)
  row_offsets = fmt.saturating_exclusive_cumsum(counts, capacity)
  within = jnp.cumsum(nz, axis=1, dtype=jnp.int32) - nz.astype(jnp.int32)
  pos = row_offsets[:, None] + within
  keep = nz & (pos < capacity)
  values = jnp.zeros((capacity,), x_RxC.dtype).at[jnp.where(keep, pos, capacity)].set(r, mode="drop")
  nnz = jnp.sum(counts.astype(jnp.float32))
  packed = fmt.BitmaskPacked(fmt.pack_bits(keep), values, row_offsets, nnz, (R, C))
  if not square_out:
    return packed
  return packed, jnp.where(keep, square(r), jnp.zeros((), x_RxC.dtype))


def unpack(packed: fmt.BitmaskPacked, *, square_out: bool = False):
  """Dense ``(R, C)`` array of a :class:`BitmaskPacked` (zeros where nothing is stored); with ``square_out`` also
  ``square`` of it."""
  keep = fmt.unpack_bits(packed.bits)
  within = jnp.cumsum(keep, axis=1, dtype=jnp.int32) - keep.astype(jnp.int32)
  pos = jnp.minimum(packed.row_offsets[:, None] + within, packed.capacity - 1)
  zero = jnp.zeros((), packed.dtype)
  r = jnp.where(keep, packed.values[pos], zero)
  if not square_out:
    return r
  return r, jnp.where(keep, square(r), zero)
