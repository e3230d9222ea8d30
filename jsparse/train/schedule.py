"""The sparse-then-dense phase plan and the optax optimizer (AdamW, warm-up + decay, clipping).

Phases run in the fixed order ``dense_warmup -> sparse -> dense_tail`` (Haziza et al.: dense warm-up because
squared-ReLU activations are only ~50% sparse at initialisation; Madhyastha et al.: a dense tail recovers quality).
The plan is static: the host decides the phase of a step before dispatching it, so each phase has its own compiled
step and the switch happens between steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jsparse.train.config import PHASES, OptimizerConfig, ScheduleConfig


@dataclasses.dataclass(frozen=True)
class PhasePlan:
  """Resolved step counts. Steps are 0-based: step ``s`` runs in ``phase_at(s)``.

  Attributes:
    dense_warmup, sparse, dense_tail: number of steps of each phase (they sum to ``steps``).
  """
  dense_warmup: int
  sparse: int
  dense_tail: int

  @property
  def steps(self) -> int:
    return self.dense_warmup + self.sparse + self.dense_tail

  @property
  def sparse_start(self) -> int:
    """First step of the sparse phase (where the sparse-phase setup runs)."""
    return self.dense_warmup

  @property
  def sparse_end(self) -> int:
    """First step after the sparse phase."""
    return self.dense_warmup + self.sparse

  def phase_at(self, step: int) -> str:
    """The phase that step ``step`` (0-based) runs in."""
    if not 0 <= step < self.steps:
      raise ValueError(f"phase_at: step {step} is outside the plan's [0, {self.steps})")
    if step < self.sparse_start:
      return PHASES[0]
    if step < self.sparse_end:
      return PHASES[1]
    return PHASES[2]

  def boundaries(self) -> list[tuple[str, int, int]]:
    """``[(phase, first_step, end_step), ...]`` for the non-empty phases, in order."""
    spans = [(PHASES[0], 0, self.sparse_start), (PHASES[1], self.sparse_start, self.sparse_end),
             (PHASES[2], self.sparse_end, self.steps)]
    return [s for s in spans if s[2] > s[1]]


def steps_of(value: int | float | None, total: int) -> int | None:
  """An int is a step count; a float in [0, 1] a fraction of ``total`` (rounded to the nearest step)."""
  if value is None:
    return None
  if isinstance(value, float):
    return int(round(value * total))
  return int(value)


def resolve_phases(schedule: ScheduleConfig, steps: int) -> PhasePlan:
  """Turns the schedule config into step counts.

  Raises:
    ValueError: the phases do not fit into ``steps`` (or, with all three given, do not add up to it).
  """
  warm = steps_of(schedule.dense_warmup, steps)
  sparse = steps_of(schedule.sparse, steps)
  tail = steps_of(schedule.dense_tail, steps)
  if warm + sparse > steps:
    raise ValueError(f"schedule: dense_warmup ({warm} steps) + sparse ({sparse} steps) exceed steps={steps}")
  if tail is None:
    tail = steps - warm - sparse
  elif warm + sparse + tail != steps:
    if isinstance(schedule.dense_tail, float) or isinstance(schedule.sparse, float) or isinstance(
        schedule.dense_warmup, float):
      # Fractions may round off by a step; the tail absorbs it.
      if abs(warm + sparse + tail - steps) <= 2:
        tail = steps - warm - sparse
    if warm + sparse + tail != steps:
      raise ValueError(f"schedule: dense_warmup + sparse + dense_tail = {warm} + {sparse} + {tail} = "
                       f"{warm + sparse + tail} steps, but steps={steps} (leave dense_tail=None to fill the rest)")
  return PhasePlan(warm, sparse, tail)


def learning_rate(optim: OptimizerConfig, steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to ``lr``, then cosine/linear decay to ``lr * min_lr_ratio`` at ``steps`` (or constant)."""
  warmup = min(steps_of(optim.lr_warmup, steps), steps)
  end = optim.lr * optim.min_lr_ratio
  if optim.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(steps, warmup + 1), end_value=end)
  decay_steps = max(steps - warmup, 1)
  after = (optax.linear_schedule(optim.lr, end, decay_steps) if optim.lr_schedule == "linear"
           else optax.constant_schedule(optim.lr))
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def global_norm(tree) -> jax.Array:
  """The global L2 norm of a pytree (``optax.tree.norm`` where it exists, else ``optax.global_norm``)."""
  tree_lib = getattr(optax, "tree", None)
  if tree_lib is not None and hasattr(tree_lib, "norm"):
    return tree_lib.norm(tree)
  return optax.global_norm(tree)


def _decay_mask(params):
  # Decay matrices (embeddings, projections) only; norms' scales and biases are left alone, as is customary.
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(optim: OptimizerConfig, steps: int) -> optax.GradientTransformation:
  """Gradient clipping (global norm) followed by AdamW on the :func:`learning_rate` schedule."""
  adamw = optax.adamw(learning_rate(optim, steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay, mask=_decay_mask)
  if optim.clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)
