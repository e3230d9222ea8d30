"""Routed (neuron-grouped) squared-ReLU FFN vs the dense FFN, fwd and fwd+bwd, bf16, one process.

Run: ``PYTHONPATH=$PWD python3 benchmarks/routed_ffn.py --out $OUT/routed_ffn.json`` (GPU). ``--sweep`` also times
every grouped GEMM of the E=8 shapes under several tile configurations (and JAX's shipped ``ragged_dot_mgpu`` on the
up-projection) and writes them next to ``--out`` as ``*_sweep.json``.

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
reported as ``relayout_ms``).

**Trained-like activations** (what the router sees): 64 latent "feature" directions u_k in R^D. Neuron f of W1 is
``u_{k(f)}`` plus Gaussian noise (each feature owns F/64 neurons, as co-activating neurons of a trained FFN do); token
t is ``u_a + 0.5 u_b`` plus noise with a, b drawn from a Zipf(1.1)-like law over the features (some features are far
more common, which makes the routed groups unequal, as real routing does). Weights are scaled to unit-variance
pre-activations. The router is ``jsparse.router_init`` (balanced k-means, 10 iterations) and routes by
``argmax x . c_g``; ``captured_mass`` is ``jsparse.captured_mass`` on these tokens (1/E would be a random router).
"""

from __future__ import annotations

import argparse
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
from jsparse.kernels.grouped_matmul import pallas as gmm_pallas  # noqa: E402
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


