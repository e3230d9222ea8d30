"""The README's benchmark tables are generated from the results files, with marker filters and extra columns."""

import json

from benchmarks import render_readme


def test_markers_filter_render_and_are_idempotent(tmp_path):
  recs = [dict(bench="b", device="GPU", date="2026-01-01", config=dict(shape=[2, 4], mode=m, blk={"r": 1}),
               metric="time", baseline="dense", ours=o, base=1.0, ratio=1.0 / o, extra_ms=o * 2)
          for m, o in (("a", 0.5), ("b", 2.0))]
  recs.append(dict(recs[0], ratio=None, ours=None))
  (tmp_path / "demo.json").write_text(json.dumps(recs))
  text = "x\n<!-- results:demo config.mode=b extra=extra_ms -->\nold\n<!-- /results:demo -->\n<!-- results:none -->\n"
  out = render_readme.update(text, tmp_path)
  assert "old" not in out and "| b |" not in out  # one record left: nothing varies, so no mode column
  assert "**0.50×**" in out and "| 4.000 |" in out and "mode=b" in out and "blk" not in out
  assert render_readme.update(out, tmp_path) == out
  out = render_readme.update("<!-- results:demo -->\n<!-- /results:demo -->", tmp_path)
  assert "skipped" in out and "**2.00×**" in out
