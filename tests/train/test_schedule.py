"""The phase plan, the learning-rate schedule and the optimizer."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsparse.train import schedule
from jsparse.train.config import OptimizerConfig, ScheduleConfig


def test_phase_plan_from_counts_and_fractions():
  p = schedule.resolve_phases(ScheduleConfig(dense_warmup=1000, sparse=30_000, dense_tail=30_000), 61_000)
  assert (p.dense_warmup, p.sparse, p.dense_tail, p.steps) == (1000, 30_000, 30_000, 61_000)
  p = schedule.resolve_phases(ScheduleConfig(dense_warmup=0.1, sparse=0.5, dense_tail=None), 600)
  assert (p.dense_warmup, p.sparse, p.dense_tail) == (60, 300, 240)
  p = schedule.resolve_phases(ScheduleConfig(dense_warmup=0.333, sparse=0.333, dense_tail=0.333), 10)
  assert p.steps == 10
  p = schedule.resolve_phases(ScheduleConfig(dense_warmup=0, sparse=0, dense_tail=None), 5)
  assert p.boundaries() == [("dense_tail", 0, 5)]


def test_phase_at_switches_exactly_at_the_boundaries():
  p = schedule.PhasePlan(3, 4, 2)
  assert [p.phase_at(s) for s in range(9)] == ["dense_warmup"] * 3 + ["sparse"] * 4 + ["dense_tail"] * 2
  assert (p.sparse_start, p.sparse_end) == (3, 7)
  assert p.boundaries() == [("dense_warmup", 0, 3), ("sparse", 3, 7), ("dense_tail", 7, 9)]
  with pytest.raises(ValueError, match="outside"):
    p.phase_at(9)


def test_schedule_errors():
  with pytest.raises(ValueError, match="exceed steps=10"):
    schedule.resolve_phases(ScheduleConfig(dense_warmup=6, sparse=5), 10)
  with pytest.raises(ValueError, match="but steps=10"):
    schedule.resolve_phases(ScheduleConfig(dense_warmup=2, sparse=2, dense_tail=2), 10)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_learning_rate_warms_up_then_decays(kind):
  cfg = OptimizerConfig(lr=1e-2, lr_schedule=kind, lr_warmup=10, min_lr_ratio=0.1)
  fn = schedule.learning_rate(cfg, 100)
  lrs = np.array([float(fn(s)) for s in range(101)])
  assert lrs[0] == 0.0
  np.testing.assert_allclose(lrs[5], 5e-3, rtol=1e-6)
  np.testing.assert_allclose(lrs[10], 1e-2, rtol=1e-6)
  assert np.all(np.diff(lrs[:11]) > 0)
  if kind == "constant":
    np.testing.assert_allclose(lrs[10:], 1e-2, rtol=1e-6)
  else:
    assert np.all(np.diff(lrs[10:]) <= 1e-9)
    np.testing.assert_allclose(lrs[100], 1e-3, rtol=1e-5)


def test_optimizer_clips_the_global_norm():
  cfg = OptimizerConfig(lr=1.0, lr_warmup=0, lr_schedule="constant", weight_decay=0.0, clip_norm=0.5, b1=0.0,
                        b2=0.0, eps=0.0)
  tx = schedule.make_optimizer(cfg, 10)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  state = tx.init(params)
  grads = {"w": jnp.full((2, 2), 10.0), "b": jnp.full(2, 10.0)}
  clipped, _ = optax.clip_by_global_norm(0.5).update(grads, optax.EmptyState())
  assert abs(float(schedule.global_norm(clipped)) - 0.5) < 1e-6
  updates, _ = tx.update(grads, state, params)
  # Adam with b1=b2=eps=0 takes sign steps of size lr.
  np.testing.assert_allclose(np.asarray(updates["w"]), -1.0, rtol=1e-5)


def test_weight_decay_skips_vectors():
  cfg = OptimizerConfig(lr=0.1, lr_warmup=0, lr_schedule="constant", weight_decay=0.5, clip_norm=None)
  tx = schedule.make_optimizer(cfg, 10)
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones(2)}
  zeros = {"w": jnp.zeros((2, 2)), "scale": jnp.zeros(2)}
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["w"]), -0.05, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["scale"]), 0.0)
