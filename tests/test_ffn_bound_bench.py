"""benchmarks/ffn_bound.py times the GEMMs it claims to: on a small shape, every mode's six products equal the dense
products of the operands pruned 2:4 along the axis its table says (GPU: the sparse GEMMs are cuSPARSELt's)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from benchmarks import ffn_bound as bench


def _f32(a):
  return np.asarray(jnp.asarray(a, jnp.float32))


@pytest.mark.gpu
def test_each_mode_runs_its_table_of_sparse_and_dense_gemms(monkeypatch):
  monkeypatch.setenv("JSPARSE_CUSPARSELT_SEARCH", "0")  # the default algorithm: the products are what is checked
  T, D, F = 256, 128, 256
  arrays = bench.operands(T, D, F, jnp.bfloat16)
  x, w1, w2, dout, h, dy1 = (_f32(a) for a in arrays)
  fns = bench.gemm_functions(T, D, F, arrays)
  assert set(fns) == {"dense", *bench.MODES}

  def pruned(a, axis):
    return _f32(jsparse.nm_prune(jnp.asarray(a, jnp.bfloat16), 2, 4, axis=axis))

  def expected(spec):
    y1 = x @ (pruned(w1, 0) if spec["y1"] else w1)
    out = {"w2": h @ pruned(w2, 0), "h": pruned(h, 1) @ w2, None: h @ w2}[spec["out"]]
    dx = (pruned(dy1, 1) if spec["dx"] else dy1) @ w1.T
    dw1 = (pruned(dy1, 0) if spec["dw"] else dy1).T @ x
    dw2 = (pruned(h, 0) if spec["dw"] else h).T @ dout
    return y1, out, dout @ w2.T, dx, dw1, dw2

  specs = {"dense": dict(y1=None, out=None, dx=None, dw=None), **bench.MODES}
  for mode, spec in specs.items():
    got = fns[mode]()
    for name, g, e in zip(("y1", "out", "dy2", "dx", "dW1", "dW2"), got, expected(spec)):
      scale = np.max(np.abs(e))
      assert np.max(np.abs(_f32(g) - e)) <= 2e-2 * scale, (mode, name)
  assert [bench.sparse_gemms(bench.MODES[m]) for m in ("act24", "sste", "sste+tok24", "act24+sste")] == [4, 2, 4, 5]