def bench_config(name, E, records, impls, log):
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
  times, outs = {}, {}
  for impl in impls:
    if impl == "einsum_equal_groups" and E != 8:
      continue
    kw = dict(implementation="pallas" if impl == "ours" else impl)
    st, a1, a2 = state, w1, w2
    if impl == "einsum":
      kw["capacity"] = cap
    if impl == "einsum_equal_groups":
      # Not a router: token t -> group t mod E, so every group has exactly T/E tokens (the idealised bound).
      kw = dict(implementation="einsum", capacity=-(-T // E // ROW_TILE) * ROW_TILE,
                groups=jnp.arange(T, dtype=jnp.int32) % E)
    if impl == "ours_grouped_weights":
      kw = dict(implementation="pallas", weights_grouped=True)
      st, a1, a2 = settled, w1g, w2g

    def f(x, w1, w2, kw=kw, st=st):
      return rf_api.routed_ffn(x, w1, w2, st, cfg, row_tile=ROW_TILE, **kw)

    for pass_name, fn in (("fwd", jax.jit(f)), ("fwd+bwd", fwd_bwd(f))):
      try:
        t = timed(fn, x, a1, a2)
      except Exception as e:  # a failing variant must not stop the others from being measured
        log(f"[{name} E={E}] {impl} {pass_name} FAILED: {type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc(limit=3)
        continue
      times[(impl, pass_name)] = t
      if pass_name == "fwd+bwd" and impl != "einsum_equal_groups":
        outs[impl] = fn(x, a1, a2)
        if impl == "ours_grouped_weights":  # grads back in the original neuron order, to compare
          inv = jnp.argsort(perm)
          loss, (dx, d1, d2) = outs[impl]
          outs[impl] = (loss, (dx, rt.take_neurons(d1, inv, 1), rt.take_neurons(d2, inv, 0)))
      conf = dict(shape=name, T=T, D=D, F=F, E=E, dtype="bfloat16", pass_=pass_name, impl=impl)
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


# ----------------------------------------------------------------------------------------------------------------------
# Kernel sweep (tile configurations per grouped GEMM at E=8).


SWEEP_CONFIGS = {
    "ws128x4": gmm_pallas.TileConfig(tile_n=128, stages=4),
    "ws128x3": gmm_pallas.TileConfig(tile_n=128, stages=3),
    "ws128x4s": gmm_pallas.TileConfig(tile_n=128, stages=4, dynamic_grid=False),
    "ws128x4w8": gmm_pallas.TileConfig(tile_n=128, stages=4, grid_tile_width=8),
    "ws64x4": gmm_pallas.TileConfig(tile_n=64, stages=4),
    "simple128": gmm_pallas.TileConfig(tile_n=128, stages=4, warp_specialized=False),
}


def sweep_shape(name, E, out_records, log, configs):
  T, D, F = SHAPES[name]
  Fe = F // E
  key = jax.random.split(jax.random.key(3), 6)
  groups = jax.random.randint(key[0], (T,), 0, E)
  layout = lay.make_layout(groups, E, ROW_TILE)
  P = layout.num_rows
  used_rows = int(jnp.sum(layout.tiles_E)) * ROW_TILE
  bf = jnp.bfloat16
  x = jax.random.normal(key[1], (P, D), bf)
  h = jax.random.normal(key[2], (P, Fe), bf)
  w1 = jax.random.normal(key[3], (D, F), bf)
  w2 = jax.random.normal(key[4], (F, D), bf)
  g = jax.random.normal(key[5], (P, D), bf)
  tg, ts, tt = layout.tile_group_R, layout.tile_start_E, layout.tiles_E
  gemms = {
      "up(relu2)": (lambda c: functools.partial(gmm_pallas.grouped_matmul, num_groups=E, group_axis="n",
                                                transpose_rhs=False, epilogue="square_relu", cfg=c), (x, w1, tg), Fe),
      "down": (lambda c: functools.partial(gmm_pallas.grouped_matmul, num_groups=E, group_axis="k",
                                           transpose_rhs=False, epilogue=None, cfg=c), (h, w2, tg), D),
      "dh(grad)": (lambda c: functools.partial(gmm_pallas.grouped_matmul, num_groups=E, group_axis="n",
                                               transpose_rhs=True, epilogue="square_relu_grad", cfg=c),
                   (g, w2, tg, jnp.abs(h)), Fe),
      "dx": (lambda c: functools.partial(gmm_pallas.grouped_matmul, num_groups=E, group_axis="k",
                                         transpose_rhs=True, epilogue=None, cfg=c), (h, w1, tg), D),
      "dW1": (lambda c: functools.partial(gmm_pallas.grouped_matmul_t, row_tile=ROW_TILE, group_axis="n", cfg=c),
              (x, h, ts, tt), None),
      "dW2": (lambda c: functools.partial(gmm_pallas.grouped_matmul_t, row_tile=ROW_TILE, group_axis="m", cfg=c),
              (h, g, ts, tt), None),
  }
  # Non-GEMM costs of the op (what the grouped GEMMs do not cover), each jitted alone.
  xt = jax.random.normal(key[1], (T, D), bf)
  cfg = rt.RouterConfig(num_groups=E, block=ROW_TILE)
  state = rt.RouterState(jax.random.normal(key[2], (E, D), jnp.float32),
                         jax.random.permutation(key[3], F).astype(jnp.int32), jnp.full((E,), Fe, jnp.int32),
                         jnp.zeros((), jnp.int32))
  pieces = {
      "route_tokens": (jax.jit(lambda a: rt.route_tokens(a, state, cfg)), (xt,)),
      "make_layout": (jax.jit(lambda gr: lay.make_layout(gr, E, ROW_TILE)), (groups,)),
      "to_padded": (jax.jit(lambda a: lay.to_padded(a, layout)), (xt,)),
      "from_padded": (jax.jit(lambda a: lay.from_padded(a, layout)), (x,)),
      "group_weights": (jax.jit(lambda a, b: rf_api.group_weights(a, b, state.perm_F)), (w1, w2)),
  }
  for pname, (fn, args) in pieces.items():
    try:
      t = timed(fn, *args, iters=10)
      out_records.append(dict(shape=name, E=E, gemm=pname, config="xla", ms=t, tflops=0.0))
      log(f"[sweep {name} E={E}] overhead {pname:14s} {t:7.3f} ms")
    except Exception as e:
      log(f"[sweep {name} E={E}] overhead {pname} FAILED: {type(e).__name__}: {str(e)[:300]}")
  flops = 2 * used_rows * D * Fe
  for gname, (make, args, n_out) in gemms.items():
    for cname, c in configs.items():
      if gname.startswith("dW"):
        c = dataclasses.replace(c, tile_m=128)
      else:
        c = dataclasses.replace(c, tile_m=ROW_TILE)
      n_check = (Fe if gname == "dW1" else D) if n_out is None else n_out
      if n_check % c.cta_n:
        continue
      try:
        fn = jax.jit(make(c))
        t = timed(fn, *args, iters=10)
      except Exception as e:
        log(f"[sweep {name} E={E}] {gname} {cname} FAILED: {type(e).__name__}: {str(e)[:300]}")
        continue
      tf = flops / t / 1e9
      out_records.append(dict(shape=name, E=E, gemm=gname, config=cname, ms=t, tflops=tf))
      log(f"[sweep {name} E={E}] {gname:10s} {cname:10s} {t:7.3f} ms {tf:6.0f} TF/s")
  # JAX's shipped Mosaic GPU ragged_dot (contiguous layout, [E, D, Fe] weights) on the up-projection.
  try:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    pos, order, counts = lay.contiguous_order(groups, E)
    xs = jax.random.normal(key[1], (T, D), bf)
    w1e = w1.reshape(D, E, Fe).transpose(1, 0, 2)
    for bm, bn in ((128, 128), (64, 128), (128, 64)):
      fn = jax.jit(functools.partial(ragged_dot_mgpu.ragged_dot, block_m=bm, block_n=bn, block_k=64,
                                     max_concurrent_steps=4, grid_block_n=1))
      t = timed(lambda a, b, c: fn(a, b, group_sizes=c), xs, w1e, counts, iters=10)
      tf = 2 * T * D * Fe / t / 1e9
      out_records.append(dict(shape=name, E=E, gemm="up(jax ragged_dot_mgpu)", config=f"{bm}x{bn}", ms=t, tflops=tf))
      log(f"[sweep {name} E={E}] up: jax ragged_dot_mgpu {bm}x{bn} {t:7.3f} ms {tf:6.0f} TF/s")
    t = timed(jax.jit(lambda a, b, c: jax.lax.ragged_dot(a, b, c)), xs, w1e, counts)
    log(f"[sweep {name} E={E}] up: jax.lax.ragged_dot {t:7.3f} ms {2 * T * D * Fe / t / 1e9:6.0f} TF/s")
  except Exception as e:
    log(f"[sweep {name} E={E}] ragged_dot_mgpu FAILED: {type(e).__name__}: {str(e)[:300]}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--shapes", default="1b,7b")
  p.add_argument("--experts", default="2,4,8,16")
  p.add_argument("--impls", default="ragged_dot,einsum,einsum_equal_groups,ours,ours_grouped_weights")
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--sweep-configs", default=",".join(SWEEP_CONFIGS))
  p.add_argument("--no-bench", action="store_true")
  args = p.parse_args(argv)
  t0 = time.time()

  def log(msg):
    print(f"{time.time() - t0:7.1f}s {msg}", flush=True)

  log(f"devices {jax.devices()} jax {jax.__version__}")
  if args.sweep:
    sweep = []
    configs = {k: SWEEP_CONFIGS[k] for k in args.sweep_configs.split(",")}
    for name in args.shapes.split(","):
      sweep_shape(name, 8, sweep, log, configs)
    _util.write_results(os.path.splitext(args.out)[0] + "_sweep.json", sweep)
  records = []
  if not args.no_bench:
    # The goal configurations first; the results file is rewritten after each one (a time limit keeps what ran).
    order = {8: 0, 2: 1, 4: 2, 16: 3}
    pairs = [(n, int(e)) for n in args.shapes.split(",") for e in args.experts.split(",")]
    for name, E in sorted(pairs, key=lambda p: (order.get(p[1], 9), p[0])):
      bench_config(name, E, records, args.impls.split(","), log)
      _util.write_results(args.out, records)
    rows = [dict(shape=r["config"]["shape"], E=r["config"]["E"], impl=r["config"]["impl"], pass_=r["config"]["pass"],
                 ms=r["ours"], dense_ms=r["base"], x_dense=r["ratio"], x_einsum=r.get("vs_einsum", ""),
                 x_eins_eq=r.get("vs_einsum_equal_groups", ""), goal=r.get("goal", ""), mass=r["captured_mass"],
                 err=r.get("max_rel_err_vs_einsum", "")) for r in records]
    _util.print_table(rows, ["shape", "E", "impl", "pass_", "ms", "dense_ms", "x_dense", "x_einsum", "x_eins_eq",
                             "goal", "mass", "err"])


if __name__ == "__main__":
  main()
