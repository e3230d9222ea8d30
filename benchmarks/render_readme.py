"""Regenerates the README's benchmark tables from ``benchmarks/results/*.json``.

Each results file NAME.json is rendered between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` markers in
README.md (markers without a results file are left alone). A marker may filter the records with ``key=value`` pairs
(``<!-- results:remat metric=time baseline=save_dense -->``): ``key`` is a record field or ``config.FIELD``, compared
as text (``a|b`` matches either); ``extra=f1,f2`` adds those record fields as columns. Run: ``python -m benchmarks.render_readme``.
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


def render(records: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> str:
  """A markdown table: the config keys that vary, then metric, baseline, ours, base, ratio and ``extra`` fields."""
  if not records:
    return "_no records_"
  keys: list[str] = []
  for r in records:
    for k in r.get("config", {}):
      if k not in keys:
        keys.append(k)
  # Dict-valued settings (kernel block shapes and the like) stay in the JSON: they do not fit a table cell.
  keys = [k for k in keys if not any(isinstance(r.get("config", {}).get(k), dict) for r in records)]
  varying = [k for k in keys if len({json.dumps(r.get("config", {}).get(k), sort_keys=True) for r in records}) > 1]
  fixed = {k: records[0]["config"].get(k) for k in keys if k not in varying}
  cols = varying + ["metric", "baseline", "ours", "base", "ratio", *extra]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in records:
    cells = [_fmt(r.get("config", {}).get(k, "")) for k in varying]
    ratio = "skipped" if r.get("ratio") is None else f"**{r['ratio']:.2f}×**"
    cells += [str(r["metric"]), str(r["baseline"]), _fmt(r.get("ours")), _fmt(r.get("base")), ratio]
    cells += [_fmt(r.get(k)) for k in extra]
    lines.append("| " + " | ".join(cells) + " |")
  devices = sorted({r["device"] for r in records})
  dates = sorted({r["date"] for r in records})
  note = f"\n_{', '.join(devices)}; {', '.join(dates)}"
  if fixed:
    note += "; " + ", ".join(f"{k}={_fmt(v)}" for k, v in fixed.items())
  note += ". Ratio > 1 means jsparse wins (base/ours for time and bytes, ours/base for throughput)._"
  return "\n".join(lines) + "\n" + note


_MARKER = re.compile(r"(<!-- results:([\w-]+)((?: [\w.]+=[^ >]+)*) -->\n)(.*?)\n?(<!-- /results:\2 -->)", re.S)


def _matches(record: dict[str, Any], filters: list[tuple[str, str]]) -> bool:
  for key, want in filters:
    value = record.get("config", {}).get(key[len("config."):]) if key.startswith("config.") else record.get(key)
    if _fmt(value) not in want.split("|") and str(value) not in want.split("|"):
      return False
  return True


def update(readme: str, results_dir: pathlib.Path = RESULTS) -> str:
  def replace(m: re.Match) -> str:
    path = results_dir / f"{m.group(2)}.json"
    if not path.exists():
      return m.group(0)
    filters = [tuple(kv.split("=", 1)) for kv in m.group(3).split()]
    extra = tuple(v for k, v in filters if k == "extra")
    extra = tuple(f for e in extra for f in e.split(","))
    filters = [(k, v) for k, v in filters if k != "extra"]
    records = [r for r in json.loads(path.read_text()) if _matches(r, filters)]
    return m.group(1) + render(records, extra) + "\n" + m.group(5)

  return _MARKER.sub(replace, readme)


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
