"""Pallas-Triton kernels for the row-wise N:M ops: N:M selection (values, bool mask or packed bits) and S-STE.

Both take the 2-D row-major ``(R, K)`` view (groups of ``m`` along K) that ``api.py`` builds, and make one pass:
read each element once, write each requested output once. What a call writes is chosen by ``outputs``:

* ``"y"``    -- the pruned values, ``(R, K)`` in ``x.dtype``;
* ``"mask"`` -- the bool pattern, ``(R, K)`` (for :func:`jsparse.nm_mask`);
* ``"bits"`` -- the pattern packed one bit per element, ``(R, K/m)`` (bit i = element i of the group), which a
  gradient mode expands with :func:`pallas_common.expand_bits` only where it needs it -- 1/8 of a byte per element
  for 2:4 instead of a bool byte, and nothing at all in the forward op users call.

The selection is the reference's: ``magnitude_key`` (|x| in f32, NaN as +inf) compared lane against lane, ties to
the lower index, so masks are bit-identical to ``reference.nm_mask``.
"""

from __future__ import annotations

import fractions
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jsparse.kernels.nm import pallas_common as pc
from jsparse.kernels.nm.pallas_common import BlockConfig

# Tuned on an H100 for 16384 x 8192 bf16 (benchmarks/sparsify.py --tune; 32 elements per thread: more spills
# registers, e.g. 32 x 1024 with 4 warps ran at 0.56x the copy's bandwidth); any power-of-two block is correct.
DEFAULT_CONFIG = BlockConfig(block_rows=4, block_cols=1024, num_warps=4, num_stages=1)
SOFT_THRESHOLD_CONFIG = BlockConfig(block_rows=4, block_cols=512, num_warps=4, num_stages=1)
MAX_M = 32


def supports_nm(x_RxK: jax.Array, n: int, m: int) -> tuple[bool, str]:
  """Whether :func:`nm_select` takes this input; ``(False, reason)`` otherwise."""
  ok, why = pc.dtype_supported(x_RxK)
  if not ok:
    return ok, why
  if jnp.ndim(x_RxK) != 2:
    return False, f"the kernel takes the 2-D (rows, K) view, got shape {tuple(jnp.shape(x_RxK))}"
  if not pc.is_pow2(m) or m > MAX_M:
    return False, f"m={m} (the kernel takes m a power of two up to {MAX_M})"
  return True, ""


# ----------------------------------------------------------------------------------------------------------------------
# A row-wise launcher: every kernel here maps a (bm, bk) block of x to blocks of its outputs.


