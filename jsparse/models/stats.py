"""Per-layer FFN statistics: sown into the ``nnx.Intermediate`` collection, popped by :func:`collect_stats`.

Every :class:`SparseFFN` call sows (float32 scalars):

* ``act_density``: fraction of ``relu(x W1)`` entries that are non-zero, before any 2:4 mask (the natural activation
  density; the recipe wants it well under 50% before the sparse phase starts);
* ``dropped_mass``: fraction of the ``relu(x W1)^2`` mass that the forward 2:4 mask removes (in the dense phase of a
  ``"2:4"`` FFN: what it *would* remove -- the signal for when to switch; 0 for FFNs without activation sparsity);
* ``dense_features``: how many features keep dense weight-gradient rows (the "5%" of the 95/5 split; d_ff when the
  weight gradients are dense).

Inside ``nnx.capture(..., nnx.Intermediate)`` the values go to the capture; otherwise they are stored on the module
(flax's pre-capture behaviour) and :func:`collect_stats` pops them.
"""

from __future__ import annotations

import re
import warnings

import jax
import numpy as np
from flax import nnx

STAT_NAMES = ("act_density", "dropped_mass", "dense_features")


def sow(module: nnx.Module, name: str, value: jax.Array) -> None:
  """``module.sow(nnx.Intermediate, name, value)`` without flax's deprecation warning for the uncaptured case."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*outside of 'nnx.capture", category=DeprecationWarning)
    module.sow(nnx.Intermediate, name, value)


def _key(path: tuple) -> str:
  """``('layers', 3, 'ffn', 'act_density')`` -> ``'layer3/act_density'``; other paths joined with '/'."""
  parts = [str(p) for p in path]
  name = parts[-1]
  for i, p in enumerate(parts[:-1]):
    if p == "layers" and i + 1 < len(parts) - 1 and re.fullmatch(r"\d+", parts[i + 1]):
      return f"layer{parts[i + 1]}/{name}"
  return "/".join(p for p in parts if p not in ("ffn",))


def collect_stats(model: nnx.Module) -> dict[str, float]:
  """Pops the sown FFN statistics of ``model`` and returns them as floats (averaged over repeated calls).

  Keys are ``"layer{i}/{name}"`` inside a :class:`Transformer`, ``"{name}"`` for a bare FFN. Call it eagerly
  (outside ``jit``), e.g. after a jitted train step has returned the updated model state.

  Returns:
    ``{key: float}``; empty if nothing was sown since the last call.
  """
  popped = nnx.pop(model, nnx.Intermediate)
  out: dict[str, float] = {}
  for path, leaf in nnx.to_flat_state(popped):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    values = value if isinstance(value, tuple) else (value,)
    if not values:
      continue
    out[_key(tuple(path))] = float(np.mean([np.asarray(v, np.float64) for v in values]))
  return out
