"""The training configuration: frozen dataclasses, presets, ``key=value`` overrides and the checks that run first.

Everything that decides *what* is computed is static configuration (hashable, printable, saved as JSON next to the
run); everything that changes while training (parameters, optimizer moments, S-STE beta, router centroids, counters)
lives in the model/optimizer state and is checkpointed by orbax.

Step counts that may also be given as fractions (``schedule.*``, ``optim.lr_warmup``) follow one rule: a Python
``int`` is a number of steps, a ``float`` in [0, 1] a fraction of ``steps``.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from typing import Any, Mapping, Union

PHASES = ("dense_warmup", "sparse", "dense_tail")

# Named FFN modes (``ffn=...``): overrides of the model's FFN config, so the CLI, the tests and the benchmark use the
# same spelling. ``None`` keeps the preset's own FFN. The keys name fields of ``jsparse.models.FFNConfig``.
FFN_MODES: dict[str, dict[str, Any]] = {
    "dense": {"kind": "squared_relu"},
    "swiglu": {"kind": "swiglu"},
    "act24": {"kind": "sparse", "activation_sparsity": "2:4", "weight_sparsity": None},
    "w24": {"kind": "sparse", "activation_sparsity": None, "weight_sparsity": "2:4-sste"},
    "act24+w24": {"kind": "sparse", "activation_sparsity": "2:4", "weight_sparsity": "2:4-sste"},
    "routed": {"kind": "sparse", "activation_sparsity": "vnm", "weight_sparsity": None},
}

_LR_SCHEDULES = ("cosine", "linear", "constant")


def _field(default: Any, help: str) -> Any:  # noqa: A002 - "help" is the natural name here
  if isinstance(default, (dict, list)):
    raise TypeError("mutable defaults are not allowed in frozen configs")
  return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """The sparse-then-dense phases, ``dense_warmup -> sparse -> dense_tail`` (int = steps, float = fraction)."""
  dense_warmup: int | float = _field(0.1, "dense steps before the sparse phase (Haziza: ~1k steps; 1b paper: 1000)")
  sparse: int | float = _field(0.5, "sparse steps; the sparse-phase setup (S-STE beta, router) runs at its start")
  dense_tail: int | float | None = _field(None, "dense steps at the end; None = whatever remains of `steps`")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """optax AdamW with a learning-rate warm-up and decay, and global-norm gradient clipping."""
  lr: float = _field(3e-3, "peak learning rate")
  lr_schedule: str = _field("cosine", "decay after the warm-up: cosine | linear | constant")
  lr_warmup: int | float = _field(0.05, "linear learning-rate warm-up from 0 (int = steps, float = fraction)")
  min_lr_ratio: float = _field(0.1, "final learning rate as a fraction of `lr` (cosine and linear)")
  b1: float = _field(0.9, "AdamW beta1")
  b2: float = _field(0.95, "AdamW beta2")
  eps: float = _field(1e-8, "AdamW epsilon")
  weight_decay: float = _field(0.1, "decoupled weight decay, applied to matrices only (not norms or biases)")
  clip_norm: float | None = _field(1.0, "clip gradients to this global norm; None = no clipping")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Byte-level text: the Python standard library's sources by default, or a directory, glob or ``.npy``."""
  path: str | None = _field(None, "directory, glob or pre-tokenised .npy; None = the stdlib's *.py files")
  seq_len: int = _field(128, "tokens per training sequence")
  batch_size: int = _field(16, "sequences per step, over all devices")
  val_fraction: float = _field(0.02, "fraction of sequences held out for validation (deterministic)")
  eval_batches: int = _field(4, "validation batches per evaluation")
  seed: int = _field(0, "seed of the train/validation split and of the per-epoch shuffling")
  max_bytes: int | None = _field(None, "read at most this many bytes of text (None = all)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh: ``data`` replicas times ``fsdp`` parameter shards (params and batch via NamedSharding)."""
  data: int = _field(1, "data-parallel replicas (batch split, parameters replicated)")
  fsdp: int = _field(1, "fully-sharded data parallel: batch split and parameters/optimizer sharded")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """orbax checkpoints of params, optimizer, schedule, sparsity/router state and data position."""
  every: int = _field(100, "save every this many steps (and always at the end); 0 = only at the end")
  keep: int = _field(3, "checkpoints kept on disk")
  resume: bool = _field(False, "continue from the newest valid checkpoint in the run directory")
  async_save: bool = _field(True, "write checkpoints in the background")
  dir: str | None = _field(None, "checkpoint directory; None = OUT_DIR/checkpoints")


@dataclasses.dataclass(frozen=True)
class LogConfig:
  """Progress bar, JSONL metrics and TensorBoard events."""
  every: int = _field(10, "progress bar, tokens/s and per-layer statistics every this many steps")
  eval_every: int = _field(100, "validation loss every this many steps (and at the end of each phase); 0 = only then")
  tensorboard: bool = _field(True, "write TensorBoard events (tensorboardX) under OUT_DIR/tb")
  progress: bool = _field(True, "show a tqdm progress bar")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. Build it with :func:`from_preset` or directly; check it with :func:`check`.

  ``model`` holds overrides of the model preset's ``TransformerConfig`` as ``(("d_model", 128), ("ffn.kind",
  "sparse"))``; ``ffn`` names one of :data:`FFN_MODES` (applied before ``model``).
  """
  preset: str = _field("tiny", "model preset: tiny | 125m | 1b | 7b")
  model: tuple[tuple[str, Any], ...] = _field((), "overrides of the model config (model.KEY=VALUE on the CLI)")
  ffn: str | None = _field("act24", "FFN mode: " + " | ".join(FFN_MODES) + "; None = the preset's own FFN")
  steps: int = _field(600, "total optimizer steps (all three phases)")
  seed: int = _field(0, "seed of the parameter initialisation and of the model's random streams")
  out_dir: str = _field("runs/tiny", "run directory: config.json, metrics.jsonl, tb/, checkpoints/")
  overwrite: bool = _field(False, "replace an existing run in out_dir (its config, metrics, events, checkpoints)")
  schedule: ScheduleConfig = ScheduleConfig()
  optim: OptimizerConfig = OptimizerConfig()
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  log: LogConfig = LogConfig()

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict (``model`` overrides become a dict)."""
    d = dataclasses.asdict(self)
    d["model"] = dict(self.model)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
    """Inverse of :meth:`to_dict` (what a run's ``config.json`` holds)."""
    kwargs = dict(d)
    kwargs["model"] = tuple(sorted(dict(kwargs.get("model", {})).items()))
    for f in dataclasses.fields(cls):
      if dataclasses.is_dataclass(f.default) and isinstance(kwargs.get(f.name), Mapping):
        kwargs[f.name] = type(f.default)(**kwargs[f.name])
    return cls(**kwargs)


