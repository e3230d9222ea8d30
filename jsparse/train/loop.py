"""``train(config)``: the optax loop over the sparse-then-dense schedule, with checkpoints, metrics and sharding.

The training state is one pytree, ``nnx.split((model, optimizer))``: parameters, AdamW moments and step count, the
S-STE betas, router state and the model's RNG streams. One jitted, sharded step per FFN mode updates it::

  step(state, tokens_BxLp1) -> (state, {"loss", "grad_norm", per-layer stats})

Whether the FFNs run sparse is a static attribute of the modules (``models.set_sparse``), i.e. part of the graphdef:
the host flips it between steps when a phase starts, and the step of each mode is compiled once (the two dense
phases share theirs). The sparse phase's one-off setup (``models.prepare_sparse_phase``: S-STE beta, router
clustering) runs eagerly on the batch of the sparse phase's first step, and its results live in the state.

Nothing here knows about kernels; the model config decides them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jsparse import models
from jsparse.train import checkpoint as ckpt_lib
from jsparse.train import config as config_lib
from jsparse.train import data as data_lib
from jsparse.train import metrics as metrics_lib
from jsparse.train import schedule as schedule_lib
from jsparse.train import sharding as sharding_lib
from jsparse.train.config import TrainConfig

CONFIG_FILE = "config.json"
# Keys that may change between a run and its resumption (they do not change the computed numbers).
_RESUMABLE_KEYS = ("out_dir", "checkpoint", "log", "mesh", "overwrite")


# ----------------------------------------------------------------------------------------------------------------------
# Planning: every check that can fail runs here, before the first array is created.


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """A checked configuration and what follows from it.

  Attributes:
    config: the training config.
    model_config: the ``models.TransformerConfig`` to build.
    phases: the resolved phase plan.
    run_dir, checkpoint_dir: where outputs go.
  """
  config: TrainConfig
  model_config: Any
  phases: schedule_lib.PhasePlan
  run_dir: str
  checkpoint_dir: str

  @property
  def tokens_per_step(self) -> int:
    return self.config.data.batch_size * self.config.data.seq_len


def build_model_config(config: TrainConfig):
  """The model preset with the ``ffn`` mode and the ``model.*`` overrides applied.

  Raises:
    ValueError: unknown preset, unknown model key or an invalid model config.
  """
  base = models.preset(config.preset)
  nested: dict[str, dict[str, Any]] = {}
  top: dict[str, Any] = {}
  # The FFN mode and the model.* overrides go into one replace: the config checks combinations (e.g. routed groups
  # against d_ff), so a mode that is valid only with its overrides must not be checked without them.
  if config.ffn is not None:
    nested["ffn"] = dict(config_lib.FFN_MODES[config.ffn])
  for key, value in config.model:
    head, _, rest = key.partition(".")
    if rest:
      nested.setdefault(head, {})[rest] = value
    else:
      top[key] = value
  names = {f.name for f in dataclasses.fields(base)}
  for key in list(top) + list(nested):
    if key not in names:
      raise ValueError(f"train config: unknown model key 'model.{key}'; model keys: {', '.join(sorted(names))}")
  try:
    for head, sub in nested.items():
      inner = getattr(base, head)
      if not dataclasses.is_dataclass(inner):
        raise ValueError(f"train config: model.{head} has no sub-keys")
      inner_names = {f.name for f in dataclasses.fields(inner)}
      for k in sub:
        if k not in inner_names:
          raise ValueError(f"train config: unknown model key 'model.{head}.{k}'; "
                           f"keys: {', '.join(sorted(inner_names))}")
      top[head] = dataclasses.replace(inner, **sub)
    return dataclasses.replace(base, **top)
  except TypeError as e:
    raise ValueError(f"train config: bad model override: {e}") from None


def _has_sparse_ffn(model_config) -> bool:
  return any(model_config.layer_ffn(i).kind == "sparse" and model_config.layer_ffn(i).has_sparsity
             for i in range(model_config.n_layers))


def plan(config: TrainConfig) -> RunPlan:
  """Checks ``config`` against itself, the model config, the devices and the run directory.

  Raises:
    ValueError: one line saying which setting is wrong and what was expected.
  """
  config_lib.check(config)
  model_config = build_model_config(config)
  phases = schedule_lib.resolve_phases(config.schedule, config.steps)
  if phases.sparse and not _has_sparse_ffn(model_config):
    raise ValueError(f"train config: the schedule has {phases.sparse} sparse steps but no layer has a sparse FFN "
                     f"(ffn={config.ffn!r}, model.ffn.kind={model_config.ffn.kind!r}); use ffn=act24|w24|... or "
                     f"schedule.sparse=0")
  if config.data.seq_len > model_config.max_len:
    raise ValueError(f"train config: data.seq_len={config.data.seq_len} exceeds the model's max_len="
                     f"{model_config.max_len} (set model.max_len)")
  is_npy = config.data.path is not None and config.data.path.endswith(".npy")
  if not is_npy and model_config.vocab_size < 256:
    raise ValueError(f"train config: byte-level text needs vocab_size >= 256, the model has "
                     f"{model_config.vocab_size} (set model.vocab_size=256 or give a pre-tokenised .npy)")
  if config.data.path is not None and not any(c in config.data.path for c in "*?[") and not os.path.exists(
      config.data.path):
    raise ValueError(f"train config: data.path={config.data.path!r} does not exist")
  sharding_lib.check_devices(config.mesh)
  run_dir = os.path.abspath(config.out_dir)
  checkpoint_dir = os.path.abspath(config.checkpoint.dir or os.path.join(run_dir, "checkpoints"))
  _check_run_dir(config, run_dir, checkpoint_dir)
  return RunPlan(config, model_config, phases, run_dir, checkpoint_dir)


def _check_run_dir(config: TrainConfig, run_dir: str, checkpoint_dir: str) -> None:
  path = os.path.join(run_dir, CONFIG_FILE)
  has_run = os.path.exists(path) or os.path.exists(os.path.join(run_dir, metrics_lib.METRICS_FILE))
  if config.checkpoint.resume:
    if os.path.exists(path):
      with open(path) as f:
        previous = json.load(f).get("train", {})
      diff = _identity_diff(previous, config.to_dict())
      if diff:
        raise ValueError(f"train config: --resume with settings that differ from the run in {run_dir}: "
                         f"{', '.join(diff)} (start a new out_dir instead)")
    return
  if has_run and not config.overwrite:
    raise ValueError(f"train config: {run_dir} already holds a run; pass --resume to continue it, overwrite=true "
                     f"to replace it, or another out_dir")


def _identity_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  diff = []
  for key in sorted(set(a) | set(b)):
    if key in _RESUMABLE_KEYS:
      continue
    va, vb = a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict) and key != "model":
      diff += [f"{key}.{k}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
    elif json.dumps(va, sort_keys=True) != json.dumps(vb, sort_keys=True):
      diff.append(key)
  return diff


# ----------------------------------------------------------------------------------------------------------------------
# The step functions.


def _loss_and_stats(model, tokens_BxLp1: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  inputs_BxL, targets_BxL = tokens_BxLp1[:, :-1], tokens_BxLp1[:, 1:]
  logits_BxLxV = model(inputs_BxL)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV.astype(jnp.float32), targets_BxL).mean()
  return loss, pop_stats(model)


def pop_stats(model) -> dict[str, jax.Array]:
  """Pops the model's sown per-layer statistics as float32 scalars, inside a trace.

  (``models.collect_stats`` does the same eagerly, returning Python floats.) Popping inside the step keeps the
  state's structure the same from step to step. Keys: ``"layer{i}/{name}"`` (``name`` as sown).
  """
  popped = nnx.pop(model, nnx.Intermediate)
  out: dict[str, jax.Array] = {}
  for path, leaf in nnx.to_flat_state(popped):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    values = value if isinstance(value, tuple) else (value,)
    if values:
      out[_stat_key(tuple(str(p) for p in path))] = jnp.mean(jnp.stack([jnp.asarray(v, jnp.float32)
                                                                        for v in values]))
  return out


def _stat_key(parts: tuple[str, ...]) -> str:
  for i, p in enumerate(parts[:-2]):
    if p == "layers" and parts[i + 1].isdigit():
      return f"layer{parts[i + 1]}/{parts[-1]}"
  return "/".join(parts)


def train_step(graphdef, state, tokens_BxLp1: jax.Array, lr_fn: optax.Schedule | None = None):
  """One optimizer step. Pure: ``(state, tokens) -> (state, metrics)``; ``graphdef`` and ``lr_fn`` are static.

  Args:
    graphdef: ``nnx.split((model, optimizer))[0]`` (carries the sparse/dense mode).
    state: the matching state.
    tokens_BxLp1: int32 ``[B, L + 1]`` windows (inputs and shifted targets).
    lr_fn: the learning-rate schedule, to report the rate this step used (optional).

  Returns:
    ``(new_state, {"loss", "grad_norm", ["lr",] <per-layer stats>})``.
  """
  model, optimizer = nnx.merge(graphdef, state)
  (loss, stats), grads = nnx.value_and_grad(_loss_and_stats, has_aux=True)(model, tokens_BxLp1)
  metrics = {"loss": loss, "grad_norm": schedule_lib.global_norm(grads), **stats}
  if lr_fn is not None:
    metrics["lr"] = jnp.asarray(lr_fn(optimizer.step[...]), jnp.float32)
  optimizer.update(model, grads)
  # Router step counter / periodic re-clustering of routed FFNs; with the optimizer, a re-clustering re-lays out the
  # weights kept in router order together with their Adam moments.
  models.after_optimizer_step(model, optimizer)
  return nnx.state((model, optimizer)), metrics


def eval_step(graphdef, state, tokens_BxLp1: jax.Array) -> jax.Array:
  """The mean next-token loss of one batch; the state is not changed."""
  model, _ = nnx.merge(graphdef, state)
  loss, _ = _loss_and_stats(model, tokens_BxLp1)
  return loss


class StepFunctions:
  """The jitted, sharded train/eval steps, one per graphdef (i.e. per FFN mode, with or without the per-layer
  statistics), compiled once each.

  ``traces`` counts how often each was traced, keyed ``(kind, sparse, stats)`` (the tests assert one per variant).
  """

  def __init__(self, mesh, batch_sharding, *, lr_fn: optax.Schedule | None = None, donate: bool = True):
    self.mesh = mesh
    self.lr_fn = lr_fn
    self.batch_sharding = batch_sharding
    self.donate = donate
    self.traces: dict[tuple[str, bool, bool], int] = {}
    self._cache: dict[tuple[str, Any], Callable] = {}

  def _counted(self, key: tuple, fn):
    def wrapped(*args):
      self.traces[key] = self.traces.get(key, 0) + 1
      return fn(*args)
    return wrapped

  def train(self, graphdef, state, sparse: bool, stats: bool = True) -> Callable:
    key = ("train", graphdef)
    if key not in self._cache:
      shardings = sharding_lib.state_shardings(state, self.mesh)
      fn = self._counted(("train", sparse, stats), functools.partial(train_step, graphdef, lr_fn=self.lr_fn))
      self._cache[key] = jax.jit(fn, in_shardings=(shardings, self.batch_sharding),
                                 out_shardings=(shardings, sharding_lib.replicated(self.mesh)),
                                 donate_argnums=(0,) if self.donate else ())
    return self._cache[key]

  def eval(self, graphdef, state, sparse: bool) -> Callable:
    key = ("eval", graphdef)
    if key not in self._cache:
      shardings = sharding_lib.state_shardings(state, self.mesh)
      fn = self._counted(("eval", sparse, False), functools.partial(eval_step, graphdef))
      self._cache[key] = jax.jit(fn, in_shardings=(shardings, self.batch_sharding),
                                 out_shardings=sharding_lib.replicated(self.mesh))
    return self._cache[key]


def init_state(model_config, optim: config_lib.OptimizerConfig, steps: int, seed: int, mesh):
  """Builds the model and AdamW directly into their shardings (no full copy on one device first).

  Returns:
    ``(graphdef, state)`` of ``(model, optimizer)``.
  """
  tx = schedule_lib.make_optimizer(optim, steps)

  def build():
    model = models.Transformer(model_config, rngs=nnx.Rngs(seed))
    return nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))

  graphdef, abstract = nnx.eval_shape(build)
  shardings = sharding_lib.state_shardings(abstract, mesh)
  state = jax.jit(lambda: build()[1], out_shardings=shardings)()
  return graphdef, state


def without_stats(graphdef, state):
  """The graph definition of the same ``(model, optimizer)`` with the sparse FFNs' statistics off
  (:func:`jsparse.models.set_stats`); ``state`` fits both."""
  model, optimizer = nnx.merge(graphdef, state)
  models.set_stats(model, False)
  return nnx.split((model, optimizer))[0]


def set_mode(graphdef, state, mesh, *, sparse: bool, prepare_tokens: np.ndarray | None = None,
             weights_grouped: bool = False):
  """Flips the FFNs' static sparse flag (and runs the sparse-phase setup when ``prepare_tokens`` is given).

  ``weights_grouped``: the state's routed FFN weights are already in router order (restored from a checkpoint taken
  after the setup); marks them so (:func:`jsparse.models.group_weights`, a no-op permutation then).

  Returns:
    the new ``(graphdef, state)``; the state keeps (or regains) the FSDP shardings.
  """
  model, optimizer = nnx.merge(graphdef, state)
  models.set_sparse(model, sparse)
  if weights_grouped:
    models.group_weights(model, optimizer)
  if prepare_tokens is not None:
    # With the optimizer, routed FFNs also store W1/W2 (and the moments) in router order: no per-step weight gathers.
    models.prepare_sparse_phase(model, jnp.asarray(prepare_tokens[:, :-1]), optimizer)
  graphdef, state = nnx.split((model, optimizer))
  return graphdef, jax.device_put(state, sharding_lib.state_shardings(state, mesh))


# ----------------------------------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns.

  Attributes:
    run_dir: the run directory (config.json, metrics.jsonl, tb/, checkpoints/).
    start_step, final_step: steps completed before (0, or the restored checkpoint's step) and after this call.
    losses: training loss of every step run by this call, in order.
    val_losses: ``[(step, val_loss), ...]`` of this call.
    phases: the phase plan.
    tokens_per_s: mean training throughput of this call, compilation excluded (steps after each mode's first).
    wall_s: wall time of this call.
    traces: how often each step function was traced (``{("train", sparse): n, ...}``).
    model: the trained model (``nnx.Module``), in the mode of the last phase.
  """
  run_dir: str
  start_step: int
  final_step: int
  losses: list[float]
  val_losses: list[tuple[int, float]]
  phases: schedule_lib.PhasePlan
  tokens_per_s: float
  wall_s: float
  traces: dict
  model: Any = None


