"""Pallas-Triton kernel for ``pack_24``: 2:4 selection (or a given mask) straight into the packed layout.

One pass reads x (and the mask, if given) and writes only the packed outputs -- values ``(R, K/2)`` and nibble
metadata ``(R, K/8)`` uint8 in the :class:`jsparse.Sparse24` layout: per group ``idx0 | idx1 << 2`` (the first and the
last kept position), group ``2j`` in the low nibble of byte ``j``. For a mask that is not 2:4 the first/last rule
still matches the reference's (``argmax`` of the mask and of its reverse; 0 and 3 when nothing is kept).
"""

from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp

from jsparse.kernels.nm import pallas_common as pc
from jsparse.kernels.nm.pallas import launch_rowwise
from jsparse.kernels.nm.pallas_common import BlockConfig


# Tuned on an H100 for 16384 x 8192 bf16 (benchmarks/sparsify.py --tune).
DEFAULT_CONFIG = BlockConfig(block_rows=8, block_cols=1024, num_warps=8, num_stages=1)


def supports_pack_24(x_RxK: jax.Array) -> tuple[bool, str]:
  """Whether :func:`pack_24` takes this (rows, K) input."""
  ok, why = pc.dtype_supported(x_RxK)
  if not ok:
    return ok, why
  if jnp.ndim(x_RxK) != 2:
    return False, f"the kernel takes the 2-D (rows, K) view, got shape {tuple(jnp.shape(x_RxK))}"
  if x_RxK.shape[1] % 8:
    return False, f"K={x_RxK.shape[1]} (the kernel writes whole metadata bytes: K must be a multiple of 8)"
  return True, ""


def _first_last(keep):
  """(index, value-selector) of the first and the last kept lane, with the reference's defaults (0 and 3)."""
  k0, k1, k2, k3 = keep
  u8 = lambda i: jnp.uint8(i)
  first = jnp.where(k0, u8(0), jnp.where(k1, u8(1), jnp.where(k2, u8(2), jnp.where(k3, u8(3), u8(0)))))
  last = jnp.where(k3, u8(3), jnp.where(k2, u8(2), jnp.where(k1, u8(1), jnp.where(k0, u8(0), u8(3)))))
  return first, last


def _pick(lanes, idx):
  v0, v1, v2, v3 = lanes
  return jnp.where(idx == 0, v0, jnp.where(idx == 1, v1, jnp.where(idx == 2, v2, v3)))


def _body(x, *mask):
  lanes = pc.deinterleave(x, 4)
  if mask:
    keep = pc.deinterleave(mask[0], 4)
  else:
    keep = pc.keep_top_n([pc.magnitude_key(v) for v in lanes], 2)
  idx0, idx1 = _first_last(keep)
  values = pc.interleave([_pick(lanes, idx0), _pick(lanes, idx1)])  # (bm, bk/2)
  nibble = idx0 | (idx1 << 2)  # (bm, bk/4)
  lo, hi = pc.deinterleave(nibble, 2)  # groups 2j and 2j+1
  return values, lo | (hi << 4)


def pack_24(x_RxK: jax.Array, mask_RxK: jax.Array | None = None, *, interpret: bool = False,
            config: BlockConfig | None = None) -> tuple[jax.Array, jax.Array]:
  """(values (R, K/2), meta (R, K/8) uint8) of ``x`` packed 2:4 along its rows."""
  inputs = [x_RxK] if mask_RxK is None else [x_RxK, mask_RxK]
  specs = [(x_RxK.dtype, fractions.Fraction(1, 2)), (jnp.uint8, fractions.Fraction(1, 8))]
  values, meta = launch_rowwise(_body, inputs, specs, min_cols=8, config=config or DEFAULT_CONFIG,
                                interpret=interpret, name="jsparse_pack_24")
  return values, meta
