"""Single-pass bitmask packer: one Pallas (Triton) kernel, rows' offsets by a decoupled look-back.

The two-pass packer (:mod:`jsparse.kernels.compress.pallas`) reads the input from device memory twice: once to
count every row's non-zeros (their prefix sum places each row in the global values buffer), once to pack. This kernel
reads it once:

1. Each program takes the next band of ``block_rows`` rows -- a ticket from an atomic counter, so a program only ever
   waits for bands that running programs hold, whatever order the GPU starts programs in -- and counts its non-zeros.
2. It publishes that count (the band's *aggregate*) in a flag array, then looks back over its predecessors' flags a
   window at a time, adding aggregates until it meets an *inclusive prefix* (Merrill & Garland's decoupled look-back,
   as in CUB's single-pass scan), and publishes its own inclusive prefix: its rows' offsets are now known.
3. It packs the band: bitmask, values scattered into the global buffer, optionally ``h = r*r``. The band is either
   kept in registers since step 1 (``hold``) or read again: a band read microseconds ago is still in the 50 MB L2, so
   the second read costs L2, not device-memory, bandwidth.

Programs past the last band wait for its inclusive prefix (the number of values kept) and zero the values buffer's
unused tail, so every output element is written exactly once and no memset runs before the kernel.

Flags: one int32 per band: 0 = nothing yet, ``1 + a`` = aggregate ``a``, ``INCLUSIVE + p`` = inclusive prefix ``p``.
Both saturate at the capacity (< 2**30, :data:`format.MAX_CAPACITY`), so codes fit in int32 and only ever grow
(published with an atomic max). Element ``0`` of the state array is the ticket counter.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jsparse.kernels.compress import _chunks as chunks_lib
from jsparse.kernels.compress import format as fmt
from jsparse.kernels.compress._chunks import pltriton

INCLUSIVE = 2**30 + 1  # flag code of an inclusive prefix; aggregates are coded 1 + a <= 1 + MAX_CAPACITY < INCLUSIVE
ZERO_BLOCK = 2048  # elements per store in the tail-zeroing loop (or the span, if smaller)
# Spin bound (flag reads, each an L2 round trip of ~1 us): only a bug could make a wait this long, and a bounded wait
# turns that bug into wrong results the tests catch instead of a hung GPU.
MAX_SPINS = 2**22


@dataclasses.dataclass(frozen=True)
class PackConfig:
  """Static launch configuration of the single-pass packer.

  Attributes:
    block_rows: rows per band (one program each); must divide the row count.
    block_cols: columns per chunk (a power of two dividing the row length); a band is walked chunk by chunk.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth of the chunk loops.
    hold: keep the band's chunks in registers between counting and packing (static unroll) instead of re-reading.
    words: load chunks as ``(rows, cols/32, 32)`` (one bitmask word per last-axis row) instead of ``(rows, cols)``.
    prefetch: (when not holding) how many chunks ahead loads are issued: with ``d``, chunk k+d is loaded before
      chunk k is processed, so ``d`` loads per program are in flight (0: none; ``True`` counts as 1).
    split: write the bitmask and ``h`` while counting (step 1), so that step 3 only places and stores the values,
      by popcounts of the bitmask words (no prefix sum over elements); implies ``words``. A band that crosses the
      capacity redoes step 3 in full.
    place: (split) how step 3 finds positions: ``"popc"`` (popcounts of the bitmask words; implies ``words``) or
      ``"scan"`` (a prefix sum over the elements).
    reload: (split, popc) read the bitmask words back in step 3 instead of recomputing them from the input.
    window: flags read per look-back step.
    zero_span: values-buffer elements each tail-zeroing program owns (a power of two).
  """

  block_rows: int = 1
  block_cols: int = 1024
  num_warps: int = 2
  num_stages: int = 1
  hold: bool = False
  words: bool = False
  prefetch: int = 1
  split: bool = True
  place: str = "popc"
  reload: bool = False
  window: int = 32
  zero_span: int = 65536

  def label(self) -> str:
    return (f"{self.block_rows}x{self.block_cols}/w{self.num_warps}s{self.num_stages}"
            f"{'/hold' if self.hold else ''}{'/words' if self.words else ''}{_prefetch_label(self.prefetch)}"
            f"{'/split-' + self.place if self.split else ''}{'/reload' if self.reload else ''}"
            f"{'' if self.window == 32 else f'/window{self.window}'}")


def _prefetch_label(depth: int) -> str:
  depth = int(depth)
  return "" if depth == 0 else "/prefetch" if depth == 1 else f"/prefetch{depth}"


def default_config(shape: tuple[int, int]) -> PackConfig:
  """The defaults, fitted to ``shape``: the configuration measured fastest on the H100 (``benchmarks/remat.py``,
  16384 x 8192 bf16, 85% zeros: 0.448 ms for 1 x 1024 with 2 warps, split, popc, prefetch; the first, unsplit design
  0.50-0.53 ms; rows held in registers 0.61-0.91 ms, 140+ registers a thread)."""
  return fit_config(PackConfig(), shape)


def fit_config(cfg: PackConfig, shape: tuple[int, int]) -> PackConfig:
  """``cfg`` with its block sizes shrunk until they tile ``shape`` (rows: any divisor; columns: a power of two
  dividing the row length, at least one word)."""
  R, C = shape
  br = cfg.block_rows
  while R % br:
    br //= 2
  bc = cfg.block_cols
  while C % bc and bc > fmt.WORD_BITS:
    bc //= 2
  window = cfg.window
  while window > 1 and window * br * C >= 2**30:  # a window's aggregates must sum without int32 overflow
    window //= 2
  hold = cfg.hold and C // bc <= 16  # registers: at most 16 chunks held
  if cfg.place not in ("popc", "scan"):
    raise ValueError(f"single-pass packer: place must be 'popc' or 'scan', got {cfg.place!r}")
  if cfg.zero_span & (cfg.zero_span - 1):
    raise ValueError(f"single-pass packer: zero_span must be a power of two, got {cfg.zero_span}")
  if not 0 <= int(cfg.prefetch) <= 4:
    raise ValueError(f"single-pass packer: prefetch must be a depth in [0, 4], got {cfg.prefetch!r}")
  return dataclasses.replace(cfg, block_rows=max(br, 1), block_cols=bc, window=window, hold=hold,
                             prefetch=min(int(cfg.prefetch), C // bc),
                             words=cfg.words or (cfg.split and cfg.place == "popc"),
                             reload=cfg.reload and cfg.split and cfg.place == "popc")


# ----------------------------------------------------------------------------------------------------------------------
# kernel


def _lookback(state_ref, t, limit: int, window: int):
  """Exclusive prefix (saturated at ``limit``) of band ``t``: adds the flags before it, ``window`` at a time, back to
  the nearest inclusive prefix; spins while a flag after that one is not yet published."""
  k = jax.lax.broadcasted_iota(jnp.int32, (window,), 0)

  def cond(carry):
    return (carry[2] == 0) & (carry[3] < MAX_SPINS)

  def body(carry):
    end, acc, _, spins = carry
    j = end - window + k
    valid = j >= 0
    # Bands before the first read as an inclusive prefix of 0. volatile: every step must see other programs' flags.
    v = pltriton.load(state_ref.at[1 + jnp.where(valid, j, 0)], mask=valid, other=INCLUSIVE, volatile=True)
    last = jnp.max(jnp.where(v >= INCLUSIVE, k, -1))  # nearest inclusive prefix in the window (or -1)
    after = k > last
    ready = jnp.min(jnp.where(after, (v > 0).astype(jnp.int32), 1)) == 1
    aggregates = jnp.sum(jnp.where(after, v - 1, 0))
    inclusive = jnp.sum(jnp.where(k == last, v - INCLUSIVE, 0))
    add = jnp.minimum(aggregates + inclusive, limit)
    acc = jnp.where(ready, jnp.minimum(acc + add, limit), acc)
    found = last >= 0
    end = jnp.where(ready & ~found, end - window, end)
    return end, acc, (ready & found).astype(jnp.int32), spins + 1

  init = (t, jnp.int32(0), (t == 0).astype(jnp.int32), jnp.int32(0))
  return jax.lax.while_loop(cond, body, init)[1]


def _ds(k, size: int):
  """Slice ``k`` of length ``size`` (``k`` a loop index or, when held chunks are unrolled, a Python int)."""
  return pl.ds(k * size, size) if isinstance(k, int) else pl.ds(pl.multiple_of(k * size, size), size)


def _load_chunk(x_ref, rows, k, bc: int, words: bool):
  if words:
    return x_ref[rows, _ds(k, bc // fmt.WORD_BITS), :]
  return x_ref[rows, _ds(k, bc)]


def _walk(x_ref, rows, cfg: PackConfig, chunks: int, fn, init):
  """``fn(k, chunk_k, carry)`` over the band's chunks; with prefetch depth ``d`` chunk k+d's load is issued before
  chunk k is processed (the ``d`` chunks ahead ride in the loop carry), so their latency overlaps the work."""
  load = lambda k: _load_chunk(x_ref, rows, k, cfg.block_cols, cfg.words)
  depth = int(cfg.prefetch)
  if not depth:
    return jax.lax.fori_loop(0, chunks, lambda k, c: fn(k, load(k), c), init)

  def body(k, carry):
    c, ahead = carry
    nxt = load(jnp.minimum(k + depth, chunks - 1))  # the last d iterations re-read the last chunk (unused)
    return fn(k, ahead[0], c), ahead[1:] + (nxt,)

  first = tuple(load(min(j, chunks - 1)) for j in range(depth))
  return jax.lax.fori_loop(0, chunks, body, (init, first))[0]


def _band(t, x_ref, bits_ref, values_ref, offsets_ref, counts_ref, state_ref, h_ref, *, relu: bool, capacity: int,
          cfg: PackConfig, chunks: int, interpret: bool):
  br, bc, words = cfg.block_rows, cfg.block_cols, cfg.words
  bw = bc // fmt.WORD_BITS
  row0 = pl.multiple_of(t * br, br)
  rows = pl.ds(row0, br)

  def store_dense(k, w, h):
    bits_ref[rows, _ds(k, bw)] = w
    if h_ref:
      if words:
        h_ref[0][rows, _ds(k, bw), :] = h
      else:
        h_ref[0][rows, _ds(k, bc)] = h

  # 1. count; with split, also write the bitmask and h (exact unless the band overflows the capacity: fixed in 3.)
  if cfg.split:
    def count(k, x, acc):
      nz = chunks_lib.nonzero(x, relu)
      w = chunks_lib.pack_words(nz)
      store_dense(k, w, jnp.where(nz, chunks_lib.square(x), jnp.zeros((), x.dtype)) if h_ref else None)
      return acc + jnp.sum(chunks_lib.popcount(w), axis=1)
  else:
    def count(k, x, acc):
      return acc + chunks_lib.nonzero_count(x, relu)
  if cfg.hold:
    held = [_load_chunk(x_ref, rows, k, bc, words) for k in range(chunks)]
    counts = jnp.zeros((br,), jnp.int32)
    for k in range(chunks):
      counts = count(k, held[k], counts)
  else:
    held = None
    counts = _walk(x_ref, rows, cfg, chunks, count, jnp.zeros((br,), jnp.int32))

  # 2. publish the aggregate, look back, publish the inclusive prefix
  total = jnp.sum(counts)
  aggregate = jnp.minimum(total, capacity)
  flag = 1 + t
  pltriton.atomic_max(state_ref, flag, jnp.where(t == 0, INCLUSIVE + aggregate, 1 + aggregate))
  prefix = _lookback(state_ref, t, capacity, cfg.window)
  pltriton.atomic_max(state_ref, flag, INCLUSIVE + jnp.minimum(prefix + aggregate, capacity))
  start = jnp.minimum(prefix + jnp.cumsum(counts) - counts, capacity)
  offsets_ref[rows] = start
  counts_ref[rows] = counts

  # 3. pack
  def pack(k, x, start):  # everything, with the capacity cut
    r, pos, keep, w, start = chunks_lib.pack_chunk(x, start, capacity, relu)
    chunks_lib.store_chunk(values_ref, r, pos, keep, capacity)
    store_dense(k, w, chunks_lib.kept_square(r, keep) if h_ref else None)
    return start

  def scatter(k, x, start):  # split, band within capacity: the values only
    if cfg.place == "scan":  # positions from a prefix sum over the elements, as in pack_chunk
      _, pos, keep, _, start = chunks_lib.pack_chunk(x, start, capacity, relu)
      chunks_lib.store_chunk(values_ref, x, pos, keep, capacity)  # relu(x) == x wherever it is stored
      return start
    # positions from the bitmask words: popcount of the words before plus of the lanes below in the word
    if cfg.reload:
      w = bits_ref[rows, _ds(k, bw)]
    else:
      w = jnp.sum(jnp.where(chunks_lib.nonzero(x, relu), chunks_lib.lane_bits(x.shape), jnp.uint32(0)), axis=2)
    pos, keep, start = chunks_lib.word_positions(w, start)
    chunks_lib.store_chunk(values_ref, x, pos, keep, capacity)  # relu(x) == x wherever it is stored
    return start

  def run(fn):
    if cfg.hold:
      s = start
      for k in range(chunks):
        s = fn(k, held[k], s)
    else:
      _walk(x_ref, rows, cfg, chunks, fn, start)

  if not cfg.split:
    run(pack)
    return
  overflow = prefix + total > capacity

  @pl.when(overflow)
  def _():
    if not interpret:
      pltriton.debug_barrier()  # step 1's bitmask and h stores before this program overwrites them
    run(pack)

  @pl.when(~overflow)
  def _():
    if cfg.reload and not interpret:
      pltriton.debug_barrier()  # this program's bitmask stores (step 1) before its loads of them
    run(scatter)


def _zero_tail(z, values_ref, state_ref, *, n_bands: int, capacity: int, span: int):
  """Program ``z`` of the tail zeroers: zeros ``values[max(lo, total):hi]`` of its span ``[lo, hi)``."""
  last = jnp.full((), n_bands, jnp.int32)  # state index of the last band's flag (an array: interpreter indexing)

  def read(spins):
    return pltriton.load(state_ref.at[last], volatile=True), spins + 1

  v, _ = jax.lax.while_loop(lambda c: (c[0] < INCLUSIVE) & (c[1] < MAX_SPINS), lambda c: read(c[1]), read(jnp.int32(0)))
  total = jnp.minimum(jnp.maximum(v - INCLUSIVE, 0), capacity)
  block = min(ZERO_BLOCK, span)
  lo = z * span
  hi = jnp.minimum(lo + span, capacity)
  first = jnp.maximum(total - lo, 0) // block
  zeros = jnp.zeros((block,), values_ref.dtype)

  def body(i, carry):
    idx = lo + i * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
    mask = (idx >= total) & (idx < hi)
    pltriton.store(values_ref.at[jnp.where(mask, idx, capacity)], zeros, mask=mask)
    return carry

  jax.lax.fori_loop(first, span // block, body, jnp.int32(0))


def _kernel(x_ref, state_in_ref, bits_ref, values_ref, offsets_ref, counts_ref, state_ref, *h_ref, relu: bool,
            capacity: int, cfg: PackConfig, chunks: int, n_bands: int, interpret: bool):
  del state_in_ref  # aliased to state_ref: zeros on entry
  ticket = pltriton.atomic_add(state_ref, jnp.zeros((), jnp.int32), jnp.int32(1))

  @pl.when(ticket < n_bands)
  def _():
    _band(ticket, x_ref, bits_ref, values_ref, offsets_ref, counts_ref, state_ref, h_ref, relu=relu,
          capacity=capacity, cfg=cfg, chunks=chunks, interpret=interpret)

  @pl.when(ticket >= n_bands)
  def _():
    _zero_tail(ticket - n_bands, values_ref, state_ref, n_bands=n_bands, capacity=capacity, span=cfg.zero_span)


def pack(x_RxC: jax.Array, capacity: int, *, relu: bool, square_out: bool, config: PackConfig | None = None,
         interpret: bool = False):
  """Packs ``activation(x)`` in one kernel.

  Args:
    x_RxC: 2-D floating input, row length a multiple of 32.
    capacity: values-buffer elements (``format.capacity_elements``).
    relu: pack ``relu(x)``.
    square_out: also return ``h``.
    config: launch configuration (default :func:`default_config`); block sizes are fitted to the shape.
    interpret: run in interpret mode (CPU).

  Returns:
    ``(bits, values, row_offsets, counts)`` and, with ``square_out``, ``h``; ``counts`` are the per-row non-zeros
    (before capacity), from which the caller takes ``nnz``.
  """
  R, C = x_RxC.shape
  cfg = fit_config(config, (R, C)) if config else default_config((R, C))
  br, bc = cfg.block_rows, cfg.block_cols
  n_bands = R // br
  n_zero = -(-capacity // cfg.zero_span)
  W = C // fmt.WORD_BITS
  x_in = x_RxC.reshape(R, W, fmt.WORD_BITS) if cfg.words else x_RxC
  dense_shape = x_in.shape
  full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # programs index by ticket, not by id
  out_shape = [jax.ShapeDtypeStruct((R, W), jnp.uint32), jax.ShapeDtypeStruct((capacity,), x_RxC.dtype),
               jax.ShapeDtypeStruct((R,), jnp.int32), jax.ShapeDtypeStruct((R,), jnp.int32),
               jax.ShapeDtypeStruct((n_bands + 1,), jnp.int32)]
  if square_out:
    out_shape.append(jax.ShapeDtypeStruct(dense_shape, x_RxC.dtype))
  kernel = functools.partial(_kernel, relu=relu, capacity=capacity, cfg=cfg, chunks=C // bc, n_bands=n_bands,
                             interpret=interpret)
  outs = pl.pallas_call(
      kernel, out_shape=tuple(out_shape), grid=(n_bands + n_zero,),
      in_specs=[full(dense_shape), full((n_bands + 1,))],
      out_specs=tuple(full(s.shape) for s in out_shape), input_output_aliases={1: 4},
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret, name="jsparse_bitmask_pack_single_pass",
  )(x_in, jnp.zeros((n_bands + 1,), jnp.int32))
  bits, values, offsets, counts = outs[:4]
  if not square_out:
    return bits, values, offsets, counts
  return bits, values, offsets, counts, outs[5].reshape(R, C)
