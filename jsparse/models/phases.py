"""Switching a model between its dense and sparse phases."""

from __future__ import annotations

import jax
from flax import nnx

from jsparse.models.sparse_ffn import SparseFFN


def sparse_ffns(model: nnx.Module) -> list[SparseFFN]:
  """Every :class:`SparseFFN` inside ``model`` (or ``model`` itself), in traversal order."""
  if isinstance(model, SparseFFN):
    return [model]
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, SparseFFN)]


def set_sparse(model: nnx.Module, sparse: bool) -> None:
  """Puts every :class:`SparseFFN` of ``model`` in its sparse (``True``) or dense (``False``) mode.

  Parameters are untouched. The mode is a static attribute, so ``nnx.jit`` traces each mode once; switch between
  steps, outside ``jit``.
  """
  for ffn in sparse_ffns(model):
    ffn.sparse = bool(sparse)


def prepare_sparse_phase(model: nnx.Module, tokens_BxL: jax.Array | None = None) -> None:
  """Call once when the sparse phase starts: fixes each S-STE scale beta from the current weights.

  The result lives in ``SparsityState`` variables, so it is checkpointed with the model and stays fixed afterwards.
  Routed (``"vnm"``) FFNs re-cluster their neurons from the current W1 (the clustering uses the weights only;
  ``tokens_BxL`` is accepted for rules that would use activations and is unused today).
  """
  del tokens_BxL
  for ffn in sparse_ffns(model):
    ffn.prepare_sparse_phase()


def after_optimizer_step(model: nnx.Module) -> None:
  """Per-step bookkeeping of sparse FFNs (the routed FFN's step counter and periodic re-clustering); jittable.

  Call it after each optimizer update (the trainer does, inside its jitted step). A no-op for the 2:4 modes.
  """
  for ffn in sparse_ffns(model):
    ffn.after_optimizer_step()
