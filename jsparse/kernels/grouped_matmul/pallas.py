"""Mosaic GPU (sm90) grouped GEMMs for the routed FFN: ``grouped_matmul`` (per row tile, one group's weight block)
and ``grouped_matmul_t`` (per group, a weight-gradient block reduced over the group's rows).

Both are persistent kernels (one CTA per SM walking output tiles, ``plgpu.nd_loop`` + ``planar_snake``) with two
interchangeable tile engines:

* **warp-specialised** (default; after ``jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py``, the production Hopper
  matmul shipped with JAX 0.10/0.11): one TMA warpgroup feeds two wgmma warpgroups side by side along N through
  ``stages`` swizzled SMEM buffers; the epilogue goes registers -> SMEM -> TMA store in ``epi_tile`` pieces.
* **simple** (after ``ragged_dot_mgpu.py``): one warpgroup, ``plgpu.emit_pipeline`` with ``delay_release=1``.

What is specific to the routed FFN:

* The group of an output tile is read from GMEM (``tile_group`` / ``group_tile_start``) and only moves the weight
  block's offset, so tokens sorted by group and padded to ``tile_m`` rows need no row masks; an unused tile or an
  empty group runs a 0-step pipeline (a dynamic grid) and stores zeros.
* The weight is one 2-D array with contiguous group blocks, read in place (no ``[E, K, N]`` copy), optionally
  through a transposed SMEM view (the backward's ``dY @ W^T``).
* Epilogues: ``square_relu`` (relu^2 fused into the up-projection) and ``square_relu_grad`` (``2 sqrt(h) * acc``, the
  squared-ReLU derivative fused into ``dH = dOut @ W2^T``; ``h`` is TMA-loaded into the output SMEM buffer).

CPU: the kernels run in Pallas' Mosaic GPU interpreter (``InterpretGPUParams``) inside
:func:`jsparse.pallas_interpret`, except transposed wgmma operands, which that interpreter does not implement.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jsparse.kernels import _common as common

_MEMORY_REGISTERS = 40
SCHEDULES = ("group_major", "sorted_snake")


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Static tile shape of one kernel call.

  A CTA computes ``tile_m x cta_n`` outputs, ``tile_k`` deep per pipeline stage, ``stages`` stages in flight. For
  ``grouped_matmul`` ``tile_m`` is also the row alignment of the group layout (``row_tile``). With two compute
  warpgroups (``warp_specialized``) ``wg_split`` says how they share the CTA tile: ``"n"`` side by side
  (``cta_n = 2 tile_n``, each warpgroup ``tile_m x tile_n``, two m64 wgmmas per k-step that each read the B slice) or
  ``"m"`` one above the other (``cta_n = tile_n``, each warpgroup ``tile_m/2 x tile_n``: with ``tile_n=256`` one
  m64n256 wgmma per k-step, CUTLASS's "cooperative" split; B is read from SMEM once per warpgroup instead of twice,
  which for a 128 x 256 CTA tile cuts the wgmma operand reads per k-step from 96 to 80 KiB next to the 48 KiB that
  TMA writes, against the SM's ~128 B/cycle of shared-memory bandwidth).
  """

  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  stages: int = 4
  epi_tile_m: int = 64
  epi_tile_n: int = 64
  # planar_snake order: bands of ``grid_tile_width`` tiles along ``grid_minor_dim`` (0: M, 1: N), each band walked
  # along the other axis. Width 1 with minor dim 1 walks M fastest: the CTAs in flight share a weight slab but all
  # read different token rows; minor dim 0 walks N fastest: they share token rows (each read once from DRAM).
  grid_minor_dim: int = 1
  grid_tile_width: int = 1
  warp_specialized: bool = True
  dynamic_grid: bool = True  # grouped_matmul: unused tiles run 0 steps (False: they multiply and are zeroed)
  mma_in_flight: int = 0  # warp-specialised: wgmma groups left in flight when a stage is released (0 or 1)
  cluster: str | None = None  # warp-specialised: 2-CTA clusters splitting "m" or "n" (the other operand multicast)
  # grouped_matmul_t: the order CTAs take output tiles in. A tile's cost is its group's row count, so tiles differ in
  # cost by the routing's imbalance. "group_major": group by group, round robin over CTAs. "sorted_snake": groups
  # from the largest down, and every other round of CTAs in reverse, so a CTA that drew a large tile in one round
  # draws a small one in the next (modelled at 7b, E=8 with trained-like routing: the busiest CTA's k-steps drop
  # from 10% to 4% over the mean; at 1b from 36% to 24%).
  schedule: str = "group_major"
  wg_split: str = "n"
  # grouped_matmul: chain each CTA's tile pipelines (Pallas' pipeline_state START/STEADY/STOP) so the TMA warpgroup
  # starts loading the next tile while the compute warpgroups finish this one and run its epilogue, instead of
  # draining the pipeline at every tile; only the used row tiles are walked (their count read from GMEM) and the
  # unused ones get zeros in a second loop, so the unused tiles must come last (as the routed layout puts them).
  # Needs static pipeline lengths: K/tile_k a multiple of ``stages`` and no ``mma_in_flight`` (grouped_matmul falls
  # back to unchained tiles otherwise).
  chain: bool = False

  def __post_init__(self):
    if self.wg_split not in ("n", "m"):
      raise ValueError(f"TileConfig: wg_split must be 'n' or 'm', got {self.wg_split!r}")
    if self.wg_split == "m" and not self.warp_specialized:
      raise ValueError("TileConfig: wg_split='m' needs the warp-specialised engine (two compute warpgroups)")
    if self.wg_split == "m" and self.tile_m % 128:
      raise ValueError(f"TileConfig: wg_split='m' needs tile_m a multiple of 128 (two m64 halves), got {self.tile_m}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"TileConfig: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.cluster not in (None, "m", "n"):
      raise ValueError(f"TileConfig: cluster must be None, 'm' or 'n', got {self.cluster!r}")
    if self.mma_in_flight not in (0, 1) or self.mma_in_flight >= self.stages:
      raise ValueError(f"TileConfig: mma_in_flight must be 0 or 1 and below stages, got {self.mma_in_flight}")
    if (self.cluster or self.mma_in_flight) and not self.warp_specialized:
      raise ValueError("TileConfig: cluster and mma_in_flight need the warp-specialised engine")

  @property
  def compute_wgs(self) -> int:
    return 2 if self.warp_specialized else 1

  @property
  def cta_n(self) -> int:
    return self.tile_n if self.wg_split == "m" else self.compute_wgs * self.tile_n

  @property
  def wg_tile(self) -> tuple[int, int]:
    """(rows, columns) of the output one compute warpgroup accumulates."""
    if self.wg_split == "m":  # only with the warp-specialised engine (__post_init__)
      return self.tile_m // self.compute_wgs, self.tile_n
    return self.tile_m, self.tile_n

  @property
  def cluster_size(self) -> int:
    return 1 if self.cluster is None else 2

  def cluster_tiles(self, m_iters: int, n_iters: int) -> tuple[int, int]:
    """(M, N) tile counts of the cluster-level loop (a cluster covers 2 adjacent tiles along ``cluster``)."""
    return (m_iters // 2 if self.cluster == "m" else m_iters), (n_iters // 2 if self.cluster == "n" else n_iters)


def _num_sms(interpret: bool) -> int:
  if interpret:
    return 1  # the interpreter simulates every CTA (slowly); one walks all tiles through the persistent loop
  return getattr(jax.devices()[0], "core_count", None) or 132


def _grid(cfg: "TileConfig", interpret: bool) -> int:
  """Persistent CTAs (clusters when ``cfg.cluster``): one per SM."""
  return max(1, _num_sms(interpret) // cfg.cluster_size)


def _transforms(dtype, minor_elems: int):
  swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _check_tiles(op, cfg: TileConfig, **dims):
  for name, (size, tile) in dims.items():
    if size % tile:
      raise ValueError(f"{op}: {name}={size} is not a multiple of the tile {tile} ({cfg})")


def _check_cluster(op, cfg: TileConfig, m_iters: int, n_iters: int, allowed: tuple[str, ...]):
  if cfg.cluster is None:
    return
  if cfg.cluster not in allowed:
    raise ValueError(f"{op}: cluster={cfg.cluster!r} is not supported here (allowed: {allowed})")
  iters = m_iters if cfg.cluster == "m" else n_iters
  if iters % 2:
    raise ValueError(f"{op}: cluster={cfg.cluster!r} needs an even number of tiles along it, got {iters}")


def _cluster_position(cfg: TileConfig, mc, nc):
  """Tile indices of this CTA from its cluster's indices."""
  if cfg.cluster is None:
    return mc, nc
  cta = lax.axis_index("cluster")
  return (mc * 2 + cta, nc) if cfg.cluster == "m" else (mc, nc * 2 + cta)


def _slice(ref, idx, axis: int):
  """``ref`` sliced along ``axis`` (2-D), or ``ref`` itself for a full slice (no extra view on the wgmma operand)."""
  if isinstance(idx, slice) and idx == slice(None):
    return ref
  return ref.at[idx] if axis == 0 else ref.at[:, idx]


def _epilogue_math(acc, epilogue, out_dtype):
  if epilogue == "square_relu":
    acc = jnp.square(jnp.maximum(acc, 0.0))
  return acc if epilogue == "square_relu_grad" else acc.astype(out_dtype)


def _kept(acc, keep):
  return acc if keep is None else acc * keep.astype(jnp.float32)


def _launch(body, out_shape, out_dtype, cfg: TileConfig, interpret: bool):
  kwargs = dict(num_threads=cfg.compute_wgs + 1, thread_name="wg") if cfg.warp_specialized else {}
  if cfg.cluster is not None:
    kwargs.update(cluster=(2,), cluster_names=("cluster",))
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
      grid=(_grid(cfg, interpret),),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=common.mosaic_interpret_params(interpret),
      **kwargs,
  )


# ----------------------------------------------------------------------------------------------------------------------
# Tile engines. ``tile_fn(lin) -> (steps, a_map, b_map, out_rows, out_cols, keep)`` describes output tile ``lin``: its
# pipeline length, the block index maps of the two operands, the CTA's output window (pl.ds slices) and whether the
# result is kept (``None``: always; else a bool scalar, False stores zeros); with ``cfg.cluster`` the two CTAs of a
# cluster get tiles adjacent along that axis and the same pipeline length, and the operand they share (A for "n", B
# for "m") is multicast: each CTA loads half of it;
# ``operands(a_smem, b_smem, rows, cols) -> (a, b)`` are the wgmma operands for the compute warpgroup owning output
# ``rows`` x ``cols`` of the CTA tile (slices of the A block's rows and the B block's columns).


def _run_ws(a_gmem, b_gmem, out_gmem, aux_gmem, *, n_tiles, a_block, b_block, tile_fn, operands, cfg, epilogue,
            chain=False, n_zero_tiles=0, zero_tile_fn=None):
  """``chain``: the tiles' pipelines are chained (static lengths); then ``zero_tile_fn(lin) -> (out_rows, out_cols)``
  names ``n_zero_tiles`` further tiles that get zeros without a pipeline."""
  dtype, out_dtype = a_gmem.dtype, out_gmem.dtype
  tm, tn = cfg.wg_tile
  wgs = cfg.compute_wgs
  slots = min(2, (tm // cfg.epi_tile_m) * (tn // cfg.epi_tile_n))

  shared_a, shared_b = (("cluster",) if cfg.cluster == c else () for c in ("n", "m"))

  def pipeline(body, compute_context, a_map, b_map, steps, state=None):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=_MEMORY_REGISTERS, wg_axis="wg", num_compute_wgs=wgs,
        max_concurrent_steps=cfg.stages, compute_context=compute_context, pipeline_state=state,
        in_specs=[
            plgpu.BlockSpec(a_block, a_map, transforms=_transforms(dtype, a_block[1]), memory_space=plgpu.SMEM,
                            delay_release=cfg.mma_in_flight, collective_axes=shared_a),
            plgpu.BlockSpec(b_block, b_map, transforms=_transforms(dtype, b_block[1]), memory_space=plgpu.SMEM,
                            delay_release=cfg.mma_in_flight, collective_axes=shared_b),
        ])

  ignore = lambda *_, **__: None
  # Buffers depend only on the block shapes: allocate them once for all tiles (hopper_matmul_mgpu's pattern).
  allocs = pipeline(ignore, ignore, lambda k: (k, 0), lambda k: (k, 0), cfg.stages).get_allocations(a_gmem, b_gmem)
  scratch = dict(
      pipeline_allocs=allocs,
      out_smem=plgpu.SMEM((wgs, slots, cfg.epi_tile_m, cfg.epi_tile_n), out_dtype,
                          transforms=_transforms(out_dtype, cfg.epi_tile_n)),
      aux_barrier=plgpu.Barrier(num_barriers=wgs * slots) if aux_gmem is not None else None,
  )

  @functools.partial(pl.run_scoped, **scratch, collective_axes="wg")
  def _scope(pipeline_allocs, out_smem, aux_barrier):
    wg_idx = lax.axis_index("wg")
    if cfg.wg_split == "m":
      rows, cols = pl.ds(wg_idx * tm, tm), slice(None)
    else:
      rows, cols = slice(None), pl.ds(wg_idx * tn, tn)

    def store_tile(out_tile, values):
      """This warpgroup's tm x tn output tile to GMEM through its SMEM slots, one epilogue block at a time:
      ``values(ms, ns, slot)`` gives the block (and may stage inputs in ``slot``, free once the wait below returns)."""
      n_epi = tn // cfg.epi_tile_n
      for mi in range(tm // cfg.epi_tile_m):
        for ni in range(n_epi):
          ms = slice(mi * cfg.epi_tile_m, (mi + 1) * cfg.epi_tile_m)
          ns = slice(ni * cfg.epi_tile_n, (ni + 1) * cfg.epi_tile_n)
          slot = (mi * n_epi + ni) % slots
          plgpu.wait_smem_to_gmem(1, wait_read_only=True)
          out_smem[wg_idx, slot] = values(ms, ns, slot)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(out_smem.at[wg_idx, slot], out_tile.at[ms, ns])

    @plgpu.nd_loop((n_tiles,), collective_axes="sm")
    def _tile_loop(loop_info):
      (lin,) = loop_info.index
      steps, a_map, b_map, out_rows, out_cols, keep = tile_fn(lin)
      state = None
      if chain:
        # A CTA's first tile fills the pipeline, its last one drains it, the ones between neither. (A lone tile
        # starts and is never drained: nothing follows it.)
        first, last = loop_info.local_index == 0, loop_info.local_index == loop_info.num_local_steps - 1
        state = jnp.where(first, int(plgpu.PipelinePipeline.START),
                          jnp.where(last, int(plgpu.PipelinePipeline.STOP), int(plgpu.PipelinePipeline.STEADY)))
      out_tile = out_gmem.at[out_rows, out_cols].at[rows, cols]
      aux_tile = aux_gmem.at[out_rows, out_cols].at[rows, cols] if aux_gmem is not None else None

      def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
        def _acc_scope(acc_ref):
          eval_pipeline(acc_ref)
          acc = _epilogue_math(_kept(acc_ref[...], keep), epilogue, out_dtype)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

          def values(ms, ns, slot):
            if aux_tile is None:
              return acc[ms, ns]
            barrier = aux_barrier.at[wg_idx * slots + slot]  # the aux block is staged in its output slot
            plgpu.copy_gmem_to_smem(aux_tile.at[ms, ns], out_smem.at[wg_idx, slot], barrier)
            plgpu.barrier_wait(barrier)
            h = out_smem[wg_idx, slot].astype(jnp.float32)
            return (acc[ms, ns] * 2.0 * jnp.sqrt(h)).astype(out_dtype)

          store_tile(out_tile, values)

      def mma(_, a_smem, b_smem, acc_ref):
        plgpu.wgmma(acc_ref, *operands(a_smem, b_smem, rows, cols))
        # With a stage released one step late (delay_release), the previous group may still be in flight.
        plgpu.wgmma_wait(cfg.mma_in_flight)
        return acc_ref

      pipeline(mma, compute_context, a_map, b_map, steps, state)(a_gmem, b_gmem, allocations=pipeline_allocs)

    if zero_tile_fn is not None:
      @plgpu.nd_loop((n_zero_tiles,), collective_axes="sm")
      def _zero_loop(loop_info):
        (lin,) = loop_info.index
        out_rows, out_cols = zero_tile_fn(lin)
        out_tile = out_gmem.at[out_rows, out_cols].at[rows, cols]

        @pl.when(wg_idx < wgs)  # the compute warpgroups; the memory one has no SMEM tile of its own
        def _store_zeros():
          store_tile(out_tile, lambda *_: jnp.zeros((cfg.epi_tile_m, cfg.epi_tile_n), out_dtype))

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _run_simple(a_gmem, b_gmem, out_gmem, aux_gmem, *, n_tiles, a_block, b_block, tile_fn, operands, cfg, epilogue):
  dtype, out_dtype = a_gmem.dtype, out_gmem.dtype
  tm, tn = cfg.tile_m, cfg.tile_n
  rows = cols = slice(None)

  @plgpu.nd_loop((n_tiles,), collective_axes="sm")
  def _tile_loop(loop_info):
    (lin,) = loop_info.index
    steps, a_map, b_map, out_rows, out_cols, keep = tile_fn(lin)

    def acc_scope(acc_ref):
      plgpu.emit_pipeline(
          lambda _, a_smem, b_smem: plgpu.wgmma(acc_ref, *operands(a_smem, b_smem, rows, cols)),
          grid=(steps,),
          in_specs=[
              plgpu.BlockSpec(a_block, a_map, transforms=_transforms(dtype, a_block[1]), delay_release=1),
              plgpu.BlockSpec(b_block, b_map, transforms=_transforms(dtype, b_block[1]), delay_release=1),
          ],
          max_concurrent_steps=cfg.stages,
      )(a_gmem, b_gmem)
      return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((tm, tn), jnp.float32))
    acc = _epilogue_math(_kept(acc, keep), epilogue, out_dtype)

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((tm, tn), out_dtype, transforms=_transforms(out_dtype, tn)),
                       barrier=plgpu.Barrier(num_barriers=1))
    def _store(o_smem, barrier):
      if aux_gmem is not None:
        plgpu.copy_gmem_to_smem(aux_gmem.at[out_rows, out_cols], o_smem, barrier.at[0])
        plgpu.barrier_wait(barrier.at[0])
        o_smem[...] = (acc * 2.0 * jnp.sqrt(o_smem[...].astype(jnp.float32))).astype(out_dtype)
      else:
        o_smem[...] = acc
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[out_rows, out_cols])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _run(*args, cfg, **kwargs):
  return (_run_ws if cfg.warp_specialized else _run_simple)(*args, cfg=cfg, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# grouped_matmul: out[P, N] = epilogue(lhs[P, K] @ B_group(tile)).


def grouped_matmul(lhs_PxK, rhs, tile_group_R, aux_PxN=None, *, num_groups: int, group_axis: str,
                   transpose_rhs: bool, epilogue: str | None, cfg: TileConfig = TileConfig(),
                   interpret: bool = False):
  """See ``reference.grouped_matmul``; ``tile_group_R`` has one entry per ``cfg.tile_m`` rows."""
  P, K = lhs_PxK.shape
  E = num_groups
  n_total = rhs.shape[0] if transpose_rhs else rhs.shape[1]
  N = n_total // E if group_axis == "n" else n_total
  _check_tiles("grouped_matmul", cfg, rows=(P, cfg.tile_m), K=(K, cfg.tile_k), N=(N, cfg.cta_n))
  dtype = lhs_PxK.dtype
  tm, tk, cta_n = cfg.tile_m, cfg.tile_k, cfg.cta_n
  m_iters, n_iters, k_iters = P // tm, N // cta_n, K // tk
  # Two CTAs of a cluster share a row tile (so a group and a pipeline length); row tiles of different groups
  # cannot share a weight block, hence no "m" clusters here.
  _check_cluster("grouped_matmul", cfg, m_iters, n_iters, ("n",))
  mc_iters, nc_iters = cfg.cluster_tiles(m_iters, n_iters)
  b_block = (cta_n, tk) if transpose_rhs else (tk, cta_n)
  has_aux = epilogue == "square_relu_grad"
  # Chained pipelines need one static length for every tile.
  chain = cfg.chain and cfg.warp_specialized and not cfg.mma_in_flight and k_iters % cfg.stages == 0

  def b_map_of(group, n_idx):
    g = jnp.minimum(group, E - 1)
    if group_axis == "n":
      nb = g * n_iters + n_idx
      return (lambda k: (nb, k)) if transpose_rhs else (lambda k: (k, nb))
    kb = g * k_iters
    return (lambda k: (n_idx, kb + k)) if transpose_rhs else (lambda k: (kb + k, n_idx))

  def window(m_idx, n_idx):
    return pl.ds(m_idx * tm, tm), pl.ds(n_idx * cta_n, cta_n)

  def body(tile_group_gmem, used_gmem, a_gmem, b_gmem, *refs):
    aux_gmem, out_gmem = refs if has_aux else (None, refs[0])

    def tile_fn(lin):
      mc, nc = plgpu.planar_snake(lin, (mc_iters, nc_iters), cfg.grid_minor_dim, cfg.grid_tile_width)
      m_idx, n_idx = _cluster_position(cfg, mc, nc)
      group = tile_group_gmem[m_idx]
      if cfg.dynamic_grid:
        steps, keep = jnp.where(group < E, k_iters, 0).astype(jnp.int32), None  # unused tile: no MMA, zeros stored
      else:
        steps, keep = k_iters, group < E
      return (steps, (lambda k: (m_idx, k)), b_map_of(group, n_idx), *window(m_idx, n_idx), keep)

    # Chained: the used row tiles (those before the first unused one: the layout puts the unused ones last) in the
    # snake order over a grid of that many rows, then zeros for the rest.
    used = used_gmem[0]

    def used_tile_fn(lin):
      mc, nc = plgpu.planar_snake(lin, (used, nc_iters), cfg.grid_minor_dim, cfg.grid_tile_width)
      m_idx, n_idx = _cluster_position(cfg, mc, nc)
      return (k_iters, (lambda k: (m_idx, k)), b_map_of(tile_group_gmem[m_idx], n_idx), *window(m_idx, n_idx),
              None)

    def zero_tile_fn(lin):
      return window(*_cluster_position(cfg, used + lax.div(lin, nc_iters), lax.rem(lin, nc_iters)))

    def operands(a_smem, b_smem, rows, cols):
      if transpose_rhs:
        return _slice(a_smem, rows, 0), b_smem.at[cols, :].transpose((1, 0))
      return _slice(a_smem, rows, 0), b_smem.at[:, cols]

    common_kw = dict(a_block=(tm, tk), b_block=b_block, operands=operands, cfg=cfg, epilogue=epilogue)
    if chain:
      _run_ws(a_gmem, b_gmem, out_gmem, aux_gmem, n_tiles=used * nc_iters, tile_fn=used_tile_fn, chain=True,
              n_zero_tiles=(mc_iters - used) * nc_iters, zero_tile_fn=zero_tile_fn, **common_kw)
    else:
      _run(a_gmem, b_gmem, out_gmem, aux_gmem, n_tiles=mc_iters * nc_iters, tile_fn=tile_fn, **common_kw)

  kernel = _launch(body, (P, N), dtype, cfg, interpret)
  tile_group_R = tile_group_R.astype(jnp.int32)
  used_tiles = jnp.sum(tile_group_R < E, dtype=jnp.int32).reshape(1)  # read only by the chained kernel
  args = (tile_group_R, used_tiles, lhs_PxK, rhs.astype(dtype))
  return kernel(*args, aux_PxN.astype(dtype)) if has_aux else kernel(*args)


# ----------------------------------------------------------------------------------------------------------------------
# grouped_matmul_t: per group g, lhs[rows_g].T @ rhs[rows_g] (the weight gradients).


def snake_rank(lin, n_tiles: int, num_ctas: int):
  """Rank (in cost order) of the tile that loop index ``lin`` takes under ``schedule="sorted_snake"``.

  The persistent loop hands CTA ``s`` the indices ``s, s + G, s + 2G, ...`` (round ``i`` = index // G). Even rounds
  map CTA s to rank ``iG + s``, odd rounds to ``iG + (size - 1 - s)`` with ``size`` the CTAs in that round (fewer in
  the last), so the mapping is a permutation of ``range(n_tiles)``.
  """
  i, s = lax.div(lin, num_ctas), lax.rem(lin, num_ctas)
  size = jnp.minimum(num_ctas, n_tiles - i * num_ctas)
  return i * num_ctas + jnp.where(lax.rem(i, 2) == 0, s, size - 1 - s)


def grouped_matmul_t(lhs_PxM, rhs_PxN, group_tile_start_E, group_tiles_E, *, row_tile: int, group_axis: str,
                     cfg: TileConfig = TileConfig(), interpret: bool = False):
  """See ``reference.grouped_matmul_t``; groups are row ranges in units of ``row_tile`` rows.

  With ``cfg.schedule == "sorted_snake"`` the groups are taken largest first (a stable argsort of the tile counts,
  computed here, a few-element XLA op) in the snake order of :func:`snake_rank`.
  """
  P, M = lhs_PxM.shape
  N = rhs_PxN.shape[1]
  E = group_tile_start_E.shape[0]
  _check_tiles("grouped_matmul_t", cfg, M=(M, cfg.tile_m), N=(N, cfg.cta_n), row_tile=(row_tile, cfg.tile_k))
  dtype = lhs_PxM.dtype
  tm, tk, cta_n = cfg.tile_m, cfg.tile_k, cfg.cta_n
  m_iters, n_iters = M // tm, N // cta_n
  _check_cluster("grouped_matmul_t", cfg, m_iters, n_iters, ("m", "n"))  # a cluster stays inside one group
  mc_iters, nc_iters = cfg.cluster_tiles(m_iters, n_iters)
  k_per_tile = row_tile // tk
  out_shape = (M, E * N) if group_axis == "n" else (E * M, N)

  per_group = mc_iters * nc_iters
  n_tiles = E * per_group
  num_ctas = _grid(cfg, interpret)

  def body(start_gmem, tiles_gmem, order_gmem, a_gmem, b_gmem, out_gmem):
    def tile_fn(lin):
      # Group-major order (both schedules): the CTAs working at the same time share one group's rows in L2.
      if cfg.schedule == "sorted_snake":
        rank = snake_rank(lin, n_tiles, num_ctas)
        g, r = order_gmem[lax.div(rank, per_group)], lax.rem(rank, per_group)
      else:
        g, r = lax.div(lin, per_group), lax.rem(lin, per_group)
      mc, nc = plgpu.planar_snake(r, (mc_iters, nc_iters), cfg.grid_minor_dim, cfg.grid_tile_width)
      m_idx, n_idx = _cluster_position(cfg, mc, nc)
      kb = start_gmem[g] * k_per_tile
      steps = (tiles_gmem[g] * k_per_tile).astype(jnp.int32)  # empty group: no MMA, zeros stored
      if group_axis == "n":
        rows, out_cols = pl.ds(m_idx * tm, tm), pl.ds((g * n_iters + n_idx) * cta_n, cta_n)
      else:
        rows, out_cols = pl.ds((g * m_iters + m_idx) * tm, tm), pl.ds(n_idx * cta_n, cta_n)
      return steps, (lambda k: (kb + k, m_idx)), (lambda k: (kb + k, n_idx)), rows, out_cols, None

    def operands(a_smem, b_smem, rows, cols):
      return _slice(a_smem, rows, 1).transpose((1, 0)), b_smem.at[:, cols]

    _run(a_gmem, b_gmem, out_gmem, None, n_tiles=n_tiles, a_block=(tk, tm), b_block=(tk, cta_n),
         tile_fn=tile_fn, operands=operands, cfg=cfg, epilogue=None)

  kernel = _launch(body, out_shape, dtype, cfg, interpret)
  tiles_E = group_tiles_E.astype(jnp.int32)
  # The group order is read only by the sorted snake; group-major passes the tile counts in its place (unread).
  order_E = jnp.argsort(-tiles_E, stable=True).astype(jnp.int32) if cfg.schedule == "sorted_snake" else tiles_E
  return kernel(group_tile_start_E.astype(jnp.int32), tiles_E, order_E, lhs_PxM, rhs_PxN.astype(dtype))
