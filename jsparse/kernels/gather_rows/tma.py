"""Mosaic GPU (sm90) row gather: whole rows moved by bulk async copies, no register traffic.

Each CTA owns ``block_rows`` consecutive output rows. It reads their indices, issues one bulk GMEM -> SMEM copy per
row (a row is contiguous, so this is a plain ``cp.async.bulk`` of ``D * itemsize`` bytes, not a tensor-map TMA with
its 256-element box limit) on one barrier (a row whose index is out of range is copied from a row of zeros), and
writes the block back with one bulk SMEM -> GMEM copy of ``block_rows * D`` contiguous
elements. Several CTAs fit on an SM (``block_rows * D * itemsize`` bytes of SMEM each), which keeps enough bytes in
flight; the Triton engine (:mod:`pallas`) moves the same data through registers instead.

CPU: runs in Pallas' Mosaic GPU interpreter under :func:`jsparse.pallas_interpret`.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jsparse.kernels import _common as common

SMEM_BYTES = 227 * 1024  # per-CTA shared-memory limit on sm90


@dataclasses.dataclass(frozen=True)
class TmaGatherConfig:
  """Static launch configuration of the bulk-copy row gather.

  Attributes:
    block_rows: output rows per CTA (a power of two, shrunk to divide P; ``block_rows * D * itemsize`` bytes of SMEM).
  """

  block_rows: int = 8

  def __post_init__(self):
    v = self.block_rows
    if not isinstance(v, int) or v < 1 or v & (v - 1):
      raise ValueError(f"TmaGatherConfig: block_rows must be a positive power of two, got {v!r}")

  def fit(self, P: int, row_bytes: int) -> "TmaGatherConfig":
    """Rows halved until they divide P and their SMEM fits one CTA."""
    br = self.block_rows
    while br > 1 and (P % br or br * row_bytes > SMEM_BYTES):
      br //= 2
    return dataclasses.replace(self, block_rows=br)


def _bulk_copy_kwargs() -> dict:
  # A row copy is in bounds by construction (clamped index): promising it keeps it a plain bulk copy, where the
  # default zero-fill mode would ask for a tensor-map TMA (boxes of at most 256 elements per dimension).
  if "oob_mode" in inspect.signature(plgpu.copy_gmem_to_smem).parameters:
    return dict(oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
  return {}


def gather_rows(src_SxD: jax.Array, idx_P: jax.Array, *, config: TmaGatherConfig = TmaGatherConfig(),
                interpret: bool = False) -> jax.Array:
  """See ``reference.gather_rows``; rows of ``D * itemsize`` bytes, a multiple of 16."""
  S, D = src_SxD.shape
  (P,) = idx_P.shape
  dtype = src_SxD.dtype
  row_bytes = D * jnp.dtype(dtype).itemsize
  br = config.fit(P, row_bytes).block_rows
  copy_kwargs = _bulk_copy_kwargs()

  def body(idx_gmem, src_gmem, zero_gmem, out_gmem):
    base = lax.axis_index("blocks") * br

    def scoped(buf_smem, barrier):
      for i in range(br):
        row = idx_gmem[base + i]
        valid = (row >= 0) & (row < S)
        # Each row is one bulk copy either way (the barrier counts br arrivals): an out-of-range index copies the
        # zero row. Zeroing from registers instead would need a store layout that D < 128 does not have.
        @pl.when(valid)
        def _row():
          plgpu.copy_gmem_to_smem(src_gmem.at[pl.ds(row, 1)], buf_smem.at[pl.ds(i, 1)], barrier.at[0],
                                  **copy_kwargs)

        @pl.when(jnp.logical_not(valid))
        def _zero():
          plgpu.copy_gmem_to_smem(zero_gmem, buf_smem.at[pl.ds(i, 1)], barrier.at[0], **copy_kwargs)

      plgpu.barrier_wait(barrier.at[0])
      plgpu.copy_smem_to_gmem(buf_smem, out_gmem.at[pl.ds(base, br)])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(scoped, plgpu.SMEM((br, D), dtype), plgpu.Barrier(num_arrivals=br, num_barriers=1))

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((P, D), dtype),
      grid=(P // br,),
      grid_names=("blocks",),
      interpret=common.mosaic_interpret_params(interpret),
  )
  return kernel(idx_P.astype(jnp.int32), src_SxD, jnp.zeros((1, D), dtype))