# Training presets: model preset + the run around it. "tiny" is the README's CPU demo (a few minutes on 2 cores);
# the large ones follow Madhyastha et al. (papers.md §2.5: 1k dense warm-up, 1b 30k sparse + 30k dense, 7b 10k + 38k)
# and the lingua 720M config for the optimizer (lr 3e-3, weight decay 0.033, 2000 warm-up steps).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "preset": "tiny", "steps": 600, "out_dir": "runs/tiny",
        "schedule.dense_warmup": 0.15, "schedule.sparse": 0.5, "schedule.dense_tail": None,
        "optim.lr": 3e-3, "optim.lr_warmup": 0.05, "data.seq_len": 128, "data.batch_size": 16,
        "checkpoint.every": 200, "log.every": 10, "log.eval_every": 100,
    },
    "125m": {
        "preset": "125m", "steps": 20_000, "out_dir": "runs/125m",
        "schedule.dense_warmup": 1000, "schedule.sparse": 9500, "schedule.dense_tail": 9500,
        "optim.lr": 3e-3, "optim.lr_warmup": 1000, "optim.weight_decay": 0.033,
        "data.seq_len": 1024, "data.batch_size": 64, "checkpoint.every": 1000, "log.every": 50, "log.eval_every": 500,
    },
    "1b": {
        "preset": "1b", "steps": 61_000, "out_dir": "runs/1b",
        "schedule.dense_warmup": 1000, "schedule.sparse": 30_000, "schedule.dense_tail": 30_000,
        "optim.lr": 3e-3, "optim.lr_warmup": 2000, "optim.weight_decay": 0.033,
        "data.seq_len": 2048, "data.batch_size": 256, "checkpoint.every": 1000, "log.every": 50,
        "log.eval_every": 1000,
    },
    "7b": {
        "preset": "7b", "steps": 49_000, "out_dir": "runs/7b",
        "schedule.dense_warmup": 1000, "schedule.sparse": 10_000, "schedule.dense_tail": 38_000,
        "optim.lr": 3e-4, "optim.lr_warmup": 2000, "optim.weight_decay": 0.033,
        "data.seq_len": 4096, "data.batch_size": 256, "checkpoint.every": 1000, "log.every": 50,
        "log.eval_every": 1000,
    },
}


