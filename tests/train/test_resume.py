"""End to end through the CLI: a short tiny-preset run, a run SIGKILLed mid-way and resumed (bit-identical losses
and final parameters), and jsparse-plot on the results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from jsparse.train import plot
from tests.train._util import QUICK, REPO, cli_command, losses, overrides_args, run_cli, subprocess_env

# 40 steps: dense warm-up [0, 8), sparse [8, 24), dense tail [24, 40); checkpoints every 8 steps.
RUN = dict(QUICK, **{"ffn": "act24+w24", "steps": 40, "schedule.dense_warmup": 8, "schedule.sparse": 16,
                     "checkpoint.every": 8, "checkpoint.keep": 5, "log.every": 1, "log.eval_every": 16,
                     "log.tensorboard": True})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return subprocess_env(str(tmp_path_factory.mktemp("jax_cache")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  """The uninterrupted run, through the CLI (``--preset tiny``)."""
  out = str(tmp_path_factory.mktemp("runs") / "reference")
  proc = run_cli(["--preset", "tiny", "--out", out, *overrides_args(RUN)], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc


def test_cli_runs_end_to_end(reference):
  out, proc = reference
  assert "jsparse-train: finished step 40" in proc.stdout
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["train"]["preset"] == "tiny" and config["model"]["d_model"] == 64
  assert [(p["phase"], p["start"], p["end"]) for p in config["phases"]] == [
      ("dense_warmup", 0, 8), ("sparse", 8, 24), ("dense_tail", 24, 40)]
  train = losses(out)
  assert sorted(train) == list(range(1, 41))
  assert np.mean([train[s] for s in range(1, 5)]) > np.mean([train[s] for s in range(37, 41)]) + 0.5
  val = losses(out, "val_loss")
  assert sorted(val) == [8, 16, 24, 32, 40]  # every 16 steps and at the end of each phase
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["16", "24", "32", "40", "8"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(out, "tb")))
  with open(os.path.join(out, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  density = [r for r in records if "layer0/act_density" in r]
  assert density and all(0.0 < r["layer0/act_density"] <= 1.0 and "layer1/act_density" in r for r in density)
  assert all(r["tokens_per_s"] > 0 for r in records if "tokens_per_s" in r)


def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, env):
  ref_dir, _ = reference
  out = str(tmp_path / "interrupted")
  args = ["--preset", "tiny", "--out", out, *overrides_args(RUN)]
  proc = subprocess.Popen(cli_command(*args), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  # Kill as soon as the sparse phase's first checkpoint is on disk (a later save may be half-written).
  deadline = time.monotonic() + 240
  while not os.path.isdir(os.path.join(out, "checkpoints", "16")):
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    assert time.monotonic() < deadline, "no checkpoint within 240 s"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(losses(out))
  assert killed_at < 40, "the run finished before SIGKILL; the test would prove nothing"

  resumed = run_cli(["--preset", "tiny", "--out", out, "--resume", *overrides_args(RUN)], env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  start = int(resumed.stderr.split("resumed from the checkpoint at step ")[1].split()[0])
  assert 16 <= start < 40 and start % 8 == 0

  # Every step's loss, every validation loss and the final parameters match the uninterrupted run exactly.
  assert losses(out) == losses(ref_dir)
  assert losses(out, "val_loss") == losses(ref_dir, "val_loss")
  assert _final_checksums(out) == _final_checksums(ref_dir)
  with open(os.path.join(out, "metrics.jsonl")) as f:
    events = [json.loads(line) for line in f]
  assert {"step": start, "event": "resume"} in events

  # A finished run resumed again has nothing left to do.
  again = run_cli(["--preset", "tiny", "--out", out, "--resume", *overrides_args(RUN)], env)
  assert again.returncode == 0 and "resumed from the checkpoint at step 40" in again.stderr
  assert "nothing to do" in again.stdout


def _final_checksums(run_dir):
  with open(os.path.join(run_dir, "checkpoints", "40", "meta", "metadata")) as f:
    return json.load(f)["checksums"]


def test_plot_compares_runs(reference, tmp_path):
  ref_dir, _ = reference
  png = str(tmp_path / "loss.png")
  assert plot.main([ref_dir, ref_dir, "-o", png]) == 0
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  run = plot.load_run(ref_dir)
  assert [p["phase"] for p in run["phases"]] == ["dense_warmup", "sparse", "dense_tail"]
  assert len(run["train"][0]) == 40 and len(run["val"][0]) == 5 and len(run["density"][0]) == 40
  assert plot.main([str(tmp_path / "missing"), "-o", png]) == 2
