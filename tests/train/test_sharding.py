"""Multi-device: the FSDP rule, mesh parsing, and the sharded run on 8 fake CPU devices against one device."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jsparse.train import sharding
from jsparse.train.config import MeshConfig
from tests.train._util import QUICK, REPO, subprocess_env


def test_parse_mesh():
  assert sharding.parse_mesh("data=2,fsdp=4") == MeshConfig(data=2, fsdp=4)
  assert sharding.parse_mesh("fsdp=8") == MeshConfig(data=1, fsdp=8)
  for bad in ("model=2", "data=two", "data"):
    with pytest.raises(ValueError, match="--mesh"):
      sharding.parse_mesh(bad)


def test_fsdp_rule():
  assert sharding.array_spec((256, 64), 4) == P("fsdp", None)
  assert sharding.array_spec((64, 256), 4) == P(None, "fsdp")
  assert sharding.array_spec((6, 10), 4) == P()
  assert sharding.array_spec((), 4) == P()
  assert sharding.array_spec((256, 64), 1) == P()


_CHILD = r"""
import json, sys
import jax
from jax.sharding import PartitionSpec as P
from jsparse.train import config as C, loop, checkpoint
assert jax.device_count() == 8, jax.devices()
base = json.loads(sys.argv[1])
out = {}
for name, mesh in (("one", {}), ("eight", {"mesh.data": 2, "mesh.fsdp": 4})):
  cfg = C.from_preset("tiny", dict(base, out_dir=sys.argv[2] + "/" + name, **mesh))
  result = loop.train(cfg)
  flat, _, _ = checkpoint.flatten_state(__import__("flax").nnx.state(result.model))
  specs = {k: str(v.sharding.spec) for k, v in flat.items()}
  out[name] = {"losses": result.losses, "val": result.val_losses, "specs": specs,
               "devices": sorted({d.id for v in flat.values() for d in v.sharding.device_set}),
               "traces": {str(k): v for k, v in result.traces.items()}}
print("RESULT" + json.dumps(out))
"""


def test_sharded_training_matches_one_device(tmp_path_factory):
  run_root = tmp_path_factory.mktemp("sharded")
  # optim.eps=1e-4: with Adam's default 1e-8, float32 rounding noise in gradient components that are ~0 (the
  # entries the 2:4 masks drop) is normalised into full-size updates, which hides the comparison below in noise.
  overrides = dict(QUICK, **{"ffn": "act24", "steps": 8, "schedule.dense_warmup": 2, "schedule.sparse": 4,
                             "checkpoint.every": 0, "log.every": 1, "log.eval_every": 0, "optim.eps": 1e-4})
  env = subprocess_env(str(tmp_path_factory.mktemp("jax_cache_sharded")), devices=8)
  proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(overrides), str(run_root)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT", 1)[1])
  one, eight = result["one"], result["eight"]
  assert one["devices"] == [0] and eight["devices"] == list(range(8))
  # Parameters (and optimizer moments) are really sharded over fsdp; the batch is split over all 8 devices.
  sharded = [k for k, s in eight["specs"].items() if "fsdp" in s]
  assert any(k.endswith("w1") for k in sharded) and any(k.endswith("w2") for k in sharded)
  assert any("embed" in k for k in sharded)
  assert eight["traces"] == one["traces"] == {"('train', False, True)": 1, "('train', True, True)": 1,
                                              "('eval', False, False)": 1, "('eval', True, False)": 1}
  # Same numbers up to float32 reduction order (the SPMD program sums partial products in another order).
  assert len(one["losses"]) == len(eight["losses"]) == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5, atol=0)
  np.testing.assert_allclose(eight["val"][-1][1], one["val"][-1][1], rtol=1e-5)
