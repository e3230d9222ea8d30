"""Pallas-Triton kernel for the fused squared-ReLU + N:M activation: one read of x, one write of h.

Same lane scheme as the N:M kernel (:mod:`jsparse.kernels.nm.pallas`); the selection key is the reference's
``selection_key`` (relu(x) in f32, NaN as +inf; computed from the bits, :func:`pallas_common.relu_key`) and ``h = relu(x)^2`` is computed in f32 and rounded once, exactly as
``reference.squared_relu_nm``, so h is bit-identical to the reference and the mask equal.

Outputs (any subset, in order): ``"h"``, ``"mask"`` (bool, ``(R, K)``) and ``"bits"`` (one bit per element,
``(R, K/m)``, expanded by the gradient only where it is needed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.kernels.nm import pallas_common as pc
from jsparse.kernels.nm.pallas import DEFAULT_CONFIG as NM_DEFAULT_CONFIG
from jsparse.kernels.nm.pallas import launch_rowwise, supports_nm
from jsparse.kernels.nm.pallas_common import BlockConfig

DEFAULT_CONFIG = NM_DEFAULT_CONFIG


def supports(x_RxK: jax.Array, n: int, m: int) -> tuple[bool, str]:
  """Whether :func:`squared_relu_nm` takes this (rows, K) input."""
  return supports_nm(x_RxK, n, m)


def _body(x, *, n: int, m: int, outputs: tuple[str, ...]):
  lanes = pc.deinterleave(x, m)
  keep = pc.keep_top_n([pc.relu_key(v) for v in lanes], n)
  out = []
  for o in outputs:
    if o == "h":
      h = []
      for k, v in zip(keep, lanes):
        v32 = v.astype(jnp.float32)
        # Not jnp.maximum alone: Triton's float max drops NaN, the reference keeps it.
        r = jnp.where(jnp.isnan(v32), v32, jnp.maximum(v32, 0.0))
        h.append(jnp.where(k, r * r, 0.0).astype(x.dtype))
      out.append(pc.interleave(h))
    elif o == "mask":
      out.append(pc.interleave(keep))
    else:
      out.append(pc.pack_bits(keep))
  return out


def squared_relu_nm(x_RxK: jax.Array, n: int, m: int, *, outputs=("h", "mask"), interpret: bool = False,
                    config: BlockConfig | None = None) -> tuple[jax.Array, ...]:
  """relu(x)^2 pruned N:M along the rows in one pass; returns the requested ``outputs``."""
  outputs = tuple(outputs)
  specs = pc.output_specs("squared_relu_nm", x_RxK.dtype, m, outputs, value="h")
  body = lambda x: _body(x, n=n, m=m, outputs=outputs)
  return launch_rowwise(body, [x_RxK], specs, min_cols=m, config=config or DEFAULT_CONFIG, interpret=interpret,
                        name=f"jsparse_squared_relu_{n}_{m}")
