"""Sparsify kernels vs a plain copy (``x*2``) and the jitted jnp reference, all in one process.

For x of 16384 x 8192 bf16 (default) times each public op with ``implementation="pallas"`` (the forward users call),
the same op with ``implementation="xla"`` under jit, and ``x*2``; reports achieved GB/s (bytes read + bytes written
once each) and the ratio to the copy's GB/s (the issue's goal: >= 0.8, and faster than the reference). Every kernel's
full-size output is also compared with the reference's (``matches_reference``).

  python -m benchmarks.sparsify --out $OUT/sparsify.json            # the results file
  python -m benchmarks.sparsify --out $OUT/tune.json --tune         # sweep block configs of every kernel
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jsparse
from benchmarks._util import print_table, record, time_fn, write_results
from jsparse.kernels import _common as common
from jsparse.kernels.activation import pallas as act_pallas
from jsparse.kernels.nm import pallas as nm_pallas
from jsparse.kernels.nm import pallas_pack
from jsparse.kernels.nm import pallas_transposable
from jsparse.kernels.nm.pallas_common import BlockConfig
from jsparse.kernels.vnm import pallas as vnm_pallas


@dataclasses.dataclass(frozen=True)
class Op:
  name: str
  call: object  # (x, implementation) -> outputs
  bytes_fn: object  # (numel, itemsize) -> bytes moved (read + written)
  kernel: object  # (x, BlockConfig) -> outputs, for --tune
  configs: tuple = ()
  extra: bool = False  # informational row beyond the six


ROWWISE_CONFIGS = (BlockConfig(2, 1024, 4), BlockConfig(4, 1024, 4), BlockConfig(4, 1024, 8),
                   BlockConfig(8, 1024, 8), BlockConfig(4, 512, 4), BlockConfig(2, 2048, 8))
TRANSPOSABLE_CONFIGS = (BlockConfig(16, 512, 4), BlockConfig(8, 256, 2), BlockConfig(32, 512, 8),
                        BlockConfig(16, 1024, 8), BlockConfig(8, 512, 4))
VNM_CONFIGS = (BlockConfig(64, 128, 1), BlockConfig(64, 256, 1), BlockConfig(64, 512, 2), BlockConfig(64, 256, 2),
               BlockConfig(64, 1024, 4), BlockConfig(64, 512, 1))


def _interp() -> bool:
  return common.interpret_enabled()


def _ops() -> list[Op]:
  same = lambda N, b: 2 * N * b
  return [
      Op("nm_prune_2_4", lambda x, i: jsparse.nm_prune(x, 2, 4, implementation=i), same,
         lambda x, c: nm_pallas.nm_select(x, 2, 4, outputs=("y",), config=c, interpret=_interp()), ROWWISE_CONFIGS),
      Op("squared_relu_nm_2_4", lambda x, i: jsparse.squared_relu_nm(x, 2, 4, implementation=i), same,
         lambda x, c: act_pallas.squared_relu_nm(x, 2, 4, outputs=("h",), config=c, interpret=_interp()), ROWWISE_CONFIGS),
      Op("soft_threshold_24", lambda x, i: jsparse.soft_threshold_24(x, implementation=i), same,
         lambda x, c: nm_pallas.soft_threshold_24(x, outputs=("s",), config=c, interpret=_interp()), ROWWISE_CONFIGS),
      Op("transposable_24_mask", lambda x, i: jsparse.transposable_24_mask(x, implementation=i),
         lambda N, b: N * b + N,
         lambda x, c: pallas_transposable.transposable_24_select(x[None], outputs=("mask",), config=c, interpret=_interp()),
         TRANSPOSABLE_CONFIGS),
      Op("vnm_prune_64_2_8", lambda x, i: jsparse.vnm_prune(x, 64, 2, 8, implementation=i), same,
         lambda x, c: vnm_pallas.vnm_select(x, 64, 2, 8, outputs=("y",), config=c, interpret=_interp()), VNM_CONFIGS),
      Op("pack_24", lambda x, i: jsparse.pack_24(x, implementation=i), lambda N, b: N * b + N * b // 2 + N // 8,
         lambda x, c: pallas_pack.pack_24(x, config=c, interpret=_interp()), ROWWISE_CONFIGS),
      # Informational: the bool mask users get from nm_mask.
      Op("nm_mask_2_4", lambda x, i: jsparse.nm_mask(x, 2, 4, implementation=i), lambda N, b: N * b + N,
         lambda x, c: nm_pallas.nm_select(x, 2, 4, outputs=("mask",), config=c, interpret=_interp()), (), extra=True),
  ]


def _equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      u.shape == v.shape and bool(jnp.array_equal(jax.lax.bitcast_convert_type(u, jnp.uint16)
                                                  if u.dtype == jnp.bfloat16 else u,
                                                  jax.lax.bitcast_convert_type(v, jnp.uint16)
                                                  if v.dtype == jnp.bfloat16 else v))
      for u, v in zip(la, lb))


def run(shape, dtype, ops, tune: bool) -> list[dict]:
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
  N, b = x.size, x.dtype.itemsize
  copy = jax.jit(lambda x: x * 2)
  copy_ms = time_fn(copy, x)
  copy_gbps = 2 * N * b / copy_ms / 1e6
  print(f"x*2: {copy_ms:.4f} ms, {copy_gbps:.1f} GB/s", flush=True)
  records = []
  for op in ops:
    nbytes = op.bytes_fn(N, b)
    if tune:
      for cfg in op.configs:
        try:
          f = jax.jit(lambda x, cfg=cfg: op.kernel(x, cfg))
          ms = time_fn(f, x, warmup=2, iters=10, rounds=3)
        except Exception as e:  # keep sweeping: one config that does not compile says nothing about the others
          print(f"{op.name} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
          continue
        gbps = nbytes / ms / 1e6
        print(f"{op.name} {cfg}: {ms:.4f} ms {gbps:.1f} GB/s {gbps / copy_gbps:.3f} of copy", flush=True)
        records.append(dict(op=op.name, block_rows=cfg.block_rows, block_cols=cfg.block_cols,
                            num_warps=cfg.num_warps, ms=ms, gbps=gbps, ratio_to_copy=gbps / copy_gbps))
      continue
    try:
      ours = jax.jit(lambda x: op.call(x, "pallas"))
      ref = jax.jit(lambda x: op.call(x, "xla"))
      match = _equal(ours(x), ref(x))
      ms = time_fn(ours, x)
      ref_ms = time_fn(ref, x)
    except Exception:
      print(f"{op.name}: FAILED", flush=True)
      traceback.print_exc()
      continue
    gbps = nbytes / ms / 1e6
    config = dict(op=op.name, shape=list(shape), dtype=jnp.dtype(dtype).name, block=_config_of(op.name))
    records.append(record("sparsify", config=config, metric="gbps", baseline="copy", ours=gbps, base=copy_gbps,
                          shape=list(shape), dtype=jnp.dtype(dtype).name, op=op.name, ms=ms, gbps=gbps,
                          copy_ms=copy_ms, copy_gbps=copy_gbps, ratio_to_copy=gbps / copy_gbps, ref_ms=ref_ms,
                          ref_speedup=ref_ms / ms, bytes=int(nbytes), matches_reference=match,
                          informational=op.extra))
    print(f"{op.name}: {ms:.4f} ms {gbps:.1f} GB/s ({gbps / copy_gbps:.3f} of copy), ref {ref_ms:.4f} ms, "
          f"match={match}", flush=True)
  return records


_DEFAULTS = {  # op -> (module, attribute) of the kernel's default config
    "nm_prune_2_4": (nm_pallas, "DEFAULT_CONFIG"),
    "soft_threshold_24": (nm_pallas, "SOFT_THRESHOLD_CONFIG"),
    "squared_relu_nm_2_4": (act_pallas, "DEFAULT_CONFIG"),
    "transposable_24_mask": (pallas_transposable, "DEFAULT_CONFIG"),
    "vnm_prune_64_2_8": (vnm_pallas, "DEFAULT_CONFIG"),
    "pack_24": (pallas_pack, "DEFAULT_CONFIG"),
}


def _use_best(path: str) -> None:
  """Sets each tuned op's default config to its fastest in a --tune file (the defaults to commit are these)."""
  import json
  best = {}
  for r in json.load(open(path)):
    if r["op"] not in best or r["ms"] < best[r["op"]]["ms"]:
      best[r["op"]] = r
  for op, r in best.items():
    module, attr = _DEFAULTS[op]
    cfg = BlockConfig(r["block_rows"], r["block_cols"], r["num_warps"])
    print(f"{op}: using {cfg}", flush=True)
    setattr(module, attr, cfg)


