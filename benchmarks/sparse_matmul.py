"""2:4 sparse GEMM through cuSPARSELt (jsparse's FFI) vs XLA dense, the library's compress and torch, in one process.

For every (M, K, N), bf16, the 2:4 operand A is M x K (the activation-sparse product ``h @ W2``):

* ``dense_ms``                -- XLA ``a @ b`` on the same (pruned) operands.
* ``ours_ms``                 -- jsparse's GEMM alone on a pre-compressed A (plan cached, algorithm searched once).
* ``ours_compress_ms``        -- jsparse's compress kernel alone (dense A -> cuSPARSELt's layout).
* ``ours_with_compress_ms``   -- ``sparse_matmul(a, b)`` from the dense A: compress + GEMM.
* ``lib_compress_ms``         -- ``cusparseLtSpMMACompress`` on the same A (through the same FFI target).
* ``torch_ms``                -- ``torch._cslt_sparse_mm`` with the algorithm from ``torch._C._cusparselt.mm_search``.
* ``ours_b_ms``               -- the weight-sparse product ``x @ W`` (W 2:4 along K) with the same M, K, N.
* ``copy_gbps`` / ``compress_gbps`` -- bytes moved per second by a same-size elementwise copy and by the compress.

Timing: host wall clock over 20 back-to-back calls ending in a sync, median of 7 rounds; the functions compared with
each other (XLA dense, ours, torch) run round-robin inside each round, so GPU clock and power drift affect them alike.

Run on the GPU: ``python -m benchmarks.sparse_matmul --out $OUT/sparse_matmul.json``. Every jsparse GEMM runs with
the algorithm search of ``$JSPARSE_CUSPARSELT_SEARCH`` (default here: 1, the library's). One record per shape, plus
the fused FFN2 activation path and an fp8 probe; the JSON is rewritten after every shape.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JSPARSE_CUSPARSELT_SEARCH", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")  # leave room for torch in the same process

import jax
import jax.numpy as jnp
import numpy as np

import jsparse
from benchmarks import _util
from jsparse.kernels.cusparselt import library, ops
from jsparse.kernels.sparse_matmul import vjp
from jsparse.kernels.sparse_matmul.api import search_mode

SEARCH = search_mode()
# The layouts measured for the activation-sparse product (ops.py: bit 0 b transposed, bit 1 output transposed). Modes
# 1 and 2 are left out: cusparseLtMatmulSearch (0.8.0) segfaulted on mode 1 at 4096^3 in this harness.
MODES = (0, 3)
SHAPES = [(4096, 4096, 4096), (16384, 2048, 8192), (16384, 8192, 2048), (8192, 4096, 14336), (8192, 14336, 4096),
          (8192, 8192, 8192), (32768, 8192, 8192)]
FFN2_SHAPE = (16384, 8192, 2048)


def exact_24(key, shape, dtype):
  """A random operand with exactly two non-zeros in every group of 4 along the last axis (never test on zeros)."""
  x = jax.random.normal(key, shape, jnp.float32)
  x = jnp.where(jnp.abs(x) < 1e-3, 1.0, x)
  return jsparse.nm_prune(x.astype(dtype), implementation="xla")


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(out - ref) / (np.linalg.norm(ref) + 1e-30))


def jax_runner(fn, *args):
  """``run(iters)``: ``iters`` back-to-back calls, then wait for the last result (launch gaps overlap as in training)."""
  def run(iters):
    out = None
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
  return run


def interleaved(runners: dict, iters: int = 20, rounds: int = 7, warmup: int = 3) -> dict[str, float]:
  """Median ms per call of each runner, timed round-robin: every round runs each one (in a rotated order), so clock
  and power drift over the measurement hit all of them alike instead of whichever ran first."""
  names = list(runners)
  for name in names:
    runners[name](warmup)
  samples = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      runners[name](iters)
      samples[name].append((time.perf_counter() - t0) * 1e3 / iters)
  return {name: statistics.median(v) for name, v in samples.items()}


def torch_runners(M, K, N) -> tuple[dict, str]:
  """({"torch_ms": run, "torch_dense_ms": run} for torch._cslt_sparse_mm with its searched alg and torch.mm, note)."""
  try:
    import torch
  except ImportError as e:
    return {}, f"torch unavailable: {e}"
  try:
    torch.manual_seed(0)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros_like(a, dtype=torch.bool).view(M, K // 4, 4)
    top = a.abs().view(M, K // 4, 4).topk(2, dim=-1).indices
    mask.scatter_(-1, top, True)
    a = a * mask.view(M, K)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    ac = torch._cslt_compress(a)
    alg_id, split_k, split_k_mode, _ = torch._C._cusparselt.mm_search(ac, b, None, None, None, False)
    try:
      fn = lambda: torch._cslt_sparse_mm(ac, b, alg_id=alg_id, split_k=split_k, split_k_mode=split_k_mode)
      fn()
    except TypeError:  # older keyword
      fn = lambda: torch._cslt_sparse_mm(ac, b, alg_id=alg_id, split_k=split_k, split_k_one_kernel=bool(split_k_mode))
    dense = lambda: torch.mm(a, b)

    def runner(f):
      def run(iters):
        for _ in range(iters):
          f()
        torch.cuda.synchronize()
      return run

    return ({"torch_ms": runner(fn), "torch_dense_ms": runner(dense)},
            f"alg_id={alg_id} split_k={split_k} split_k_mode={split_k_mode}")
  except Exception as e:  # report, never hide: the record says why torch is missing
    return {}, f"torch failed: {type(e).__name__}: {e}"


def bench_shape(M, K, N, lib) -> dict:
  dtype = jnp.bfloat16
  key = jax.random.key(M * 7 + K * 3 + N)
  ka, kb = jax.random.split(key)
  a = jax.jit(lambda k: exact_24(k, (M, K), dtype))(ka)
  b = jax.random.normal(kb, (K, N), jnp.float32).astype(dtype) * (K ** -0.5)
  x = a  # the weight-sparse product reuses the shapes: x (M, K) dense, W (K, N) 2:4 along K
  w = jax.jit(lambda b: jsparse.nm_prune(b, axis=0, implementation="xla"))(b)

  dense = jax.jit(lambda a, b: a @ b)
  compress = jax.jit(lambda a: ops.compress(a))
  compress_lib = jax.jit(lambda a: ops.compress(a, method="library"))
  ca = jsparse.compress_24(a, implementation="cusparselt")
  gemm = jax.jit(lambda c, b: jsparse.sparse_matmul(c, b, implementation="cusparselt"))  # what a user calls
  with_compress = jax.jit(lambda a, b: jsparse.sparse_matmul(a, b, implementation="cusparselt"))
  copy = jax.jit(lambda a: -a)
  wc = jsparse.compress_24(w, operand="b", implementation="cusparselt")
  gemm_b = jax.jit(lambda x, c: jsparse.sparse_matmul(x, c, sparse_operand="b", implementation="cusparselt"))
  bt = jax.jit(lambda b: b.T)(b)

  raw_fns = {}

  def raw(mode, search):  # the cuSPARSELt call alone, operands already in the mode's layout
    if (mode, search) not in raw_fns:
      raw_fns[mode, search] = jax.jit(lambda p, d: ops.matmul(p, d, m=M, k=K, mode=mode, search=search))
    return raw_fns[mode, search]

  packed = jax.block_until_ready(compress(a))
  packed_lib = jax.block_until_ready(compress_lib(a))
  same_bytes = bool(np.array_equal(np.asarray(packed), np.asarray(packed_lib)))
  ref = dense(a, b)
  err = rel_err(gemm(ca, b), ref)
  err_with = rel_err(with_compress(a, b), ref)
  err_b = rel_err(gemm_b(x, wc), dense(x, w))
  mode_errs = {}
  for mode in MODES:
    out = raw(mode, SEARCH)(packed, bt if mode & 1 else b)
    mode_errs[mode] = rel_err(out.T if mode & 2 else out, ref)

  r = dict(M=M, K=K, N=N, dtype="bfloat16")
  t_runners, torch_note = torch_runners(M, K, N)
  gemms = dict(dense_ms=jax_runner(dense, a, b), ours_ms=jax_runner(gemm, ca, b),
               ours_with_compress_ms=jax_runner(with_compress, a, b), ours_b_ms=jax_runner(gemm_b, x, wc),
               **{f"ours_mode{m}_ms": jax_runner(raw(m, SEARCH), packed, bt if m & 1 else b) for m in MODES},
               **t_runners)
  r.update(interleaved(gemms))
  r.update(interleaved(dict(ours_compress_ms=jax_runner(compress, a), copy_ms=jax_runner(copy, a))))
  r.update(interleaved(dict(lib_compress_ms=jax_runner(compress_lib, a)), iters=5, rounds=3, warmup=1))
  for mode in MODES:
    r[f"rel_err_mode{mode}"] = mode_errs[mode]
  del packed_lib, t_runners
  torch_ms = r.get("torch_ms")
  r.setdefault("torch_ms", None)
  r.setdefault("torch_dense_ms", None)
  r["torch_note"] = torch_note
  compress_bytes = M * K * 2 + M * K * 9 // 8
  r["compress_gbps"] = compress_bytes / r["ours_compress_ms"] / 1e6
  r["copy_gbps"] = 2 * M * K * 2 / r["copy_ms"] / 1e6
  r["compress_frac_of_copy"] = r["compress_gbps"] / r["copy_gbps"]
  r["ratio_vs_dense"] = r["dense_ms"] / r["ours_ms"]
  r["ratio_with_compress_vs_dense"] = r["dense_ms"] / r["ours_with_compress_ms"]
  r["ratio_b_vs_dense"] = r["dense_ms"] / r["ours_b_ms"]
  r["ratio_compress_vs_lib"] = r["lib_compress_ms"] / r["ours_compress_ms"]
  r["ratio_vs_torch"] = (torch_ms / r["ours_ms"]) if torch_ms else None
  r["rel_err_gemm"], r["rel_err_with_compress"], r["rel_err_b"] = err, err_with, err_b
  r["compress_bit_exact_vs_lib"] = same_bytes
  r["layout"] = lib.layout_status(M, K, dtype)
  r["search"] = SEARCH
  r["sparse_a_mode"] = vjp.SPARSE_A_MODE
  r["plans"] = {mode: lib.plan_info(M, N, K, mode, dtype, SEARCH) for mode in MODES}
  r["plan_b"] = lib.plan_info(N, M, K, 3, dtype, SEARCH)
  return r


def bench_ffn2(lib) -> dict:
  """The activation path from the pre-activation: jsparse's fused relu^2 + 2:4 + compress, then the sparse GEMM, vs the
  dense FFN2 in XLA (relu^2 fused by XLA, dense GEMM; the baseline) and XLA's own 2:4 reference (relu^2 + 2:4 mask)."""
  T, F, D = FFN2_SHAPE
  ky, kw = jax.random.split(jax.random.key(1))
  y = jax.random.normal(ky, (T, F), jnp.float32).astype(jnp.bfloat16)
  w2 = (jax.random.normal(kw, (F, D), jnp.float32) * F ** -0.5).astype(jnp.bfloat16)
  xla = jax.jit(lambda y, w: jsparse.squared_relu_nm(y, implementation="xla") @ w)
  xla_dense = jax.jit(lambda y, w: jnp.square(jax.nn.relu(y)) @ w)
  ours = jax.jit(lambda y, w: jsparse.sparse_matmul(jsparse.squared_relu_24_compress(y, implementation="cusparselt"),
                                                    w, implementation="cusparselt"))
  err = rel_err(ours(y, w2), xla(y, w2))
  times = interleaved(dict(xla_masked_ms=jax_runner(xla, y, w2), xla_dense_relu2_ms=jax_runner(xla_dense, y, w2),
                           ours_ms=jax_runner(ours, y, w2)))
  return dict(T=T, F=F, D=D, rel_err=err, **times)


