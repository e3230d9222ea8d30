"""Row gather (the routed FFN's token moves): the Pallas kernel vs XLA's ``jnp.take`` and a plain copy, one process.

Moves of the routed FFN at T=16384: into the padded group layout (P = 17408 rows at E=8, row tile 128: a permutation
of the T tokens plus zero rows) and back to token order, for the 1b (D=2048) and 7b (D=4096) widths, bf16. Reports
GB/s (rows read + rows written, once each), the ratio to XLA's gather (``baseline: xla_take``) and to ``x*2`` (a copy
of the same bytes), for each kernel config of both engines (Triton; Mosaic GPU bulk copies, ``engine: tma``); every
output is checked bit for bit against the reference.

  python -m benchmarks.gather_rows --out $OUT/gather_rows.json
  python -m benchmarks.gather_rows --out /tmp/g.json --interpret --tokens 512   # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jsparse
from benchmarks._util import print_table, record, time_fn, write_results
from jsparse.kernels.gather_rows import api
from jsparse.kernels.routed_ffn import layout as lay

WIDTHS = {"1b": 2048, "7b": 4096}
CONFIGS = [api.GatherConfig(), api.TmaGatherConfig()] + [
    api.GatherConfig(br, bc, w) for br, bc, w in
    [(4, 1024, 4), (16, 1024, 8), (8, 2048, 8), (8, 512, 4), (2, 4096, 8), (1, 4096, 4), (32, 256, 4)]] + [
    api.TmaGatherConfig(br) for br in (2, 4, 16)]


def _describe(cfg) -> dict:
  if isinstance(cfg, api.TmaGatherConfig):
    return dict(engine="tma", block_rows=cfg.block_rows)
  return dict(engine="triton", block_rows=cfg.block_rows, block_cols=cfg.block_cols, num_warps=cfg.num_warps)


def _moves(T: int, E: int, row_tile: int, key):
  """(name, src rows, index) of the two moves, with skewed group sizes like real routing."""
  p = 1.0 / np.arange(1, E + 1) ** 1.1
  groups = jax.random.choice(key, E, (T,), p=jnp.asarray(p / p.sum()))
  layout = lay.make_layout(groups, E, row_tile)
  return [("to_padded", T, layout.row_token_P), ("from_padded", layout.num_rows, layout.pos_T)]


def run(T: int, widths: dict[str, int], configs, E: int = 8, row_tile: int = 128, iters: int = 20):
  records = []
  copy = jax.jit(lambda a: a * 2)
  xla = jax.jit(lambda s, i: api.gather_rows(s, i, implementation="xla"))
  for shape, D in widths.items():
    for move, S, idx in _moves(T, E, row_tile, jax.random.key(0)):
      src = jax.random.normal(jax.random.key(1), (S, D), jnp.float32).astype(jnp.bfloat16)
      P = idx.shape[0]
      nbytes = 2 * P * D * src.dtype.itemsize
      want = np.asarray(xla(src, idx)).view(np.uint16)
      t_xla = time_fn(xla, src, idx, iters=iters)
      t_copy = time_fn(copy, jnp.zeros((P, D), src.dtype), iters=iters)
      gbps = lambda ms: nbytes / ms / 1e6
      for cfg in configs:
        fn = jax.jit(lambda s, i, cfg=cfg: api.gather_rows(s, i, implementation="pallas", config=cfg))
        try:
          exact = bool(np.array_equal(np.asarray(fn(src, idx)).view(np.uint16), want))
          t = time_fn(fn, src, idx, iters=iters)
        except Exception as e:  # a config the compiler rejects must not stop the others
          print(f"[{shape} {move}] {cfg} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
          continue
        conf = dict(shape=[P, D], src_rows=S, dtype="bfloat16", move=move, model=shape, E=E, **_describe(cfg))
        records.append(record("gather_rows", config=conf, metric="gbps", baseline="xla_take", ours=gbps(t),
                              base=gbps(t_xla), ms=t, xla_ms=t_xla, copy_gbps=gbps(t_copy),
                              ratio_to_copy=gbps(t) / gbps(t_copy), exact=exact))
        print(f"[{shape} {move}] {cfg}: {t * 1e3:7.1f} us "
              f"{gbps(t):6.0f} GB/s, xla {t_xla * 1e3:7.1f} us {gbps(t_xla):6.0f} GB/s, copy {gbps(t_copy):6.0f} GB/s,"
              f" exact {exact}", flush=True)
  return records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="results JSON path")
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--widths", default="1b,7b", help="comma-separated keys of WIDTHS")
  parser.add_argument("--interpret", action="store_true", help="CPU smoke test: the kernel in interpret mode")
  args = parser.parse_args(argv)
  widths = {k: WIDTHS[k] for k in args.widths.split(",")}
  configs = CONFIGS
  if args.interpret:
    widths = {k: 256 for k in widths}
    configs = CONFIGS[:2]
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
  with jsparse.pallas_interpret(args.interpret):
    records = run(args.tokens, widths, configs, iters=2 if args.interpret else 20)
  write_results(args.out, records)
  print_table([dict(r["config"], gbps=r["ours"], xla=r["base"], ratio=r["ratio"], copy=r["copy_gbps"],
                    exact=r["exact"]) for r in records],
              ["model", "move", "engine", "block_rows", "block_cols", "num_warps", "gbps", "xla", "ratio", "copy",
               "exact"])
  return 0 if records and all(r["exact"] for r in records) else 1


if __name__ == "__main__":
  sys.exit(main())
