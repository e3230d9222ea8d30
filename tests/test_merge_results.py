"""benchmarks/merge_results.py: re-measured records replace their committed counterparts, new ones are appended,
the rest stay; filters and malformed records."""

import json

import pytest

from benchmarks import merge_results


def _rec(impl, ours, shape="7b", metric="time"):
  return dict(bench="routed_ffn", device="NVIDIA H100 80GB HBM3", date="2026-11-23", config=dict(shape=shape, impl=impl),
              metric=metric, baseline="xla_dense", ours=ours, base=10.0, ratio=10.0 / ours)


def test_merge_replaces_appends_and_keeps(tmp_path):
  into = tmp_path / "routed_ffn.json"
  into.write_text(json.dumps([_rec("ours", 3.0), _rec("einsum", 4.0), _rec("ours", 1.0, shape="1b")]))
  new = tmp_path / "new.json"
  new.write_text(json.dumps([_rec("ours", 2.9), _rec("ours_pgather", 2.8), _rec("ours", 2.95)]))
  assert merge_results.main([str(new), "--into", str(into)]) == 0
  got = json.loads(into.read_text())
  assert [(r["config"]["impl"], r["config"]["shape"], r["ours"]) for r in got] == [
      ("ours", "7b", 2.95), ("einsum", "7b", 4.0), ("ours", "1b", 1.0), ("ours_pgather", "7b", 2.8)]


def test_config_key_order_does_not_matter():
  a = _rec("ours", 3.0)
  b = dict(a, config=dict(impl="ours", shape="7b"), ours=2.0)
  merged, replaced, appended = merge_results.merge([a], [b])
  assert (replaced, appended) == (1, 0) and merged[0]["ours"] == 2.0


def test_only_filter_and_bad_records(tmp_path):
  into = tmp_path / "r.json"
  new = tmp_path / "new.json"
  new.write_text(json.dumps([_rec("ours", 2.0, shape="1b"), _rec("ours", 2.5)]))
  merge_results.main([str(new), "--into", str(into), "--only", "config.shape=1b"])
  assert [r["config"]["shape"] for r in json.loads(into.read_text())] == ["1b"]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"bench": "x", "config": {}}]))
  with pytest.raises(SystemExit, match="lacks"):
    merge_results.main([str(bad), "--into", str(into)])
