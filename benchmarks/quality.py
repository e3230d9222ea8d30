"""Quality parity: the sparse-then-dense FFN modes against dense squared-ReLU at equal tokens and hyper-parameters.

Every run is an ordinary ``jsparse-train`` run (the script prints the exact command for each; running it gives the
same run): a ~25M-parameter byte-level Llama-style model (D=512, 8 layers, 8 heads, F=2048 squared-ReLU, seq 512,
batch 32 = 16,384 tokens/step, bf16 compute), AdamW with warm-up + cosine, and -- for the sparse modes -- the
schedule ``5% dense warm-up -> 50% sparse -> 45% dense tail``. The runs (:data:`RUNS`):

* ``dense_swiglu``, ``dense_squared_relu`` -- the dense baselines (SwiGLU at the parameter-matched width);
* ``act24`` -- Haziza et al.'s 2:4 activation recipe (mask before ReLU², forward mask reused in the backward, token
  permutation before the token-wise 2:4 of the weight gradients, 95/5 split);
* ``act24_no_permutation``, ``act24_no_mask_reuse`` -- the paper's two big ablations;
* ``w24_sste`` -- 2:4 S-STE weights (W1 and W2, fixed beta);
* ``routed_e4``, ``routed_e8`` -- the neuron-routed FFN (Madhyastha et al.) with E=4 / E=8 groups.

Recorded per run: final validation loss (``metric: "val_loss"``, ``baseline: "dense_squared_relu"``, ``ratio`` =
dense loss / ours, so > 1 means lower loss than dense), the validation loss at the end of the sparse phase, the
validation curve, per-layer activation density over training, and the training throughput.

Data sources (``--source``): ``stdlib`` -- the default ``jsparse-train`` text, the Python standard library's ``*.py``
files; ``peps`` -- the Python Enhancement Proposals, ~14 MB of English prose (``*.rst``/``*.txt`` of
https://github.com/python/peps at ba4deeb7969588d937da609008d05bb83a47b1ab; put them under ``.data/peps``, e.g.
``git clone https://github.com/python/peps .data/peps``).

Run (H100), one command per batch of runs, then merge and plot here::

  python -m benchmarks.quality --runs dense_squared_relu,act24 --source stdlib --out $OUT
  python -m benchmarks.quality --merge A/quality.json B/quality.json --results benchmarks/results/quality.json

``--out`` receives ``quality.json`` and ``runs.tar.gz`` (each run's ``config.json`` + ``metrics.jsonl``); ``--merge``
also unpacks the run archives given with ``--runs-archives`` and plots the curves with ``jsparse-plot``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tarfile
import time
import traceback
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks import _util

MODEL = {"model.d_model": 512, "model.n_layers": 8, "model.n_heads": 8, "model.n_kv_heads": 8, "model.d_ff": 2048,
         "model.max_len": 512, "model.compute_dtype": "bfloat16"}
TRAIN = {"data.seq_len": 512, "data.batch_size": 32, "data.eval_batches": 16, "optim.lr": 2e-3,
         "optim.lr_warmup": 0.05, "checkpoint.every": 0, "log.every": 25, "log.tensorboard": False,
         "log.progress": False, "overwrite": True}
SPARSE_SCHEDULE = {"schedule.dense_warmup": 0.05, "schedule.sparse": 0.5}
DENSE_SCHEDULE = {"schedule.dense_warmup": 0, "schedule.sparse": 0}

RUNS: dict[str, dict[str, Any]] = {
    "dense_swiglu": {"ffn": "swiglu"},
    "dense_squared_relu": {"ffn": "dense"},
    "act24": {"ffn": "act24"},
    "act24_no_permutation": {"ffn": "act24", "model.ffn.permute_tokens": False},
    "act24_no_mask_reuse": {"ffn": "act24", "model.ffn.reuse_mask_in_backward": False},
    "w24_sste": {"ffn": "w24"},
    "routed_e4": {"ffn": "routed", "model.ffn.num_groups": 4},
    "routed_e8": {"ffn": "routed", "model.ffn.num_groups": 8},
}
BASELINE = "dense_squared_relu"
# The papers' order of final loss (Haziza et al. Table 1): full recipe < no permutation < no backward mask reuse.
ABLATION_ORDER = ("act24", "act24_no_permutation", "act24_no_mask_reuse")
SOURCES = {"stdlib": None, "peps": ".data/peps"}
# Steps per source: just under one epoch of its training split (16,384 tokens/step; stdlib ~31.5 MB, peps ~14.4 MB).
# A second epoch measures memorisation: on the H100 the dense run's validation loss rose each time an epoch began.
SOURCE_STEPS = {"stdlib": 1800, "peps": 800}


def overrides_for(name: str, source: str, steps: int, *, tiny: bool = False) -> dict[str, Any]:
  """The ``jsparse-train`` overrides of run ``name`` (all runs share everything but the FFN mode).

  Raises:
    ValueError: unknown run or source.
  """
  if name not in RUNS:
    raise ValueError(f"quality: unknown run {name!r}; known: {', '.join(RUNS)}")
  if source not in SOURCES:
    raise ValueError(f"quality: unknown source {source!r}; known: {', '.join(SOURCES)}")
  dense = RUNS[name]["ffn"] in ("dense", "swiglu")
  o: dict[str, Any] = {} if tiny else dict(MODEL)
  o.update(TRAIN)
  if tiny:  # the CPU test: the tiny preset's model and small batches, same code path
    o.update({"data.seq_len": 64, "data.batch_size": 8, "data.eval_batches": 2, "model.d_ff": 256,
              "model.ffn.router_block": 32, "log.every": 2})
  o.update(DENSE_SCHEDULE if dense else SPARSE_SCHEDULE)
  o.update({"steps": steps, "log.eval_every": max(1, steps // 20)})  # 20 evals: one lands on the sparse end
  if SOURCES[source] is not None:
    o["data.path"] = SOURCES[source]
  o.update(RUNS[name])
  return o


def command_for(overrides: dict[str, Any], out_dir: str) -> str:
  """The ``jsparse-train`` command line that reproduces a run."""
  args = ["jsparse-train", "--preset", "tiny", "--out", out_dir]
  args += [f"{k}={v}" for k, v in overrides.items()]
  return " ".join(shlex.quote(a) for a in args)


def run_one(name: str, source: str, steps: int, out_root: str, tiny: bool = False) -> dict[str, Any]:
  """Trains run ``name`` and returns its raw summary (no baseline yet)."""
  from jsparse.train import config as config_lib
  from jsparse.train import loop
  from jsparse.train.metrics import read_metrics

  overrides = overrides_for(name, source, steps, tiny=tiny)
  run_dir = os.path.join(out_root, f"{source}-{name}")
  overrides_with_dir = dict(overrides, out_dir=run_dir)
  print(f"quality: {name} on {source}: {command_for(overrides, run_dir)}", flush=True)
  cfg = config_lib.from_preset("tiny", overrides_with_dir)
  t0 = time.perf_counter()
  result = loop.train(cfg)
  wall = time.perf_counter() - t0
  records = read_metrics(run_dir)
  phases = {"sparse_start": result.phases.sparse_start, "sparse_end": result.phases.sparse_end}
  val = dict(result.val_losses)
  density_curve = []
  for r in records:
    dens = {k.split("/")[0]: v for k, v in r.items() if k.endswith("/act_density")}
    if dens:
      density_curve.append((r["step"], r.get("phase"), [dens[k] for k in sorted(dens, key=lambda s: int(s[5:]))]))
  sparse_tps = [r["tokens_per_s"] for r in records if r.get("phase") == "sparse" and "tokens_per_s" in r]
  model_config = loop.build_model_config(cfg)
  n_params = _param_count(result.model)
  return dict(run=name, source=source, steps=steps, tokens=steps * cfg.data.batch_size * cfg.data.seq_len,
              final_val_loss=val[result.final_step],
              val_loss_end_of_sparse=val.get(phases["sparse_end"]) if phases["sparse_end"] > phases["sparse_start"]
              else None,
              final_train_loss=float(np.mean(result.losses[-25:])),
              val_curve=sorted(val.items()), density_curve=density_curve,
              tokens_per_s=result.tokens_per_s, sparse_phase_tokens_per_s=float(np.median(sparse_tps)) if sparse_tps
              else None, wall_s=wall,
              params=n_params, d_model=model_config.d_model, n_layers=model_config.n_layers, d_ff=model_config.d_ff,
              ffn=RUNS[name]["ffn"], overrides={k: v for k, v in overrides.items() if k not in TRAIN},
              phases=phases, command=command_for(overrides, f"runs/quality/{source}-{name}"))


def _param_count(model) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def to_records(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Results records: one ``val_loss`` record per run against the same source's dense squared-ReLU run, plus one
  ``ablation_order`` record per source whose three recipe runs are present."""
  records = []
  by_source: dict[str, dict[str, dict]] = {}
  for s in summaries:
    by_source.setdefault(s["source"], {})[s["run"]] = s
  for source, runs in by_source.items():
    base = runs.get(BASELINE)
    for name in RUNS:
      s = runs.get(name)
      if s is None:
        continue
      config = dict(run=name, ffn=s["ffn"], source=source, steps=s["steps"], tokens=s["tokens"], params=s["params"],
                    shape=[s["d_model"], s["n_layers"], s["d_ff"]], overrides=s["overrides"])
      extra = {k: s[k] for k in ("val_loss_end_of_sparse", "final_train_loss", "val_curve", "density_curve",
                                 "tokens_per_s", "sparse_phase_tokens_per_s", "wall_s", "command", "phases")}
      if base is not None:
        rec = _util.record("quality", config=config, metric="val_loss", baseline=BASELINE, ours=s["final_val_loss"],
                           base=base["final_val_loss"], **extra)
        rec["within_0.5pct"] = rec["ours"] <= 1.005 * rec["base"]
        if base.get("val_loss_end_of_sparse") is None and s["val_loss_end_of_sparse"] is not None:
          # dense baseline's loss at the same step, for the end-of-sparse-phase comparison
          at = dict(base["val_curve"]).get(s["phases"]["sparse_end"])
          rec["dense_val_loss_at_sparse_end"] = at
      else:
        rec = dict(bench="quality", device=s.get("device") or _util.device_name(), date=_util.today(), config=config,
                   metric="val_loss", baseline=BASELINE, ours=s["final_val_loss"], base=None, ratio=None, **extra)
      if s.get("device"):
        rec["device"] = s["device"]
      records.append(rec)
    if all(n in runs for n in ABLATION_ORDER):
      losses = [runs[n]["final_val_loss"] for n in ABLATION_ORDER]
      sparse_end = [runs[n]["val_loss_end_of_sparse"] for n in ABLATION_ORDER]
      records.append(dict(bench="quality_ablation_order", device=runs["act24"].get("device") or _util.device_name(),
                          date=_util.today(), config=dict(source=source, runs=list(ABLATION_ORDER)),
                          metric="val_loss", baseline="paper_order", final_val_losses=losses,
                          sparse_end_val_losses=sparse_end,
                          final_in_paper_order=bool(losses[0] <= losses[1] <= losses[2]),
                          sparse_end_in_paper_order=bool(None not in sparse_end
                                                         and sparse_end[0] <= sparse_end[1] <= sparse_end[2])))
  return records


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runs", default=",".join(RUNS), help="comma-separated runs (default: all): " + ", ".join(RUNS))
  p.add_argument("--source", default="stdlib", choices=sorted(SOURCES), help="text source (default stdlib)")
  p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: SOURCE_STEPS, ~1 epoch)")
  p.add_argument("--out", help="output folder: quality.json, runs.tar.gz, runs/")
  p.add_argument("--max-seconds", type=float, default=None, help="start no new run after this long")
  p.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny model, small batches")
  p.add_argument("--merge", nargs="+", metavar="JSON", help="merge the summaries of earlier calls (quality.json)")
  p.add_argument("--runs-archives", nargs="*", default=[], help="with --merge: runs.tar.gz files to unpack and plot")
  p.add_argument("--results", default="benchmarks/results/quality.json", help="with --merge: the records file")
  p.add_argument("--runs-root", default="runs/quality", help="with --merge: where the run archives are unpacked")
  p.add_argument("--plot-dir", default="benchmarks/results", help="with --merge: where the PNGs go")
  return p.parse_args(argv)


