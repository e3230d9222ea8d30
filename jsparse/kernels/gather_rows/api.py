"""Public row gather: ``gather_rows(src, idx)``, zero rows where an index is out of range."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jsparse.kernels import _common as common
from jsparse.kernels.gather_rows import pallas as kernel
from jsparse.kernels.gather_rows import reference as ref
from jsparse.kernels.gather_rows import tma

GatherConfig = kernel.GatherConfig
TmaGatherConfig = tma.TmaGatherConfig
CONFIG_TYPES = (GatherConfig, TmaGatherConfig)


def _support(src, D: int, config) -> tuple[bool, str]:
  row_bytes = jnp.dtype(src.dtype).itemsize * D
  if row_bytes % 16:
    return False, f"a row of D={D} {jnp.dtype(src.dtype)} elements is not a multiple of 16 bytes"
  if isinstance(config, TmaGatherConfig) and row_bytes > tma.SMEM_BYTES:
    return False, f"a row of {row_bytes} bytes does not fit the bulk-copy engine's shared memory"
  return True, ""


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _gather(src_SxD, idx_P, impl: str, config: GatherConfig | TmaGatherConfig):
  if impl == "pallas":
    engine = tma if isinstance(config, TmaGatherConfig) else kernel
    return engine.gather_rows(src_SxD, idx_P, config=config, interpret=common.interpret_enabled())
  return ref.gather_rows(src_SxD, idx_P)


def _gather_fwd(src_SxD, idx_P, impl, config):
  return _gather(src_SxD, idx_P, impl, config), (idx_P, src_SxD.shape[0])


def _gather_bwd(impl, config, res, g_PxD):
  # The transpose of a gather is a scatter-add (indices may repeat); out-of-range indices drop their rows.
  idx_P, S = res
  d_src = jnp.zeros((S, g_PxD.shape[1]), g_PxD.dtype).at[ref.past_end(idx_P, S)].add(g_PxD, mode="drop")
  return d_src, None


_gather.defvjp(_gather_fwd, _gather_bwd)


def gather_rows(src_SxD: jax.Array, idx_P: jax.Array, *, implementation: str | None = None,
                config: GatherConfig | TmaGatherConfig = GatherConfig()) -> jax.Array:
  """Rows of ``src`` by index, zero rows for out-of-range indices: ``out[p] = src[idx[p]]``.

  ``jnp.take(src, idx, axis=0, mode="fill", fill_value=0)`` except that negative indices give zero rows instead of
  wrapping around; differentiable in ``src`` (the gradient is
  the scatter-add of the output gradient; callers that know the gather is a permutation should differentiate through
  the inverse gather instead, as :mod:`jsparse.kernels.routed_ffn.layout` does).

  Args:
    src_SxD: (S, D) rows to gather from, any dtype.
    idx_P: (P,) integer row indices; values outside ``[0, S)`` (e.g. ``S`` or ``-1``) give zero rows.
    implementation: ``None`` (the Pallas kernel on a GPU where supported, else XLA), ``"pallas"`` or ``"xla"``.
    config: which kernel, and its blocks (shrunk to divide ``(P, D)``): a :class:`GatherConfig` (Triton: rows move
      through registers in ``block_rows x block_cols`` tiles) or a :class:`TmaGatherConfig` (Mosaic GPU: each row one
      bulk async copy into shared memory, ``block_rows`` rows written back with one bulk copy).

  Returns:
    (P, D) array in src's dtype.

  Raises:
    ValueError: src not 2-D, idx not a 1-D integer array, or an explicit ``"pallas"`` that cannot run (rows not a
      multiple of 16 bytes, a row too long for the bulk-copy engine's shared memory, or no GPU outside interpret
      mode).
  """
  op = "gather_rows"
  common.check_rank(op, "src", src_SxD, 2, 2)
  if jnp.ndim(idx_P) != 1 or not jnp.issubdtype(jnp.result_type(idx_P), jnp.integer):
    raise ValueError(f"{op}: idx must be a 1-D integer array, got {jnp.result_type(idx_P)}{tuple(jnp.shape(idx_P))}")
  if not isinstance(config, CONFIG_TYPES):
    raise ValueError(f"{op}: config must be a GatherConfig or TmaGatherConfig, got {type(config).__name__}")
  ok, why = _support(src_SxD, src_SxD.shape[1], config)
  impl = common.resolve_implementation(op, implementation, pallas_supports=ok, why_not=why)
  return _gather(src_SxD, idx_P.astype(jnp.int32), impl, config)
