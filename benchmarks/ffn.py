"""FFN forward and forward+backward time per sparsity mode vs the dense squared-ReLU and SwiGLU FFNs, in one process.

Shapes (``--shapes``): ``1b`` (D=2048, F=8192) and ``7b`` (D=4096, F=14336), T=16384 tokens, bfloat16 parameters
and compute. Modules (``jsparse.models``, statistics off):

=====================  ==========================================================================================
``squared_relu``       ``SquaredReLUFFN`` -- the baseline every ratio is taken against (``baseline``)
``swiglu``             ``SwiGLUFFN`` at the parameter-matched width ``swiglu_matched_d_ff(F)`` (second baseline)
``sparse_off``         ``SparseFFN`` (2:4 recipe config) in its dense mode: must cost what ``squared_relu`` costs
``act24``              Haziza et al.'s 2:4 activation recipe (token permutation, mask reuse, 95/5 split)
``sste``               2:4 S-STE weights on W1 and W2 (forward GEMMs 2:4, backward dense)
``sste+tok24``         the same plus the recipe's token-wise 2:4 weight gradients
``act24+sste``         both
=====================  ==========================================================================================

Each sparse mode runs with every ``--implementations`` entry (the FFN's ``implementation``): ``pallas`` (jsparse's
Pallas sparsify kernels, the 2:4 operands multiplied as dense arrays with zeros by XLA -- the sparsity costs and
cannot pay), ``cusparselt`` (2:4 GEMMs through ``jsparse.sparse_matmul``'s cuSPARSELt FFI; a mode that cannot run
there is reported and skipped, never silently replaced), ``xla`` (everything in plain XLA) or ``default`` (``None``). ``fwd`` times ``module(x)``; ``fwd+bwd`` times the output and the gradients of the parameters and ``x``
for a random output cotangent. All functions of one shape and pass are timed round-robin in each round (median of
the rounds), so clock drift hits them alike.

Run on the GPU: ``python -m benchmarks.ffn --out $OUT/ffn.json``. One record per (shape, pass, mode, implementation,
baseline), ``metric="time"``, ``ratio = base / ours`` (> 1: faster than the baseline; < 1: slower, said as such).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import _util
from jsparse import models


def use_searched_algorithms() -> None:
  """Searched cuSPARSELt algorithms (benchmarks/sparse_matmul.py does the same); JSPARSE_CUSPARSELT_SEARCH=0 in the
  environment measures the library default, what the models get unless it is set. Called by the benchmarks' mains,
  not at import, so that a test importing a benchmark does not switch the search on for the whole process."""
  os.environ.setdefault("JSPARSE_CUSPARSELT_SEARCH", "1")


SHAPES = {"1b": (2048, 8192), "7b": (4096, 14336)}
SPARSE_MODES = {
    "act24": dict(activation_sparsity="2:4"),
    "sste": dict(weight_sparsity="2:4-sste"),
    "sste+tok24": dict(weight_sparsity="2:4-sste", token_24_weight_grads=True),
    "act24+sste": dict(activation_sparsity="2:4", weight_sparsity="2:4-sste"),
}
GOAL = 1.25  # the goal for act24 and sste fwd+bwd vs squared_relu, once the cuSPARSELt path runs


def build(mode: str, implementation: str | None, D: int, F: int, dtype) -> nnx.Module:
  rngs = nnx.Rngs(0)
  if mode == "squared_relu":
    return models.SquaredReLUFFN(D, F, dtype=dtype, param_dtype=dtype, rngs=rngs)
  if mode == "swiglu":
    return models.SwiGLUFFN(D, models.swiglu_matched_d_ff(F), dtype=dtype, param_dtype=dtype, rngs=rngs)
  if mode == "sparse_off":
    cfg = models.FFNConfig(kind="sparse", activation_sparsity="2:4", sparse=False, stats=False)
  else:
    cfg = models.FFNConfig(kind="sparse", stats=False, implementation=implementation, **SPARSE_MODES[mode])
  return models.SparseFFN(D, F, cfg, dtype=dtype, param_dtype=dtype, rngs=rngs)


def functions(module: nnx.Module):
  """(fwd(x), fwd_bwd(x, g)) as jitted pure functions of the module's current state."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  @jax.jit
  def fwd(params, rest, x):
    return nnx.merge(graphdef, params, rest)(x)

  @jax.jit
  def fwd_bwd(params, rest, x, g):
    # nnx.grad, not jax.vjp: the sparse FFN draws its token permutation from an RNG stream (state it updates).
    def loss(m, x):
      out = m(x)
      return jnp.vdot(out.astype(jnp.float32), g.astype(jnp.float32)), out
    (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(nnx.merge(graphdef, params, rest), x)
    return out, grads

  return (lambda x: fwd(params, rest, x)), (lambda x, g: fwd_bwd(params, rest, x, g))


def interleaved(fns: dict, args: tuple, iters: int, rounds: int, warmup: int = 2) -> dict[str, float]:
  """Median ms per call of each function; every round runs all of them (rotated order) back to back."""
  names = list(fns)
  for name in names:
    for _ in range(warmup):
      jax.block_until_ready(fns[name](*args))
  samples = {n: [] for n in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      out = None
      t0 = time.perf_counter()
      for _ in range(iters):
        out = fns[name](*args)
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - t0) * 1e3 / iters)
  return {n: statistics.median(s) for n, s in samples.items()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="results JSON path")
  p.add_argument("--shapes", default="1b,7b")
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--modes", default="sparse_off," + ",".join(SPARSE_MODES))
  p.add_argument("--implementations", default="pallas,cusparselt")
  p.add_argument("--passes", default="fwd+bwd,fwd")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args(argv)
  use_searched_algorithms()
  dtype = jnp.bfloat16
  T = args.tokens
  records, rows, skipped = [], [], []
  for shape in args.shapes.split(","):
    D, F = SHAPES[shape]
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (T, D), jnp.float32).astype(dtype)
    g = jax.random.normal(kg, (T, D), jnp.float32).astype(dtype)
    entries = [("squared_relu", "xla"), ("swiglu", "xla")]
    for mode in args.modes.split(","):
      impls = ["pallas"] if mode == "sparse_off" else args.implementations.split(",")
      entries += [(mode, impl) for impl in impls]
    for pass_ in args.passes.split(","):
      fns = {}
      for mode, impl in entries:
        name = f"{mode}/{impl}"
        try:
          module = build(mode, None if impl == "default" else impl, D, F, dtype)
          fwd, fwd_bwd = functions(module)
          fn, call_args = (fwd, (x,)) if pass_ == "fwd" else (fwd_bwd, (x, g))
          jax.block_until_ready(fn(*call_args))  # compile and run once; a path that cannot run fails here
          fns[name] = (lambda fn: (lambda *a: fn(*a)))(fn)
        except Exception as e:  # noqa: BLE001 - report and go on with the other modes
          reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
          skipped.append((shape, pass_, name, reason))
          print(f"SKIP {shape} {pass_} {name}: {reason}", flush=True)
          traceback.print_exc(limit=3)
      times = interleaved(fns, (x,) if pass_ == "fwd" else (x, g), args.iters, args.rounds)
      base, swiglu = times["squared_relu/xla"], times["swiglu/xla"]
      for name, ms in times.items():
        mode, impl = name.split("/")
        config = dict(shape=shape, tokens=T, d_model=D, d_ff=F, d_ff_swiglu=models.swiglu_matched_d_ff(F),
                      dtype="bfloat16", mode=mode, implementation=impl, pass_=pass_,
                      cusparselt_search=os.environ["JSPARSE_CUSPARSELT_SEARCH"])
        row = dict(shape=shape, pass_=pass_, mode=mode, impl=impl, ms=ms, vs_sqrelu=base / ms, vs_swiglu=swiglu / ms)
        rows.append(row)
        if mode != "squared_relu":
          records.append(_util.record("ffn", config=config, metric="time", baseline="squared_relu_xla", ours=ms,
                                      base=base, slower_than_baseline=ms > base,
                                      goal=GOAL if (mode in ("act24", "sste") and pass_ == "fwd+bwd") else None))
        if mode not in ("squared_relu", "swiglu"):
          records.append(_util.record("ffn", config=config, metric="time", baseline="swiglu_xla", ours=ms,
                                      base=swiglu, slower_than_baseline=ms > swiglu))
      print(f"{shape} {pass_}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()), flush=True)
      _util.write_results(args.out, records)  # rewritten after every (shape, pass): partial runs keep results
  print(f"\ndevice: {_util.device_name()}, T={T}, bf16; ratio > 1 = faster than the baseline, < 1 = SLOWER")
  for s in skipped:
    print("skipped:", *s)
  _util.print_table(rows, ["shape", "pass_", "mode", "impl", "ms", "vs_sqrelu", "vs_swiglu"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
