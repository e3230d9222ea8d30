"""benchmarks/gather_rows.py on a tiny shape (CPU, kernel interpreted; timings meaningless here): every record is an
exact move with the fields the results format needs."""

import json

from benchmarks import gather_rows as bench


def test_records_are_exact_moves(tmp_path, monkeypatch):
  monkeypatch.setattr(bench, "time_fn", lambda fn, *args, iters=20: 1.0)
  out = tmp_path / "g.json"
  assert bench.main(["--out", str(out), "--interpret", "--tokens", "256", "--widths", "7b"]) == 0
  records = json.loads(out.read_text())
  assert {r["config"]["move"] for r in records} == {"to_padded", "from_padded"}
  assert {r["config"]["engine"] for r in records} == {"triton", "tma"}
  for r in records:
    assert r["exact"] and r["metric"] == "gbps" and r["baseline"] == "xla_take"
    assert {"bench", "device", "date", "config", "ours", "base", "ratio"} <= set(r)
