"""Merges freshly measured records into a committed results file, newest measurement winning.

A GPU session writes records under ``$OUT``; this folds them into ``benchmarks/results/NAME.json``: a new record
replaces the committed one with the same ``bench``, ``config``, ``metric`` and ``baseline`` (the same measurement,
re-taken), and records with no counterpart are appended. Committed records that were not re-measured stay, so a
partial re-run (one shape, one variant) updates only what it measured. Then ``python -m benchmarks.render_readme``.

  python -m benchmarks.merge_results /path/to/rt.json --into benchmarks/results/routed_ffn.json
  python -m benchmarks.merge_results a.json b.json --into benchmarks/results/gather_rows.json --only bench=gather_rows
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any


def key(record: dict[str, Any]) -> str:
  """What identifies a measurement: bench, config (normalised), metric and baseline."""
  return json.dumps([record.get("bench"), record.get("config"), record.get("metric"), record.get("baseline")],
                    sort_keys=True)


def merge(committed: list[dict[str, Any]], new: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, int]:
  """(merged records, replaced, appended). Order: committed order, then new measurements in their order."""
  latest = {}
  for r in new:
    latest[key(r)] = r  # a measurement repeated within the new files: the last one wins
  out, replaced = [], 0
  for r in committed:
    k = key(r)
    if k in latest:
      out.append(latest.pop(k))
      replaced += 1
    else:
      out.append(r)
  appended = list(latest.values())
  return out + appended, replaced, len(appended)


def _selected(record: dict[str, Any], only: list[tuple[str, str]]) -> bool:
  for field, want in only:
    value = record.get("config", {}).get(field[len("config."):]) if field.startswith("config.") else record.get(field)
    if str(value) != want:
      return False
  return True


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("new", nargs="+", help="JSON lists of records written by a benchmark")
  p.add_argument("--into", required=True, help="the committed results file (created if missing)")
  p.add_argument("--only", action="append", default=[], metavar="FIELD=VALUE",
                 help="merge only new records whose field (or config.FIELD) equals VALUE; repeatable")
  args = p.parse_args(argv)
  only = [tuple(kv.split("=", 1)) for kv in args.only]
  new = [r for path in args.new for r in json.loads(pathlib.Path(path).read_text()) if _selected(r, only)]
  for r in new:
    missing = {"bench", "device", "date", "config", "metric", "baseline", "ours", "base", "ratio"} - set(r)
    if missing:
      raise SystemExit(f"merge_results: a record lacks {sorted(missing)}: {json.dumps(r)[:200]}")
  into = pathlib.Path(args.into)
  committed = json.loads(into.read_text()) if into.exists() else []
  merged, replaced, appended = merge(committed, new)
  into.parent.mkdir(parents=True, exist_ok=True)
  into.write_text(json.dumps(merged, indent=1) + "\n")
  print(f"{into}: {replaced} replaced, {appended} appended, {len(merged)} records")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
