"""Helpers for the training tests: small run settings and a subprocess runner for the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# A short run of the real tiny model: small text slice, short sequences, small batch.
QUICK = {
    "data.max_bytes": 600_000,
    "data.seq_len": 32,
    "data.batch_size": 8,
    "data.eval_batches": 2,
    "optim.lr_warmup": 2,
    "log.progress": False,
    "log.tensorboard": False,
}

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def overrides_args(overrides: dict) -> list[str]:
  """``{"a.b": 1}`` -> ``["a.b=1"]`` for the CLI."""
  return [f"{k}={v}" for k, v in overrides.items()]


def subprocess_env(cache_dir: str, devices: int | None = None) -> dict[str, str]:
  """Environment for child processes: the repo importable, a shared persistent compilation cache (identical
  programs are compiled once per session), and optionally N fake CPU devices."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
  if devices:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
  return env


def cli_command(*args: str) -> list[str]:
  return [sys.executable, "-m", "jsparse.train.cli", *args]


def run_cli(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
  return subprocess.run(cli_command(*args), env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def losses(run_dir: str, key: str = "loss") -> dict[int, float]:
  """``{step: value}`` of a run's metrics.jsonl (later records win)."""
  out = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if key in r:
        out[r["step"]] = r[key]
  return out