def train(config: TrainConfig) -> TrainResult:
  """Trains a model as ``config`` says (see the module docstring and ``jsparse-train --help``).

  Raises:
    ValueError: a bad configuration, raised before any computation.
  """
  t_start = time.perf_counter()
  run = plan(config)
  cfg = run.config
  phases = run.phases
  batches = data_lib.make_batches(cfg.data)
  if batches.tokens.dtype != np.uint8 and int(np.max(batches.tokens)) >= run.model_config.vocab_size:
    raise ValueError(f"data: token ids reach {int(np.max(batches.tokens))}, but the model's vocab_size is "
                     f"{run.model_config.vocab_size}")
  if cfg.overwrite and not cfg.checkpoint.resume:
    _clear_run(run)
  os.makedirs(run.run_dir, exist_ok=True)
  _write_config(run, batches)

  mesh = sharding_lib.make_mesh(cfg.mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  graphdef, state = init_state(run.model_config, cfg.optim, cfg.steps, cfg.seed, mesh)
  checkpointer = ckpt_lib.Checkpointer(run.checkpoint_dir, keep=cfg.checkpoint.keep,
                                       async_save=cfg.checkpoint.async_save)

  start = 0
  if cfg.checkpoint.resume:
    graphdef, state, start = _restore(checkpointer, graphdef, state, phases, batches, mesh)
    metrics_lib.truncate_metrics(run.run_dir, start)
  logger = metrics_lib.MetricsLogger(run.run_dir, total_steps=phases.steps, start_step=start,
                                     tensorboard=cfg.log.tensorboard, progress=cfg.log.progress)
  if start:
    logger.write([{"step": start, "event": "resume"}])
    logger.message(f"jsparse-train: resumed from the checkpoint at step {start} in {run.checkpoint_dir}")

  steps_fns = StepFunctions(mesh, batch_sharding, lr_fn=schedule_lib.learning_rate(cfg.optim, cfg.steps))
  losses: list[float] = []
  val_losses: list[tuple[int, float]] = []
  pending: list[tuple[int, str, dict[str, jax.Array]]] = []
  phase = None
  # Throughput counts only intervals of plain training steps: the first step after a phase change (compilation,
  # sparse-phase setup) and evaluations/checkpoints are kept out by restarting the interval after them.
  timed_tokens, timed_s = 0, 0.0
  interval_t0, interval_step0 = time.perf_counter(), start
  try:
    for step in range(start, phases.steps):
      first_of_phase = phases.phase_at(step) != phase
      if first_of_phase:
        phase = phases.phase_at(step)
        prepare = batches.train_batch(step) if (phase == "sparse" and step == phases.sparse_start) else None
        # A checkpoint from after the sparse phase's setup holds routed weights in router order; the static flag
        # that says so lives in the graph definition, which a restore does not carry.
        resumed_grouped = step == start and start > phases.sparse_start and phases.sparse > 0
        graphdef, state = set_mode(graphdef, state, mesh, sparse=phase == "sparse", prepare_tokens=prepare,
                                   weights_grouped=resumed_grouped)
        quiet_graphdef = without_stats(graphdef, state)
        logger.write([{"step": step, "event": "phase", "phase": phase}])
      done = step + 1
      log_now = done % cfg.log.every == 0 or done == phases.steps
      # The per-layer statistics are only logged at log steps: the steps in between run without them.
      step_fn = steps_fns.train(graphdef if log_now else quiet_graphdef, state, phase == "sparse", stats=log_now)
      tokens = jax.device_put(batches.train_batch(step), batch_sharding)
      state, out = step_fn(state, tokens)
      pending.append((done, phase, out))
      if first_of_phase:
        jax.block_until_ready(out["loss"])
        interval_t0, interval_step0 = time.perf_counter(), done
      # Also at the end of each phase, so every phase's effect on the validation loss is visible.
      eval_now = ((cfg.log.eval_every and done % cfg.log.eval_every == 0) or done == phases.steps
                  or (phases.sparse and done in (phases.sparse_start, phases.sparse_end)))
      save_now = (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == phases.steps
      if not (log_now or eval_now or save_now):
        continue
      records = _drain(pending)
      losses.extend(r["loss"] for r in records)
      if log_now:
        now = time.perf_counter()
        tps = None
        if done > interval_step0:
          tps = (done - interval_step0) * run.tokens_per_step / (now - interval_t0)
          timed_tokens += (done - interval_step0) * run.tokens_per_step
          timed_s += now - interval_t0
          records[-1]["tokens_per_s"] = tps
        records[-1].update(records[-1].pop("_stats"))
        logger.progress(done, loss=records[-1]["loss"], tok_s=_rate(tps), phase=phase)
        interval_t0, interval_step0 = now, done
      for r in records:
        r.pop("_stats", None)
      logger.write(records)
      if eval_now:
        eval_fn = steps_fns.eval(quiet_graphdef, state, phase == "sparse")
        val = _evaluate(eval_fn, state, batches, cfg.data.eval_batches, batch_sharding)
        val_losses.append((done, val))
        logger.write([{"step": done, "phase": phase, "val_loss": val}])
        logger.message(f"step {done:>6}  phase {phase:<12}  train loss {losses[-1]:.4f}  val loss {val:.4f}")
      if save_now:
        flat, _, _ = ckpt_lib.flatten_state(state)
        checkpointer.save(done, flat, {"phase": phase, "data_position": batches.position(done),
                                       "data_fingerprint": batches.fingerprint,
                                       "sparse_prepared": phases.sparse > 0 and done > phases.sparse_start})
      interval_t0, interval_step0 = time.perf_counter(), done
    jax.block_until_ready(state)
  finally:
    checkpointer.close()
    logger.close()
  model, _ = nnx.merge(graphdef, state)
  wall = time.perf_counter() - t_start
  return TrainResult(run.run_dir, start, phases.steps, losses, val_losses, phases,
                     timed_tokens / timed_s if timed_s else float("nan"), wall, dict(steps_fns.traces), model)


def _rate(tokens_per_s: float | None) -> str:
  return "-" if tokens_per_s is None else f"{tokens_per_s:,.0f}"


def _drain(pending: list) -> list[dict[str, Any]]:
  host = jax.device_get([out for _, _, out in pending])
  records = []
  for (step, phase, _), out in zip(pending, host):
    stats = {k: float(v) for k, v in out.items() if k not in ("loss", "grad_norm", "lr")}
    records.append({"step": step, "phase": phase, "loss": float(out["loss"]), "lr": float(out["lr"]),
                    "grad_norm": float(out["grad_norm"]), "_stats": stats})
  pending.clear()
  return records


def _evaluate(eval_fn, state, batches: data_lib.TokenBatches, max_batches: int, batch_sharding) -> float:
  losses = [eval_fn(state, jax.device_put(b, batch_sharding)) for b in batches.val_batches(max_batches)]
  return float(np.mean(np.asarray(jax.device_get(losses), np.float64)))


def _restore(checkpointer: ckpt_lib.Checkpointer, graphdef, state, phases, batches, mesh):
  flat, treedef, impls = ckpt_lib.flatten_state(state)
  restored = checkpointer.restore_latest(ckpt_lib.abstract_of(flat))
  if restored is None:
    warnings.warn(f"train: --resume found no usable checkpoint in {checkpointer.directory}; starting from step 0",
                  stacklevel=3)
    return graphdef, state, 0
  flat_restored, meta = restored
  step = int(meta["step"])
  if meta.get("data_fingerprint") != batches.fingerprint:
    warnings.warn("train: the data differs from the checkpointed run's (fingerprint mismatch); the batch order "
                  "continues by step, but the run is no longer an exact continuation", stacklevel=3)
  if meta.get("data_position") != batches.position(step):
    raise ValueError(f"train: checkpoint data position {meta.get('data_position')} does not match step {step} "
                     f"with batch size {batches.batch_size}")
  state = ckpt_lib.unflatten_state(flat_restored, treedef, list(flat), impls)
  return graphdef, state, step


def _write_config(run: RunPlan, batches: data_lib.TokenBatches) -> None:
  payload = {
      "train": run.config.to_dict(),
      "model": _jsonable(dataclasses.asdict(run.model_config)),
      "phases": [{"phase": p, "start": a, "end": b} for p, a, b in run.phases.boundaries()],
      "data": {"tokens": int(len(batches.tokens)), "train_sequences": batches.n_train,
               "val_sequences": batches.n_val, "fingerprint": batches.fingerprint},
      "devices": [str(d) for d in jax.devices()[:run.config.mesh.data * run.config.mesh.fsdp]],
  }
  path = os.path.join(run.run_dir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=1)
  os.replace(path + ".tmp", path)


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


def _clear_run(run: RunPlan) -> None:
  for name in (CONFIG_FILE, metrics_lib.METRICS_FILE):
    path = os.path.join(run.run_dir, name)
    if os.path.exists(path):
      os.remove(path)
  for path in (os.path.join(run.run_dir, "tb"), run.checkpoint_dir):
    shutil.rmtree(path, ignore_errors=True)