def bench_fp8(lib) -> dict:
  """Whether cuSPARSELt's e4m3 2:4 GEMM (bf16 out) runs on this GPU through the FFI, and how fast."""
  M, K, N = FFN2_SHAPE
  out = dict(M=M, K=K, N=N)
  try:
    a = jax.jit(lambda k: exact_24(k, (M, K), jnp.bfloat16))(jax.random.key(2)).astype(jnp.float8_e4m3fn)
    b = (jax.random.normal(jax.random.key(3), (K, N), jnp.float32)).astype(jnp.float8_e4m3fn)
    bt = jax.jit(lambda b: b.T)(b)
    packed = jax.jit(lambda a: ops.compress(a, method="library"))(a)
    dense8 = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.bfloat16))
    ref = dense8(a, b)
    runners = {}
    for mode in (0, 3):
      name = f"mode{mode}"
      try:
        f = jax.jit(lambda p, d, mode=mode: ops.matmul(p, d, m=M, k=K, mode=mode, search=SEARCH,
                                                          out_dtype=jnp.bfloat16))
        d = bt if mode & 1 else b
        res = f(packed, d)
        out[f"{name}_rel_err"] = rel_err(res.T if mode & 2 else res, ref)
        runners[f"{name}_ms"] = jax_runner(f, packed, d)
      except Exception as e:
        out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    runners["xla_fp8_dense_ms"] = jax_runner(dense8, a, b)
    out.update(interleaved(runners))
  except Exception as e:
    out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="results JSON path")
  parser.add_argument("--shapes", default="all", help="'all' or a comma list of MxKxN")
  parser.add_argument("--skip-extras", action="store_true", help="skip the FFN2-path and fp8 records")
  parser.add_argument("--probe", action="store_true", help="run one small searched GEMM and exit (0 = it works)")
  args = parser.parse_args(argv)
  if args.probe:
    a = jax.jit(lambda k: exact_24(k, (256, 512), jnp.bfloat16))(jax.random.key(0))
    b = jnp.ones((512, 128), jnp.bfloat16)
    out = jax.jit(lambda a, b: jsparse.sparse_matmul(a, b, implementation="cusparselt"))(a, b)
    out_b = jax.jit(lambda x, w: jsparse.sparse_matmul(x, w, sparse_operand="b", implementation="cusparselt"))(b.T, a.T)
    err = max(rel_err(out, a @ b), rel_err(out_b, b.T @ a.T))
    print(f"probe: search={SEARCH} rel_err={err:.2e}", flush=True)
    return 0 if err < 1e-2 else 1
  shapes = SHAPES if args.shapes == "all" else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  lib = library.require("benchmarks.sparse_matmul")
  print(f"device={_util.device_name()} cusparselt={lib.version()} jax={jax.__version__} "
        f"search={os.environ['JSPARSE_CUSPARSELT_SEARCH']}", flush=True)
  records, rows = [], []
  failed = 0
  for M, K, N in shapes:
    t0 = time.perf_counter()
    try:
      r = bench_shape(M, K, N, lib)
    except Exception as e:  # keep going: one shape's failure must not hide the others' numbers
      failed += 1
      print(f"{M}x{K}x{N}: FAILED {type(e).__name__}: {e}", flush=True)
      continue
    print(f"{M}x{K}x{N}: {r} ({time.perf_counter() - t0:.1f} s)", flush=True)
    records.append(_util.record("sparse_matmul", config=dict(shape=[M, K, N], dtype="bfloat16", sparse="a"),
                                metric="time", baseline="xla_dense", ours=r["ours_ms"], base=r["dense_ms"], **r))
    rows.append(r)
    _util.write_results(args.out, records)  # after every shape: a crash later keeps what was measured
  if not args.skip_extras:
    f = bench_ffn2(lib)
    print(f"ffn2: {f}", flush=True)
    records.append(_util.record("sparse_matmul_ffn2_path", config=dict(shape=list(FFN2_SHAPE), dtype="bfloat16",
                                                                       sparse="relu2(y) 2:4"),
                                metric="time", baseline="xla_dense_relu2", ours=f["ours_ms"],
                                base=f["xla_dense_relu2_ms"], **f))
    p = bench_fp8(lib)
    print(f"fp8: {p}", flush=True)
    fp8_ms = [p[f"mode{m}_ms"] for m in (0, 3) if f"mode{m}_ms" in p]
    if fp8_ms and "xla_fp8_dense_ms" in p:
      records.append(_util.record("sparse_matmul_fp8", config=dict(shape=list(FFN2_SHAPE), dtype="float8_e4m3fn",
                                                                   sparse="a"),
                                  metric="time", baseline="xla_fp8_dense", ours=min(fp8_ms),
                                  base=p["xla_fp8_dense_ms"], **p))
  print(f"stats: {lib.stats()}", flush=True)
  _util.write_results(args.out, records)
  _util.print_table(rows, ["M", "K", "N", "dense_ms", "ours_ms", "ratio_vs_dense", "ours_compress_ms",
                           "compress_frac_of_copy", "ratio_compress_vs_lib", "ours_with_compress_ms",
                           "ratio_with_compress_vs_dense", "ratio_vs_torch", "ratio_b_vs_dense"])
  _util.print_table(rows, ["M", "K", "N", "ours_mode0_ms", "ours_mode3_ms", "ours_b_ms", "torch_ms", "torch_dense_ms"])
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