def _config_of(op_name: str) -> dict:
  if op_name not in _DEFAULTS:
    return {}
  module, attr = _DEFAULTS[op_name]
  return dataclasses.asdict(getattr(module, attr))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="results JSON path")
  parser.add_argument("--tune", action="store_true", help="sweep kernel block configs instead")
  parser.add_argument("--shape", type=int, nargs=2, default=(16384, 8192))
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--ops", nargs="*", help="subset of op names")
  parser.add_argument("--interpret", action="store_true", help="CPU smoke test: kernels in interpret mode")
  parser.add_argument("--best-from", help="a --tune results file: run with each op's fastest config")
  args = parser.parse_args(argv)
  interpret = jsparse.pallas_interpret(args.interpret)  # kept referenced: the flag lives while the block is open
  interpret.__enter__()
  ops = [op for op in _ops() if not args.ops or op.name in args.ops]
  if args.best_from:
    _use_best(args.best_from)
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
  records = run(tuple(args.shape), jnp.dtype(args.dtype), ops, args.tune)
  write_results(args.out, records)
  if not records:
    return 1
  if args.tune:
    print_table(records, ["op", "block_rows", "block_cols", "num_warps", "ms", "gbps", "ratio_to_copy"])
  else:
    print_table(records, ["op", "ms", "gbps", "copy_gbps", "ratio_to_copy", "ref_ms", "ref_speedup",
                          "matches_reference"])


if __name__ == "__main__":
  sys.exit(main())
