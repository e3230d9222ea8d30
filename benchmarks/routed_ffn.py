"""Routed (neuron-grouped) squared-ReLU FFN vs the dense FFN, fwd and fwd+bwd, bf16, one process.

Run: ``PYTHONPATH=$PWD python3 benchmarks/routed_ffn.py --out $OUT/routed_ffn.json --token-order-at 8`` (GPU; both
shapes, E in 2, 4, 8, 16: ~175 s on an H100, most of it compilation). ``--sweep`` also times every grouped GEMM of
the E=8 shapes under TileConfig variants, the whole op under the winners and its non-GEMM pieces; ``--op-variants``
times the whole op under named tuning variants after the benchmark; both write ``*_sweep.json`` next to ``--out``.

Every routed time includes the whole op as a model calls it: token routing (``x @ centroids``, argmax), the counting
sort and layout, the weight permutation (W1 columns / W2 rows into router order), the token gather and the scatter
back, and, for fwd+bwd, the same in reverse. Re-clustering (k-means, every k steps) is timed once per config and
reported separately (``recluster_ms``). Loss for fwd+bwd: ``mean(out^2) / 2`` (all grads: x, W1, W2).

Implementations: ``xla_dense`` (``relu(x @ W1)^2 @ W2``, the base), ``ragged_dot`` (``jax.lax.ragged_dot``), ``einsum``
(padded batched GEMMs; capacity = the largest group of this routing rounded up to 128 -- an oracle static capacity,
so the baseline pays for the imbalance but never drops a token), ``einsum_equal_groups`` (E=8 only: tokens dealt
round-robin so every group has exactly T/E -- not a router, the idealised plain-XLA bound of h100-measurements §9),
``ours`` (``implementation="pallas"``: the Mosaic GPU grouped GEMMs, weights passed in their original neuron order
and permuted inside the op every step) and ``ours_grouped_weights`` (the same with the weights kept in router order,
``weights_grouped=True``; the re-layout of W1, W2 and two float32 Adam moments each, paid once per re-clustering, is
reported as ``relayout_ms``). A ``_rt64`` suffix on an ``ours*`` name (not run by default) runs it with 64-row tiles
instead of 128: half the padding per group and twice the row tiles, against smaller wgmma tiles (``row_tile`` in
the record's config); a ``_pgather`` / ``_tgather`` suffix moves tokens into the group layout with the Pallas
row-gather kernel, Triton / Mosaic GPU bulk-copy engine, instead of XLA's gather (``gather="pallas"`` /
``"pallas_tma"``; ``gather`` in the config); a ``_snake`` suffix runs the weight-gradient GEMMs with
``schedule="sorted_snake"`` (``dw_schedule`` in the config); a ``_playout`` suffix builds the group layout with
its Triton kernel (``layout="pallas"``; ``layout`` in the config); a ``_wgm`` suffix runs every grouped GEMM with
its two compute warpgroups split along M (``wg_split="m"``, 64 x 256 each; ``wg_split`` in the config); a ``_chain``
suffix chains the tile pipelines of up/down/dh/dx (``chain`` in the config). Suffixes combine (``_rt64_pgather``).
The sorted snake and the chained pipelines are the tuned defaults since they won on the H100 (``TUNED`` in
``jsparse/kernels/grouped_matmul/api.py``), so ``_snake`` and ``_chain`` now only label what every variant runs.

**Trained-like activations** (what the router sees): 64 latent "feature" directions u_k in R^D. Neuron f of W1 is
``u_{k(f)}`` plus Gaussian noise (each feature owns F/64 neurons, as co-activating neurons of a trained FFN do); token
t is ``u_a + 0.5 u_b`` plus noise with a, b drawn from a Zipf(1.1)-like law over the features (some features are far
more common, which makes the routed groups unequal, as real routing does). Weights are scaled to unit-variance
pre-activations. The router is ``jsparse.router_init`` (balanced k-means, 10 iterations) and routes by
``argmax x . c_g``; ``captured_mass`` is ``jsparse.captured_mass`` on these tokens (1/E would be a random router).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _util  # noqa: E402
from jsparse import router as rt  # noqa: E402
from jsparse.kernels.grouped_matmul import api as gmm_api  # noqa: E402
from jsparse.kernels.routed_ffn import api as rf_api  # noqa: E402
from jsparse.kernels.routed_ffn import layout as lay  # noqa: E402

SHAPES = {"1b": (16384, 2048, 8192), "7b": (16384, 4096, 14336), "tiny": (512, 256, 2048)}  # tiny: CPU smoke test
GOALS = {("1b", 8): 4.0, ("7b", 8): 5.5, ("1b", 2): 1.6, ("7b", 2): 1.6}
ROW_TILE = 128


def trained_like(T, D, F, key, num_features=64, dtype=jnp.bfloat16):
  """Tokens and weights with clustered, Zipf-skewed activations (see the module docstring)."""
  k = jax.random.split(key, 6)
  u = jax.random.normal(k[0], (num_features, D), jnp.float32)
  u = u / jnp.linalg.norm(u, axis=1, keepdims=True)
  feat_F = jnp.arange(F) % num_features
  w1 = (u[feat_F] + 0.35 * jax.random.normal(k[1], (F, D)) / math.sqrt(D)).T  # (D, F): unit-norm-ish columns
  p = 1.0 / (jnp.arange(num_features) + 1.0) ** 1.1
  a = jax.random.choice(k[2], num_features, (T,), p=p / p.sum())
  b = jax.random.choice(k[3], num_features, (T,), p=p / p.sum())
  x = u[a] + 0.5 * u[b] + 0.35 * jax.random.normal(k[4], (T, D)) / math.sqrt(D)  # feature-a neurons see y ~ 1
  w2 = jax.random.normal(k[5], (F, D), jnp.float32) / math.sqrt(F)
  return x.astype(dtype), w1.astype(dtype), w2.astype(dtype)


def dense_ffn(x, w1, w2):
  return jnp.dot(jnp.square(jax.nn.relu(jnp.dot(x, w1))), w2)


def fwd_bwd(f):
  def loss(x, w1, w2):
    return 0.5 * jnp.mean(jnp.square(f(x, w1, w2).astype(jnp.float32)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _rel_err(a, b):
  """max over (loss, dx, dW1, dW2) of |a - b|_max / |b|_max."""
  errs = []
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
    errs.append(float(np.abs(u - v).max() / max(np.abs(v).max(), 1e-30)))
  return round(max(errs), 5)


def timed(fn, *args, iters=6):
  return _util.time_fn(fn, *args, warmup=2, iters=iters, rounds=3)


_SHAPE_CACHE = {}


def shape_setup(name, log):
  """Tokens, weights and the dense baseline of a shape (measured once per process)."""
  if name not in _SHAPE_CACHE:
    T, D, F = SHAPES[name]
    x, w1, w2 = trained_like(T, D, F, jax.random.key(0))
    t_dense = {"fwd": timed(jax.jit(dense_ffn), x, w1, w2), "fwd+bwd": timed(fwd_bwd(dense_ffn), x, w1, w2)}
    log(f"[{name}] dense fwd {t_dense['fwd']:.3f} ms, fwd+bwd {t_dense['fwd+bwd']:.3f} ms")
    _SHAPE_CACHE[name] = (x, w1, w2, t_dense)
  return _SHAPE_CACHE[name]


VARIANT_SUFFIXES = ("_rt64", "_pgather", "_tgather", "_snake", "_playout", "_wgm", "_chain")


def _variant(impl: str) -> tuple[str, set[str]]:
  """(base implementation, modifiers) of a name like ``ours_grouped_weights_rt64_pgather``."""
  mods = set()
  while impl.startswith("ours") and impl.endswith(VARIANT_SUFFIXES):
    suffix = next(s for s in VARIANT_SUFFIXES if impl.endswith(s))
    mods.add(suffix[1:])
    impl = impl.removesuffix(suffix)
  return impl, mods


def _gather(mods: set[str]) -> str | None:
  """The ``gather=`` a variant's modifiers ask for (None: the op's default)."""
  return "pallas_tma" if "tgather" in mods else ("pallas" if "pgather" in mods else None)


def _variant_conf(mods: set[str]) -> dict:
  """The record's config fields a variant's modifiers set (``VARIANT_KWARGS`` among them go to ``routed_ffn``)."""
  conf = {}
  if "rt64" in mods:
    conf["row_tile"] = 64
  if _gather(mods) is not None:
    conf["gather"] = _gather(mods)
  if "snake" in mods:
    conf["dw_schedule"] = "sorted_snake"
  if "playout" in mods:
    conf["layout"] = "pallas"
  if "wgm" in mods:
    conf["wg_split"] = "m"
  if "chain" in mods:
    conf["chain"] = True
  return conf


VARIANT_KWARGS = ("row_tile", "gather", "layout")


def _tuning(mods: set[str]) -> dict:
  """Grouped-GEMM overrides a variant's modifiers ask for (``_snake``: the weight gradients' sorted-snake order;
  ``_wgm``: every GEMM's warpgroups split along M; ``_chain``: the four row-tile GEMMs' tile pipelines chained)."""
  tune = {g: {} for g in SWEEP_GEMMS}
  for g in SWEEP_GEMMS:
    if "snake" in mods and g in ("dw1", "dw2"):
      tune[g]["schedule"] = "sorted_snake"
    if "wgm" in mods:
      tune[g]["wg_split"] = "m"
    if "chain" in mods and not g.startswith("dw"):
      tune[g]["chain"] = True
  return {g: f for g, f in tune.items() if f}


def bench_config(name, E, records, impls, log, token_order_at=(2, 4, 8, 16)):
  T, D, F = SHAPES[name]
  x, w1, w2, t_dense = shape_setup(name, log)
  cfg = rt.RouterConfig(num_groups=E, block=ROW_TILE, kmeans_iters=10)
  init = jax.jit(lambda w, k: rt.router_init(w, cfg, k))
  # k-means++ and 10 balanced Lloyd iterations: what a re-clustering costs (it runs every k steps, not per step).
  t_recluster = timed(init, w1, jax.random.key(1), iters=2)
  state = init(w1, jax.random.key(1))
  rnd = jax.random.randint(jax.random.key(2), (T,), 0, E)

  @jax.jit
  def route_and_mass(x, w1, state, rnd):
    groups = rt.route_tokens(x, state, cfg)
    return groups, rt.captured_mass(x, w1, state, groups), rt.captured_mass(x, w1, state, rnd)

  groups, mass, mass_rnd = route_and_mass(x, w1, state, rnd)
  mass, mass_rnd = float(mass), float(mass_rnd)
  counts = np.bincount(np.asarray(groups), minlength=E)
  cap = int(-(-counts.max() // ROW_TILE) * ROW_TILE)
  # Weights kept in router order: the re-layout (W1, W2 and two float32 Adam moments each) at every re-clustering.
  settled, perm = rt.settle_permutation(state)
  w1g, w2g = rt.take_neurons(w1, perm, 1), rt.take_neurons(w2, perm, 0)
  moments = [jnp.zeros(w1.shape, jnp.float32)] * 2 + [jnp.zeros(w2.shape, jnp.float32)] * 2
  relayout = jax.jit(lambda ws, p: [rt.take_neurons(w, p, 1 if w.shape == w1.shape else 0) for w in ws])
  t_relayout = timed(relayout, [w1, w2, *moments], perm, iters=2)
  info = dict(captured_mass=round(mass, 4), captured_mass_random_groups=round(mass_rnd, 4),
              group_max_over_mean=round(float(counts.max() / counts.mean()), 3),
              empty_groups=int((counts == 0).sum()), recluster_ms=round(t_recluster, 3),
              relayout_ms=round(t_relayout, 3))
  log(f"[{name} E={E}] counts min/mean/max {counts.min()}/{counts.mean():.0f}/{counts.max()} "
      f"captured mass {mass:.3f} (random groups {mass_rnd:.3f}) recluster {t_recluster:.1f} ms "
      f"relayout {t_relayout:.2f} ms")
  jobs = []  # (impl, pass, jitted fn, weight args)
  for impl in impls:
    if (impl == "einsum_equal_groups" and E != 8) or (impl == "ours" and E not in token_order_at):
      continue
    base_impl, mods = _variant(impl)
    kw = dict(implementation="pallas" if base_impl == "ours" else impl)
    st, a1, a2 = state, w1, w2
    if impl == "einsum":
      kw["capacity"] = cap
    if impl == "einsum_equal_groups":
      # Not a router: token t -> group t mod E, so every group has exactly T/E tokens (the idealised bound).
      kw = dict(implementation="einsum", capacity=-(-T // E // ROW_TILE) * ROW_TILE,
                groups=jnp.arange(T, dtype=jnp.int32) % E)
    if base_impl == "ours_grouped_weights":
      kw = dict(implementation="pallas", weights_grouped=True)
      st, a1, a2 = settled, w1g, w2g
    kw.update({k: v for k, v in _variant_conf(mods).items() if k in VARIANT_KWARGS})

    def f(x, w1, w2, kw=kw, st=st):
      return rf_api.routed_ffn(x, w1, w2, st, cfg, **{"row_tile": ROW_TILE, **kw})

    for pass_name, fn in (("fwd", jax.jit(f)), ("fwd+bwd", fwd_bwd(f))):
      jobs.append((impl, pass_name, fn, (a1, a2)))
  compiled = compile_all([(fn, (x, *ws), _tuning(_variant(impl)[1])) for impl, _, fn, ws in jobs])
  times, outs = {}, {}
  for (impl, pass_name, _, (a1, a2)), fn in zip(jobs, compiled):
    base_impl, mods = _variant(impl)
    try:
      if isinstance(fn, Exception):
        raise fn
      t = timed(fn, x, a1, a2)
    except Exception as e:  # a failing variant must not stop the others from being measured
      log(f"[{name} E={E}] {impl} {pass_name} FAILED: {type(e).__name__}: {str(e)[:300]}")
      continue
    times[(impl, pass_name)] = t
    if pass_name == "fwd+bwd" and impl != "einsum_equal_groups":
      outs[impl] = fn(x, a1, a2)
      if base_impl == "ours_grouped_weights":  # grads back in the original neuron order, to compare
        inv = jnp.argsort(perm)
        loss, (dx, d1, d2) = outs[impl]
        outs[impl] = (loss, (dx, rt.take_neurons(d1, inv, 1), rt.take_neurons(d2, inv, 0)))
    conf = dict(shape=name, T=T, D=D, F=F, E=E, dtype="bfloat16", pass_=pass_name, impl=impl)
    conf.update(_variant_conf(mods))
    conf["pass"] = conf.pop("pass_")
    extra = dict(info)
    if impl.startswith("ours") and ("einsum", pass_name) in times:
      extra["vs_einsum"] = round(times[("einsum", pass_name)] / t, 3)
    if impl.startswith("ours") and ("einsum_equal_groups", pass_name) in times:
      extra["vs_einsum_equal_groups"] = round(times[("einsum_equal_groups", pass_name)] / t, 3)
    if impl.startswith("ours") and pass_name == "fwd+bwd" and "einsum" in outs and impl in outs:
      extra["max_rel_err_vs_einsum"] = _rel_err(outs[impl], outs["einsum"])
    goal = GOALS.get((name, E)) if (impl.startswith("ours") and pass_name == "fwd+bwd") else None
    if goal is not None:
      extra["goal"] = goal
    records.append(_util.record("routed_ffn", config=conf, metric="time", baseline="xla_dense", ours=t,
                                base=t_dense[pass_name], **extra))
    log(f"[{name} E={E}] {impl:22s} {pass_name:8s} {t:8.3f} ms  {t_dense[pass_name] / t:5.2f}x dense"
        + (f"  {extra['vs_einsum']:.2f}x einsum" if "vs_einsum" in extra else ""))


def compile_all(jobs, threads=8):
  """AOT-compiles ``[(jitted fn, args[, tuning])]``: traced and lowered here (under the job's
  :func:`jsparse.kernels.grouped_matmul.api.tuning` overrides, if any), XLA-compiled in parallel threads (the backend
  compile releases the GIL; the benchmark's wall time is mostly compilation). Returns the compiled callables (or the
  exception of each failure), in order."""
  lowered = []
  for fn, args, *tune in jobs:
    try:
      with gmm_api.tuning(**(tune[0] if tune else {})):  # read while tracing, the backward's GEMMs included
        lowered.append(fn.lower(*args))
    except Exception as e:
      lowered.append(e)

  def comp(lw):
    if isinstance(lw, Exception):
      return lw
    try:
      return lw.compile()
    except Exception as e:
      return e

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return list(pool.map(comp, lowered))


# ----------------------------------------------------------------------------------------------------------------------
# Kernel sweep: TileConfig fields per grouped GEMM at E=8 with this shape's real (trained-like) routing, each config
# checked against the current one, then the whole op (fwd+bwd, weights in router order) with the best config of
# every GEMM against the current table, and the op's non-GEMM pieces timed alone.

SWEEP_FIELDS = {
    "base": {},
    "f1": dict(mma_in_flight=1),
    "cl": dict(cluster="auto"),
    "clf1": dict(cluster="auto", mma_in_flight=1),
    "m0": dict(grid_minor_dim=0),
    "w8": dict(grid_tile_width=8),
    "m0w8": dict(grid_minor_dim=0, grid_tile_width=8),
    "s3": dict(stages=3),
    "n64": dict(tile_n=64),
    "n64cl": dict(tile_n=64, cluster="auto"),
    "cln": dict(cluster="n"),
    "wgm": dict(wg_split="m"),
    "wgmf1": dict(wg_split="m", mma_in_flight=1),
    "wgmcl": dict(wg_split="m", cluster="auto"),
    "chain": dict(chain=True),
    "wgmchain": dict(wg_split="m", chain=True),
}
SWEEP_ONLY = {"n64": ("up", "dh"), "n64cl": ("up", "dh"), "cln": ("dw1", "dw2"), "chain": ("up", "down", "dh", "dx"),
              "wgmchain": ("up", "down", "dh", "dx")}
# Second stage: the best single change of each category that beats the base, combined.
SWEEP_CATEGORIES = (("f1", "cl", "clf1", "cln"), ("m0", "w8", "m0w8"),
                    ("s3", "n64", "n64cl", "wgm", "wgmf1", "wgmcl", "chain", "wgmchain"))
SWEEP_GEMMS = ("up", "down", "dh", "dx", "dw1", "dw2")
_UNCHAINED = {g: dict(chain=False) for g in ("up", "down", "dh", "dx")}
_GROUP_MAJOR = {g: dict(schedule="group_major") for g in ("dw1", "dw2")}
# Whole-op tuning variants (--op-variants): single changes the GEMM sweep found faster in isolation.
OP_VARIANTS = {
    "current": {},
    "dh_n64": dict(dh=dict(tile_n=64)),
    "m0_dx_dw1": dict(dx=dict(grid_minor_dim=0), dw1=dict(grid_minor_dim=0)),
    "f1_all": {g: dict(mma_in_flight=1) for g in SWEEP_GEMMS},
    "n64_up_dh": dict(up=dict(tile_n=64), dh=dict(tile_n=64)),
    "cl_dw": dict(dw1=dict(cluster="m"), dw2=dict(cluster="m")),
    "wgm_all": {g: dict(wg_split="m") for g in SWEEP_GEMMS},
    "wgm_all_snake": {g: dict(wg_split="m", **(dict(schedule="sorted_snake") if g.startswith("dw") else {}))
                      for g in SWEEP_GEMMS},
    "snake": {g: dict(schedule="sorted_snake") for g in ("dw1", "dw2")},
    "chain": {g: dict(chain=True) for g in ("up", "down", "dh", "dx")},
    # The tuned defaults (chain, sorted snake) switched off one at a time, and both.
    "unchained": _UNCHAINED,
    "group_major": _GROUP_MAJOR,
    "untuned": {**_UNCHAINED, **_GROUP_MAJOR},
    "wgm_chain_snake": {g: dict(wg_split="m", **(dict(schedule="sorted_snake") if g.startswith("dw") else
                                                   dict(chain=True))) for g in SWEEP_GEMMS},
}


def _fields(gemm, fields):
  f = dict(fields)
  if f.get("cluster") == "auto":
    f["cluster"] = "m" if gemm.startswith("dw") else "n"
  return f


def _gemm_fns(E, layout, x_P, h, g, w1g, w2g):
  tg, ts, tt = layout.tile_group_R, layout.tile_start_E, layout.tiles_E
  impl = dict(implementation="pallas")
  rows = dict(impl, unused_tiles_last=True)  # the routed layout's order: a tuned chain applies
  return {
      "up": (lambda: gmm_api.grouped_matmul(x_P, w1g, tg, num_groups=E, group_axis="n", epilogue="square_relu",
                                            **rows)),
      "down": (lambda: gmm_api.grouped_matmul(h, w2g, tg, num_groups=E, group_axis="k", **rows)),
      "dh": (lambda: gmm_api.grouped_matmul(g, w2g, tg, num_groups=E, group_axis="n", transpose_rhs=True,
                                            epilogue="square_relu_grad", aux_PxN=h, **rows)),
      "dx": (lambda: gmm_api.grouped_matmul(h, w1g, tg, num_groups=E, group_axis="k", transpose_rhs=True, **rows)),
      "dw1": (lambda: gmm_api.grouped_matmul_t(x_P, h, ts, tt, row_tile=ROW_TILE, group_axis="n", **impl)),
      "dw2": (lambda: gmm_api.grouped_matmul_t(h, g, ts, tt, row_tile=ROW_TILE, group_axis="m", **impl)),
  }


def _max_rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def sweep_shape(name, E, out_records, log, fields_names, deadline, best_from=None):
  """Times TileConfig variants of the six GEMMs; returns {gemm: fastest correct fields}.

  ``best_from`` (another shape's winners): time only those against the base.
  """
  T, D, F = SHAPES[name]
  Fe = F // E
  x, w1, w2, _ = shape_setup(name, log)
  cfg = rt.RouterConfig(num_groups=E, block=ROW_TILE, kmeans_iters=10)
  state = jax.jit(lambda w, k: rt.router_init(w, cfg, k))(w1, jax.random.key(1))
  _, perm = rt.settle_permutation(state)
  w1g, w2g = rt.take_neurons(w1, perm, 1), rt.take_neurons(w2, perm, 0)
  groups = jax.jit(lambda a: rt.route_tokens(a, state, cfg))(x)
  layout = jax.jit(lambda gr: lay.make_layout(gr, E, ROW_TILE))(groups)
  x_P = jax.jit(lambda a: lay.to_padded(a, layout))(x)
  h = jax.jit(lambda: gmm_api.grouped_matmul(x_P, w1g, layout.tile_group_R, num_groups=E, group_axis="n",
                                             epilogue="square_relu", implementation="pallas"))()
  g = jax.random.normal(jax.random.key(7), x_P.shape, x.dtype) * 1e-2
  used_rows = int(jnp.sum(layout.tiles_E)) * ROW_TILE
  flops = 2 * used_rows * D * Fe
  fns = _gemm_fns(E, layout, x_P, h, g, w1g, w2g)
  dims = {"dw1": (D, Fe), "dw2": (Fe, D)}
  results = {gemm: {} for gemm in SWEEP_GEMMS}  # cname -> (ms, fields) for correct configs
  base_out = {}

  def run(jobs):
    """jobs: [(gemm, cname, fields)]; lowers under each tuning, compiles in parallel, times one by one."""
    jobs = [j for j in jobs if time.time() < deadline]
    lowered = []
    for gemm, cname, fields in jobs:
      try:
        with gmm_api.tuning(**{gemm: fields}):
          lowered.append(jax.jit(fns[gemm]).lower())
      except Exception as e:
        lowered.append(e)
    comp = compile_all([(_Lowered(lw), ()) for lw in lowered])
    for (gemm, cname, fields), fn in zip(jobs, comp):
      try:
        if isinstance(fn, Exception):
          raise fn
        out = fn()
        t = timed(fn, iters=10)
      except Exception as e:
        log(f"[sweep {name} E={E}] {gemm:4s} {cname:9s} FAILED: {type(e).__name__}: {str(e)[:400]}")
        continue
      if cname == "base":
        base_out[gemm] = out
      want = base_out.get(gemm, out)
      err = _max_rel(out, want)
      t_base = results[gemm].get("base", (t,))[0]
      ok = err < 1e-2
      if ok:
        results[gemm][cname] = (t, fields)
      tf = flops / t / 1e9
      out_records.append(dict(shape=name, E=E, gemm=gemm, config=cname, fields=fields, ms=t, tflops=tf,
                              vs_base=t_base / t, err_vs_base=err))
      log(f"[sweep {name} E={E}] {gemm:4s} {cname:9s} {t:7.3f} ms {tf:6.0f} TF/s {t_base / t:5.3f}x base"
          f" err {err:.1e}{'' if ok else ' WRONG'}")

  def dividing(gemm, fields):
    if not fields.get("cluster"):
      return True
    m, n = dims.get(gemm, (x_P.shape[0], D if gemm in ("down", "dx") else Fe))
    with gmm_api.tuning(**{gemm: fields}):
      return gmm_api.kernel_config(gemm, 128, m, n).cluster is not None

  if best_from is not None:
    run([(gm, c, f) for gm in SWEEP_GEMMS for c, f in (("base", {}), ("best", best_from.get(gm)))
         if f is not None and (c == "base" or f)])
  else:
    stage1 = []
    for gm in SWEEP_GEMMS:
      for cname in ["base"] + [c for c in fields_names if c != "base"]:
        if gm not in SWEEP_ONLY.get(cname, SWEEP_GEMMS):
          continue
        f = _fields(gm, SWEEP_FIELDS[cname])
        if dividing(gm, f):
          stage1.append((gm, cname, f))
    for gm in SWEEP_GEMMS:  # one batch per GEMM, so that the deadline is checked between them
      run([j for j in stage1 if j[0] == gm])
    stage2 = []
    for gm in SWEEP_GEMMS:
      res = results[gm]
      if "base" not in res:
        continue
      picks = []
      for cat in SWEEP_CATEGORIES:
        better = [c for c in cat if c in res and res[c][0] < 0.99 * res["base"][0]]
        if better:
          picks.append(min(better, key=lambda c: res[c][0]))
      combos = [picks[i:j] for i in range(len(picks)) for j in range(i + 2, len(picks) + 1)]
      for combo in combos:
        f = {}
        for c in combo:
          f.update(res[c][1])
        stage2.append((gm, "+".join(combo), f))
    for gm in SWEEP_GEMMS:
      run([j for j in stage2 if j[0] == gm])
  best = {}
  for gm in SWEEP_GEMMS:
    res = results[gm]
    if res:
      k = min(res, key=lambda c: res[c][0])
      best[gm] = res[k][1]
      log(f"[sweep {name} E={E}] {gm:4s} best {k} {res[k][0]:.3f} ms (base {res.get('base', (float('nan'),))[0]:.3f})"
          f" fields {res[k][1]}")
  return best


class _Lowered:
  """Adapts an already-lowered computation (or the exception that lowering raised) to ``compile_all``."""

  def __init__(self, lowered):
    self.lowered = lowered

  def lower(self):
    if isinstance(self.lowered, Exception):
      raise self.lowered
    return self.lowered


def sweep_pieces(name, E, out_records, log):
  """The routed op's non-GEMM work, each piece jitted alone, and a plain copy of the gather's bytes."""
  T, D, F = SHAPES[name]
  x, w1, w2, _ = shape_setup(name, log)
  cfg = rt.RouterConfig(num_groups=E, block=ROW_TILE, kmeans_iters=10)
  state = jax.jit(lambda w, k: rt.router_init(w, cfg, k))(w1, jax.random.key(1))
  groups = jax.jit(lambda a: rt.route_tokens(a, state, cfg))(x)
  layout = jax.jit(lambda gr: lay.make_layout(gr, E, ROW_TILE))(groups)
  x_P = jax.jit(lambda a: lay.to_padded(a, layout))(x)
  pieces = {
      "route_tokens": (jax.jit(lambda a: rt.route_tokens(a, state, cfg)), (x,)),
      "make_layout": (jax.jit(lambda gr: lay.make_layout(gr, E, ROW_TILE)), (groups,)),
      "make_layout_pallas": (jax.jit(lambda gr: lay.make_layout(gr, E, ROW_TILE, "pallas")), (groups,)),
      "to_padded": (jax.jit(lambda a: lay.to_padded(a, layout)), (x,)),
      "to_padded_pallas": (jax.jit(lambda a: lay.to_padded(a, layout, "pallas")), (x,)),
      "to_padded_pallas_tma": (jax.jit(lambda a: lay.to_padded(a, layout, "pallas_tma")), (x,)),
      "from_padded": (jax.jit(lambda a: lay.from_padded(a, layout)), (x_P,)),
      "copy_x_plus_1": (jax.jit(lambda a: a + 1), (x,)),
      "group_weights": (jax.jit(lambda a, b: rf_api.group_weights(a, b, state.perm_F)), (w1, w2)),
  }
  for pname, (fn, args) in pieces.items():
    try:
      t = timed(fn, *args, iters=10)
    except Exception as e:
      log(f"[pieces {name} E={E}] {pname} FAILED: {type(e).__name__}: {str(e)[:300]}")
      continue
    out_records.append(dict(shape=name, E=E, gemm=pname, config="pallas" if "pallas" in pname else "xla", ms=t))
    log(f"[pieces {name} E={E}] {pname:14s} {t:7.3f} ms")


_ROUTER_CACHE = {}


def _router(name, E, w1):
  if (name, E) not in _ROUTER_CACHE:
    cfg = rt.RouterConfig(num_groups=E, block=ROW_TILE, kmeans_iters=10)
    _ROUTER_CACHE[(name, E)] = cfg, jax.jit(lambda w, k: rt.router_init(w, cfg, k))(w1, jax.random.key(1))
  return _ROUTER_CACHE[(name, E)]


def sweep_op(name, E, variants, out_records, log, rounds=1, deadline=float("inf")):
  """fwd+bwd and fwd of the whole op (pallas, weights in router order) under each {gemm: fields} variant.

  All variants are compiled first, then timed ``rounds`` times in alternation (the spread between rounds is the
  measurement noise that a difference between variants has to beat).
  """
  T, D, F = SHAPES[name]
  x, w1, w2, t_dense = shape_setup(name, log)
  cfg, state = _router(name, E, w1)
  settled, perm = rt.settle_permutation(state)
  w1g, w2g = rt.take_neurons(w1, perm, 1), rt.take_neurons(w2, perm, 0)

  def f(x, w1, w2):
    return rf_api.routed_ffn(x, w1, w2, settled, cfg, row_tile=ROW_TILE, weights_grouped=True,
                             implementation="pallas")

  lowered = []
  for per_gemm in variants.values():
    for fn in (fwd_bwd(f), jax.jit(f)):
      try:
        with gmm_api.tuning(**per_gemm):
          lowered.append(fn.lower(x, w1g, w2g))
      except Exception as e:
        lowered.append(e)
  comp = compile_all([(_Lowered(lw), ()) for lw in lowered])
  for rnd in range(rounds):
    for i, (vname, per_gemm) in enumerate(variants.items()):
      if time.time() > deadline:
        log(f"[op {name} E={E}] deadline reached before {vname} round {rnd}")
        return
      try:
        fb, fw = comp[2 * i], comp[2 * i + 1]
        for fn in (fb, fw):
          if isinstance(fn, Exception):
            raise fn
        t = timed(fb, x, w1g, w2g)
        tf = timed(fw, x, w1g, w2g)
      except Exception as e:
        log(f"[op {name} E={E}] {vname} FAILED: {type(e).__name__}: {str(e)[:300]}")
        continue
      out_records.append(dict(shape=name, E=E, gemm="op", config=vname, round=rnd, fields=per_gemm, ms=t,
                              fwd_ms=tf, x_dense=t_dense["fwd+bwd"] / t, x_dense_fwd=t_dense["fwd"] / tf))
      log(f"[op {name} E={E}] {vname:10s} round {rnd} fwd+bwd {t:7.3f} ms {t_dense['fwd+bwd'] / t:5.2f}x dense; "
          f"fwd {tf:7.3f} ms {t_dense['fwd'] / tf:5.2f}x")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--shapes", default="1b,7b")
  p.add_argument("--experts", default="2,4,8,16")
  p.add_argument("--impls", default="ragged_dot,einsum,einsum_equal_groups,ours,ours_grouped_weights")
  p.add_argument("--sweep", action="store_true", help="tile sweep per GEMM (first shape fully, the others on its "
                 "winners), the op's pieces, and the whole op under the winners; written to *_sweep.json")
  p.add_argument("--sweep-shapes", default="7b,1b")
  p.add_argument("--sweep-configs", default="base,f1,cl,clf1,m0,m0w8,n64,n64cl,cln,wgm,wgmf1,chain,wgmchain")
  p.add_argument("--sweep-seconds", type=float, default=170.0, help="stop starting sweep steps after this")
  p.add_argument("--max-seconds", type=float, default=1e9, help="stop starting benchmark configs after this")
  p.add_argument("--token-order-at", default="2,4,8,16",
                 help="E values at which 'ours' (weights in token order, permuted every step) is also timed")
  p.add_argument("--op-variants", default="", help=f"after the benchmark: the whole op at 7b/1b (E from "
                 f"--op-variant-experts) under these "
                 f"tuning variants ({','.join(OP_VARIANTS)}), each run twice in alternation, into *_sweep.json")
  p.add_argument("--op-variant-shapes", default="7b")
  p.add_argument("--op-variant-experts", type=int, default=8)
  p.add_argument("--diag-seconds", type=float, default=1e9, help="stop starting op variants after this")
  p.add_argument("--no-bench", action="store_true")
  args = p.parse_args(argv)
  t0 = time.time()

  def log(msg):
    print(f"{time.time() - t0:7.1f}s {msg}", flush=True)

  log(f"devices {jax.devices()} jax {jax.__version__}")
  if args.sweep:
    sweep = []
    sweep_path = os.path.splitext(args.out)[0] + "_sweep.json"
    deadline = t0 + args.sweep_seconds
    shapes = args.sweep_shapes.split(",")
    best = {}
    # Per shape: the GEMM sweep (the first shape fully, the others on its winners), then the whole op under the
    # winners; the op's pieces last.
    for i, name in enumerate(shapes):
      if time.time() > deadline:
        break
      best[name] = sweep_shape(name, 8, sweep, log, args.sweep_configs.split(","), deadline,
                               best_from=best[shapes[0]] if i else None)
      _util.write_results(sweep_path, sweep)
      if time.time() > deadline:
        break
      variants = {"current": {}}
      for src, b in best.items():
        variants[f"best_{src}"] = b
      sweep_op(name, 8, variants, sweep, log)
      _util.write_results(sweep_path, sweep)
      log(f"best fields {name}: {best[name]}")
    for name in shapes:
      if time.time() > deadline:
        break
      sweep_pieces(name, 8, sweep, log)
      _util.write_results(sweep_path, sweep)
  records = []
  if not args.no_bench:
    # The goal configurations first; the results file is rewritten after each one (a time limit keeps what ran).
    order = {8: 0, 2: 1, 16: 2, 4: 3}
    pairs = [(n, int(e)) for n in args.shapes.split(",") for e in args.experts.split(",")]
    token_order_at = tuple(int(e) for e in args.token_order_at.split(",") if e)
    for name, E in sorted(pairs, key=lambda p: (order.get(p[1], 9), p[0])):
      if time.time() - t0 > args.max_seconds:
        log(f"--max-seconds reached: {name} E={E} and later configurations not run")
        break
      bench_config(name, E, records, args.impls.split(","), log, token_order_at)
      _util.write_results(args.out, records)
    rows = [dict(shape=r["config"]["shape"], E=r["config"]["E"], impl=r["config"]["impl"], pass_=r["config"]["pass"],
                 ms=r["ours"], dense_ms=r["base"], x_dense=r["ratio"], x_einsum=r.get("vs_einsum", ""),
                 x_eins_eq=r.get("vs_einsum_equal_groups", ""), goal=r.get("goal", ""), mass=r["captured_mass"],
                 err=r.get("max_rel_err_vs_einsum", "")) for r in records]
    _util.print_table(rows, ["shape", "E", "impl", "pass_", "ms", "dense_ms", "x_dense", "x_einsum", "x_eins_eq",
                             "goal", "mass", "err"])
  if args.op_variants:
    diag, deadline = [], t0 + args.diag_seconds
    names = args.op_variants.split(",")
    for name in args.op_variant_shapes.split(","):
      if time.time() > deadline:
        log(f"--diag-seconds reached before {name}")
        break
      sweep_op(name, args.op_variant_experts, {v: OP_VARIANTS[v] for v in names}, diag, log, rounds=2,
               deadline=deadline)
      _util.write_results(os.path.splitext(args.out)[0] + "_sweep.json", diag)


if __name__ == "__main__":
  main()
