"""Pallas-Triton kernel for V:N:M (Venom) selection on a 2-D ``(R, C)`` array.

One program handles one block of ``v`` rows x ``bc`` columns (``bc/m`` column groups), one row at a time, so that
every step is elementwise inside a thread (a row's groups of ``m`` are split into lanes, as in the N:M kernel):

1. it sums the keys (|x| in f32, NaN as +inf) of every column in the reference's fixed order
   (:func:`jsparse.kernels.vnm.reference.halving_sum`), walking the halving tree depth first (rows in bit-reversed
   order), so the column sums are bit-identical and only ``log2(v)`` partial sums are live;
2. selects the 4 columns of each group with the largest sums (ties to the lower column) and precomputes, per group,
   which lane feeds which of the 4 "slots" (the selected columns in ascending order);
3. re-reads each row (from cache), gathers the 4 selected keys, keeps the ``n`` largest (ties to the lower column)
   and scatters the decision back to the ``m`` lanes, writing the requested outputs: ``"y"`` (pruned values),
   ``"mask"`` (bool) or ``"bits"`` (one bit per element, ``(R, C/m)``).

Performance (H100, 16384 x 8192 bf16, 64:2:8): ~0.59x the bandwidth of ``x*2``, short of the 0.8 goal. The second
pass is a loop whose row re-reads (cache hits) look latency-bound: the first pass hoists all v row loads, which took
168 registers per thread in a local Triton 3.6 compile (few warps per SM). Measured alternatives: 2-8 rows per loop
iteration (0.54-0.56x); an earlier design with 8-row slabs kept in registers and rank counting reached 0.80x, but
with the flushing |x| (see ``pallas_common.magnitude_key``), and was not re-measured with exact keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jsparse.kernels.nm import pallas_common as pc
from jsparse.kernels.nm.pallas import lane_ranks
from jsparse.kernels.nm.pallas_common import BlockConfig
from jsparse.kernels.vnm import reference as ref

# block_rows is ignored (a block is always v rows); block_cols is the column block. Tuned on an H100, 64:2:8 bf16
# (benchmarks/sparsify.py --tune): 0.56-0.59x the copy's bandwidth; see the module docstring for what limits it.
DEFAULT_CONFIG = BlockConfig(block_rows=64, block_cols=1024, num_warps=4, num_stages=1)
MAX_M = 32
MAX_BLOCK_ROWS = 256
SLOTS = ref.SELECTED_COLUMNS


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


def _column_sums(x_ref, v: int):
  """The reference's halving sum over the v rows: tree(t, s) = tree(t, 2s) + tree(t + s, 2s), leaves are rows."""
  def tree(t, stride):
    if stride == v:
      return pc.magnitude_key(x_ref[t])
    return tree(t, 2 * stride) + tree(t + stride, 2 * stride)
  return tree(0, 1)


def _kernel(x_ref, *out_refs, v: int, n: int, m: int, outputs):
  col_keys = pc.deinterleave(_column_sums(x_ref, v), m)  # (bc/m,) per lane
  selected = [r < SLOTS for r in lane_ranks(col_keys)]
  # slot[k][j]: lane j is the k-th selected column of its group (lane j can only be slot max(0, j-m+4)..min(3, j)).
  before = jnp.zeros(selected[0].shape, jnp.int32)
  slot = [[None] * m for _ in range(SLOTS)]
  for j in range(m):
    for k in range(max(0, j - m + SLOTS), min(SLOTS - 1, j) + 1):
      slot[k][j] = selected[j] & (before == k)
    before = before + selected[j].astype(jnp.int32)
  def row(r):
    lanes = pc.deinterleave(x_ref[r], m)
    keys = [pc.magnitude_key(lane) for lane in lanes]
    slot_keys = []
    for k in range(SLOTS):
      js = [j for j in range(m) if slot[k][j] is not None]
      value = keys[js[-1]]
      for j in reversed(js[:-1]):
        value = jnp.where(slot[k][j], keys[j], value)
      slot_keys.append(value)
    slot_keep = pc.keep_top_n(slot_keys, n)  # slots are in column order: ties go to the lower column
    keep = []
    for j in range(m):
      terms = [slot[k][j] & slot_keep[k] for k in range(SLOTS) if slot[k][j] is not None]
      kj = terms[0]
      for t in terms[1:]:
        kj = kj | t
      keep.append(kj)
    for o, out_ref in zip(outputs, out_refs):
      if o == "y":
        out_ref[r] = pc.interleave([jnp.where(k, lane, jnp.zeros((), lane.dtype)) for k, lane in zip(keep, lanes)])
      elif o == "mask":
        out_ref[r] = pc.interleave(keep)
      else:
        out_ref[r] = pc.pack_bits(keep)

  # A loop, not v unrolled copies: small code (fast to compile, also in interpret mode); the row's loads are cache hits.
  jax.lax.fori_loop(0, v, lambda r, carry: (row(r), carry)[1], 0)


def vnm_select(x_RxC: jax.Array, v: int, n: int, m: int, *, outputs=("y",), interpret: bool = False,
               config: BlockConfig | None = None) -> tuple[jax.Array, ...]:
  """V:N:M selection in one pass; returns the requested ``outputs`` (see the module docstring)."""
  config = config or DEFAULT_CONFIG
  outputs = tuple(outputs)
  R, C = x_RxC.shape
  bc = pc.pow2_block(C, max(m, config.block_cols))
  nc = C // bc

  def index_map(p):
    return p // nc, p % nc

  shapes, specs = [], []
  for dtype, frac in pc.output_specs("vnm_select", x_RxC.dtype, m, outputs):
    shapes.append(jax.ShapeDtypeStruct((R, int(C * frac)), dtype))
    specs.append(pl.BlockSpec((v, int(bc * frac)), index_map))
  call = pc.pallas_call(lambda x_ref, *o: _kernel(x_ref, *o, v=v, n=n, m=m, outputs=outputs), out_shape=tuple(shapes),
                        grid=((R // v) * nc,), in_specs=[pl.BlockSpec((v, bc), index_map)], out_specs=tuple(specs),
                        config=config, interpret=interpret, name=f"jsparse_vnm_{v}_{n}_{m}")
  return tuple(call(x_RxC))
