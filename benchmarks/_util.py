"""Shared benchmark plumbing: timing on the device, the device's name, and the results-file format.

Every record written by a benchmark has the fields ``bench, device, date, config, metric, baseline, ours, base,
ratio`` (ratio > 1 means jsparse wins: base/ours for time and bytes, ours/base for throughput) plus any
bench-specific fields.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np


def device_name() -> str:
  """The device as it names itself, e.g. "NVIDIA H100 80GB HBM3" (``device_kind``)."""
  return jax.devices()[0].device_kind


def today() -> str:
  return datetime.date.today().isoformat()


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 3, iters: int = 20, rounds: int = 5) -> float:
  """Median wall time per call in milliseconds, synchronising on the outputs.

  Each round times ``iters`` back-to-back calls (so launch gaps overlap as in training) and the median over rounds is
  returned. ``fn`` should already be jitted; compilation happens during warm-up.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  per_call = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    out = None
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t0) * 1e3 / iters)
  return statistics.median(per_call)


def record(bench: str, *, config: dict[str, Any], metric: str, baseline: str, ours: float, base: float,
           **extra: Any) -> dict[str, Any]:
  """One results record. ``ratio`` is base/ours for time and bytes, ours/base for throughput metrics."""
  higher_is_better = metric in ("tokens_per_s", "gbps")
  ratio = (ours / base) if higher_is_better else (base / ours)
  return dict(bench=bench, device=device_name(), date=today(), config=config, metric=metric, baseline=baseline,
              ours=float(ours), base=float(base), ratio=float(ratio), **extra)


def write_results(path: str, records: list[dict[str, Any]]) -> None:
  """Writes the records as a JSON list (creating the folder)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(records, f, indent=1, default=_jsonable)
  print(f"wrote {len(records)} records to {path}")


def _jsonable(o: Any) -> Any:
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, tuple):
    return list(o)
  return str(o)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
  """Prints a fixed-width table (the device tool returns the tail of stdout)."""
  widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
  print("  ".join(c.ljust(widths[c]) for c in columns))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)
