"""Configuration: overrides, presets, and the rejection of nonsense before any computation."""

from __future__ import annotations

import json
import os

import pytest

from jsparse.train import cli, loop
from jsparse.train import config as config_lib
from jsparse.train.config import TrainConfig, from_preset


def test_overrides_parse_to_field_types():
  cfg = from_preset("tiny", {"optim.lr": "1e-3", "schedule.sparse": "0.4", "schedule.dense_warmup": "7",
                             "data.path": "none", "ffn": "None", "checkpoint.resume": "true", "model.d_model": "32",
                             "model.ffn.dense_multiple": "4"})
  assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
  assert cfg.schedule.sparse == 0.4 and isinstance(cfg.schedule.sparse, float)
  assert cfg.schedule.dense_warmup == 7 and isinstance(cfg.schedule.dense_warmup, int)
  assert cfg.data.path is None and cfg.ffn is None and cfg.checkpoint.resume is True
  assert dict(cfg.model) == {"d_model": 32, "ffn.dense_multiple": 4}
  assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  hash(cfg)  # static configuration is hashable


def test_every_key_has_help():
  keys = config_lib.config_keys()
  assert len(keys) > 30
  assert all(help_text for _, _, _, help_text in keys), [k for k, _, _, h in keys if not h]
  text = cli.build_parser().format_help()
  for key, *_ in keys:
    assert key in text
  assert "model.ffn.activation_sparsity" in text and "act24+w24" in text


def test_model_config_from_ffn_mode_and_overrides():
  cfg = from_preset("tiny", {"ffn": "w24", "model.d_model": 32, "model.ffn.weight_sparsity_on": "w1"})
  model_config = loop.build_model_config(cfg)
  assert model_config.d_model == 32
  assert model_config.ffn.kind == "sparse" and model_config.ffn.weight_sparsity == "2:4-sste"
  assert model_config.ffn.weight_sparsity_on == "w1" and model_config.ffn.activation_sparsity is None


def test_ffn_mode_is_checked_together_with_its_model_overrides():
  # routed on tiny (F=256) is valid only with a smaller router block; the mode must not be checked without it
  cfg = from_preset("tiny", {"ffn": "routed", "model.ffn.router_block": 32, "model.ffn.num_groups": 4})
  model_config = loop.build_model_config(cfg)
  assert model_config.ffn.activation_sparsity == "vnm" and model_config.ffn.num_groups == 4
  with pytest.raises(ValueError, match="not a multiple of block=128"):
    loop.build_model_config(from_preset("tiny", {"ffn": "routed"}))


BAD = [
    ({"optim.lrx": 1}, "unknown key 'optim.lrx'"),
    ({"optim.lr": "fast"}, "optim.lr must be float"),
    ({"optim.lr": 0}, "optim.lr must be > 0"),
    ({"optim.lr_schedule": "step"}, "optim.lr_schedule must be one of"),
    ({"steps": "2.5"}, "steps must be int"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"schedule.sparse": 1.5}, "is a float, i.e. a fraction"),
    ({"schedule.sparse": -3}, "schedule.sparse must be >= 0"),
    ({"steps": 100, "schedule.dense_warmup": 60, "schedule.sparse": 50}, "exceed steps=100"),
    ({"steps": 100, "schedule.dense_warmup": 10, "schedule.sparse": 50, "schedule.dense_tail": 10}, "but steps=100"),
    ({"ffn": "dense"}, "no layer has a sparse FFN"),
    ({"ffn": "magic"}, "ffn must be one of"),
    ({"model.d_modell": 32}, "unknown model key 'model.d_modell'"),
    ({"model.ffn.sparsity": 1}, "unknown model key 'model.ffn.sparsity'"),
    ({"model.n_heads": 5}, "not a multiple of n_heads"),
    ({"data.seq_len": 4096}, "exceeds the model's max_len"),
    ({"model.vocab_size": 128}, "byte-level text needs vocab_size >= 256"),
    ({"data.batch_size": 6, "mesh.fsdp": 4}, "not divisible by the mesh"),
    ({"mesh.data": 64, "data.batch_size": 64}, "needs 64 devices"),
    ({"data.path": "/nonexistent/corpus"}, "does not exist"),
    ({"data.val_fraction": 1.0}, "data.val_fraction must be in (0, 1)"),
    ({"checkpoint.keep": 0}, "checkpoint.keep must be >= 1"),
    ({"optim": 3}, "is a group"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[m for _, m in BAD])
def test_bad_configs_are_rejected(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=None) as err:
    loop.plan(from_preset("tiny", dict({"out_dir": str(tmp_path / "run")}, **overrides)))
  assert message in str(err.value)
  assert "\n" not in str(err.value)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  cfg = from_preset("tiny", {"out_dir": str(run_dir)})
  (run_dir / "config.json").write_text(json.dumps({"train": cfg.to_dict()}))
  with pytest.raises(ValueError, match="already holds a run"):
    loop.plan(cfg)
  loop.plan(config_lib.apply_overrides(cfg, {"overwrite": True}))
  loop.plan(config_lib.apply_overrides(cfg, {"checkpoint.resume": True, "log.every": 3, "mesh.data": 1}))
  with pytest.raises(ValueError, match="optim.lr"):
    loop.plan(config_lib.apply_overrides(cfg, {"checkpoint.resume": True, "optim.lr": 1e-4}))


def test_cli_rejects_before_computing(tmp_path, monkeypatch, capsys):
  def no_compute(*args, **kwargs):
    raise AssertionError("a rejected config must not build the model")
  monkeypatch.setattr(loop, "init_state", no_compute)
  out_dir = tmp_path / "run"
  for argv in (["--out", str(out_dir), "ffn=dense"], ["--out", str(out_dir), "--mesh", "data=3,fsdp=5"],
               ["--out", str(out_dir), "bogus"], ["--out", str(out_dir), "--mesh", "model=2"],
               ["--out", str(out_dir), "schedule.sparse=2.0"]):
    assert cli.main(argv) == 2, argv
    assert "jsparse-train: error:" in capsys.readouterr().err
  assert not out_dir.exists()
  assert cli.main(["--out", str(out_dir), "--check", "--steps", "50"]) == 0
  printed = capsys.readouterr().out
  assert "dense_warmup [0, 8)" in printed and "sparse [8, 33)" in printed and "dense_tail [33, 50)" in printed
  assert not os.path.exists(out_dir)