def merge(args) -> int:
  summaries: dict[tuple[str, str], dict] = {}
  for path in args.merge:
    with open(path) as f:
      for s in json.load(f)["summaries"]:
        summaries[(s["source"], s["run"])] = s  # a later file's rerun wins
  records = to_records(list(summaries.values()))
  _util.write_results(args.results, records)
  runs_root = args.runs_root
  for archive in args.runs_archives:
    with tarfile.open(archive) as tar:
      tar.extractall(runs_root, filter="data")
  if args.runs_archives:
    from jsparse.train import plot
    for source in sorted({s for s, _ in summaries}):
      dirs = [os.path.join(runs_root, f"{source}-{n}") for n in RUNS if (source, n) in summaries]
      dirs = [d for d in dirs if os.path.exists(os.path.join(d, "metrics.jsonl"))]
      if dirs:
        plot.main(dirs + ["-o", os.path.join(args.plot_dir, f"quality_{source}.png"), "--smooth", "50",
                          "--title", f"quality: {source} text, equal tokens (sparse phase shaded)"])
  rows = [dict(run=r["config"].get("run", "-"), source=r["config"]["source"], val_loss=r.get("ours"),
               dense=r.get("base"), ratio=r.get("ratio"), sparse_end=r.get("val_loss_end_of_sparse"),
               tok_s=r.get("tokens_per_s")) for r in records if r["bench"] == "quality"]
  _util.print_table(rows, ["run", "source", "val_loss", "dense", "ratio", "sparse_end", "tok_s"])
  for r in records:
    if r["bench"] == "quality_ablation_order":
      print(f"ablation order ({r['config']['source']}): final {r['final_val_losses']} in paper order: "
            f"{r['final_in_paper_order']}; end of sparse phase {r['sparse_end_val_losses']}: "
            f"{r['sparse_end_in_paper_order']}")
  return 0


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.merge:
    return merge(args)
  if not args.out:
    raise SystemExit("quality: --out is required (or --merge)")
  if args.steps is None:
    args.steps = SOURCE_STEPS[args.source]
  names = [n for n in args.runs.split(",") if n]
  for n in names:
    overrides_for(n, args.source, args.steps)  # unknown names fail before any training
  runs_root = os.path.join(args.out, "runs")
  os.makedirs(runs_root, exist_ok=True)
  summaries, failures = [], []
  t0 = time.perf_counter()
  device = _util.device_name()
  for name in names:
    if args.max_seconds is not None and time.perf_counter() - t0 > args.max_seconds:
      failures.append(dict(run=name, source=args.source, reason="--max-seconds used up; not started"))
      continue
    try:
      s = run_one(name, args.source, args.steps, runs_root, tiny=args.tiny)
      s["device"] = device
      summaries.append(s)
      print(f"quality: {name}: final val loss {s['final_val_loss']:.4f} (end of sparse phase: "
            f"{s['val_loss_end_of_sparse']}), {s['tokens_per_s']:,.0f} tokens/s, {s['wall_s']:.0f} s", flush=True)
    except Exception as e:  # noqa: BLE001 - record and go on with the other runs
      traceback.print_exc()
      failures.append(dict(run=name, source=args.source, reason=f"{type(e).__name__}: {str(e)[:300]}"))
    with open(os.path.join(args.out, "quality.json"), "w") as f:  # after every run: a cut-short call keeps it
      json.dump({"summaries": summaries, "failures": failures}, f, indent=1)
  with tarfile.open(os.path.join(args.out, "runs.tar.gz"), "w:gz") as tar:
    for s in summaries:
      d = os.path.join(runs_root, f"{s['source']}-{s['run']}")
      for fname in ("config.json", "metrics.jsonl"):
        if os.path.exists(os.path.join(d, fname)):
          tar.add(os.path.join(d, fname), arcname=f"{s['source']}-{s['run']}/{fname}")
  for r in to_records(summaries):
    if r["bench"] == "quality":
      print(f"quality: {r['config']['run']:<22} val {r['ours']:.4f}  ratio {r['ratio']}")
  if failures:
    print(f"quality: {len(failures)} runs failed or not started: {failures}")
  return 0 if not failures else 1


if __name__ == "__main__":
  sys.exit(main())
