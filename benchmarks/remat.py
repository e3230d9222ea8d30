"""Compressed remat of the squared-ReLU FFN activation: memory, saved bytes and fwd+bwd time per policy (one process).

Run on the GPU (``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so ``peak_bytes_in_use`` is what was really used):

  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD python3 benchmarks/remat.py --out $OUT/remat.json

How the activations are driven to a density: the last input feature is a constant 1 and the last row of ``w1`` a
bias ``-Phi^-1(zeros)``; the other features are N(0, 1) and ``w1`` N(0, 1/(D-1)), so every pre-activation is about
N(-Phi^-1(zeros), 1) and ``relu`` zeroes the requested fraction (a learned negative bias is how squared-ReLU FFNs get
there in training). The measured density is recorded.

Sections (all by default): ``kernels`` (pack/unpack bandwidth vs an XLA copy, block-size sweep), ``ffn`` (each
policy at the two issue shapes and two sparsities), ``max_batch`` (largest token batch of an 8-layer FFN stack that
fits, save-dense vs compressed), ``residuals`` (``print_saved_residuals`` of each policy at a toy size). Not by
default: ``variants`` (the CUDA pack's launch configurations, timed interleaved with copy; GPU only).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import io
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jsparse
from benchmarks import _util
from jsparse import remat
from jsparse.kernels.compress import cuda as compress_cuda
from jsparse.kernels.compress import format as fmt
from jsparse.kernels.compress import pallas as kernels
from jsparse.kernels.compress import single_pass

SHAPES = [(16384, 2048, 8192), (16384, 4096, 14336)]
ZEROS = [0.85, 0.95]
POLICIES = ["xla_autodiff", "save_dense", "compressed", "offload", "recompute"]
CAPACITY_MARGIN = 1.1  # capacity = 1.1 x the expected density
BENCH = "remat"
_INTERPRET = jax.default_backend() != "gpu"  # --quick on a CPU runs the kernels in interpret mode


def _ppf(q: float) -> float:
  return statistics.NormalDist().inv_cdf(q)


def make_inputs(T, D, F, zeros, dtype=jnp.bfloat16, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (T, D), dtype).at[:, -1].set(1)
  w1 = (jax.random.normal(k2, (D, F), jnp.float32) / np.sqrt(D - 1)).at[-1].set(-_ppf(zeros)).astype(dtype)
  w2 = (jax.random.normal(k3, (F, D), jnp.float32) / np.sqrt(F)).astype(dtype)
  return x, w1, w2


def ffn_fn(policy: str, capacity: float):
  if policy == "xla_autodiff":  # what a JAX user writes today: plain autodiff, no checkpoint
    return lambda x, w1, w2: jnp.square(jax.nn.relu(x @ w1)) @ w2
  return functools.partial(jsparse.squared_relu_ffn, remat=policy, capacity=capacity)


def loss_fn(policy, capacity):
  # The cotangent must depend on the output (as in training), else XLA drops the forward h @ w2 as dead code.
  f = ffn_fn(policy, capacity)
  return lambda x, w1, w2: 0.5 * jnp.sum(jnp.square(f(x, w1, w2).astype(jnp.float32)))


def _time(fn, *args, iters=20, rounds=5):
  # Kernels of 0.1-0.5 ms: 100 calls, as the variants' ranking moved by up to 10% between processes at 15 calls.
  return _util.time_fn(fn, *args, warmup=2, iters=iters, rounds=rounds)


def _static_peak(ma) -> int:
  """XLA's own estimate of an executable's device footprint (buffer assignment): the larger of its peak and
  arguments + outputs + temporaries - aliased (CPU reports a peak without temporaries)."""
  total = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
  return int(max(getattr(ma, "peak_memory_in_bytes", 0) or 0, total))


def _mem():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0), stats.get("bytes_in_use", 0), stats.get("bytes_limit", 0)


# ----------------------------------------------------------------------------------------------------------------------
# kernels

# Single-pass packer configurations timed by the sweep (the first is the default; fit_config adapts them to F).
_SP = single_pass.PackConfig
_FULL = _SP(split=False, prefetch=False)  # count, then pack everything (the first design measured)
PACK_SWEEP = [
    _SP(),
    dataclasses.replace(_FULL, prefetch=True),
    _FULL,
    dataclasses.replace(_FULL, num_stages=2),
    _SP(prefetch=False),
    _SP(reload=True),
    _SP(reload=True, prefetch=False),
    _SP(num_stages=2, prefetch=False),
    _SP(1, 2048, num_warps=8),
    _SP(1, 2048, num_warps=4),
    _SP(1, 2048, num_warps=8, reload=True),
    _SP(2, 1024, num_warps=4),
    _SP(2, 1024, num_warps=8, reload=True),
    _SP(4, 1024, num_warps=8),
    _SP(1, 512, num_warps=2),
    _SP(1, 1024, num_warps=4),
    _SP(1, 1024, num_warps=8),
    _SP(1, 4096, num_warps=8),
    _SP(hold=True),
    _SP(1, 2048, num_warps=8, hold=True),
    _SP(hold=True, reload=True),
    _SP(place="scan"),
    _SP(place="scan", prefetch=False),
    _SP(place="scan", words=True),
    _SP(1, 2048, num_warps=8, place="scan"),
    _SP(window=8),
    _SP(prefetch=2),
    _SP(prefetch=3),
    _SP(reload=True, prefetch=2),
    _SP(1, 512, num_warps=2, prefetch=3),
    _SP(1, 1024, num_warps=4, prefetch=3),
]
# Unpack variants (block_rows, block_cols, num_warps, num_stages, words); the first is the default.
# (block_rows, block_cols, num_warps, num_stages, placement): "" a prefix sum over the chunk, "words" over each word's
# lanes, "popc" popcounts of the bitmask words.
UNPACK_SWEEP = [(None, None, 4, 1, ""), (4, 1024, 4, 1, "words"), (4, 1024, 4, 2, ""), (2, 2048, 8, 1, "words"),
                (4, 1024, 4, 1, "popc"), (4, 1024, 4, 2, "popc"), (8, 1024, 8, 2, "popc"), (2, 2048, 8, 2, "popc")]


def _default_impl(shape) -> str:
  """What ``pack_bitmask(implementation=None)`` runs for a bfloat16 array of this shape here."""
  from jsparse.kernels.compress import api
  return api._resolve("bench", shape, jnp.bfloat16, None)


def _pack_bytes(n, nnz, square):
  """Bytes a pack must move: read the input once, write the bitmask and the kept values (and h)."""
  return n * 2 + n // 8 + nnz * 2 + (n * 2 if square else 0)


def _same_pack(outs, want, per_row_counts: bool) -> bool:
  """Whether two packers' (bits, values, offsets, counts, h) agree bit for bit (bf16 values and h as their bits).
  Counts per band (the CUDA pack's) have one length per band size: with per_row_counts=False only their sums are
  compared."""
  bits, values, offs, cnt, h = outs
  want_bits, want_values, want_offs, want_cnt, want_h = want
  same_counts = jnp.array_equal(cnt, want_cnt) if per_row_counts else jnp.sum(cnt) == jnp.sum(want_cnt)
  return bool(jnp.array_equal(bits, want_bits) & jnp.array_equal(values.view(jnp.uint16), want_values.view(jnp.uint16))
              & jnp.array_equal(offs, want_offs) & same_counts
              & jnp.array_equal(h.view(jnp.uint16), want_h.view(jnp.uint16)))


def bench_kernels(T, F, zeros_list, sweep: bool, top: int = 3, out: str | None = None):
  records, rows = [], []
  n = T * F
  copy = jax.jit(lambda a: -a)
  relu_sq = jax.jit(lambda a: jnp.square(jax.nn.relu(a)))
  square = jax.jit(lambda a: jnp.square(a))
  ranked = None  # single-pass configs by time at the first sparsity
  for zeros in zeros_list:
    y = jax.random.normal(jax.random.key(1), (T, F), jnp.bfloat16) - _ppf(zeros)
    density = 1.0 - zeros
    cap = fmt.capacity_elements("bench", (T, F), min(1.0, density * CAPACITY_MARGIN))
    counts = jax.jit(lambda a: kernels.count(a, relu=True, interpret=_INTERPRET))(y)
    nnz = int(jnp.sum(counts))
    offsets = fmt.saturating_exclusive_cumsum(counts, cap)
    t_copy = _time(copy, y, iters=20, rounds=7)
    gb_copy = 2 * n * 2 / t_copy / 1e6
    cfg = dict(shape=[T, F], dtype="bfloat16", zeros=zeros, density=nnz / n, capacity=cap / n)
    print(f"zeros {zeros}: copy {t_copy:.4f} ms = {gb_copy:.0f} GB/s", flush=True)

    def add(name, t, nbytes, baseline="xla_copy", **extra):
      gbps = nbytes / t / 1e6
      rows.append(dict(kernel=name, zeros=zeros, ms=t, gbps=gbps, of_copy=gbps / gb_copy,
                       **{k: v for k, v in extra.items() if k in ("blocks", "warps", "exact", "variant")}))
      print(f"  {name} {extra.get('blocks', '')}: {t:.4f} ms, {gbps:.0f} GB/s = {gbps / gb_copy:.3f} of copy",
            flush=True)
      records.append(_util.record(BENCH, config=dict(cfg, kernel=name, **extra), metric="gbps", baseline=baseline,
                                  ours=gbps, base=gb_copy, ms=t, copy_ms=t_copy, bytes=nbytes))

    bits_bytes, values_bytes = n // 8, nnz * 2
    # Two-pass kernels at their default blocks: count, pack alone, and the whole two-pass pack.
    f_count = jax.jit(lambda a: kernels.count(a, relu=True, interpret=_INTERPRET))
    add("count", _time(f_count, y), n * 2, blocks="x".join(map(str, kernels.default_blocks((T, F), "count"))))
    f_pack = jax.jit(lambda a, o: kernels.pack(a, o, cap, relu=True, square_out=True, interpret=_INTERPRET))
    want_bits, want_values, want_h = f_pack(y, offsets)
    tag = dict(blocks="x".join(map(str, kernels.default_blocks((T, F)))), warps=4)
    add("pack_relu_square (pass 2 alone)", _time(f_pack, y, offsets), _pack_bytes(n, nnz, True), **tag)

    def two_pass(a):
      c = kernels.count(a, relu=True, interpret=_INTERPRET)
      o = fmt.saturating_exclusive_cumsum(c, cap)
      return kernels.pack(a, o, cap, relu=True, square_out=True, interpret=_INTERPRET), o, c
    add("pack_relu_square two-pass (count + offsets + pack)", _time(jax.jit(two_pass), y), _pack_bytes(n, nnz, True),
        **tag)

    def same_pack(outs, per_row_counts: bool) -> bool:
      """Whether a packer's (bits, values, offsets, counts, h) are the two-pass kernels', bit for bit."""
      return _same_pack(outs, (want_bits, want_values, offsets, counts, want_h), per_row_counts)

    # Single-pass packer: the sweep (first sparsity), then the fastest `top` and the default (other sparsities).
    if ranked is None:
      configs = PACK_SWEEP if sweep else PACK_SWEEP[:1]
    else:
      configs = [PACK_SWEEP[0]] + [c for c in ranked[:top] if c != PACK_SWEEP[0]]
    timed = []
    for c in configs:
      fitted = single_pass.fit_config(c, (T, F))
      try:
        f_sp = jax.jit(lambda a, c=c: single_pass.pack(a, cap, relu=True, square_out=True, config=c,
                                                       interpret=_INTERPRET))
        exact = same_pack(f_sp(y), per_row_counts=True)
        t = _time(f_sp, y)
        if not exact:
          print(f"!! single-pass {fitted.label()} differs from the two-pass kernels")
        add("pack_relu_square single-pass", t, _pack_bytes(n, nnz, True), blocks=fitted.label(),
            warps=fitted.num_warps, exact=exact, pack_config=dataclasses.asdict(fitted))
        if exact:
          timed.append((t, c))
      except Exception as e:  # a configuration that does not compile is reported, not fatal
        print(f"single-pass {fitted.label()} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    if ranked is None:
      ranked = [c for _, c in sorted(timed, key=lambda tc: tc[0])]
    if ranked:
      best = ranked[0]
      # What pack_bitmask runs (kernel + the count's sum), with the fastest configuration of this process.
      f_best = jax.jit(lambda a: (lambda o: (o, jnp.sum(o[3].astype(jnp.float32))))(
          single_pass.pack(a, cap, relu=True, square_out=True, config=best, interpret=_INTERPRET)))
      add("pack_bitmask(relu, square) end to end, fastest config", _time(f_best, y), _pack_bytes(n, nnz, True),
          blocks=single_pass.fit_config(best, (T, F)).label())
      f_sp1 = jax.jit(lambda a: single_pass.pack(a, cap, relu=True, square_out=False, config=best,
                                                 interpret=_INTERPRET))
      add("pack_relu single-pass (no h)", _time(f_sp1, y), _pack_bytes(n, nnz, False),
          blocks=single_pass.fit_config(best, (T, F)).label())

    # The CUDA kernels (jsparse's FFI library), where it builds: pack, then unpack.
    if not _INTERPRET and compress_cuda.available()[0]:
      try:
        for variant in (list(compress_cuda.PACK_VARIANTS) if sweep else [0]):  # 0: the default
          f_cv = jax.jit(lambda a, v=variant: compress_cuda.pack(a, cap, relu=True, square_out=True, variant=v))
          exact = same_pack(f_cv(y), per_row_counts=False)
          if not exact:
            print(f"!! the CUDA pack (variant {variant}) differs from the Pallas kernels")
          add("pack_relu_square cuda", _time(f_cv, y), _pack_bytes(n, nnz, True), exact=exact,
              implementation="cuda", variant=variant, pack_variant=compress_cuda.PACK_VARIANTS[variant])
        f_cu1 = jax.jit(lambda a: compress_cuda.pack(a, cap, relu=True, square_out=False))
        add("pack_relu cuda (no h)", _time(f_cu1, y), _pack_bytes(n, nnz, False), implementation="cuda")
        f_cu_u2 = jax.jit(lambda b, o, v: compress_cuda.unpack(b, o, v, (T, F), square_out=True))
        r_cu, h_cu = f_cu_u2(want_bits, offsets, want_values)
        want_r, want_rh = kernels.unpack(want_bits, offsets, want_values, (T, F), square_out=True)
        exact = bool(jnp.array_equal(r_cu.view(jnp.uint16), want_r.view(jnp.uint16))
                     & jnp.array_equal(h_cu.view(jnp.uint16), want_rh.view(jnp.uint16)))
        del r_cu, h_cu, want_r, want_rh
        add("unpack_square cuda", _time(f_cu_u2, want_bits, offsets, want_values),
            bits_bytes + values_bytes + 2 * n * 2, exact=exact, implementation="cuda")
        f_cu_u1 = jax.jit(lambda b, o, v: compress_cuda.unpack(b, o, v, (T, F), square_out=False))
        add("unpack cuda", _time(f_cu_u1, want_bits, offsets, want_values), bits_bytes + values_bytes + n * 2,
            implementation="cuda")
      except Exception as e:
        print(f"cuda kernels failed: {type(e).__name__}: {str(e)[:600]}", flush=True)

    # Unpack (the backward's decompress), default blocks first.
    for br, bc, nw, ns, place in (UNPACK_SWEEP if sweep and zeros == zeros_list[0] else UNPACK_SWEEP[:1]):
      kw = dict(block_rows=br, block_cols=bc, num_warps=nw, num_stages=ns, interpret=_INTERPRET,
                **({place: True} if place else {}))
      d = kernels.default_blocks((T, F))
      utag = dict(blocks=f"{br or d[0]}x{bc or d[1]}/w{nw}s{ns}{'/' + place if place else ''}", warps=nw)
      try:
        f_u2 = jax.jit(lambda b, o, v, kw=kw: kernels.unpack(b, o, v, (T, F), square_out=True, **kw))
        add("unpack_square", _time(f_u2, want_bits, offsets, want_values), bits_bytes + values_bytes + 2 * n * 2,
            **utag)
        f_u1 = jax.jit(lambda b, o, v, kw=kw: kernels.unpack(b, o, v, (T, F), square_out=False, **kw))
        add("unpack", _time(f_u1, want_bits, offsets, want_values), bits_bytes + values_bytes + n * 2, **utag)
      except Exception as e:
        print(f"unpack {utag} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)

    # End to end, against the XLA passes they replace in the FFN (forward relu^2; backward r^2): the default
    # implementation and, where it differs, the Pallas kernels.
    t_relu = _time(relu_sq, y)
    r = relu_sq(y)
    t_sq = _time(square, r)
    t_default = None
    impls = [None] + (["pallas"] if _default_impl((T, F)) != "pallas" else [])
    for impl in impls:
      label = impl or _default_impl((T, F))
      e2e_pack = jax.jit(lambda a, i=impl: jsparse.pack_bitmask(a, cap, relu=True, return_square=True,
                                                                implementation=i))
      packed, _ = e2e_pack(y)
      t_pack = _time(e2e_pack, y)
      t_default = t_default if impl else t_pack
      add("pack_bitmask(relu, square) end to end", t_pack, _pack_bytes(n, nnz, True), implementation=label)
      records.append(_util.record(BENCH, config=dict(cfg, kernel="pack_bitmask(relu, square) end to end",
                                                     implementation=label),
                                  metric="time", baseline="xla_relu_square", ours=t_pack, base=t_relu))
      rows.append(dict(kernel=f"e2e pack vs xla relu^2 ({label})", zeros=zeros, ms=t_pack, base_ms=t_relu))
      e2e_unpack = jax.jit(lambda p, i=impl: jsparse.unpack_bitmask(p, return_square=True, implementation=i))
      t_unpack = _time(e2e_unpack, packed)
      add("unpack_bitmask(square) end to end", t_unpack, bits_bytes + values_bytes + 2 * n * 2, implementation=label)
      records.append(_util.record(BENCH, config=dict(cfg, kernel="unpack_bitmask(square) end to end",
                                                     implementation=label),
                                  metric="time", baseline="xla_square", ours=t_unpack, base=t_sq))
      rows.append(dict(kernel=f"e2e unpack vs xla r^2 ({label})", zeros=zeros, ms=t_unpack, base_ms=t_sq))
    xla_pack = jax.jit(lambda a: jsparse.pack_bitmask(a, cap, relu=True, return_square=True, implementation="xla"))
    try:
      t_xla = _time(xla_pack, y, iters=2, rounds=2)
      records.append(_util.record(BENCH, config=dict(cfg, kernel="pack_bitmask(relu, square)"), metric="time",
                                  baseline="xla_reference_pack", ours=t_default, base=t_xla))
      rows.append(dict(kernel="e2e pack vs xla reference pack", zeros=zeros, ms=t_default, base_ms=t_xla))
    except Exception as e:
      print(f"xla reference pack failed: {e!r}"[:300])
    del y, packed, r, want_bits, want_values, want_h
    gc.collect()
    if out:  # partial results survive a run cut short
      _util.write_results(out, records)
  _util.print_table(rows, ["kernel", "zeros", "blocks", "variant", "exact", "ms", "base_ms", "gbps", "of_copy"])
  return records


def profile_kernels(T, F, results_path: str, zeros: float = 0.85, repeats: int = 3):
  """Runs the two-pass pack, the fastest single-pass configuration in ``results_path``, the default unpack and the
  CUDA pack and unpack a few times each, untimed: a target for ``ncu -k regex:"jsparse|pack_kernel|unpack_kernel"``."""
  import json
  with open(results_path) as f:
    recs = [r for r in json.load(f) if r["config"].get("kernel") == "pack_relu_square single-pass"
            and r["config"].get("zeros") == zeros and r["config"].get("exact")]
  best = single_pass.PackConfig(**min(recs, key=lambda r: r["ms"])["config"]["pack_config"]) if recs else None
  print(f"profiling: two-pass pack, single-pass {best and best.label()}, unpack_square")
  y = jax.random.normal(jax.random.key(1), (T, F), jnp.bfloat16) - _ppf(zeros)
  cap = fmt.capacity_elements("bench", (T, F), min(1.0, (1 - zeros) * CAPACITY_MARGIN))
  offsets = fmt.saturating_exclusive_cumsum(kernels.count(y, relu=True), cap)
  f_pack = jax.jit(lambda a, o: kernels.pack(a, o, cap, relu=True, square_out=True))
  f_sp = jax.jit(lambda a: single_pass.pack(a, cap, relu=True, square_out=True, config=best))
  bits, values, _ = f_pack(y, offsets)
  f_un = jax.jit(lambda b, o, v: kernels.unpack(b, o, v, (T, F), square_out=True))
  cuda_ok = compress_cuda.available()[0]
  f_cu = jax.jit(lambda a: compress_cuda.pack(a, cap, relu=True, square_out=True))
  f_cu_un = jax.jit(lambda b, o, v: compress_cuda.unpack(b, o, v, (T, F), square_out=True))
  for _ in range(repeats):
    jax.block_until_ready(f_pack(y, offsets))
    jax.block_until_ready(f_sp(y))
    jax.block_until_ready(f_un(bits, offsets, values))
    if cuda_ok:  # ncu -k regex:"jsparse|pack_kernel|unpack_kernel"
      jax.block_until_ready(f_cu(y))
      jax.block_until_ready(f_cu_un(bits, offsets, values))


def bench_pack_variants(T, F, zeros_list, variants=None, rounds: int = 4):
  """The CUDA pack's launch configurations, interleaved in one process: per round, copy and every variant are timed
  (100 calls each) in turn, and each one's median over the rounds is kept, so that a drift of the machine's clocks
  or of its memory moves all of them alike. Every variant's output is checked bit for bit against the default's."""
  if _INTERPRET or not compress_cuda.available()[0]:
    print("no CUDA library here: the variants section needs a GPU")
    return []
  variants = list(compress_cuda.PACK_VARIANTS) if variants is None else variants
  records, n = [], T * F
  copy = jax.jit(lambda a: -a)
  for zeros in zeros_list:
    y = jax.random.normal(jax.random.key(1), (T, F), jnp.bfloat16) - _ppf(zeros)
    cap = fmt.capacity_elements("bench", (T, F), min(1.0, (1.0 - zeros) * CAPACITY_MARGIN))
    fns = {v: jax.jit(lambda a, v=v: compress_cuda.pack(a, cap, relu=True, square_out=True, variant=v))
           for v in variants}
    want = fns[variants[0]](y)
    nnz = int(jnp.sum(want[3]))
    exact = {}
    for v, f in fns.items():  # band counts differ in length between band sizes: their sums are compared
      exact[v] = _same_pack(f(y), want, per_row_counts=False)
      if not exact[v]:
        print(f"!! pack variant {v} differs from variant {variants[0]}")
    del want
    times = {k: [] for k in ["copy", *variants]}
    for _ in range(rounds):
      times["copy"].append(_time(copy, y))
      for v, f in fns.items():
        times[v].append(_time(f, y))
    med = {k: statistics.median(t) for k, t in times.items()}
    gb_copy = 2 * n * 2 / med["copy"] / 1e6
    nbytes = _pack_bytes(n, nnz, True)
    print(f"zeros {zeros}: copy {med['copy']:.4f} ms ({gb_copy:.0f} GB/s)")
    for v in variants:
      gbps = nbytes / med[v] / 1e6
      print(f"  variant {v} {compress_cuda.PACK_VARIANTS[v]}: {med[v]:.4f} ms = {gbps / gb_copy:.3f} of copy"
            f"{'' if exact[v] else ' (NOT EXACT)'}  rounds {[round(t, 4) for t in times[v]]}", flush=True)
      cfg = dict(shape=[T, F], dtype="bfloat16", zeros=zeros, kernel="pack_relu_square cuda", variant=v,
                 pack_config=compress_cuda.PACK_VARIANTS[v], exact=exact[v],
                 timing=f"median of {rounds} interleaved rounds, each the median of 5 x 20 calls")
      records.append(_util.record("remat_pack_variants", config=cfg, metric="gbps", baseline="xla_copy", ours=gbps,
                                  base=gb_copy, ms=med[v], copy_ms=med["copy"], bytes=nbytes))
  return records


# ----------------------------------------------------------------------------------------------------------------------
# FFN policies


def bench_ffn(shapes, zeros_list, policies):
  records, rows = [], []
  configs = []
  for (T, D, F) in shapes:
    for zeros in zeros_list:
      capacity = min(1.0, (1.0 - zeros) * CAPACITY_MARGIN)
      for policy in policies:
        configs.append(dict(T=T, D=D, F=F, zeros=zeros, policy=policy, capacity=capacity))
  # Compile everything first (static peak from XLA's buffer assignment). Then the measured peak: peak_bytes_in_use is
  # a high-water mark that never resets, so before each step a ballast buffer lifts bytes_in_use to the current
  # high-water mark; the step's own peak is then (new high-water mark - bytes in use before it) + its inputs.
  for c in configs:
    args = jax.eval_shape(lambda: make_inputs(c["T"], c["D"], c["F"], c["zeros"]))
    grad = jax.jit(jax.grad(loss_fn(c["policy"], c["capacity"]), argnums=(0, 1, 2)))
    try:
      compiled = grad.lower(*args).compile()
      ma = compiled.memory_analysis()
      c["static_peak"] = _static_peak(ma)
      c["compiled"] = compiled
      # The FFN's own residuals (a loss linear in the output adds none of its own).
      f = ffn_fn(c["policy"], c["capacity"])
      c["saved_bytes"] = remat.residual_bytes(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), *args)
    except Exception as e:
      c["error"] = f"{type(e).__name__}: {str(e)[:200]}"
      print(f"compile failed {c['policy']} {c['T'], c['D'], c['F']}: {c['error']}")
  ballast = []
  for (T, D, F) in shapes:
    for zeros in zeros_list:
      args = jax.block_until_ready(make_inputs(T, D, F, zeros))
      arg_bytes = sum(a.nbytes for a in args)
      for c in configs:
        if (c["T"], c["D"], c["F"], c["zeros"]) != (T, D, F, zeros) or "compiled" not in c:
          continue
        try:
          high, in_use, _ = _mem()
          if high > in_use:
            ballast.append(jax.block_until_ready(jnp.zeros((high - in_use,), jnp.int8)))
          before = _mem()[1]
          jax.block_until_ready(c["compiled"](*args))
          c["peak"] = (_mem()[0] - before + arg_bytes) if before else None
        except Exception as e:
          c["error"] = f"{type(e).__name__}: {str(e)[:200]}"
          print(f"run failed {c['policy']}: {c['error']}")
        gc.collect()
      del args
      gc.collect()
  del ballast
  gc.collect()
  # Timings, one group of inputs at a time.
  for (T, D, F) in shapes:
    for zeros in zeros_list:
      group = [c for c in configs if (c["T"], c["D"], c["F"], c["zeros"]) == (T, D, F, zeros) and "compiled" in c
               and "error" not in c]
      args = make_inputs(T, D, F, zeros)
      capacity = min(1.0, (1.0 - zeros) * CAPACITY_MARGIN)
      _, stats = jax.jit(lambda *a: jsparse.squared_relu_ffn(*a, remat="compressed", capacity=capacity,
                                                             return_stats=True))(*args)
      density, dropped = float(stats["density"]), float(stats["dropped_fraction"])
      for c in group:
        c["ms"] = _time(c["compiled"], *args, iters=5, rounds=3)  # 5-40 ms a step
        c["density"], c["dropped"] = density, dropped
      del args
      gc.collect()
      by = {c["policy"]: c for c in group}
      for c in group:
        cfg = dict(shape=[T, D, F], dtype="bfloat16", zeros=zeros, policy=c["policy"], capacity=c["capacity"])
        extra = dict(density=density, dropped_fraction=dropped)
        for base_name in ("save_dense", "recompute", "xla_autodiff"):
          b = by.get(base_name)
          if b is None or b is c:
            continue
          records.append(_util.record(BENCH, config=cfg, metric="time", baseline=base_name, ours=c["ms"],
                                      base=b["ms"], **extra))
          if base_name != "recompute":
            if c["saved_bytes"]:
              records.append(_util.record(BENCH, config=cfg, metric="saved_bytes", baseline=base_name,
                                          ours=c["saved_bytes"], base=b["saved_bytes"], **extra))
            ours_peak = c["peak"] if c.get("peak") else c["static_peak"]
            base_peak = b["peak"] if b.get("peak") else b["static_peak"]
            if ours_peak and base_peak:
              records.append(_util.record(BENCH, config=cfg, metric="peak_bytes", baseline=base_name, ours=ours_peak,
                                          base=base_peak, peak_source="peak_bytes_in_use" if c.get("peak") and
                                          b.get("peak") else "xla_static_peak", static_ours=c["static_peak"],
                                          static_base=b["static_peak"], **extra))
        rows.append(dict(shape=f"{T}x{D}x{F}", zeros=zeros, policy=c["policy"], ms=c["ms"],
                         vs_dense=by["save_dense"]["ms"] / c["ms"] if "save_dense" in by else None,
                         vs_recompute=by["recompute"]["ms"] / c["ms"] if "recompute" in by else None,
                         saved_MB=c["saved_bytes"] / 2**20,
                         saved_x=(by["save_dense"]["saved_bytes"] / c["saved_bytes"]) if c["saved_bytes"] else None,
                         peak_MB=(c.get("peak") or 0) / 2**20, static_MB=c["static_peak"] / 2**20,
                         density=density, dropped=dropped))
  _util.print_table(rows, ["shape", "zeros", "policy", "ms", "vs_dense", "vs_recompute", "saved_MB", "saved_x",
                           "peak_MB", "static_MB", "density", "dropped"])
  return records


# ----------------------------------------------------------------------------------------------------------------------
# Largest token batch of an L-layer FFN stack


def stack_loss(policy, capacity, layers):
  def loss(x, w1s, w2s):
    def layer(x, w):
      w1, w2 = w
      if policy == "xla_autodiff":
        return x + jnp.square(jax.nn.relu(x @ w1)) @ w2, None
      # Each layer checkpointed with the policy: what survives to the backward pass is the layer input plus the
      # policy's residual.
      f = jax.checkpoint(lambda x, w1, w2: x + jsparse.squared_relu_ffn(x, w1, w2, remat=policy, capacity=capacity),
                         policy=jsparse.remat_policy(policy))
      return f(x, w1, w2), None
    x, _ = jax.lax.scan(layer, x, (w1s, w2s))
    return jnp.sum(x.astype(jnp.float32))
  return loss


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _stack_inputs(T, D, F, layers, zeros):
  # One jitted producer: no eager temporaries left behind in the allocator before the big step.
  x = jax.random.normal(jax.random.key(0), (T, D), jnp.bfloat16).at[:, -1].set(1)
  w1 = (jax.random.normal(jax.random.key(1), (layers, D, F), jnp.float32) / np.sqrt(D)).at[:, -1].set(-_ppf(zeros))
  w2 = jax.random.normal(jax.random.key(2), (layers, F, D), jnp.float32) / (4 * np.sqrt(F))
  return x, w1.astype(jnp.bfloat16), w2.astype(jnp.bfloat16)


def bench_max_batch(D, F, zeros, layers, policies, probe=(32768, 65536), step=8192):
  records, rows = [], []
  limit = _mem()[2]
  if not limit:
    print("max_batch: this device reports no memory limit; skipped")
    return []
  capacity = min(1.0, (1.0 - zeros) * CAPACITY_MARGIN)
  results = {}
  for policy in policies:
    grad = jax.jit(jax.grad(stack_loss(policy, capacity, layers), argnums=(0, 1, 2)))

    def shapes(T):
      return (jax.ShapeDtypeStruct((T, D), jnp.bfloat16), jax.ShapeDtypeStruct((layers, D, F), jnp.bfloat16),
              jax.ShapeDtypeStruct((layers, F, D), jnp.bfloat16))

    peaks = []
    for T in probe:
      ma = grad.lower(*shapes(T)).compile().memory_analysis()
      peaks.append(_static_peak(ma))
    per_token = (peaks[1] - peaks[0]) / (probe[1] - probe[0])
    fixed = peaks[0] - per_token * probe[0]
    predicted = int((limit * 0.92 - fixed) / per_token) // step * step
    print(f"max_batch {policy}: limit {limit / 2**30:.1f} GiB, {per_token / 1024:.1f} KiB/token + "
          f"{fixed / 2**20:.0f} MiB -> predicted {predicted} tokens", flush=True)
    fits = None
    for T in (predicted, predicted - 2 * step, predicted - 4 * step):
      if T <= 0:
        break
      try:
        x, w1, w2 = _stack_inputs(T, D, F, layers, zeros)
        jax.block_until_ready(grad(x, w1, w2))
        fits = T
        del x, w1, w2
        gc.collect()
        break
      except Exception as e:
        print(f"max_batch {policy} T={T}: {type(e).__name__} {str(e)[:160]}")
        gc.collect()
    results[policy] = fits
    rows.append(dict(policy=policy, per_token_KB=per_token / 1024, fixed_MB=fixed / 2**20, predicted=predicted,
                     fits=fits))
  _util.print_table(rows, ["policy", "per_token_KB", "fixed_MB", "predicted", "fits"])
  base = results.get("save_dense")
  for policy, fits in results.items():
    if policy == "save_dense" or not fits or not base:
      continue
    rec = _util.record(BENCH, config=dict(shape=["T", D, F], layers=layers, dtype="bfloat16", zeros=zeros,
                                          policy=policy, capacity=capacity), metric="max_tokens",
                       baseline="save_dense", ours=fits, base=base)
    rec["ratio"] = fits / base  # more tokens is better
    records.append(rec)
  return records


# ----------------------------------------------------------------------------------------------------------------------


def print_residuals():
  x = jnp.ones((256, 64), jnp.float32)
  w1 = jnp.ones((64, 512), jnp.float32)
  w2 = jnp.ones((512, 64), jnp.float32)
  for policy in remat.REMAT_POLICIES:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      jax.ad_checkpoint.print_saved_residuals(
          lambda x, w1, w2: jnp.sum(jsparse.squared_relu_ffn(x, w1, w2, remat=policy)), x, w1, w2)
    print(f"== remat={policy!r}")
    print(buf.getvalue().rstrip())


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=False, help="results JSON path")
  p.add_argument("--sections", default="kernels,ffn,max_batch,residuals")
  p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test of the script)")
  p.add_argument("--no-sweep", action="store_true")
  p.add_argument("--kernels-only", action="store_true", help="only the kernel bandwidth section")
  p.add_argument("--profile", metavar="RESULTS", help="run the kernels untimed for ncu (fastest config in RESULTS)")
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--variants", help="the variants section's CUDA pack variants, e.g. 0,5 (default: all)")
  args = p.parse_args(argv)
  if _INTERPRET:
    jsparse.kernels._common._state.interpret = True  # the CPU smoke run: Pallas in interpret mode
  sections = {"kernels"} if args.kernels_only else set(args.sections.split(","))
  print(f"device: {_util.device_name()}  jax {jax.__version__}")
  if args.profile:
    profile_kernels(*((256, 512) if args.quick else (16384, 8192)), args.profile)
    return 0
  records = []
  t0 = time.time()
  if args.quick:
    shapes, kshape, probe, step = [(256, 64, 512)], (256, 512), (256, 512), 256
  else:
    shapes, kshape, probe, step = SHAPES, (16384, 8192), (32768, 65536), 8192

  def run(name, fn):
    if name not in sections:
      return
    t = time.time()
    try:
      records.extend(fn())
    except Exception:  # keep the other sections' numbers
      traceback.print_exc()
    print(f"[{name}: {time.time() - t:.1f}s]", flush=True)
    if args.out:
      _util.write_results(args.out, records)

  run("residuals", lambda: (print_residuals(), [])[1])
  run("kernels", lambda: bench_kernels(*kshape, ZEROS, sweep=not args.no_sweep, out=args.out))
  variants = [int(v) for v in args.variants.split(",")] if args.variants else None
  run("variants", lambda: bench_pack_variants(*kshape, ZEROS, variants))
  run("ffn", lambda: bench_ffn(shapes, ZEROS, POLICIES))
  run("max_batch", lambda: bench_max_batch(shapes[0][1], shapes[0][2], 0.85, args.layers,
                                           ["save_dense", "compressed"], probe=probe, step=step))
  print(f"total {time.time() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