def from_preset(name: str = "tiny", overrides: Mapping[str, Any] | None = None) -> TrainConfig:
  """The preset's config with ``overrides`` applied (``{"optim.lr": 1e-3, "model.d_model": 64}``; strings parsed).

  Raises:
    ValueError: unknown preset, unknown key or a value of the wrong type.
  """
  if name not in PRESETS:
    raise ValueError(f"train config: preset must be one of {sorted(PRESETS)}, got {name!r}")
  merged = dict(PRESETS[name])
  merged.update(overrides or {})
  return apply_overrides(TrainConfig(), merged)


def apply_overrides(config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
  """Returns ``config`` with dotted-key overrides applied; string values are parsed to the field's type.

  Keys starting with ``model.`` become model-config overrides (checked against the model config when it is built).

  Raises:
    ValueError: unknown key or unparsable value.
  """
  model = dict(config.model)
  for key, value in overrides.items():
    if key.startswith("model."):
      model[key[len("model."):]] = _parse_literal(value) if isinstance(value, str) else value
      continue
    config = _replace_path(config, key.split("."), value, key)
  return dataclasses.replace(config, model=tuple(sorted(model.items())))


def _replace_path(obj: Any, path: list[str], value: Any, key: str) -> Any:
  names = {f.name: f for f in dataclasses.fields(obj)}
  head = path[0]
  if head not in names or head == "model":
    raise ValueError(f"train config: unknown key {key!r}; see `jsparse-train --help` for the list")
  current = getattr(obj, head)
  if len(path) > 1:
    if not dataclasses.is_dataclass(current):
      raise ValueError(f"train config: {key!r}: {head!r} has no sub-keys")
    return dataclasses.replace(obj, **{head: _replace_path(current, path[1:], value, key)})
  if dataclasses.is_dataclass(current):
    example = f"{key}.{dataclasses.fields(current)[0].name}"
    raise ValueError(f"train config: {key!r} is a group; set one of its keys, e.g. {example}")
  hint = typing.get_type_hints(type(obj))[head]
  return dataclasses.replace(obj, **{head: coerce(value, hint, key)})


def _parse_literal(text: str) -> Any:
  if text.lower() in ("none", "null"):
    return None
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def coerce(value: Any, hint: Any, key: str) -> Any:
  """Parses/checks ``value`` against a type hint (``int``, ``float | None``, ``int | float``, ``str``, ``bool``).

  Raises:
    ValueError: the value does not fit the hint.
  """
  options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
  if isinstance(value, str) and type(None) in options and value.lower() in ("none", "null"):
    value = None
  elif isinstance(value, str) and str not in options:
    value = _parse_literal(value)
  if value is None:
    if type(None) in options:
      return None
    raise ValueError(f"train config: {key} cannot be None")
  if isinstance(value, bool) and bool not in options:
    raise ValueError(f"train config: {key} must be {_describe(options)}, got {value!r}")
  for option in options:
    if option is type(None):
      continue
    if option is float and isinstance(value, (int, float)) and not isinstance(value, bool) and int not in options:
      return float(value)
    if isinstance(value, option):
      return value
  raise ValueError(f"train config: {key} must be {_describe(options)}, got {value!r}")


def _describe(options: tuple) -> str:
  return " or ".join("None" if o is type(None) else o.__name__ for o in options)


def config_keys() -> list[tuple[str, str, Any, str]]:
  """Every settable key as ``(key, type, default, help)``, for ``--help`` (model keys excluded)."""
  rows: list[tuple[str, str, Any, str]] = []

  def walk(cls: type, prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      if dataclasses.is_dataclass(f.default):
        walk(type(f.default), f"{prefix}{f.name}.")
      else:
        rows.append((prefix + f.name, _type_name(hints[f.name]), f.default, f.metadata.get("help", "")))

  walk(TrainConfig, "")
  return rows


def _type_name(hint: Any) -> str:
  options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
  return "|".join("None" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)


# ----------------------------------------------------------------------------------------------------------------------
# Checks that need nothing but the config. ``jsparse.train.train`` runs these, then the ones that need the model
# config, the devices and the data, all before the first array is created.


def check(config: TrainConfig) -> None:
  """Rejects settings that make no sense on their own.

  Raises:
    ValueError: one line naming the key and what was expected.
  """
  if config.steps < 1:
    raise ValueError(f"train config: steps must be >= 1, got {config.steps}")
  if config.ffn is not None and config.ffn not in FFN_MODES:
    raise ValueError(f"train config: ffn must be one of {list(FFN_MODES)} or None, got {config.ffn!r}")
  for name in ("dense_warmup", "sparse", "dense_tail"):
    _check_steps_or_fraction(f"schedule.{name}", getattr(config.schedule, name))
  o = config.optim
  if not o.lr > 0:
    raise ValueError(f"train config: optim.lr must be > 0, got {o.lr}")
  if o.lr_schedule not in _LR_SCHEDULES:
    raise ValueError(f"train config: optim.lr_schedule must be one of {_LR_SCHEDULES}, got {o.lr_schedule!r}")
  _check_steps_or_fraction("optim.lr_warmup", o.lr_warmup)
  if not 0 <= o.min_lr_ratio <= 1:
    raise ValueError(f"train config: optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
  if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
    raise ValueError(f"train config: optim.b1 and optim.b2 must be in [0, 1), got {o.b1}, {o.b2}")
  if o.weight_decay < 0:
    raise ValueError(f"train config: optim.weight_decay must be >= 0, got {o.weight_decay}")
  if o.clip_norm is not None and not o.clip_norm > 0:
    raise ValueError(f"train config: optim.clip_norm must be > 0 or None, got {o.clip_norm}")
  d = config.data
  if d.seq_len < 2:
    raise ValueError(f"train config: data.seq_len must be >= 2, got {d.seq_len}")
  if d.batch_size < 1:
    raise ValueError(f"train config: data.batch_size must be >= 1, got {d.batch_size}")
  if not 0 < d.val_fraction < 1:
    raise ValueError(f"train config: data.val_fraction must be in (0, 1), got {d.val_fraction}")
  if d.eval_batches < 1:
    raise ValueError(f"train config: data.eval_batches must be >= 1, got {d.eval_batches}")
  if d.max_bytes is not None and d.max_bytes < 1:
    raise ValueError(f"train config: data.max_bytes must be >= 1 or None, got {d.max_bytes}")
  m = config.mesh
  if m.data < 1 or m.fsdp < 1:
    raise ValueError(f"train config: mesh sizes must be >= 1, got data={m.data}, fsdp={m.fsdp}")
  if d.batch_size % (m.data * m.fsdp):
    raise ValueError(f"train config: data.batch_size={d.batch_size} is not divisible by the mesh's "
                     f"data*fsdp={m.data * m.fsdp} devices")
  c = config.checkpoint
  if c.every < 0:
    raise ValueError(f"train config: checkpoint.every must be >= 0, got {c.every}")
  if c.keep < 1:
    raise ValueError(f"train config: checkpoint.keep must be >= 1, got {c.keep}")
  if config.log.every < 1:
    raise ValueError(f"train config: log.every must be >= 1, got {config.log.every}")
  if config.log.eval_every < 0:
    raise ValueError(f"train config: log.eval_every must be >= 0, got {config.log.eval_every}")


def _check_steps_or_fraction(key: str, value: int | float | None) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"train config: {key} must be an int (steps) or a float in [0, 1] (fraction), got {value!r}")
  if isinstance(value, float) and not 0.0 <= value <= 1.0:
    raise ValueError(f"train config: {key}={value} is a float, i.e. a fraction, and must be in [0, 1] "
                     f"(write an int for a step count)")
  if isinstance(value, int) and value < 0:
    raise ValueError(f"train config: {key} must be >= 0, got {value}")
