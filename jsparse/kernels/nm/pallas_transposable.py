"""Pallas-Triton kernel for the transposable 2:4 mask: exhaustive search over the 90 patterns of every 4x4 tile.

The kernel views ``x`` as ``(tile rows, 4, C)`` (free in XLA) and loads the four rows of a band of tiles as four
``(bt, bc)`` blocks; splitting each into 4 column lanes gives the 16 entries of every tile as 16 arrays, one element
per tile, so the search is elementwise. It performs exactly the reference's additions -- per row the pair sums
``key[a] + key[b]``, then ``((row0 + row1) + row2) + row3`` for every pattern, in :func:`transposable_patterns`
order -- and keeps the first maximum (strict ``>``), so its mask equals ``reference.transposable_24_mask`` bit for
bit. Partial sums shared by several patterns are computed once, in pattern order, so they die early.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jsparse.kernels._common import magnitude_key
from jsparse.kernels.nm import pallas_common as pc
from jsparse.kernels.nm import reference as ref
from jsparse.kernels.nm.pallas_common import BlockConfig

# block_rows counts rows of x (4 per tile row). Tuned on an H100 for 16384 x 8192 bf16.
DEFAULT_CONFIG = BlockConfig(block_rows=16, block_cols=256, num_warps=4, num_stages=1)
OUTPUTS = ("y", "mask")


def supports_transposable(x_BxRxC: jax.Array) -> tuple[bool, str]:
  """Whether :func:`transposable_24_select` takes this (batch, R, C) input."""
  ok, why = pc.dtype_supported(x_BxRxC)
  if not ok:
    return ok, why
  if jnp.ndim(x_BxRxC) != 3:
    return False, f"the kernel takes the 3-D (batch, R, C) view, got shape {tuple(jnp.shape(x_BxRxC))}"
  return True, ""


def _pattern_bits() -> list[int]:
  """Per pattern, its 4x4 mask as 16 bits (bit 4r + c)."""
  out = []
  for choice in ref.transposable_patterns():
    bits = 0
    for r, pair in enumerate(choice):
      for c in ref.ROW_PAIRS[pair]:
        bits |= 1 << (4 * r + c)
    out.append(bits)
  return out


def _search(keys):
  """keys[r][c]: (bt, bc/4) f32 arrays. Returns the chosen pattern's bits per tile (int32)."""
  pair_sums = [[keys[r][a] + keys[r][b] for a, b in ref.ROW_PAIRS] for r in range(4)]
  table = ref.transposable_patterns()
  bits = _pattern_bits()
  prefix2, prefix3 = {}, {}
  best = best_bits = None
  for p, (t0, t1, t2, t3) in enumerate(table.tolist()):
    if (t0, t1) not in prefix2:
      prefix2[(t0, t1)] = pair_sums[0][t0] + pair_sums[1][t1]
    if (t0, t1, t2) not in prefix3:
      prefix3[(t0, t1, t2)] = prefix2[(t0, t1)] + pair_sums[2][t2]
    score = prefix3[(t0, t1, t2)] + pair_sums[3][t3]
    if best is None:
      best, best_bits = score, jnp.full(score.shape, bits[p], jnp.int32)
    else:
      better = score > best  # strict: the first maximum wins, as jnp.argmax
      best = jnp.where(better, score, best)
      best_bits = jnp.where(better, jnp.int32(bits[p]), best_bits)
  return best_bits


def _kernel(x_ref, *out_refs, outputs):
  rows = [x_ref[:, r, :] for r in range(4)]  # (bt, bc) each: row r of every tile of the band
  lanes = [pc.deinterleave(row, 4) for row in rows]  # lanes[r][c]: entry (r, c) of every tile
  best_bits = _search([[magnitude_key(v) for v in lanes[r]] for r in range(4)])
  for r in range(4):
    keep = [((best_bits >> (4 * r + c)) & 1) != 0 for c in range(4)]
    for o, ref_ in zip(outputs, out_refs):
      if o == "y":
        ref_[:, r, :] = pc.interleave([jnp.where(k, v, jnp.zeros((), v.dtype)) for k, v in zip(keep, lanes[r])])
      else:
        ref_[:, r, :] = pc.interleave(keep)


def transposable_24_select(x_BxRxC: jax.Array, *, outputs=("mask",), interpret: bool = False,
                           config: BlockConfig | None = None) -> tuple[jax.Array, ...]:
  """The optimal transposable 2:4 selection of every 4x4 tile; returns the requested ``outputs`` ("y", "mask")."""
  config = config or DEFAULT_CONFIG
  outputs = tuple(outputs)
  for o in outputs:
    if o not in OUTPUTS:
      raise ValueError(f"transposable_24_select: unknown output {o!r}; expected some of {OUTPUTS}")
  B, R, C = x_BxRxC.shape
  T = B * R // 4
  x_Tx4xC = x_BxRxC.reshape(T, 4, C)  # tiles never straddle batches: R % 4 == 0
  bc = pc.pow2_block(C, max(config.block_cols, 4))
  bt = pc.pow2_block(T, max(1, min(config.block_rows // 4, pc.MAX_BLOCK_ELEMENTS // (4 * bc))))
  nc = C // bc

  def index_map(p):
    return p // nc, 0, p % nc

  spec = pl.BlockSpec((bt, 4, bc), index_map)
  shapes = tuple(jax.ShapeDtypeStruct((T, 4, C), x_BxRxC.dtype if o == "y" else jnp.bool_) for o in outputs)
  call = pc.pallas_call(lambda x_ref, *o: _kernel(x_ref, *o, outputs=outputs), out_shape=shapes,
                        grid=((T // bt) * nc,), in_specs=[spec], out_specs=tuple(spec for _ in outputs),
                        config=config, interpret=interpret, name="jsparse_transposable_24")
  return tuple(o.reshape(B, R, C) for o in call(x_Tx4xC))

