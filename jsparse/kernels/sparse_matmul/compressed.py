"""``Compressed24``: a 2:4 operand of :func:`jsparse.sparse_matmul`, compressed once and reused.

The pytree carries

* ``source``: the differentiable dense array the operand comes from (the 2:4 array itself for :func:`compress_24`,
  the pre-activation for :func:`squared_relu_24_compress`). Gradients flow into it; the backward products that are
  dense read the operand back from it.
* ``packed``: cuSPARSELt's compressed layout (an opaque ``uint8`` buffer: the kept values, then the metadata) of the
  operand in the *sparse-A role*: ``a`` itself (rows x K) for ``operand="a"``, ``b.T`` (N x K) for ``operand="b"``.
  ``None`` when the compression ran on the XLA path (CPU, non-Hopper): the product then runs masked-dense.
* ``packed_t``: for ``operand="b"`` with ``transposable=True``, ``b`` itself (K x N, 2:4 along N) in the same layout:
  the operand of the sparse ``dx = g @ b.T`` product in the backward.

Static fields: ``shape`` (the dense operand's shape), ``operand`` (``"a"`` or ``"b"``), ``activation`` (``"none"``
or ``"squared_relu"``), ``transposable``.
"""

from __future__ import annotations

import dataclasses

import jax

from jsparse.kernels.sparse_matmul import reference as ref


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Compressed24:
  """A 2:4 operand compressed for :func:`jsparse.sparse_matmul` (see the module docstring for the fields)."""

  source: jax.Array
  packed: jax.Array | None
  packed_t: jax.Array | None
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  operand: str = dataclasses.field(default="a", metadata=dict(static=True))
  activation: str = dataclasses.field(default="none", metadata=dict(static=True))
  transposable: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def dtype(self):
    return self.source.dtype

  @property
  def k_axis(self) -> int:
    """The contraction axis of the dense operand: -1 for ``a``, 0 for ``b``."""
    return -1 if self.operand == "a" else 0

  @property
  def on_device(self) -> bool:
    """Whether the cuSPARSELt packing exists (else the product runs on the XLA path)."""
    return self.packed is not None

  def to_dense(self) -> jax.Array:
    """The dense 2:4 operand (differentiable in ``source``)."""
    return ref.dense_operand(self.source, self.activation, self.k_axis)
