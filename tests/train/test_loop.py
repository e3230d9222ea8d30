"""The loop on the real tiny model: phases switch at the right steps, each mode compiles once, the sparse-phase
setup runs once on the right batch and its state (S-STE beta) stays fixed afterwards."""

from __future__ import annotations

import numpy as np

from jsparse import models
from jsparse.train import checkpoint as ckpt
from jsparse.train import data as data_lib
from jsparse.train import loop, sharding
from jsparse.train.config import from_preset
from tests.train._util import QUICK, losses


def test_phases_switch_at_the_right_steps(tmp_path, monkeypatch):
  calls = []
  real_set, real_prepare = models.set_sparse, models.prepare_sparse_phase

  def set_sparse(model, sparse):
    calls.append(("set_sparse", bool(sparse)))
    real_set(model, sparse)

  def prepare(model, tokens_BxL, optimizer=None):
    calls.append(("prepare", np.asarray(tokens_BxL)))
    real_prepare(model, tokens_BxL, optimizer)

  monkeypatch.setattr(models, "set_sparse", set_sparse)
  monkeypatch.setattr(models, "prepare_sparse_phase", prepare)
  cfg = from_preset("tiny", dict(QUICK, **{
      "out_dir": str(tmp_path / "run"), "ffn": "act24+w24", "steps": 12, "schedule.dense_warmup": 3,
      "schedule.sparse": 5, "schedule.dense_tail": None, "checkpoint.every": 4, "checkpoint.keep": 5,
      "log.every": 1, "log.eval_every": 0}))
  result = loop.train(cfg)

  # The host flips the mode exactly when a phase starts; the setup runs once, on the sparse phase's first batch.
  assert [c for c in calls if c[0] == "set_sparse"] == [("set_sparse", False), ("set_sparse", True),
                                                        ("set_sparse", False)]
  prepared = [c[1] for c in calls if c[0] == "prepare"]
  assert len(prepared) == 1
  expected = data_lib.make_batches(cfg.data).train_batch(3)[:, :-1]
  np.testing.assert_array_equal(prepared[0], expected)
  assert [c[0] for c in calls].index("prepare") == 2  # right after switching to sparse

  records = [r for r in _records(tmp_path / "run")]
  events = [(r["step"], r["phase"]) for r in records if r.get("event") == "phase"]
  assert events == [(0, "dense_warmup"), (3, "sparse"), (8, "dense_tail")]
  step_phases = {r["step"]: r["phase"] for r in records if "loss" in r}
  assert step_phases == {s + 1: result.phases.phase_at(s) for s in range(12)}
  assert sorted(losses(str(tmp_path / "run"))) == list(range(1, 13))

  # One compilation per mode: the dense tail reuses the warm-up's step (every step logs, so all keep statistics).
  assert result.traces == {("train", False, True): 1, ("train", True, True): 1, ("eval", False, False): 1,
                           ("eval", True, False): 1}
  assert [s for s, _ in result.val_losses] == [3, 8, 12]  # the end of each phase
  assert all(not f.sparse for f in models.phases.sparse_ffns(result.model))
  assert len(result.losses) == 12 and all(np.isfinite(result.losses))

  # beta is set at the sparse phase's start and fixed from then on (checkpoints at steps 4, 8, 12).
  betas = {step: _betas(tmp_path / "run" / "checkpoints", step) for step in (4, 8, 12)}
  assert betas[4] and betas[4] == betas[8] == betas[12]
  mesh = sharding.make_mesh(cfg.mesh)
  _, fresh = loop.init_state(loop.build_model_config(cfg), cfg.optim, cfg.steps, cfg.seed, mesh)
  flat, _, _ = ckpt.flatten_state(fresh)
  initial = {k: float(v) for k, v in flat.items() if k.startswith("model.") and "beta" in k}
  assert set(initial) == set(betas[4]) and initial != betas[4]


def test_statistics_only_at_log_steps_and_the_same_losses(tmp_path):
  # Between log steps the step runs without the per-layer statistics (a second compiled variant per mode); the
  # statistics still reach every logged record, and the training itself is unchanged.
  def run(name, every):
    cfg = from_preset("tiny", dict(QUICK, **{
        "out_dir": str(tmp_path / name), "ffn": "act24", "steps": 9, "schedule.dense_warmup": 3,
        "schedule.sparse": 3, "schedule.dense_tail": None, "checkpoint.every": 0, "log.every": every,
        "log.eval_every": 0}))
    return loop.train(cfg)

  every1, every3 = run("every1", 1), run("every3", 3)
  assert every3.traces == {("train", False, True): 1, ("train", False, False): 1, ("train", True, True): 1,
                           ("train", True, False): 1, ("eval", False, False): 1, ("eval", True, False): 1}
  np.testing.assert_allclose(every3.losses, every1.losses, rtol=1e-6, atol=0)
  logged = [r for r in _records(tmp_path / "every3") if "loss" in r and r["step"] % 3 == 0]
  assert [r["step"] for r in logged] == [3, 6, 9]
  for r in logged:
    assert any(k.endswith("/act_density") for k in r), r
  unlogged = [r for r in _records(tmp_path / "every3") if "loss" in r and r["step"] % 3]
  assert unlogged and not any(k.endswith("/act_density") for r in unlogged for k in r)


def _records(run_dir):
  import json
  with open(run_dir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _betas(directory, step):
  import orbax.checkpoint as ocp
  restored = ocp.CheckpointManager(str(directory)).restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  return {k: float(np.asarray(v)) for k, v in restored["state"].items() if k.startswith("model.") and "beta" in k}
