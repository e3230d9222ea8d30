"""``jsparse-train``: parse the command line into a :class:`TrainConfig` and call :func:`train`. Nothing else.

    jsparse-train --preset tiny
    jsparse-train --preset tiny --data ~/corpus --out runs/mine steps=2000 optim.lr=1e-3 model.d_model=128
    jsparse-train --preset tiny --out runs/mine --resume
    jsparse-train --preset 1b --mesh data=2,fsdp=4 ffn=w24
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from typing import Sequence

from jsparse.train import config as config_lib

_FLAG_KEYS = {"data": "data.path", "out": "out_dir", "steps": "steps", "ffn": "ffn"}


def _keys_help() -> str:
  rows = config_lib.config_keys()
  width = max(len(k) for k, *_ in rows)
  lines = ["configuration keys (KEY=VALUE; int = steps, float in [0,1] = fraction where both are allowed):"]
  for key, type_name, default, help_text in rows:
    lines.append(f"  {key:<{width}}  {help_text} [{type_name}, default {default!r}]")
  lines.append("")
  lines.append("presets (--preset) set these defaults first:")
  for name, values in config_lib.PRESETS.items():
    text = ", ".join(f"{k}={v}" for k, v in values.items() if k != "preset")
    lines.append(textwrap.fill(f"{name}: {text}", width=118, initial_indent="  ", subsequent_indent="      "))
  lines.append("")
  lines.append("ffn modes (ffn=MODE) set these model.ffn.* keys:")
  for name, values in config_lib.FFN_MODES.items():
    lines.append(f"  {name:<10} {values}")
  lines.append("")
  lines.append(_model_keys_help())
  return "\n".join(lines)


def _model_keys_help() -> str:
  try:
    from jsparse import models
    base = models.preset("tiny")
  except Exception as e:  # noqa: BLE001 - help must print even if the models package is incomplete
    return f"model keys (model.KEY=VALUE): unavailable ({type(e).__name__}: {e})"
  lines = ["model keys (model.KEY=VALUE, model.ffn.KEY=VALUE; defaults of the tiny preset; see "
           "jsparse.models.TransformerConfig / FFNConfig):"]
  for f in dataclasses.fields(base):
    value = getattr(base, f.name)
    if dataclasses.is_dataclass(value):
      for g in dataclasses.fields(value):
        lines.append(f"  model.{f.name}.{g.name}={getattr(value, g.name)!r}")
    else:
      lines.append(f"  model.{f.name}={value!r}")
  return "\n".join(lines)


class _LazyHelpParser(argparse.ArgumentParser):
  # The key list imports the models; build it only when help is actually printed.
  def format_help(self) -> str:
    self.epilog = _keys_help()
    return super().format_help()


def build_parser() -> argparse.ArgumentParser:
  parser = _LazyHelpParser(
      prog="jsparse-train", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Train a Llama-style byte-level LM with sparse FFNs on the sparse-then-dense schedule "
                  "(dense_warmup -> sparse -> dense_tail). Defaults train on the Python standard library's sources.")
  parser.add_argument("--preset", default="tiny", choices=sorted(config_lib.PRESETS),
                      help="training preset: model size and the run around it (default: tiny, a few minutes on a CPU)")
  parser.add_argument("--data", help="directory, glob or pre-tokenised .npy (default: the stdlib's *.py files)")
  parser.add_argument("--out", help="run directory (default: runs/PRESET)")
  parser.add_argument("--steps", type=int, help="total steps (same as steps=N)")
  parser.add_argument("--ffn", help=f"FFN mode: {' | '.join(config_lib.FFN_MODES)} | none (same as ffn=MODE)")
  parser.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4 (same as mesh.data=2 mesh.fsdp=4)")
  parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in the run "
                                                            "directory")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing run in the run directory")
  parser.add_argument("--check", action="store_true", help="check the configuration, print the plan and exit")
  parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides (listed below)")
  return parser


def parse_config(argv: Sequence[str] | None = None) -> tuple[config_lib.TrainConfig, argparse.Namespace]:
  """The command line as a config (raises ValueError on bad keys or values)."""
  args = build_parser().parse_args(argv)
  overrides: dict[str, object] = {}
  for name, key in _FLAG_KEYS.items():
    value = getattr(args, name)
    if value is not None:
      overrides[key] = value
  if args.mesh:
    from jsparse.train.sharding import parse_mesh
    mesh = parse_mesh(args.mesh)
    overrides.update({"mesh.data": mesh.data, "mesh.fsdp": mesh.fsdp})
  if args.resume:
    overrides["checkpoint.resume"] = True
  if args.overwrite:
    overrides["overwrite"] = True
  for item in args.overrides:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"jsparse-train: expected KEY=VALUE, got {item!r}")
    overrides[key.strip()] = value.strip()
  return config_lib.from_preset(args.preset, overrides), args


def main(argv: Sequence[str] | None = None) -> int:
  """Console entry point. Returns the exit status (2 for a rejected configuration)."""
  try:
    config, args = parse_config(argv)
    from jsparse.train import loop
    if args.check:
      run = loop.plan(config)
      print(f"model: {run.model_config}")
      print("phases: " + ", ".join(f"{p} [{a}, {b})" for p, a, b in run.phases.boundaries()))
      print(f"run directory: {run.run_dir}")
      return 0
    result = loop.train(config)
  except ValueError as e:
    print(f"jsparse-train: error: {e}", file=sys.stderr)
    return 2
  if result.start_step == result.final_step:
    print(f"jsparse-train: nothing to do: the run in {result.run_dir} already finished step {result.final_step}")
    return 0
  final_val = result.val_losses[-1][1] if result.val_losses else float("nan")
  final_train = result.losses[-1] if result.losses else float("nan")
  print(f"jsparse-train: finished step {result.final_step} in {result.wall_s:.1f} s: train loss {final_train:.4f}, "
        f"val loss {final_val:.4f}, {result.tokens_per_s:,.0f} tokens/s; run in {result.run_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
