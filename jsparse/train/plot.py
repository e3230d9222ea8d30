"""``jsparse-plot RUN_DIR [RUN_DIR ...] -o out.png``: loss curves of one or more runs, phases shaded.

Top panel: training loss (a moving average, thin) and validation loss (markers) per run, with the sparse phase of
each run shaded. Bottom panel (when the runs logged it): activation density averaged over layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from jsparse.train.metrics import read_metrics

_PHASE_COLORS = {"dense_warmup": "#dddddd", "sparse": "#ffd9a8", "dense_tail": "#cfe3ff"}


def load_run(run_dir: str) -> dict[str, Any]:
  """A run's curves: ``{"name", "train": (steps, losses), "val": (steps, losses), "density", "phases"}``.

  Raises:
    ValueError: the directory has no ``metrics.jsonl``.
  """
  records = read_metrics(run_dir)
  if not records:
    raise ValueError(f"jsparse-plot: {run_dir} has no metrics.jsonl records")
  train, val, density = {}, {}, {}
  for r in records:  # later records win: a resumed run overwrote the steps it redid
    if isinstance(r.get("loss"), (int, float)):
      train[r["step"]] = r["loss"]
    if isinstance(r.get("val_loss"), (int, float)):
      val[r["step"]] = r["val_loss"]
    dens = [v for k, v in r.items() if k.endswith("act_density") and isinstance(v, (int, float))]
    if dens:
      density[r["step"]] = float(np.mean(dens))
  phases = []
  config_path = os.path.join(run_dir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      phases = json.load(f).get("phases", [])
  series = lambda d: (np.array(sorted(d)), np.array([d[k] for k in sorted(d)]))  # noqa: E731
  return {"name": os.path.basename(os.path.normpath(run_dir)), "train": series(train), "val": series(val),
          "density": series(density), "phases": phases}


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
  if window <= 1 or len(y) < window:
    return y
  kernel = np.ones(window) / window
  head = np.array([y[:i + 1].mean() for i in range(window - 1)])
  return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def _last_step(runs: Sequence[dict[str, Any]]) -> float:
  """The largest step any run logged."""
  return max((float(r[k][0].max()) for r in runs for k in ("train", "val") if len(r[k][0])), default=0.0)


def plot_runs(run_dirs: Sequence[str], out: str, *, smooth: int = 20, title: str | None = None) -> str:
  """Writes the PNG and returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = [load_run(d) for d in run_dirs]
  has_density = any(len(r["density"][0]) for r in runs)
  fig, axes = plt.subplots(2 if has_density else 1, 1, figsize=(10, 7 if has_density else 4.5), sharex=True,
                           squeeze=False, gridspec_kw={"height_ratios": [3, 1.3]} if has_density else None)
  ax = axes[0, 0]
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  shaded = set()
  many = len(runs) > 4  # then only the validation curves go in the legend
  for i, run in enumerate(runs):
    color = colors[i % len(colors)]
    has_sparse = any(p["phase"] == "sparse" and p["end"] > p["start"] for p in run["phases"])
    for p in run["phases"] if has_sparse else ():  # an all-dense run has no phases worth shading
      span = (p["phase"], p["start"], p["end"])
      if p["phase"] != "dense_warmup" and span not in shaded:
        shaded.add(span)
        for a in axes[:, 0]:
          a.axvspan(p["start"], p["end"], color=_PHASE_COLORS.get(p["phase"], "#eeeeee"), alpha=0.45, lw=0,
                    label=p["phase"].replace("_", " ") if a is ax and len(shaded) <= 2 else None)
    steps, loss = run["train"]
    if len(steps):
      ax.plot(steps, _smooth(loss, smooth), color=color, lw=1.0, alpha=0.6 if many else 0.9,
              label=None if many else f"{run['name']} train")
    steps, loss = run["val"]
    if len(steps):
      ax.plot(steps, loss, "o-", color=color, ms=4, lw=1.5, label=f"{run['name']} val")
    if has_density and len(run["density"][0]):
      axes[1, 0].plot(*run["density"], color=color, lw=1.0, label=run["name"])
  # Zoom on the part that separates runs: the first 10% of steps (the initial drop) would flatten the rest.
  cut = 0.1 * _last_step(runs)
  tail = [float(v) for r in runs for k in ("train", "val") for st, v in zip(*r[k]) if st > cut]
  if tail:
    lo, hi = min(tail), max(tail)
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title(title or "jsparse: loss by step (shaded: sparse phase, dense tail)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper right")
  if has_density:
    axes[1, 0].set_ylabel("act. density\n(mean over layers)")
    axes[1, 0].grid(alpha=0.3)
  axes[-1, 0].set_xlabel("step")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """Console entry point of ``jsparse-plot``."""
  parser = argparse.ArgumentParser(prog="jsparse-plot", description="Plot train/val loss of jsparse-train runs, "
                                   "with the sparse phase and the dense tail shaded.")
  parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by jsparse-train")
  parser.add_argument("-o", "--out", default="loss.png", help="output PNG (default: loss.png)")
  parser.add_argument("--smooth", type=int, default=20, help="moving-average window of the train loss (steps)")
  parser.add_argument("--title", help="figure title")
  args = parser.parse_args(argv)
  try:
    path = plot_runs(args.runs, args.out, smooth=args.smooth, title=args.title)
  except ValueError as e:
    print(f"jsparse-plot: error: {e}", file=sys.stderr)
    return 2
  print(f"jsparse-plot: wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
