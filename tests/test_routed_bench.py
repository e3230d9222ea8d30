"""benchmarks/routed_ffn.py's records on a tiny shape (CPU, kernels interpreted; timings meaningless here): each
variant's gradients agree with the padded-einsum baseline once mapped back to the original neuron order, and the
64-row-tile and Pallas-gather variants say so in their configs."""

import pytest

import jsparse
from benchmarks import routed_ffn as bench


@pytest.fixture
def tiny_shape(monkeypatch):
  monkeypatch.setitem(bench.SHAPES, "tiny", (256, 128, 1024))
  monkeypatch.setattr(bench, "timed", lambda fn, *args, iters=6: 1.0)  # one call per function is enough here
  bench._SHAPE_CACHE.pop("tiny", None)
  yield "tiny"
  bench._SHAPE_CACHE.pop("tiny", None)


def test_records_compare_every_variant_with_einsum_in_the_original_neuron_order(tiny_shape, monkeypatch):
  seen = []  # (gemm, schedule, wg_split) of every grouped-GEMM config built while tracing, the backward's included
  config_fn = bench.gmm_api.kernel_config

  def spy(gemm, *a):
    cfg = config_fn(gemm, *a)
    seen.append((gemm, cfg.schedule, cfg.wg_split))
    return cfg

  monkeypatch.setattr(bench.gmm_api, "kernel_config", spy)
  records = []
  impls = ["einsum", "ours", "ours_grouped_weights", "ours_grouped_weights_rt64", "ours_grouped_weights_rt64_pgather",
           "ours_grouped_weights_tgather_snake_playout", "ours_grouped_weights_wgm_chain"]
  with jsparse.pallas_interpret():
    bench.bench_config(tiny_shape, 2, records, impls, lambda msg: None, token_order_at=(2,))
  by_name = {(r["config"]["impl"], r["config"]["pass"]): r for r in records}
  assert set(by_name) == {(i, p) for i in impls for p in ("fwd", "fwd+bwd")}
  for impl in impls[1:]:
    assert by_name[(impl, "fwd+bwd")]["max_rel_err_vs_einsum"] < 0.02, impl
  assert by_name[("ours_grouped_weights_rt64", "fwd")]["config"]["row_tile"] == 64
  assert "row_tile" not in by_name[("ours_grouped_weights", "fwd")]["config"]
  assert by_name[("ours_grouped_weights_rt64_pgather", "fwd")]["config"]["gather"] == "pallas"
  assert by_name[("ours_grouped_weights_rt64_pgather", "fwd")]["config"]["row_tile"] == 64
  assert "gather" not in by_name[("ours_grouped_weights_rt64", "fwd")]["config"]
  combined = by_name[("ours_grouped_weights_tgather_snake_playout", "fwd+bwd")]["config"]
  assert (combined["gather"], combined["dw_schedule"], combined["layout"]) == ("pallas_tma", "sorted_snake", "pallas")
  assert bench._tuning({"snake"}) == {"dw1": dict(schedule="sorted_snake"), "dw2": dict(schedule="sorted_snake")}
  # The sorted snake is the weight gradients' tuned default: every variant's backward traced them with it.
  dw = [(g, schedule) for g, schedule, _ in seen if g.startswith("dw")]
  assert len(dw) >= 2 * 6 and set(dw) == {("dw1", "sorted_snake"), ("dw2", "sorted_snake")}
  # _wgm: all six GEMMs of its fwd+bwd (and the two of its fwd) split along M.
  assert sum(1 for _, _, split in seen if split == "m") == 8
  assert by_name[("ours_grouped_weights_wgm_chain", "fwd")]["config"]["wg_split"] == "m"
  assert by_name[("ours_grouped_weights_wgm_chain", "fwd")]["config"]["chain"] is True
  assert bench._tuning({"chain"}) == {g: dict(chain=True) for g in ("up", "down", "dh", "dx")}
  assert bench._variant("ours_grouped_weights_pgather_rt64") == ("ours_grouped_weights", {"rt64", "pgather"})
  assert bench._variant("einsum") == ("einsum", set())


def test_op_variants_build_their_tile_configs():
  # Every --op-variants entry names known GEMMs and valid TileConfig fields; "untuned" switches both tuned defaults
  # (chained row-tile GEMMs, sorted-snake weight gradients) off.
  for name, per_gemm in bench.OP_VARIANTS.items():
    with bench.gmm_api.tuning(**per_gemm):
      cfgs = {g: bench.gmm_api.kernel_config(g, 128, 4096, 1024) for g in bench.SWEEP_GEMMS}
    assert cfgs, name
  assert bench.gmm_api.kernel_config("up", 128, 4096, 1024).chain
  with bench.gmm_api.tuning(**bench.OP_VARIANTS["untuned"]):
    assert not any(bench.gmm_api.kernel_config(g, 128, 4096, 1024).chain for g in ("up", "down", "dh", "dx"))
    assert {bench.gmm_api.kernel_config(g, 128, 4096, 1024).schedule for g in ("dw1", "dw2")} == {"group_major"}
