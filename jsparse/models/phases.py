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


def set_stats(model: nnx.Module, collect: bool) -> None:
  """Turns the per-layer statistics of every :class:`SparseFFN` of ``model`` on or off (where its config has them).

  The statistics cost HBM passes over the T x F activations every step (at the 1b shape on the H100, about 0.5 ms
  per layer for the 2:4 activation FFN in its dense mode); a training loop that only logs them every N steps turns
  them off in between (``jsparse.train`` compiles both variants). Static, like :func:`set_sparse`: call outside
  ``jit`` and re-split.
  """
  for ffn in sparse_ffns(model):
    ffn.collect_stats = bool(collect)


def prepare_sparse_phase(model: nnx.Module, tokens_BxL: jax.Array | None = None,
                         optimizer: nnx.Optimizer | None = None) -> None:
  """Call once when the sparse phase starts: fixes each S-STE scale beta from the current weights.

  The result lives in ``SparsityState`` variables, so it is checkpointed with the model and stays fixed afterwards.
  Routed (``"vnm"``) FFNs re-cluster their neurons from the current W1 (the clustering uses the weights only;
  ``tokens_BxL`` is accepted for rules that would use activations and is unused today). With ``optimizer`` (the
  ``nnx.Optimizer`` of ``model``), routed FFNs also store their weights, and the optimizer's moments, in router order
  (:func:`group_weights`): the fast layout. Call outside ``jit``, then re-split the model (the layout is static).
  """
  del tokens_BxL
  moments = _routed_moments(model, optimizer)
  for ffn in sparse_ffns(model):
    ffn.prepare_sparse_phase(*moments.get(id(ffn), (None, None)))


def group_weights(model: nnx.Module, optimizer: nnx.Optimizer | None) -> None:
  """Stores every routed FFN's W1/W2 in router order, permuting the optimizer's moments alike (see ``SparseFFN``).

  The model computes the same function and an element-wise optimizer (Adam, SGD, ...) continues exactly as before;
  the forward then skips the two per-step weight gathers, and each re-clustering re-lays out weights and moments (so
  :func:`after_optimizer_step` must get the optimizer). Idempotent (e.g. after restoring a checkpoint of a grouped
  model). ``optimizer=None``: a model without optimizer state (inference). Call outside ``jit``, then re-split.

  Raises:
    ValueError: an optimizer state under a routed FFN's weight that is neither shaped like it nor scalar (e.g. a
      factored second moment), which a neuron permutation cannot be applied to.
  """
  moments = _routed_moments(model, optimizer)
  for _, ffn in _routed_ffns(model):
    ffn.group_weights(*moments.get(id(ffn), ((), ())))


def after_optimizer_step(model: nnx.Module, optimizer: nnx.Optimizer | None = None) -> None:
  """Per-step bookkeeping of sparse FFNs (the routed FFN's step counter and periodic re-clustering); jittable.

  Call it after each optimizer update (the trainer does, inside its jitted step). A no-op for the 2:4 modes. Routed
  FFNs with weights in router order (:func:`group_weights`) need ``optimizer``: a re-clustering permutes their
  weights and its moments.
  """
  moments = _routed_moments(model, optimizer) if optimizer is not None else {}
  for ffn in sparse_ffns(model):
    ffn.after_optimizer_step(*moments.get(id(ffn), (None, None)))


def _routed_ffns(model: nnx.Module) -> list[tuple[tuple, SparseFFN]]:
  return [(tuple(p), m) for p, m in nnx.iter_modules(model)
          if isinstance(m, SparseFFN) and m.config.activation_sparsity == "vnm"]


def _routed_moments(model: nnx.Module, optimizer) -> dict[int, tuple[list, list]]:
  """For each routed FFN (by id): the optimizer-state variables shaped like its w1 and like its w2.

  An optimizer's state mirrors the parameter tree, so a moment of ``<ffn path>/w1`` sits at a path ending in it.
  """
  if optimizer is None:
    return {}
  state_vars = [(tuple(p), v) for p, v in nnx.iter_graph(optimizer)
                if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param)]
  out = {}
  for path, ffn in _routed_ffns(model):
    lists = []
    for name in ("w1", "w2"):
      suffix, shape = path + (name,), getattr(ffn, name).shape
      found = []
      for p, v in state_vars:
        if len(p) <= len(suffix) or p[-len(suffix):] != suffix:
          continue
        if v.shape == shape:
          found.append(v)
        elif jax.numpy.ndim(v[...]) > 0:
          raise ValueError(f"group_weights: optimizer state {'/'.join(map(str, p))} has shape {v.shape}, not "
                           f"{shape}: a neuron permutation cannot be applied to it")
      lists.append(found)
    out[id(ffn)] = tuple(lists)
  return out
