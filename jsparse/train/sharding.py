"""Multi-device training with ``jax.sharding``: a ``(data, fsdp)`` mesh, NamedSharding on the state and the batch.

* The batch is split over both mesh axes (every device sees ``batch_size / (data * fsdp)`` sequences).
* Every state array (parameters, optimizer moments, sparsity/router state) is sharded along ``fsdp`` on its largest
  dimension that the ``fsdp`` size divides, and replicated along ``data``; arrays with no such dimension (scalars,
  counters, RNG keys, small vectors) are replicated. XLA's SPMD partitioner inserts the all-gathers and
  reduce-scatters: this is ZeRO-3-style FSDP with no change to the model code.

The jitted step gets the same shardings as ``in_shardings`` and ``out_shardings``, so the state keeps its layout from
step to step and each phase compiles once.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jsparse.train.config import MeshConfig

AXES = ("data", "fsdp")


def parse_mesh(text: str) -> MeshConfig:
  """Parses ``"data=2,fsdp=4"`` (either key may be omitted; sizes default to 1).

  Raises:
    ValueError: unknown axis or non-integer size.
  """
  sizes = {"data": 1, "fsdp": 1}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, sep, value = part.partition("=")
    if not sep or key.strip() not in sizes:
      raise ValueError(f"--mesh: expected 'data=N,fsdp=M', got {text!r}")
    try:
      sizes[key.strip()] = int(value)
    except ValueError:
      raise ValueError(f"--mesh: size of {key.strip()!r} must be an integer, got {value!r}") from None
  return MeshConfig(**sizes)


def check_devices(config: MeshConfig) -> None:
  """Raises ValueError when the mesh needs more devices than JAX sees."""
  need, have = config.data * config.fsdp, jax.device_count()
  if need > have:
    raise ValueError(f"mesh: data={config.data} x fsdp={config.fsdp} needs {need} devices, but JAX sees {have} "
                     f"({jax.default_backend()}); on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={need}")


def make_mesh(config: MeshConfig) -> Mesh:
  """A ``(data, fsdp)`` mesh over the first ``data * fsdp`` devices."""
  check_devices(config)
  devices = np.asarray(jax.devices()[:config.data * config.fsdp]).reshape(config.data, config.fsdp)
  return Mesh(devices, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sequences split over both axes; the sequence dimension stays whole."""
  return NamedSharding(mesh, P(AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def array_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """FSDP rule: shard the largest dimension that ``fsdp`` divides (ties: the first); replicate otherwise."""
  if fsdp == 1 or not shape:
    return P()
  candidates = [(size, -axis) for axis, size in enumerate(shape) if size % fsdp == 0 and size >= fsdp]
  if not candidates:
    return P()
  _, neg_axis = max(candidates)
  spec = [None] * len(shape)
  spec[-neg_axis] = "fsdp"
  return P(*spec)


def state_shardings(state, mesh: Mesh):
  """A pytree of NamedShardings matching ``state`` (arrays or ShapeDtypeStructs) under the FSDP rule."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, array_spec(tuple(np.shape(x)), fsdp)), state)
