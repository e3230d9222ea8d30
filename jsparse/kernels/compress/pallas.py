"""Pallas GPU kernels of the bitmask packer (Triton backend; CPU interpret twins): the two-pass packer and unpack.

Where jsparse's CUDA library builds, ``jsparse.pack_bitmask`` / ``unpack_bitmask`` run its CUDA kernels
(:mod:`jsparse.kernels.compress.cuda`); elsewhere on a GPU ``pack_bitmask`` packs with the Pallas single-pass kernel
(:mod:`jsparse.kernels.compress.single_pass`, 1.4x faster end to end on the H100 than ``count`` + ``pack`` here, which
remain as its baseline in ``benchmarks/remat.py`` and its oracle's twin in the tests) and ``unpack_bitmask`` runs
``unpack``.

Three kernels, each a grid over bands of ``block_rows`` rows that walks its band in chunks of ``block_cols``
columns (so any row length that is a multiple of the chunk works, e.g. F = 14336):

* ``count``: non-zeros per row (pass 1; reads the input once).
* ``pack``: with the rows' offsets known (an exclusive prefix sum of the counts, in XLA: a few kB), writes the
  bitmask, scatters the non-zeros into the global values buffer and optionally the dense ``h = r*r`` of the stored
  values (pass 2; fused with the squared ReLU in the FFN, so the FFN forward pays one extra read of ``y1``, not a
  separate activation pass).
* ``unpack``: gathers the values back into the dense array (and optionally ``h``), one pass.

Positions inside a chunk come from a running per-row count plus a prefix sum along the chunk, matching the
row-major order of :mod:`jsparse.kernels.compress.reference` exactly, so kernels and reference agree bit for bit.

``pl.pallas_call`` is given Triton ``CompilerParams`` explicitly: JAX 0.10 would otherwise pick Mosaic GPU (which has
no cumsum), and JAX 0.11 lowers ``pallas_call`` only through Triton anyway.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jsparse.kernels.compress import _chunks as chunks_lib
from jsparse.kernels.compress import format as fmt
from jsparse.kernels.compress._chunks import pltriton

BLOCK_ROWS = (16, 8, 4, 2, 1)
BLOCK_COLS = (1024, 512, 256, 128, 64, 32)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def supports(shape: tuple[int, ...], dtype) -> tuple[bool, str]:
  """Whether the kernels handle an input of this shape/dtype (else the caller uses the reference)."""
  if pltriton is None:
    return False, "this JAX has no Pallas Triton backend"
  if len(shape) != 2:
    return False, f"expects a 2-D array, got shape {shape}"
  if jnp.dtype(dtype) not in DTYPES:
    return False, f"dtype {jnp.dtype(dtype)} is not one of bfloat16, float16, float32"
  if shape[1] % 32:
    return False, f"the row length {shape[1]} is not a multiple of 32"
  if shape[0] * shape[1] >= 2**31:
    return False, f"{shape[0] * shape[1]} elements: the kernels index in int32 (< 2**31)"
  return True, ""


def default_blocks(shape: tuple[int, int], kernel: str = "pack") -> tuple[int, int]:
  """(block_rows, block_cols) dividing the shape: 8 x 1024 for ``count``, 4 x 1024 for ``pack``/``unpack``.

  Chosen by the H100 sweep in ``benchmarks/remat.py`` (16384 x 8192 bf16, 85% zeros): count 0.118 ms at 8 x 1024
  vs 0.153 at 4 x 1024; pack 0.53 ms at 4 x 1024 vs 0.63 at 8 x 1024; unpack+square 0.30 vs 0.33.
  """
  R, C = shape
  rows = 8 if kernel == "count" else 4
  br = next(b for b in BLOCK_ROWS if b <= rows and R % b == 0)
  bc = next(b for b in BLOCK_COLS if C % b == 0)
  return br, bc


def _params(num_warps: int, num_stages: int = 1):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------------------------------
# count


def _count_kernel(x_ref, counts_ref, *, relu: bool, br: int, bc: int, chunks: int):
  def body(k, acc):
    return acc + chunks_lib.nonzero_count(x_ref[:, pl.ds(pl.multiple_of(k * bc, bc), bc)], relu)

  counts_ref[...] = jax.lax.fori_loop(0, chunks, body, jnp.zeros((br,), jnp.int32))


def count(x_RxC: jax.Array, *, relu: bool, block_rows: int | None = None, block_cols: int | None = None,
          num_warps: int = 4, num_stages: int = 1, interpret: bool = False) -> jax.Array:
  """Non-zeros per row of ``activation(x)``, int32 ``(R,)``."""
  R, C = x_RxC.shape
  br, bc = _blocks(x_RxC.shape, block_rows, block_cols, "count")
  kernel = functools.partial(_count_kernel, relu=relu, br=br, bc=bc, chunks=C // bc)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((R,), jnp.int32), grid=(R // br,),
      in_specs=[pl.BlockSpec((br, C), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((br,), lambda i: (i,)),
      compiler_params=_params(num_warps, num_stages), interpret=interpret, name="jsparse_bitmask_count")(x_RxC)


# ----------------------------------------------------------------------------------------------------------------------
# pack


def _pack_kernel(x_ref, offsets_ref, values_in_ref, bits_ref, values_ref, *h_ref, relu: bool, capacity: int,
                 bc: int, chunks: int):
  del values_in_ref  # aliased to values_ref: a zeroed buffer, so the unused tail reads as zeros
  bw = bc // fmt.WORD_BITS

  def body(k, start):
    col = pl.multiple_of(k * bc, bc)
    r, pos, keep, words, start = chunks_lib.pack_chunk(x_ref[:, pl.ds(col, bc)], start, capacity, relu)
    chunks_lib.store_chunk(values_ref, r, pos, keep, capacity)
    bits_ref[:, pl.ds(pl.multiple_of(k * bw, bw), bw)] = words
    if h_ref:
      h_ref[0][:, pl.ds(col, bc)] = chunks_lib.kept_square(r, keep)
    return start

  jax.lax.fori_loop(0, chunks, body, offsets_ref[...])


def pack(x_RxC: jax.Array, row_offsets: jax.Array, capacity: int, *, relu: bool, square_out: bool,
         block_rows: int | None = None, block_cols: int | None = None, num_warps: int = 4, num_stages: int = 1,
         interpret: bool = False):
  """Pass 2 of the two-pass packer. Returns ``(bits, values)`` and, with ``square_out``, ``h``."""
  R, C = x_RxC.shape
  br, bc = _blocks(x_RxC.shape, block_rows, block_cols)
  out_shape = [jax.ShapeDtypeStruct((R, C // fmt.WORD_BITS), jnp.uint32),
               jax.ShapeDtypeStruct((capacity,), x_RxC.dtype)]
  out_specs = [pl.BlockSpec((br, C // fmt.WORD_BITS), lambda i: (i, 0)),
               pl.BlockSpec((capacity,), lambda i: (0,))]
  if square_out:
    out_shape.append(jax.ShapeDtypeStruct((R, C), x_RxC.dtype))
    out_specs.append(pl.BlockSpec((br, C), lambda i: (i, 0)))
  kernel = functools.partial(_pack_kernel, relu=relu, capacity=capacity, bc=bc, chunks=C // bc)
  return pl.pallas_call(
      kernel, out_shape=tuple(out_shape), grid=(R // br,),
      in_specs=[pl.BlockSpec((br, C), lambda i: (i, 0)), pl.BlockSpec((br,), lambda i: (i,)),
                pl.BlockSpec((capacity,), lambda i: (0,))],
      out_specs=tuple(out_specs), input_output_aliases={2: 1},
      compiler_params=_params(num_warps, num_stages), interpret=interpret, name="jsparse_bitmask_pack",
  )(x_RxC, row_offsets, jnp.zeros((capacity,), x_RxC.dtype))


# ----------------------------------------------------------------------------------------------------------------------
# unpack


def _unpack_kernel(bits_ref, offsets_ref, values_ref, r_ref, *h_ref, br: int, bc: int, chunks: int, words: bool,
                   popc: bool):
  bw = bc // fmt.WORD_BITS
  capacity = values_ref.shape[0]

  def body(k, start):
    w = bits_ref[:, pl.ds(pl.multiple_of(k * bw, bw), bw)]
    word_cols = (slice(None), pl.ds(pl.multiple_of(k * bw, bw), bw), slice(None))
    if popc:  # (br, bw, 32) view, positions from popcounts: no prefix sum over the chunk's elements
      pos, keep, next_start = chunks_lib.word_positions(w, start)
      cols = word_cols
    elif words:  # (br, bw, 32) view: lane prefix plus the words before, no reshape
      shape = (br, bw, fmt.WORD_BITS)
      lanes = jax.lax.broadcasted_iota(jnp.uint32, shape, 2)
      nz = ((jnp.broadcast_to(w[:, :, None], shape) >> lanes) & jnp.uint32(1)).astype(jnp.int32)
      word_nz = jnp.sum(nz, axis=2)
      pos = (start[:, None, None] + (jnp.cumsum(word_nz, axis=1) - word_nz)[:, :, None]
             + jnp.cumsum(nz, axis=2) - nz)
      keep, next_start, cols = nz != 0, start + jnp.sum(word_nz, axis=1), word_cols
    else:
      nz = chunks_lib.unpack_words(w, br, bc).astype(jnp.int32)
      pos = start[:, None] + jnp.cumsum(nz, axis=1) - nz
      keep, next_start = nz != 0, start + jnp.sum(nz, axis=1)
      cols = (slice(None), pl.ds(pl.multiple_of(k * bc, bc), bc))
    r = pltriton.load(values_ref.at[jnp.where(keep, pos, capacity - 1)], mask=keep, other=0)
    r = jnp.where(keep, r, jnp.zeros((), r.dtype))
    r_ref[cols] = r
    if h_ref:
      h_ref[0][cols] = chunks_lib.kept_square(r, keep)
    return next_start

  jax.lax.fori_loop(0, chunks, body, offsets_ref[...])


def unpack(bits: jax.Array, row_offsets: jax.Array, values: jax.Array, shape: tuple[int, int], *,
           square_out: bool, block_rows: int | None = None, block_cols: int | None = None, num_warps: int = 4,
           num_stages: int = 1, words: bool = False, popc: bool = False, interpret: bool = False):
  """Dense ``r`` (and ``h`` with ``square_out``) from the packed arrays; ``words`` writes through the
  ``(R, C/32, 32)`` view; ``popc`` (implies ``words``) places the values by popcounts of the bitmask words
  (:func:`_chunks.word_positions`) instead of a prefix sum over each chunk's elements."""
  R, C = shape
  br, bc = _blocks(shape, block_rows, block_cols)
  capacity = values.shape[0]
  words = words or popc
  dense = (R, C // fmt.WORD_BITS, fmt.WORD_BITS) if words else (R, C)
  dense_spec = pl.BlockSpec((br,) + dense[1:], lambda i: (i,) + (0,) * (len(dense) - 1))
  out_shape = [jax.ShapeDtypeStruct(dense, values.dtype)] * (2 if square_out else 1)
  kernel = functools.partial(_unpack_kernel, br=br, bc=bc, chunks=C // bc, words=words, popc=popc)
  out = pl.pallas_call(
      kernel, out_shape=tuple(out_shape), grid=(R // br,),
      in_specs=[pl.BlockSpec((br, C // fmt.WORD_BITS), lambda i: (i, 0)), pl.BlockSpec((br,), lambda i: (i,)),
                pl.BlockSpec((capacity,), lambda i: (0,))],
      out_specs=tuple([dense_spec] * len(out_shape)),
      compiler_params=_params(num_warps, num_stages), interpret=interpret, name="jsparse_bitmask_unpack",
  )(bits, row_offsets, values)
  out = [o.reshape(R, C) for o in out]
  return tuple(out) if square_out else out[0]


def _blocks(shape, block_rows, block_cols, kernel: str = "pack") -> tuple[int, int]:
  R, C = shape
  br, bc = default_blocks(shape, kernel)
  br = block_rows or br
  bc = block_cols or bc
  if R % br or C % bc or bc % fmt.WORD_BITS:
    raise ValueError(f"bitmask kernels: blocks ({br}, {bc}) do not tile shape {shape}")
  return br, bc
