"""What a run shows and leaves behind: a progress bar, ``metrics.jsonl`` and TensorBoard events.

``metrics.jsonl`` has one JSON object per line:

* ``{"step", "phase", "loss", "lr", "grad_norm"}`` for every training step (``step`` = steps completed, 1-based);
  every ``log.every`` steps also ``tokens_per_s`` and the model's per-layer statistics (``"layer0/act_density"``...).
* ``{"step", "phase", "val_loss"}`` at each evaluation.
* ``{"step", "event": "phase", "phase"}`` when a phase starts, ``{"step", "event": "resume"}`` after a restore.

On resume, records of steps after the restored checkpoint (which are about to be redone) are dropped, so the file
always describes one consistent run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from typing import Any, Iterable

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
  """All records of a run (a torn last line from a killed run is ignored)."""
  path = os.path.join(run_dir, METRICS_FILE)
  records = []
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def truncate_metrics(run_dir: str, step: int) -> None:
  """Drops records of steps after ``step`` (they are redone after a resume from ``step``)."""
  path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.exists(path):
    return
  kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in kept:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


class MetricsLogger:
  """Writes records to JSONL (and TensorBoard) and drives a tqdm progress bar.

  Args:
    run_dir: the run directory.
    total_steps: for the progress bar.
    start_step: the step the bar starts at (non-zero after a resume).
    tensorboard: also write TensorBoard events under ``run_dir/tb`` (skipped with a warning if tensorboardX is
      missing).
    progress: show the bar.
  """

  def __init__(self, run_dir: str, *, total_steps: int, start_step: int = 0, tensorboard: bool = True,
               progress: bool = True):
    os.makedirs(run_dir, exist_ok=True)
    self._file = open(os.path.join(run_dir, METRICS_FILE), "a", buffering=1)
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
      except ImportError:
        warnings.warn("metrics: tensorboardX is not installed; no TensorBoard events are written", stacklevel=2)
    self._bar = None
    if progress:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                       mininterval=0.5)
    self._last_step = start_step

  def write(self, records: Iterable[dict[str, Any]]) -> None:
    """Appends records to the JSONL file and the TensorBoard scalars."""
    for record in records:
      self._file.write(json.dumps(_clean(record)) + "\n")
      if self._tb is not None and "step" in record:
        for key, value in record.items():
          if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            self._tb.add_scalar(key if "/" in key else f"train/{key}" if key != "val_loss" else "val/loss",
                                value, record["step"])

  def progress(self, step: int, **postfix: Any) -> None:
    """Moves the bar to ``step`` with ``postfix`` (loss, tokens/s, phase) shown."""
    if self._bar is None:
      return
    self._bar.update(step - self._last_step)
    self._last_step = step
    self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)

  def message(self, text: str) -> None:
    """A line that does not break the bar."""
    if self._bar is not None:
      self._bar.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    self._file.close()


def _clean(record: dict[str, Any]) -> dict[str, Any]:
  # JSON has no NaN/inf; keep them visible as strings rather than failing the run.
  return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _short(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
  return str(v)
