"""orbax checkpoints of the whole training state, with exact resume and corrupt-checkpoint skipping.

A checkpoint holds two items:

* ``state`` -- every array of the model and the optimizer as a flat ``{"model.layers.0.ffn.w1": array}`` dict:
  parameters, AdamW moments and step count (hence the learning-rate schedule), S-STE beta, router centroids, the
  model's RNG stream keys (stored as raw key data, which every orbax version can write).
* ``meta`` -- JSON: the step, the phase, the data position and dataset fingerprint, and a per-array checksum.

orbax writes a checkpoint into a temporary directory and renames it when complete, so a run killed mid-save leaves
only a ``*.orbax-checkpoint-tmp-*`` directory, which is never listed as a step (we warn about it). A finished
checkpoint whose files were damaged afterwards either fails to restore or fails the checksum; either way it is skipped
with a warning and the next older one is tried.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

_TMP_MARK = ".orbax-checkpoint-tmp"


def flatten_state(state) -> tuple[dict[str, jax.Array], Any, dict[str, Any]]:
  """Flattens a state pytree to ``{dotted.path: array}``.

  Returns:
    ``(flat, treedef, key_impls)``: PRNG key arrays are replaced by their raw ``uint32`` key data, and ``key_impls``
    remembers their implementation so :func:`unflatten_state` can wrap them back.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  flat, impls = {}, {}
  for path, leaf in leaves:
    name = _path_name(path)
    if name in flat:
      raise ValueError(f"checkpoint: two state arrays map to the same name {name!r}")
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      impls[name] = jax.random.key_impl(leaf)
      leaf = jax.random.key_data(leaf)
    flat[name] = leaf
  return flat, treedef, impls


def unflatten_state(flat: dict[str, jax.Array], treedef, names: list[str], key_impls: dict[str, Any]):
  """Inverse of :func:`flatten_state` (``names`` in the flattening order)."""
  leaves = []
  for name in names:
    leaf = flat[name]
    if name in key_impls:
      leaf = jax.random.wrap_key_data(leaf, impl=key_impls[name])
    leaves.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _path_name(path) -> str:
  parts = []
  for entry in path:
    key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
    parts.append(str(key))
  if parts and parts[-1] == "value":  # nnx.Variable's own leaf
    parts.pop()
  if parts and parts[0] in ("0", "1"):  # the (model, optimizer) pair
    parts[0] = ("model", "opt")[int(parts[0])]
  return ".".join(parts)


@jax.jit
def _checksums(flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
  # Position-weighted sum of the raw bits, mod 2**32: exact (integer arithmetic is associative, so sharding and
  # reduction order do not matter) and sensitive to any changed, swapped or zeroed element.
  def one(x):
    x = jnp.ravel(x)
    if x.dtype.itemsize == 4:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
      bits = x.astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)
  return {k: one(v) for k, v in flat.items()}


def checksums(flat: dict[str, jax.Array]) -> dict[str, int]:
  """Per-array checksums of a flat state (computed on the devices; only scalars come back)."""
  return {k: int(v) for k, v in jax.device_get(_checksums(flat)).items()}


class Checkpointer:
  """An orbax ``CheckpointManager`` over a directory, keeping ``keep`` checkpoints.

  Args:
    directory: where step directories are written.
    keep: checkpoints kept on disk.
    async_save: write in a background thread (device-to-host copies still happen inside :meth:`save`).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, flat: dict[str, jax.Array], meta: dict[str, Any]) -> None:
    """Saves the flat state and the metadata (with checksums added) as checkpoint ``step``."""
    meta = dict(meta, step=int(step), checksums=checksums(flat))
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def steps(self) -> list[int]:
    """Completed checkpoint steps, newest first."""
    self.manager.reload()
    return sorted(self.manager.all_steps(), reverse=True)

  def restore_latest(self, abstract: dict[str, jax.ShapeDtypeStruct]) -> tuple[dict[str, jax.Array],
                                                                                dict[str, Any]] | None:
    """Restores the newest checkpoint that loads and passes its checksums, or None if there is none.

    Args:
      abstract: ``{name: jax.ShapeDtypeStruct(shape, dtype, sharding=...)}`` of the state to restore into.

    Returns:
      ``(flat_state, meta)`` or None. Damaged and half-written checkpoints are skipped with a warning.
    """
    for name in sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []:
      if _TMP_MARK in name:
        warnings.warn(f"checkpoint: skipping half-written checkpoint {os.path.join(self.directory, name)}",
                      stacklevel=2)
    for step in self.steps():
      try:
        return self.restore(step, abstract)
      except Exception as e:  # noqa: BLE001 - any failure means "do not load this one"
        warnings.warn(f"checkpoint: skipping damaged checkpoint at step {step} in {self.directory}: "
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", stacklevel=2)
    return None

  def restore(self, step: int, abstract: dict[str, jax.ShapeDtypeStruct]) -> tuple[dict[str, jax.Array],
                                                                                  dict[str, Any]]:
    """Restores checkpoint ``step`` and verifies names, shapes, dtypes and checksums.

    Raises:
      Exception: whatever orbax raises for an unreadable checkpoint; ValueError when the verification fails.
    """
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  meta=ocp.args.JsonRestore()))
    flat, meta = dict(restored["state"]), dict(restored["meta"])
    _verify(flat, meta, abstract)
    return flat, meta

  def wait(self) -> None:
    """Blocks until background writes are done."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _verify(flat: dict[str, jax.Array], meta: dict[str, Any], abstract: dict[str, jax.ShapeDtypeStruct]) -> None:
  if set(flat) != set(abstract):
    missing, extra = sorted(set(abstract) - set(flat)), sorted(set(flat) - set(abstract))
    raise ValueError(f"state names differ (missing {missing[:3]}, unexpected {extra[:3]})")
  for name, want in abstract.items():
    if tuple(flat[name].shape) != tuple(want.shape) or flat[name].dtype != want.dtype:
      raise ValueError(f"{name}: stored {flat[name].dtype}{tuple(flat[name].shape)}, expected "
                       f"{want.dtype}{tuple(want.shape)}")
  stored = meta.get("checksums")
  if not isinstance(stored, dict):
    raise ValueError("metadata has no checksums")
  actual = checksums(flat)
  bad = [k for k in actual if stored.get(k) != actual[k]]
  if bad:
    raise ValueError(f"checksum mismatch in {len(bad)} array(s), e.g. {bad[0]}")


def abstract_of(flat: dict[str, jax.Array]) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs (with shardings) of a flat state: the restore target."""
  return {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=getattr(v, "sharding", None))
          for k, v in flat.items()}