def launch_rowwise(body: Callable[..., Sequence[jax.Array]], inputs: Sequence[jax.Array],
                   out_specs: Sequence[tuple[object, fractions.Fraction]], *, min_cols: int, config: BlockConfig,
                   interpret: bool, name: str) -> tuple[jax.Array, ...]:
  """Runs ``body`` over (rows, cols) blocks of 2-D ``inputs`` (all shaped like the first).

  Args:
    body: maps the input blocks (arrays) to the output blocks, in ``out_specs`` order.
    inputs: 2-D arrays of one shape ``(R, K)``.
    out_specs: per output ``(dtype, fraction)``: the output is ``(R, K * fraction)`` and so are its blocks.
    min_cols: the smallest column block the body accepts (a power of two dividing K).
  """
  R, K = inputs[0].shape
  bk = pc.pow2_block(K, max(config.block_cols, min_cols))
  assert bk % min_cols == 0, (K, min_cols)
  bm = pc.pow2_block(R, max(1, min(config.block_rows, pc.MAX_BLOCK_ELEMENTS // bk)))
  nk = K // bk
  grid = ((R // bm) * nk,)

  def index_map(p):  # a flat grid: no 65535 limit on the second axis, column blocks of a row band adjacent
    return p // nk, p % nk

  in_specs = [pl.BlockSpec((bm, bk), index_map) for _ in inputs]
  shapes, specs = [], []
  for dtype, frac in out_specs:
    cols = K * frac
    bcols = bk * frac
    assert cols.denominator == 1 and bcols.denominator == 1, (K, bk, frac)
    shapes.append(jax.ShapeDtypeStruct((R, int(cols)), dtype))
    specs.append(pl.BlockSpec((bm, int(bcols)), index_map))
  n_in = len(inputs)

  def kernel(*refs):
    values = body(*[r[...] for r in refs[:n_in]])
    for ref, value in zip(refs[n_in:], values):
      ref[...] = value.astype(ref.dtype)

  call = pc.pallas_call(kernel, out_shape=tuple(shapes), grid=grid, in_specs=in_specs, out_specs=tuple(specs),
                        config=config, interpret=interpret, name=name)
  return tuple(call(*inputs))


def _emit(outputs: Sequence[str], lanes: Sequence[jax.Array], keep: Sequence[jax.Array]) -> list[jax.Array]:
  out = []
  for o in outputs:
    if o == "y":
      out.append(pc.interleave([jnp.where(k, v, jnp.zeros((), v.dtype)) for k, v in zip(keep, lanes)]))
    elif o == "mask":
      out.append(pc.interleave(keep))
    else:
      out.append(pc.pack_bits(keep))
  return out


# ----------------------------------------------------------------------------------------------------------------------
# N:M selection


def _nm_body(x, *, n: int, m: int, outputs: tuple[str, ...]):
  lanes = pc.deinterleave(x, m)
  keep = pc.keep_top_n([pc.magnitude_key(v) for v in lanes], n)
  return _emit(outputs, lanes, keep)


def nm_select(x_RxK: jax.Array, n: int, m: int, *, outputs: Sequence[str] = ("y",), interpret: bool = False,
              config: BlockConfig | None = None) -> tuple[jax.Array, ...]:
  """N:M selection along the rows of ``x_RxK`` in one pass; returns the requested ``outputs`` (see module doc)."""
  outputs = tuple(outputs)
  specs = pc.output_specs("nm_select", x_RxK.dtype, m, outputs)
  body = lambda x: _nm_body(x, n=n, m=m, outputs=outputs)
  return launch_rowwise(body, [x_RxK], specs, min_cols=m, config=config or DEFAULT_CONFIG, interpret=interpret,
                        name=f"jsparse_nm_{n}_{m}")


# ----------------------------------------------------------------------------------------------------------------------
# S-STE soft threshold (2:4)


def lane_ranks(keys: Sequence[jax.Array]) -> list[jax.Array]:
  """Rank of each lane in its group (0 = largest key; ties to the lower lane), as int32."""
  m = len(keys)
  ranks = [jnp.zeros(keys[0].shape, jnp.int32) for _ in range(m)]
  for i in range(m):
    for j in range(i + 1, m):
      i_first = (keys[i] >= keys[j]).astype(jnp.int32)
      ranks[j] = ranks[j] + i_first
      ranks[i] = ranks[i] + (1 - i_first)
  return ranks


def _soft_threshold_body(w, *, outputs: tuple[str, ...]):
  lanes = pc.deinterleave(w, 4)
  w32 = [v.astype(jnp.float32) for v in lanes]
  a = [pc.abs_f32(v) for v in w32]
  ranks = lane_ranks([pc.magnitude_key(v) for v in lanes])
  # The 3rd-largest magnitude: exactly one lane has rank 2, so a select chain picks it exactly.
  third = jnp.where(ranks[0] == 2, a[0], jnp.where(ranks[1] == 2, a[1], jnp.where(ranks[2] == 2, a[2], a[3])))
  keep = [r < 2 for r in ranks]
  out = []
  for o in outputs:
    if o == "s":
      s = [jnp.where(k, jnp.sign(v) * (ai - third), 0.0).astype(w.dtype) for k, v, ai in zip(keep, w32, a)]
      out.append(pc.interleave(s))
    else:
      out.extend(_emit((o,), lanes, keep))
  return out


def soft_threshold_24(w_RxK: jax.Array, *, outputs: Sequence[str] = ("s",), interpret: bool = False,
                      config: BlockConfig | None = None) -> tuple[jax.Array, ...]:
  """S-STE soft threshold of groups of 4 along the rows; ``outputs`` from ``"s"`` and the N:M ``"mask"``/``"bits"``
  of the two largest (the pattern the gradient modes use)."""
  outputs = tuple(outputs)
  specs = pc.output_specs("soft_threshold_24", w_RxK.dtype, 4, outputs, value="s")
  body = lambda w: _soft_threshold_body(w, outputs=outputs)
  return launch_rowwise(body, [w_RxK], specs, min_cols=4, config=config or SOFT_THRESHOLD_CONFIG,
                        interpret=interpret, name="jsparse_soft_threshold_24")
