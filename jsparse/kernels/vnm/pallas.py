"""Pallas-Triton kernel for V:N:M (Venom) selection on a 2-D ``(R, C)`` array.

One program handles one block of ``v`` rows x ``bc`` columns (``bc/m`` column groups). It loads the rows as slabs of
up to 8 rows, which stay in registers for the whole program, and

1. sums the keys (|x| in f32, NaN as +inf) of every column in the reference's fixed order
   (:func:`jsparse.kernels.vnm.reference.halving_sum`: slab j + slab j+S/2, ..., then inside the last slab top half +
   bottom half through 2-element reductions, which have only one order), so column sums are bit-identical;
2. selects the 4 columns of each group of ``m`` with the largest sums (ties to the lower column);
3. keeps, per row, the ``n`` largest of those 4 (ties to the lower column) and writes the requested outputs:
   ``"y"`` (pruned values), ``"mask"`` (bool) or ``"bits"`` (one bit per element, ``(R, C/m)``).
"""

from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jsparse.kernels._common import magnitude_key
from jsparse.kernels.nm import pallas_common as pc
from jsparse.kernels.nm.pallas import lane_ranks
from jsparse.kernels.nm.pallas_common import BlockConfig
from jsparse.kernels.vnm import reference as ref

# block_rows is ignored (a block is always v rows); block_cols is the column block. Tuned on an H100, 64:2:8 bf16.
DEFAULT_CONFIG = BlockConfig(block_rows=64, block_cols=128, num_warps=4, num_stages=1)
SLAB_ROWS = 8
MAX_M = 32
MAX_BLOCK_ROWS = 256
OUTPUTS = ("y", "mask", "bits")


def supports_vnm(x_RxC: jax.Array, v: int, n: int, m: int) -> tuple[bool, str]:
  """Whether :func:`vnm_select` takes this input (already validated by ``check_vnm``)."""
  ok, why = pc.dtype_supported(x_RxC)
  if not ok:
    return ok, why
  if not pc.is_pow2(v) or v > MAX_BLOCK_ROWS:
    return False, f"v={v} (the kernel takes v a power of two up to {MAX_BLOCK_ROWS})"
  if not pc.is_pow2(m) or m > MAX_M:
    return False, f"m={m} (the kernel takes m a power of two up to {MAX_M})"
  return True, ""


def _column_sums(keys_slabs, bc: int):
  """The reference's halving sum over all rows of the block: (1, bc) f32."""
  level = list(keys_slabs)
  while len(level) > 1:
    h = len(level) // 2
    level = [level[i] + level[i + h] for i in range(h)]
  acc = level[0]
  rows = acc.shape[0]
  while rows > 1:
    h = rows // 2
    acc = jnp.sum(acc.reshape(2, h, bc), axis=0)  # a 2-element sum: top row + bottom row, whatever the order
    rows = h
  return acc


def _kernel(x_ref, *out_refs, v: int, n: int, m: int, outputs):
  bc = x_ref.shape[-1]
  rs = min(v, SLAB_ROWS)
  slabs = [x_ref[pl.ds(s * rs, rs), :] for s in range(v // rs)]
  col_sum = _column_sums([magnitude_key(s) for s in slabs], bc)
  selected = [r < ref.SELECTED_COLUMNS for r in lane_ranks(pc.deinterleave(col_sum, m))]  # (1, bc/m) each
  for s, slab in enumerate(slabs):
    lanes = pc.deinterleave(slab, m)
    # Unselected columns rank behind every selected one (keys are >= 0), as in the reference.
    masked = [jnp.where(sel, magnitude_key(lane), -1.0) for sel, lane in zip(selected, lanes)]
    keep = [(r < n) & sel for r, sel in zip(lane_ranks(masked), selected)]
    for o, out_ref in zip(outputs, out_refs):
      if o == "y":
        value = pc.interleave([jnp.where(k, lane, jnp.zeros((), lane.dtype)) for k, lane in zip(keep, lanes)])
      elif o == "mask":
        value = pc.interleave(keep)
      else:
        value = pc.pack_bits(keep)
      out_ref[pl.ds(s * rs, rs), :] = value


def vnm_select(x_RxC: jax.Array, v: int, n: int, m: int, *, outputs=("y",), interpret: bool = False,
               config: BlockConfig | None = None) -> tuple[jax.Array, ...]:
  """V:N:M selection in one pass; returns the requested ``outputs`` (see the module docstring)."""
  config = config or DEFAULT_CONFIG
  outputs = tuple(outputs)
  R, C = x_RxC.shape
  bc = pc.pow2_block(C, max(m, min(config.block_cols, max(m, pc.MAX_BLOCK_ELEMENTS // v))))
  nc = C // bc

  def index_map(p):
    return p // nc, p % nc

  shapes, specs = [], []
  for o in outputs:
    if o == "y":
      dtype, frac = x_RxC.dtype, fractions.Fraction(1)
    elif o == "mask":
      dtype, frac = jnp.bool_, fractions.Fraction(1)
    elif o == "bits":
      dtype, frac = pc.bits_dtype(m), fractions.Fraction(1, m)
    else:
      raise ValueError(f"vnm_select: unknown output {o!r}; expected some of {OUTPUTS}")
    shapes.append(jax.ShapeDtypeStruct((R, int(C * frac)), dtype))
    specs.append(pl.BlockSpec((v, int(bc * frac)), index_map))
  call = pc.pallas_call(lambda x_ref, *o: _kernel(x_ref, *o, v=v, n=n, m=m, outputs=outputs), out_shape=tuple(shapes),
                        grid=((R // v) * nc,), in_specs=[pl.BlockSpec((v, bc), index_map)], out_specs=tuple(specs),
                        config=config, interpret=interpret, name=f"jsparse_vnm_{v}_{n}_{m}")
  return tuple(call(x_RxC))
