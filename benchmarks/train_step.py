"""Training-step throughput of the 1b-shaped model per FFN mode, with and without compressed remat, in one process;
1 vs N GPUs through the mesh; and the projected wall time of the whole 1b sparse-then-dense schedule.

For each FFN mode (``dense`` = squared-ReLU, ``act24``, ``w24``, ``act24+w24``, ``routed``) and remat setting
(``none``, ``compressed`` = ``TransformerConfig.remat="compressed"``) it builds the model and AdamW exactly as
``jsparse-train`` does (``jsparse.train.loop``: same jitted, sharded, donating step), then times full optimizer
steps (forward, backward, clipping, AdamW) on random tokens:

* ``step_ms`` / ``tokens_per_s`` -- the mode's step in its *sparse* phase (for ``dense``: the only step);
* ``dense_mode_step_ms`` -- the same model in its dense phases (a SparseFFN with sparsity switched off), which is what
  the warm-up and the dense tail of the schedule run.

The timed steps run without the sparse FFNs' per-layer statistics (``config.stats_in_step=False``), as the loop's
steps between log steps do; records from before that change (``stats_in_step=True``) computed them every step.

A mode whose ops do not exist yet (``NotImplementedError``) or that runs out of memory is recorded as skipped. If the
dense baseline itself does not fit, the layer count is halved until it does (printed, and recorded in ``config``).

Projection (papers.md §2.5): 1,000 dense warm-up steps + 30,000 sparse + 30,000 dense for the 1b model, i.e.
``31000 * dense_mode_step + 30000 * sparse_step`` against ``61000 * dense_step`` of the all-dense squared-ReLU model.
Compilation and evaluation are left out of both.

Run (H100): ``python -m benchmarks.train_step --out $OUT/train_step.json`` (one command: all modes, both remat
settings, the projection, and 1 vs N devices when more than one GPU is visible; ``--scaling-only`` for just that,
e.g. on a 2-GPU machine).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback

import jax
import numpy as np

from benchmarks import _util
from jsparse.models.transformer import auto_attention
from jsparse.train import config as config_lib
from jsparse.train import loop, sharding

MODES = ["dense", "act24", "w24", "act24+w24", "routed"]
REMATS = ["none", "compressed"]
SCHEDULE_1B = {"dense_warmup": 1000, "sparse": 30_000, "dense_tail": 30_000}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="results JSON path")
  p.add_argument("--preset", default="1b", help="model preset (default 1b)")
  p.add_argument("--layers", type=int, default=None, help="layers (default: the preset's; halved on OOM)")
  p.add_argument("--batch", type=int, default=8, help="sequences per step per device (default 8)")
  p.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048: 16384 tokens per step)")
  p.add_argument("--modes", default=",".join(MODES), help="comma-separated FFN modes")
  p.add_argument("--remat", default=",".join(REMATS), help="comma-separated: none, compressed")
  p.add_argument("--implementation", default=None, help="FFN implementation (None, pallas, xla, cusparselt)")
  p.add_argument("--steps", type=int, default=5, help="timed steps per round (3 rounds; median)")
  p.add_argument("--scaling-only", action="store_true", help="only the 1 vs N devices measurement")
  p.add_argument("--scaling-mode", default="dense", help="FFN mode for the scaling measurement")
  p.add_argument("--scaling-layers", type=int, default=None, help="layers for the scaling measurement")
  p.add_argument("--max-seconds", type=float, default=None,
                 help="stop starting new configurations after this long (they are recorded as skipped)")
  return p.parse_args(argv)


def make_config(args, mode: str, remat: str, layers: int, mesh: dict[str, int], batch: int):
  overrides = {"ffn": mode, "steps": 10, "schedule.dense_warmup": 0, "schedule.sparse": 0 if mode == "dense" else 10,
               "data.seq_len": args.seq, "data.batch_size": batch, "model.n_layers": layers,
               "model.max_len": max(args.seq, 128), "out_dir": "/tmp/jsparse_bench_unused", **mesh}
  if remat != "none":
    overrides["model.remat"] = remat
  if args.implementation:
    overrides["model.ffn.implementation"] = args.implementation
  return config_lib.from_preset(args.preset, overrides)


def time_steps(step_fn, state, tokens, iters: int, rounds: int = 3, warmup: int = 2):
  """Median ms per optimizer step, threading the (donated) state through back-to-back steps."""
  for _ in range(warmup):
    state, out = step_fn(state, tokens)
  jax.block_until_ready(out["loss"])
  per_step = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(iters):
      state, out = step_fn(state, tokens)
    jax.block_until_ready(out["loss"])
    per_step.append((time.perf_counter() - t0) * 1e3 / iters)
  if not np.isfinite(float(out["loss"])):
    raise FloatingPointError(f"non-finite loss {float(out['loss'])}")
  return statistics.median(per_step), state


def measure(cfg, iters: int, modes=("sparse", "dense")) -> dict[str, float]:
  """Step times (ms) of ``cfg``'s model in its sparse and/or dense mode on cfg.mesh."""
  model_config = loop.build_model_config(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  graphdef, state = loop.init_state(model_config, cfg.optim, cfg.steps, cfg.seed, mesh)
  rng = np.random.default_rng(0)
  tokens_np = rng.integers(0, model_config.vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
  tokens = jax.device_put(tokens_np, batch_sharding)
  fns = loop.StepFunctions(mesh, batch_sharding)
  out = {}
  for mode in modes:
    sparse = mode == "sparse"
    graphdef, state = loop.set_mode(graphdef, state, mesh, sparse=sparse,
                                    prepare_tokens=tokens_np if sparse else None)
    t0 = time.perf_counter()
    # The loop's common step: without the per-layer statistics, which it only collects at log steps.
    step_fn = fns.train(loop.without_stats(graphdef, state), state, sparse, stats=False)
    ms, state = time_steps(step_fn, state, tokens, iters)
    out[f"{mode}_ms"] = ms
    out[f"{mode}_wall_s"] = time.perf_counter() - t0
    print(f"train_step:   ffn={cfg.ffn} remat={model_config.remat} mesh={cfg.mesh.data}x{cfg.mesh.fsdp} "
          f"{mode} mode: {ms:.2f} ms/step ({out[f'{mode}_wall_s']:.0f} s with compilation)", flush=True)
  del state
  return out


_T0 = time.perf_counter()


def _out_of_time(args) -> bool:
  return args.max_seconds is not None and time.perf_counter() - _T0 > args.max_seconds


def _free():
  gc.collect()
  jax.clear_caches()


def _is_oom(e: BaseException) -> bool:
  text = f"{type(e).__name__}: {e}"
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _attention(args) -> str:
  """The attention the preset's default (``attention_implementation=None``) tries first on this machine."""
  return auto_attention(loop.build_model_config(config_lib.from_preset(args.preset)).compute_dtype)


def skipped(config: dict, reason: str, base: float | None) -> dict:
  return dict(bench="train_step", device=_util.device_name(), date=_util.today(), config=config,
              metric="tokens_per_s", baseline="dense", ours=None, base=base, ratio=None, skipped=reason)


def run_modes(args, records: list, table: list) -> None:
  layers = args.layers or loop.build_model_config(config_lib.from_preset(args.preset)).n_layers
  batch = args.batch
  modes = [m for m in args.modes.split(",") if m]
  remats = [r for r in args.remat.split(",") if r]
  tokens = batch * args.seq
  dense: dict[str, dict[str, float]] = {}
  # The dense baseline decides the layer count (halved until it fits), so every mode is compared at one size.
  while True:
    try:
      for remat in remats:
        dense[remat] = measure(make_config(args, "dense", remat, layers, {}, batch), args.steps, modes=("dense",))
        _free()
      break
    except Exception as e:  # noqa: BLE001
      _free()
      if not _is_oom(e) or layers == 1:
        raise
      layers //= 2
      dense.clear()
      print(f"train_step: dense {args.preset} does not fit; retrying with {layers} layers", flush=True)
  print(f"train_step: {args.preset} with {layers} layers, batch {batch} x seq {args.seq} = {tokens} tokens/step",
        flush=True)
  for remat in remats:
    base_ms = dense[remat]["dense_ms"]
    for mode in modes:
      config = dict(preset=args.preset, layers=layers, batch=batch, seq=args.seq, tokens_per_step=tokens, mode=mode,
                    remat=remat, implementation=args.implementation or "default", attention=_attention(args),
                    cusparselt_search=os.environ.get("JSPARSE_CUSPARSELT_SEARCH", "0"), stats_in_step=False)
      base_tps = tokens / base_ms * 1e3
      if _out_of_time(args):
        records.append(skipped(config, "time budget (--max-seconds) used up", base_tps))
        _util.write_results(args.out, records)
        continue
      if mode == "dense":
        m = dense[remat]
        sparse_ms, dense_mode_ms = m["dense_ms"], m["dense_ms"]
      else:
        try:
          m = measure(make_config(args, mode, remat, layers, {}, batch), args.steps)
          sparse_ms, dense_mode_ms = m["sparse_ms"], m["dense_ms"]
        except NotImplementedError as e:
          records.append(skipped(config, f"not available yet: {e}", base_tps))
          table.append(dict(mode=mode, remat=remat, step_ms="skipped", note=str(e)[:60]))
          _free()
          continue
        except Exception as e:  # noqa: BLE001 - record and go on with the other modes
          reason = "out of memory" if _is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
          traceback.print_exc()
          records.append(skipped(config, reason, base_tps))
          table.append(dict(mode=mode, remat=remat, step_ms="failed", note=reason[:60]))
          _free()
          continue
        _free()
      tps = tokens / sparse_ms * 1e3
      rec = _util.record("train_step", config=config, metric="tokens_per_s", baseline=f"dense_{remat}", ours=tps,
                         base=base_tps, step_ms=sparse_ms, dense_step_ms=base_ms, dense_mode_step_ms=dense_mode_ms,
                         vs_dense_no_remat=(tps / (tokens / dense["none"]["dense_ms"] * 1e3)
                                            if "none" in dense else None))
      records.append(rec)
      _util.write_results(args.out, records)  # after every configuration: a run cut short keeps what it measured
      table.append(dict(mode=mode, remat=remat, step_ms=sparse_ms, dense_mode_ms=dense_mode_ms, tokens_per_s=tps,
                        vs_dense=rec["ratio"]))
  project(records, table, tokens)


def project(records: list, table: list, tokens: int) -> None:
  """Whole-schedule projection from the best sparse configuration and the best all-dense one."""
  measured = [r for r in records if r.get("bench") == "train_step" and r.get("ours")]
  dense = [r for r in measured if r["config"]["mode"] == "dense"]
  sparse = [r for r in measured if r["config"]["mode"] != "dense"]
  if not dense or not sparse:
    return
  best_dense = min(dense, key=lambda r: r["step_ms"])
  n_dense = SCHEDULE_1B["dense_warmup"] + SCHEDULE_1B["dense_tail"]
  n_sparse = SCHEDULE_1B["sparse"]
  all_dense_h = (n_dense + n_sparse) * best_dense["step_ms"] / 3.6e6
  best = min(sparse, key=lambda r: n_dense * r["dense_mode_step_ms"] + n_sparse * r["step_ms"])
  ours_h = (n_dense * best["dense_mode_step_ms"] + n_sparse * best["step_ms"]) / 3.6e6
  config = dict(best["config"], schedule="1000 dense + 30000 sparse + 30000 dense",
                dense_baseline=f"dense_{best_dense['config']['remat']}")
  rec = _util.record("train_step_schedule_projection", config=config, metric="time", baseline="all_dense_61000_steps",
                     ours=ours_h * 3600, base=all_dense_h * 3600, ours_hours=ours_h, base_hours=all_dense_h,
                     sparse_step_ms=best["step_ms"], dense_mode_step_ms=best["dense_mode_step_ms"],
                     dense_step_ms=best_dense["step_ms"], sparse_step_speedup=best_dense["step_ms"] / best["step_ms"])
  records.append(rec)
  table.append(dict(mode=f"schedule: {best['config']['mode']}", remat=best["config"]["remat"],
                    step_ms=f"{ours_h:.1f} h", dense_mode_ms=f"all-dense {all_dense_h:.1f} h", vs_dense=rec["ratio"]))


def run_scaling(args, records: list, table: list) -> None:
  n = jax.device_count()
  if n < 2:
    print(f"train_step: scaling needs >= 2 devices, JAX sees {n}; skipped", flush=True)
    return
  layers = args.scaling_layers or args.layers or loop.build_model_config(config_lib.from_preset(args.preset)).n_layers
  mode = args.scaling_mode
  per_device = args.batch
  results = {}
  for label, mesh, batch in (("1 device", {}, per_device),
                             (f"{n} devices data={n}", {"mesh.data": n}, per_device * n),
                             (f"{n} devices fsdp={n}", {"mesh.fsdp": n}, per_device * n)):
    try:
      cfg = make_config(args, mode, "none", layers, mesh, batch)
      m = measure(cfg, args.steps, modes=("sparse",) if mode != "dense" else ("dense",))
      ms = m["sparse_ms"] if mode != "dense" else m["dense_ms"]
      results[label] = (batch * args.seq / ms * 1e3, ms, batch)
    except Exception as e:  # noqa: BLE001
      reason = "out of memory" if _is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      print(f"train_step: scaling {label} failed: {reason}", flush=True)
    _free()
  if "1 device" not in results:
    return
  base_tps = results["1 device"][0]
  for label, (tps, ms, batch) in results.items():
    if label == "1 device":
      continue
    config = dict(preset=args.preset, layers=layers, mode=mode, seq=args.seq, per_device_batch=per_device,
                  attention=_attention(args),
                  global_batch=batch, devices=n, mesh=label.split(" ", 2)[2])
    rec = _util.record("train_step_scaling", config=config, metric="tokens_per_s", baseline="1_device", ours=tps,
                       base=base_tps, step_ms=ms, base_step_ms=results["1 device"][1], efficiency=tps / base_tps / n)
    records.append(rec)
    table.append(dict(mode=f"scaling {label}", remat="none", step_ms=ms, tokens_per_s=tps, vs_dense=rec["ratio"]))


def main(argv=None) -> int:
  args = parse_args(argv)
  print(f"train_step: {jax.device_count()} x {_util.device_name()}, jax {jax.__version__}", flush=True)
  records: list = []
  table: list = []
  try:
    if not args.scaling_only:
      run_modes(args, records, table)
    run_scaling(args, records, table)
  finally:
    _util.write_results(args.out, records)
    if table:
      columns = ["mode", "remat", "step_ms", "dense_mode_ms", "tokens_per_s", "vs_dense", "note"]
      _util.print_table([{c: row.get(c, "") for c in columns} for row in table], columns)
  return 0


if __name__ == "__main__":
  sys.exit(main())
