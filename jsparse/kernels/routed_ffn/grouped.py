"""The routed FFN on grouped GEMMs (the GPU path): tile-padded group layout, five grouped GEMMs, custom VJP.

Forward (``P`` padded rows, ``Fe = F/E``)::

  h[P, Fe]  = relu(x_pad @ W1[:, group block])^2      grouped_matmul, group_axis="n", relu^2 fused in the epilogue
  h         = h * vnm_mask(h)                          optional V:N:M (an XLA pass; dense tensor cores either way)
  out[P, D] = h @ W2[group block, :]                   grouped_matmul, group_axis="k"

Backward (``g`` = dOut in the padded layout)::

  dy1[P, Fe] = 2 sqrt(h) * (g @ W2_blk^T)              grouped_matmul, transposed rhs, fused squared-ReLU derivative
  dx[P, D]   = dy1 @ W1_blk^T                          grouped_matmul, transposed rhs, group_axis="k"
  dW1[D, F]  = per group x_pad_g^T dy1_g               grouped_matmul_t, group_axis="n"
  dW2[F, D]  = per group h_g^T g_g                     grouped_matmul_t, group_axis="m"

``2 sqrt(h) = 2 relu(y)`` (h = relu(y)^2 rounded to the compute dtype, ~2^-9 relative), so ``y`` is never stored,
and a V:N:M-pruned entry (h = 0) gets no gradient -- the "masked" rule. Residuals: x_pad and h.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jsparse.kernels import _common as common
from jsparse.kernels.grouped_matmul import api as gmm
from jsparse.kernels.routed_ffn import reference as ref


@dataclasses.dataclass(frozen=True)
class GroupedSpec:
  num_groups: int
  row_tile: int
  vnm: tuple[int, int, int] | None
  implementation: str  # "pallas" or "xla": what the grouped GEMMs run on


def _forward(x_PxD, w1g_DxF, w2g_FxD, tile_group_R, spec: GroupedSpec):
  E, impl = spec.num_groups, spec.implementation
  h = gmm.grouped_matmul(x_PxD, w1g_DxF, tile_group_R, num_groups=E, group_axis="n", epilogue="square_relu",
                         implementation=impl, unused_tiles_last=True)
  if spec.vnm is not None:
    h = jnp.where(ref.vnm_keep_rows(h, spec.vnm), h, jnp.zeros((), h.dtype))
  out = gmm.grouped_matmul(h, w2g_FxD, tile_group_R, num_groups=E, group_axis="k", implementation=impl,
                           unused_tiles_last=True)
  return out, h


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def grouped_ffn(x_PxD, w1g_DxF, w2g_FxD, tile_group_R, tile_start_E, tiles_E, spec: GroupedSpec):
  """(P, D) routed FFN on the padded layout; weights in router order and in x's dtype."""
  return _forward(x_PxD, w1g_DxF, w2g_FxD, tile_group_R, spec)[0]


def _fwd(x_PxD, w1g_DxF, w2g_FxD, tile_group_R, tile_start_E, tiles_E, spec):
  out, h = _forward(x_PxD, w1g_DxF, w2g_FxD, tile_group_R, spec)
  return out, (x_PxD, h, w1g_DxF, w2g_FxD, tile_group_R, tile_start_E, tiles_E)


def _transposed_impl(impl: str) -> str:
  # Pallas' Mosaic GPU interpreter (CPU) cannot feed wgmma a transposed SMEM view, so under jsparse.pallas_interpret()
  # on a CPU the four transposed backward GEMMs use the reference; on a GPU they always run the kernel.
  if impl == "pallas" and common.interpret_enabled() and not common.on_gpu():
    return "xla"
  return impl


def _bwd(spec, res, g_PxD):
  x_PxD, h, w1g_DxF, w2g_FxD, tile_group_R, tile_start_E, tiles_E = res
  E, impl, rt = spec.num_groups, _transposed_impl(spec.implementation), spec.row_tile
  g_PxD = g_PxD.astype(x_PxD.dtype)
  dy1 = gmm.grouped_matmul(g_PxD, w2g_FxD, tile_group_R, num_groups=E, group_axis="n", transpose_rhs=True,
                           epilogue="square_relu_grad", aux_PxN=h, implementation=impl, unused_tiles_last=True)
  dx = gmm.grouped_matmul(dy1, w1g_DxF, tile_group_R, num_groups=E, group_axis="k", transpose_rhs=True,
                          implementation=impl, unused_tiles_last=True)
  dw1 = gmm.grouped_matmul_t(x_PxD, dy1, tile_start_E, tiles_E, row_tile=rt, group_axis="n", implementation=impl)
  dw2 = gmm.grouped_matmul_t(h, g_PxD, tile_start_E, tiles_E, row_tile=rt, group_axis="m", implementation=impl)
  return dx, dw1.astype(w1g_DxF.dtype), dw2.astype(w2g_FxD.dtype), None, None, None


grouped_ffn.defvjp(_fwd, _bwd)
