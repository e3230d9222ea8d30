"""Regenerates the README's benchmark tables from ``benchmarks/results/*.json``.

Each results file NAME.json is rendered between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` markers in
README.md (markers without a results file are left alone). Run: ``python -m benchmarks.render_readme``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _fmt(v: Any) -> str:
  if v is None:
    return "—"
  if isinstance(v, float):
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
      return f"{v:.3g}"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
  if isinstance(v, (list, tuple)):
    return "×".join(str(x) for x in v)
  return str(v)


def render(records: list[dict[str, Any]]) -> str:
  """A markdown table: the config keys that vary, then metric, baseline, ours, base and ratio."""
  if not records:
    return "_no records_"
  keys: list[str] = []
  for r in records:
    for k in r.get("config", {}):
      if k not in keys:
        keys.append(k)
  varying = [k for k in keys if len({json.dumps(r.get("config", {}).get(k), sort_keys=True) for r in records}) > 1]
  fixed = {k: records[0]["config"].get(k) for k in keys if k not in varying}
  cols = varying + ["metric", "baseline", "ours", "base", "ratio"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in records:
    cells = [_fmt(r.get("config", {}).get(k, "")) for k in varying]
    ratio = "skipped" if r.get("ratio") is None else f"**{r['ratio']:.2f}×**"
    cells += [str(r["metric"]), str(r["baseline"]), _fmt(r.get("ours")), _fmt(r.get("base")), ratio]
    lines.append("| " + " | ".join(cells) + " |")
  devices = sorted({r["device"] for r in records})
  dates = sorted({r["date"] for r in records})
  note = f"\n_{', '.join(devices)}; {', '.join(dates)}"
  if fixed:
    note += "; " + ", ".join(f"{k}={_fmt(v)}" for k, v in fixed.items())
  note += ". Ratio > 1 means jsparse wins (base/ours for time and bytes, ours/base for throughput)._"
  return "\n".join(lines) + "\n" + note


def update(readme: str, results_dir: pathlib.Path = RESULTS) -> str:
  for path in sorted(results_dir.glob("*.json")):
    name = path.stem
    pattern = re.compile(rf"(<!-- results:{re.escape(name)} -->\n).*?(\n<!-- /results:{re.escape(name)} -->)", re.S)
    if not pattern.search(readme):
      continue
    table = render(json.loads(path.read_text()))
    readme = pattern.sub(lambda m: m.group(1) + table + m.group(2), readme)
  return readme


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--readme", default=str(ROOT / "README.md"))
  parser.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
  args = parser.parse_args()
  path = pathlib.Path(args.readme)
  old = path.read_text()
  new = update(old)
  if args.check:
    raise SystemExit(0 if new == old else 1)
  path.write_text(new)
  print(f"updated {path}" if new != old else f"{path} already up to date")


if __name__ == "__main__":
  main()
