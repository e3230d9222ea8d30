"""Pallas (Triton backend) row gather: ``out[p] = src[idx[p]]``, zero rows where ``idx[p]`` is out of range.

Why a kernel when ``jnp.take`` exists: XLA lowers this gather to a loop fusion that took 118-132 us per move of
16384 x 4096 bf16 rows in the routed FFN's H100 profile (7b, E=8), about 2.2 TB/s by the bytes moved, where an XLA copy
measured 2.75 TB/s (``benchmarks/results/remat.json``).
Rows here are long and contiguous (D elements), so each program loads a ``(block_rows, block_cols)`` tile as
``block_rows`` contiguous row segments (the index times the constexpr row length keeps the 16-byte alignment Triton
needs to vectorise) and stores it contiguously. Out-of-range indices are masked loads (``other=0``), so the padding
rows of the routed layout cost a store and no read.

Index blocks are read once per program; the grid is ``(P / block_rows, D / block_cols)``, small tiles and many
programs, so the GPU's occupancy rather than software pipelining keeps enough loads in flight.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # Triton-specific masked load; absent only in JAX builds without the Triton backend.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pltriton = None


@dataclasses.dataclass(frozen=True)
class GatherConfig:
  """Static launch configuration of the row gather.

  Attributes:
    block_rows: output rows per program (must divide P).
    block_cols: columns per program (must divide D).
    num_warps: Triton warps per program.
  """

  block_rows: int = 8
  block_cols: int = 1024
  num_warps: int = 4

  def __post_init__(self):
    for name in ("block_rows", "block_cols", "num_warps"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1 or v & (v - 1):
        raise ValueError(f"GatherConfig: {name} must be a positive power of two, got {v!r}")

  def fit(self, P: int, D: int) -> "GatherConfig":
    """This config with blocks shrunk (halved) until they divide ``(P, D)``."""
    br, bc = self.block_rows, self.block_cols
    while P % br:
      br //= 2
    while D % bc:
      bc //= 2
    return dataclasses.replace(self, block_rows=br, block_cols=bc)


def _gather_kernel(idx_ref, src_ref, out_ref, *, num_src: int, bc: int):
  idx = idx_ref[...]
  valid = (idx >= 0) & (idx < num_src)
  rows = jnp.where(valid, idx, 0)[:, None]
  # Column indices as an array (Triton's usual `start + arange`; still contiguous and 16-byte aligned for its
  # vectoriser): a ``pl.ds`` next to an integer-array index is a mix the CPU interpreter cannot discharge.
  cols = pl.multiple_of(pl.program_id(1) * bc, bc) + jax.lax.broadcasted_iota(jnp.int32, (1, bc), 1)
  mask = jnp.broadcast_to(valid[:, None], out_ref.shape)
  out_ref[...] = pltriton.load(src_ref.at[rows, cols], mask=mask, other=0)


def gather_rows(src_SxD: jax.Array, idx_P: jax.Array, *, config: GatherConfig = GatherConfig(),
                interpret: bool = False) -> jax.Array:
  """See ``reference.gather_rows``; the config's blocks are fitted to ``(P, D)``."""
  S, D = src_SxD.shape
  (P,) = idx_P.shape
  cfg = config.fit(P, D)
  br, bc = cfg.block_rows, cfg.block_cols
  kernel = functools.partial(_gather_kernel, num_src=S, bc=bc)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((P, D), src_SxD.dtype),
      grid=(P // br, D // bc),
      in_specs=[pl.BlockSpec((br,), lambda i, j: (i,)), pl.BlockSpec((S, D), lambda i, j: (0, 0))],
      out_specs=pl.BlockSpec((br, bc), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
      interpret=interpret,
      name="jsparse_gather_rows",
  )(idx_P.astype(jnp.int32), src_SxD)
