"""Public grouped GEMMs over a group-sorted, tile-padded row layout (see ``reference.py`` for the exact semantics).

``implementation``: ``None`` (the Mosaic GPU kernel on a CUDA GPU when the shapes fit it, the jnp reference
elsewhere), ``"pallas"`` (the kernel; raises where it cannot run) or ``"xla"`` (the reference). On a CPU the kernel
runs inside :func:`jsparse.pallas_interpret` through Pallas' Mosaic GPU interpreter, which cannot apply a transposed
SMEM view to ``wgmma`` (JAX 0.10), so only ``transpose_rhs=False`` ``grouped_matmul`` runs interpreted; the
transposed GEMMs are tested on the GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp

from jsparse.kernels import _common as common
from jsparse.kernels.grouped_matmul import pallas as gmm_pallas
from jsparse.kernels.grouped_matmul import reference as ref

GROUP_AXES = ("n", "k")
GROUP_AXES_T = ("n", "m")
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# The six GEMMs of the routed FFN, by (kernel, group_axis, transpose_rhs).
GEMMS = {("gmm", "n", False): "up", ("gmm", "k", False): "down", ("gmm", "n", True): "dh",
         ("gmm", "k", True): "dx", ("gmm_t", "n", False): "dw1", ("gmm_t", "m", False): "dw2"}

# Tuned TileConfig fields per GEMM; ``cluster`` is dropped where the tile count along it is odd, ``chain`` where the
# caller does not promise unused tiles last (grouped_matmul's ``unused_tiles_last``; the routed FFN does). Measured on
# the H100 (benchmarks/routed_ffn.py, E=8, trained-like routing, fwd+bwd of the whole op, 2026-11-23 session 7): the
# four row-tile GEMMs with chained tile pipelines 3.032 -> 2.955 ms at 7b (1b 1.177 -> 1.176), and with the weight
# gradients in sorted-snake order as well 2.962 ms at 7b and 1.140 ms at 1b. Measured and left off: warpgroups split
# along M (7b 3.055 vs 3.053 ms alone, 2.999 vs 2.955 chained), and, from an earlier sweep, single-GEMM winners that
# slowed the whole op (7b 3.268 vs 2.995 ms).
TUNED: dict[str, dict] = {
    **{g: dict(chain=True) for g in ("up", "down", "dh", "dx")},
    **{g: dict(schedule="sorted_snake") for g in ("dw1", "dw2")},
}

_overrides: list[dict[str, dict]] = []


@contextlib.contextmanager
def tuning(**per_gemm: dict):
  """Overrides the tuned ``TileConfig`` fields of some GEMMs while tracing (the benchmark's sweep).

  ``tuning(up=dict(stages=3), dw1=dict(cluster="m"))``; read at trace time, so jit inside the context.
  """
  unknown = set(per_gemm) - set(TUNED)
  if unknown:
    raise ValueError(f"tuning: unknown GEMMs {sorted(unknown)}; known: {sorted(TUNED)}")
  _overrides.append(per_gemm)
  try:
    yield
  finally:
    _overrides.pop()


def kernel_config(gemm: str, tile_m: int, m: int, n: int) -> gmm_pallas.TileConfig:
  """The tile configuration of one GEMM: output tiles ``tile_m`` x ``cta_n`` over an (m, n) output.

  Two warpgroups of 128 columns where n allows it, else of 64 (with ``wg_split="m"``: one CTA width of 256 columns,
  halved until it divides n). Measured on an H100 (benchmarks/routed_ffn.py
  --sweep, T=16384, D=2048, F=8192, E=8): 128-column warpgroups run the six grouped GEMMs at 420-620 TF/s, 64-column
  ones at 280-555 TF/s, the single-warpgroup engine at 270-550 TF/s. Then the per-GEMM fields of ``TUNED`` (and any
  :func:`tuning` override); a cluster that does not divide the tile grid is dropped.
  """
  fields = dict(TUNED[gemm])
  for o in _overrides:
    fields.update(o.get(gemm, {}))
  if fields.get("wg_split") == "m" and tile_m % 128:
    fields["wg_split"] = "n"  # two m64 halves need 128-row tiles (row_tile=64 keeps the side-by-side split)
  if fields.get("wg_split") == "m":  # warpgroups one above the other: the CTA is tile_n wide
    fields.setdefault("tile_n", 256)
    while n % fields["tile_n"] and fields["tile_n"] > 64:
      fields["tile_n"] //= 2  # a tuned width that does not divide this output (e.g. F/E = 896)
  else:
    fields.setdefault("tile_n", 128 if n % 256 == 0 else 64)
    if n % (2 * fields["tile_n"]):
      fields["tile_n"] = 64  # a tuned width that does not divide this output (e.g. F/E = 896)
  cfg = gmm_pallas.TileConfig(tile_m=tile_m, **fields)
  if cfg.cluster is not None:
    iters = m // cfg.tile_m if cfg.cluster == "m" else n // cfg.cta_n
    if iters % 2 or (gemm in ("up", "down", "dh", "dx") and cfg.cluster == "m"):
      cfg = dataclasses.replace(cfg, cluster=None)
  if common.interpret_enabled() and not common.on_gpu() and cfg.cluster is not None:
    cfg = dataclasses.replace(cfg, cluster=None)  # the Mosaic GPU interpreter has no cluster barriers
  return cfg


def _kernel_support(op: str, dtype, dims: dict[str, tuple[int, int]], transposed: bool) -> tuple[bool, str]:
  if jnp.dtype(dtype) not in KERNEL_DTYPES:
    return False, f"{op}: the kernel takes bfloat16/float16 operands (wgmma), got {jnp.dtype(dtype)}"
  for name, (size, tile) in dims.items():
    if size % tile:
      return False, f"{op}: {name}={size} is not a multiple of {tile}"
  if transposed and common.interpret_enabled() and not common.on_gpu():
    return False, f"{op}: the Mosaic GPU interpreter cannot run transposed wgmma operands (GPU only)"
  return True, ""


def grouped_matmul(lhs_PxK: jax.Array, rhs: jax.Array, tile_group_R: jax.Array, *, num_groups: int,
                   group_axis: str = "n", transpose_rhs: bool = False, epilogue: str | None = None,
                   aux_PxN: jax.Array | None = None, implementation: str | None = None,
                   unused_tiles_last: bool = False) -> jax.Array:
  """Grouped GEMM: row tile r of ``lhs`` times the weight block of group ``tile_group_R[r]``.

  Args:
    lhs_PxK: (P, K) rows sorted by group, P a multiple of the tile (P / len(tile_group_R) rows per tile).
    rhs: one 2-D weight with contiguous group blocks: ``[K, E*N]`` (``group_axis="n"``) or ``[E*K, N]`` (``"k"``);
      transposed (``[E*N, K]`` / ``[N, E*K]``) when ``transpose_rhs``.
    tile_group_R: int (P / row_tile,) group of every row tile; ``num_groups`` marks an unused tile (output 0).
    num_groups: E.
    epilogue: ``None``, ``"square_relu"`` (relu(acc)^2) or ``"square_relu_grad"`` (2 sqrt(aux) acc).
    aux_PxN: the saved relu^2 activation, for ``"square_relu_grad"`` only.
    implementation: ``None``, ``"pallas"`` or ``"xla"``.
    unused_tiles_last: the caller guarantees that no used tile follows an unused one (the routed FFN's layout): lets
      the kernel chain its tile pipelines (``TileConfig.chain``) where the tuning asks for it. With False (the safe
      default for any layout) a tuned ``chain`` is ignored.

  Returns:
    (P, N) in lhs's dtype (float32 accumulation).

  Raises:
    ValueError: bad ranks, shapes that do not split into E groups or tiles, bad epilogue/aux, or an explicit
      ``"pallas"`` that cannot run here.
  """
  op = "grouped_matmul"
  common.check_floating(op, "lhs", lhs_PxK)
  common.check_rank(op, "lhs", lhs_PxK, 2, 2)
  common.check_rank(op, "rhs", rhs, 2, 2)
  if group_axis not in GROUP_AXES:
    raise ValueError(f"{op}: group_axis must be one of {GROUP_AXES}, got {group_axis!r}")
  if epilogue not in ref.EPILOGUES:
    raise ValueError(f"{op}: epilogue must be one of {ref.EPILOGUES}, got {epilogue!r}")
  P, K = lhs_PxK.shape
  R = tile_group_R.shape[0]
  if R < 1 or P % R:
    raise ValueError(f"{op}: lhs has {P} rows, not a multiple of len(tile_group_R)={R}")
  row_tile = P // R
  rk, rn = (rhs.shape[1], rhs.shape[0]) if transpose_rhs else rhs.shape
  grouped = rn if group_axis == "n" else rk
  if grouped % num_groups:
    raise ValueError(f"{op}: rhs axis {group_axis!r} has size {grouped}, not a multiple of num_groups={num_groups}")
  k_rhs = rk // num_groups if group_axis == "k" else rk
  if k_rhs != K:
    raise ValueError(f"{op}: lhs has K={K} but rhs gives K={k_rhs} per group (shape {rhs.shape}, "
                     f"group_axis={group_axis!r}, transpose_rhs={transpose_rhs})")
  N = rn // num_groups if group_axis == "n" else rn
  if (epilogue == "square_relu_grad") != (aux_PxN is not None):
    raise ValueError(f"{op}: aux_PxN is required by, and only by, epilogue='square_relu_grad'")
  if aux_PxN is not None and aux_PxN.shape != (P, N):
    raise ValueError(f"{op}: aux_PxN must have shape {(P, N)}, got {aux_PxN.shape}")
  cfg = kernel_config(GEMMS[("gmm", group_axis, transpose_rhs)], row_tile, P, N)
  if cfg.chain and not unused_tiles_last:
    cfg = dataclasses.replace(cfg, chain=False)
  ok, why = _kernel_support(op, lhs_PxK.dtype, dict(row_tile=(row_tile, 64), K=(K, cfg.tile_k), N=(N, cfg.cta_n)),
                            transpose_rhs)
  impl = common.resolve_implementation(op, implementation, pallas_supports=ok, why_not=why)
  if impl == "pallas":
    return gmm_pallas.grouped_matmul(lhs_PxK, rhs, tile_group_R, aux_PxN, num_groups=num_groups,
                                     group_axis=group_axis, transpose_rhs=transpose_rhs, epilogue=epilogue, cfg=cfg,
                                     interpret=common.interpret_enabled() and not common.on_gpu())
  return ref.grouped_matmul(lhs_PxK, rhs, tile_group_R, num_groups=num_groups, group_axis=group_axis,
                            transpose_rhs=transpose_rhs, epilogue=epilogue, aux_PxN=aux_PxN)


def grouped_matmul_t(lhs_PxM: jax.Array, rhs_PxN: jax.Array, group_tile_start_E: jax.Array,
                     group_tiles_E: jax.Array, *, row_tile: int, group_axis: str = "n",
                     implementation: str | None = None) -> jax.Array:
  """Per-group ``lhs[rows_g].T @ rhs[rows_g]`` (the grouped weight gradient), blocks laid side by side.

  Args:
    lhs_PxM, rhs_PxN: rows in the group layout; group g owns rows
      ``[start_g * row_tile, (start_g + tiles_g) * row_tile)``.
    group_tile_start_E, group_tiles_E: int (E,) first tile and tile count of each group (0 tiles: a zero block).
    row_tile: rows per tile.
    group_axis: ``"n"`` gives ``[M, E*N]`` (block g in columns ``g*N:(g+1)*N``), ``"m"`` gives ``[E*M, N]``.
    implementation: ``None``, ``"pallas"`` (GPU only: the kernel reads lhs transposed) or ``"xla"``.

  Raises:
    ValueError: bad ranks or shapes, or an explicit ``"pallas"`` that cannot run here.
  """
  op = "grouped_matmul_t"
  common.check_floating(op, "lhs", lhs_PxM)
  common.check_rank(op, "lhs", lhs_PxM, 2, 2)
  common.check_rank(op, "rhs", rhs_PxN, 2, 2)
  if group_axis not in GROUP_AXES_T:
    raise ValueError(f"{op}: group_axis must be one of {GROUP_AXES_T}, got {group_axis!r}")
  if lhs_PxM.shape[0] != rhs_PxN.shape[0]:
    raise ValueError(f"{op}: lhs and rhs must have the same rows, got {lhs_PxM.shape} and {rhs_PxN.shape}")
  if group_tile_start_E.shape != group_tiles_E.shape or group_tile_start_E.ndim != 1:
    raise ValueError(f"{op}: group_tile_start_E and group_tiles_E must both have shape (E,)")
  common.check_multiple(op, "rows", lhs_PxM.shape[0], row_tile, "row_tile")
  M, N = lhs_PxM.shape[1], rhs_PxN.shape[1]
  cfg = kernel_config(GEMMS[("gmm_t", group_axis, False)], 128, M, N)
  ok, why = _kernel_support(op, lhs_PxM.dtype, dict(M=(M, cfg.tile_m), N=(N, cfg.cta_n),
                                                    row_tile=(row_tile, cfg.tile_k)), True)
  impl = common.resolve_implementation(op, implementation, pallas_supports=ok, why_not=why)
  if impl == "pallas":
    return gmm_pallas.grouped_matmul_t(lhs_PxM, rhs_PxN, group_tile_start_E, group_tiles_E, row_tile=row_tile,
                                       group_axis=group_axis, cfg=cfg, interpret=False)
  return ref.grouped_matmul_t(lhs_PxM, rhs_PxN, group_tile_start_E, group_tiles_E, row_tile=row_tile,
                              group_axis=group_axis)
