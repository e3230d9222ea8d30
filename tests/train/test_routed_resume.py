"""The routed FFN in the trainer: weights kept in router order (with their Adam moments) through periodic
re-clusterings, and a resume in the sparse phase continuing bit-for-bit (the static layout flag is set again)."""

from __future__ import annotations

import os
import shutil

from flax import nnx

from jsparse.models.sparse_ffn import SparseFFN
from jsparse.train import config as config_lib
from jsparse.train import loop
from jsparse.train.metrics import read_metrics
from tests.train._util import QUICK

# 32 steps: dense warm-up [0, 8), sparse [8, 24) with a re-clustering every 4 steps, dense tail [24, 32).
RUN = dict(QUICK, **{"ffn": "routed", "model.ffn.router_block": 32, "model.ffn.num_groups": 4,
                     "model.ffn.recluster_every": 4, "steps": 32, "schedule.dense_warmup": 8, "schedule.sparse": 16,
                     "checkpoint.every": 8, "checkpoint.keep": 5, "checkpoint.async_save": False, "log.every": 1,
                     "log.eval_every": 0})


def _losses(run_dir):
  return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_routed_run_keeps_router_order_and_resumes_exactly(tmp_path):
  ref = str(tmp_path / "ref")
  result = loop.train(config_lib.from_preset("tiny", dict(RUN, out_dir=ref)))
  ffns = [m for _, m in nnx.iter_modules(result.model) if isinstance(m, SparseFFN)]
  assert ffns and all(f.weights_grouped for f in ffns)  # the trainer passed the optimizer: the fast layout
  ref_losses = _losses(ref)
  assert sorted(ref_losses) == list(range(1, 33))

  # "Interrupt" after the sparse phase's step-16 checkpoint: a copy of the run with the later checkpoints removed.
  cut = str(tmp_path / "cut")
  shutil.copytree(ref, cut)
  for name in os.listdir(os.path.join(cut, "checkpoints")):
    if int(name) > 16:
      shutil.rmtree(os.path.join(cut, "checkpoints", name))
  resumed = loop.train(config_lib.from_preset("tiny", dict(RUN, out_dir=cut, **{"checkpoint.resume": True})))
  assert resumed.start_step == 16
  assert resumed.losses == [ref_losses[s] for s in range(17, 33)]
