"""Packed sparse formats as pytrees: 2:4 (values + 2-bit indices) and V:N:M (values + kept columns + indices).

Both are jsparse's own layouts, documented here, for storage (compressed remat, checkpoints) and for the XLA/Pallas
paths. cuSPARSELt's compressed operand is a different, opaque layout produced by ``jsparse.compress_24``.

**Sparse24** (groups of 4 along the last axis ``K``):

* ``values``: ``(..., K/2)`` -- the two kept elements of each group, in index order.
* ``meta``: ``(..., ceil(K/8))`` uint8 -- per group a nibble ``idx0 | idx1 << 2`` (``idx0 < idx1``, the kept
  positions 0..3, the PTX sparse-MMA convention); group ``2j`` in the low nibble of byte ``j``, group ``2j+1`` in the
  high nibble. Storage is 9/16 of dense for 16-bit dtypes.

**VNMPacked** (2-D ``(R, C)``, blocks of ``v`` rows x ``m`` columns):

* ``values``: ``(R, C/m * n)`` -- per row and column group, the n kept elements in column order.
* ``columns``: ``(R/v, C/m, 4)`` uint8 -- the 4 selected columns of each block (0..m-1, ascending).
* ``meta``: ``(R, C/m)`` uint8 -- per row and group, n 2-bit fields: the kept elements' positions among the 4
  selected columns (ascending; field k at bits 2k..2k+1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jsparse.kernels import _common as common
from jsparse.kernels.nm import pallas_pack as nm_pallas_pack
from jsparse.kernels.nm import reference as nm_ref
from jsparse.kernels.vnm import api as vnm_api
from jsparse.kernels.vnm import reference as vnm_ref


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sparse24:
  """A 2:4-packed array (see the module docstring for the layout). ``shape``/``dtype`` are the dense ones."""

  values: jax.Array
  meta: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

  @property
  def dtype(self):
    return self.values.dtype

  @property
  def nbytes(self) -> int:
    """Bytes held (values + metadata)."""
    return self.values.size * self.values.dtype.itemsize + self.meta.size

  def to_dense(self) -> jax.Array:
    return unpack_24(self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VNMPacked:
  """A V:N:M-packed 2-D array (see the module docstring for the layout)."""

  values: jax.Array
  columns: jax.Array
  meta: jax.Array
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  v: int = dataclasses.field(metadata=dict(static=True))
  n: int = dataclasses.field(metadata=dict(static=True))
  m: int = dataclasses.field(metadata=dict(static=True))

  @property
  def dtype(self):
    return self.values.dtype

  @property
  def nbytes(self) -> int:
    return self.values.size * self.values.dtype.itemsize + self.columns.size + self.meta.size

  def to_dense(self) -> jax.Array:
    return unpack_vnm(self)


# ----------------------------------------------------------------------------------------------------------------------
# 2:4


def _first_last_kept(mask_Gx4: jax.Array) -> tuple[jax.Array, jax.Array]:
  idx0 = jnp.argmax(mask_Gx4, axis=-1).astype(jnp.uint8)
  idx1 = (3 - jnp.argmax(mask_Gx4[..., ::-1], axis=-1)).astype(jnp.uint8)
  return idx0, idx1


def pack_24(x: jax.Array, mask: jax.Array | None = None, *, implementation: str | None = None) -> Sparse24:
  """Packs ``x`` 2:4 along its last axis.

  Args:
    x: floating array, last axis a multiple of 4.
    mask: optional bool pattern (exactly 2 True per group of 4) to pack with; defaults to :func:`jsparse.nm_mask`.
      Pass the mask an op returned (e.g. ``squared_relu_nm(..., return_mask=True)``) to pack exactly that pattern.
    implementation: ``None`` (the Pallas kernel on a GPU, which selects and packs in one pass writing only values and
      metadata; XLA elsewhere), ``"pallas"`` or ``"xla"``. The kernel needs the last axis a multiple of 8.

  Returns:
    :class:`Sparse24`; ``unpack_24(pack_24(x, mask))`` equals ``where(mask, x, 0)`` bit for bit.

  Raises:
    ValueError: non-floating ``x``, rank 0, last axis not a multiple of 4, ``mask`` not bool or not shaped like
      ``x``, or ``implementation="pallas"`` where the kernel cannot run.
  """
  op = "pack_24"
  common.check_floating(op, "x", x)
  common.check_rank(op, "x", x, 1)
  common.check_multiple(op, "axis -1", x.shape[-1], 4, "m")
  if mask is not None:
    common.check_same_shape(op, ("x", "mask"), x, mask)
    if jnp.result_type(mask) != jnp.bool_:
      raise ValueError(f"{op}: mask must be bool, got {jnp.result_type(mask)}")
  *batch, K = x.shape
  x_RxK = x.reshape(-1, K)
  ok, why = nm_pallas_pack.supports_pack_24(x_RxK)
  impl = common.resolve_implementation(op, implementation, pallas_supports=ok, why_not=why)
  if impl == "pallas":
    mask_RxK = None if mask is None else mask.reshape(-1, K)
    values, meta = nm_pallas_pack.pack_24(x_RxK, mask_RxK, interpret=common.interpret_enabled())
    return Sparse24(values.reshape(*batch, K // 2), meta.reshape(*batch, K // 8), tuple(x.shape))
  if mask is None:
    mask = nm_ref.nm_mask(x, 2, 4)
  x_Gx4 = x.reshape(*batch, K // 4, 4)
  idx0, idx1 = _first_last_kept(mask.reshape(*batch, K // 4, 4))
  idx_Gx2 = jnp.stack([idx0, idx1], axis=-1).astype(jnp.int32)
  values = jnp.take_along_axis(x_Gx4, idx_Gx2, axis=-1).reshape(*batch, K // 2)
  nibble = idx0 | (idx1 << 2)
  if (K // 4) % 2:
    nibble = jnp.concatenate([nibble, jnp.zeros((*batch, 1), jnp.uint8)], axis=-1)
  nib_Bx2 = nibble.reshape(*batch, -1, 2)
  meta = (nib_Bx2[..., 0] | (nib_Bx2[..., 1] << 4)).astype(jnp.uint8)
  return Sparse24(values, meta, tuple(x.shape))


def unpack_24(packed: Sparse24) -> jax.Array:
  """Dense array of a :class:`Sparse24` (zeros where nothing was kept)."""
  *batch, K = packed.shape
  G = K // 4
  meta = packed.meta
  nibble = jnp.stack([meta & 0xF, meta >> 4], axis=-1).reshape(*batch, -1)[..., :G]
  idx0, idx1 = nibble & 0x3, (nibble >> 2) & 0x3
  vals_Gx2 = packed.values.reshape(*batch, G, 2)
  pos = jnp.arange(4, dtype=jnp.uint8)
  zero = jnp.zeros((), packed.values.dtype)
  dense = jnp.where(pos == idx0[..., None], vals_Gx2[..., :1], zero)
  dense = jnp.where(pos == idx1[..., None], vals_Gx2[..., 1:], dense)
  return dense.reshape(packed.shape)


# ----------------------------------------------------------------------------------------------------------------------
# V:N:M


def pack_vnm(x: jax.Array, v: int = 64, n: int = 2, m: int = 8) -> VNMPacked:
  """Packs a 2-D ``x`` in V:N:M (selection as :func:`jsparse.vnm_mask`).

  Returns:
    :class:`VNMPacked`; ``unpack_vnm(pack_vnm(x, v, n, m))`` equals ``where(vnm_mask(x, v, n, m), x, 0)`` exactly.
  """
  vnm_api.check_vnm("pack_vnm", x, v, n, m)
  R, C = x.shape
  G = C // m
  selected = vnm_ref.vnm_columns(x, v, m)  # (R/v, G, m)
  mask = vnm_ref.vnm_mask(x, v, n, m).reshape(R, G, m)
  # Selected columns in ascending order: a stable sort putting True first.
  columns = jnp.argsort(~selected, axis=-1, stable=True)[..., :vnm_ref.SELECTED_COLUMNS].astype(jnp.uint8)
  cols_RxGx4 = jnp.repeat(columns, v, axis=0).astype(jnp.int32)
  slab = jnp.take_along_axis(x.reshape(R, G, m), cols_RxGx4, axis=-1)
  slab_mask = jnp.take_along_axis(mask, cols_RxGx4, axis=-1)
  pos = jnp.argsort(~slab_mask, axis=-1, stable=True)[..., :n]  # kept positions among the 4, ascending
  values = jnp.take_along_axis(slab, pos, axis=-1).reshape(R, G * n)
  shifts = (2 * jnp.arange(n)).astype(jnp.uint8)
  meta = jnp.sum((pos.astype(jnp.uint8) << shifts), axis=-1, dtype=jnp.uint8)
  return VNMPacked(values, columns, meta, (R, C), v, n, m)


def unpack_vnm(packed: VNMPacked) -> jax.Array:
  """Dense array of a :class:`VNMPacked`."""
  R, C = packed.shape
  v, n, m = packed.v, packed.n, packed.m
  G = C // m
  shifts = (2 * jnp.arange(n)).astype(jnp.uint8)
  pos = ((packed.meta[..., None] >> shifts) & 0x3).astype(jnp.int32)  # (R, G, n)
  cols = jnp.repeat(packed.columns, v, axis=0).astype(jnp.int32)  # (R, G, 4)
  col_of_kept = jnp.take_along_axis(cols, pos, axis=-1)  # (R, G, n)
  vals = packed.values.reshape(R, G, n)
  j = jnp.arange(m)
  dense = jnp.zeros((R, G, m), vals.dtype)
  for k in range(n):  # where-chains, not sums: keeps -0.0 and NaN payloads bit for bit
    dense = jnp.where(col_of_kept[..., k:k + 1] == j, vals[..., k:k + 1], dense)
  return dense.reshape(R, C)
