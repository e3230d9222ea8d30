"""benchmarks/quality.py: every run is a valid jsparse-train run, its printed command rebuilds the same config, and
the records compare each run with the same source's dense squared-ReLU run and check the papers' ablation order."""

import shlex

import pytest

from benchmarks import quality
from jsparse.train import cli, loop
from jsparse.train import config as config_lib


@pytest.mark.parametrize("name", list(quality.RUNS))
def test_runs_are_valid_configs_and_commands_reproduce_them(name):
  overrides = quality.overrides_for(name, "stdlib", 2000)
  assert quality.overrides_for(name, "peps", 2000)["data.path"] == quality.SOURCES["peps"]
  cfg = config_lib.from_preset("tiny", dict(overrides, out_dir="runs/x"))
  model = loop.build_model_config(cfg)  # also checks the routed groups against d_ff
  assert (model.d_model, model.n_layers, model.d_ff, cfg.data.seq_len) == (512, 8, 2048, 512)
  parsed, _ = cli.parse_config(shlex.split(quality.command_for(overrides, "runs/x"))[1:])
  assert parsed == cfg
  plan = loop.plan(cfg).phases
  if quality.RUNS[name]["ffn"] in ("dense", "swiglu"):
    assert plan.sparse == 0
  else:  # the sparse end lands on an evaluation step, for the end-of-sparse-phase comparison
    assert plan.sparse_end % cfg.log.eval_every == 0 and plan.sparse_start == 100 and plan.sparse_end == 1100


def test_unknown_run_or_source_is_rejected():
  with pytest.raises(ValueError, match="unknown run"):
    quality.overrides_for("act42", "stdlib", 10)
  with pytest.raises(ValueError, match="unknown source"):
    quality.overrides_for("act24", "wiki", 10)


def _summary(run, loss, sparse_end=None, source="stdlib"):
  return dict(run=run, source=source, steps=10, tokens=100, final_val_loss=loss, val_loss_end_of_sparse=sparse_end,
              final_train_loss=loss, val_curve=[(6, loss + 0.5), (10, loss)], density_curve=[], tokens_per_s=1.0,
              sparse_phase_tokens_per_s=None, wall_s=1.0, params=1, d_model=1, n_layers=1, d_ff=1,
              ffn=quality.RUNS[run]["ffn"], overrides={}, phases={"sparse_start": 1, "sparse_end": 6}, command="c",
              device="GPU")


def test_records_ratio_and_ablation_order():
  recs = quality.to_records([_summary("dense_squared_relu", 2.0), _summary("act24", 2.011, 2.2),
                             _summary("act24_no_permutation", 2.3, 2.4), _summary("act24_no_mask_reuse", 2.2, 3.0),
                             _summary("act24", 3.0, source="peps")])
  by = {(r["config"].get("run"), r["config"]["source"]): r for r in recs if r["bench"] == "quality"}
  assert by[("act24", "stdlib")]["ratio"] == pytest.approx(2.0 / 2.011)
  assert by[("act24", "stdlib")]["within_0.5pct"] is False and by[("dense_squared_relu", "stdlib")]["within_0.5pct"]
  assert by[("act24", "stdlib")]["dense_val_loss_at_sparse_end"] == 2.5
  assert by[("act24", "peps")]["ratio"] is None  # no dense run on that source: no ratio invented
  order = [r for r in recs if r["bench"] == "quality_ablation_order"]
  assert len(order) == 1 and order[0]["final_in_paper_order"] is False and order[0]["sparse_end_in_paper_order"]
