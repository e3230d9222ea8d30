"""The GEMM-only ceiling of each sparse FFN mode: its six fwd+bwd GEMMs alone vs the dense FFN's six, in one process.

A sparse FFN mode can be at most as fast, relative to the dense squared-ReLU FFN, as its GEMMs are: everything else
(selection, compression, the token permutation, the 95/5 split's dense rows, transposes) only adds time. This
benchmark measures that ceiling on the device with the operands compressed beforehand (not timed) and cuSPARSELt's
searched algorithms, and times the real modules' fwd+bwd (``benchmarks.ffn``) in the same rounds, so the report says
both how far each mode is from its ceiling and how much time a 1.25x goal leaves for all the non-GEMM work::

    budget = dense_ffn / 1.25 - gemms(mode)          (ms; negative: the goal is out of reach at any overhead)

The six GEMMs per mode (``x`` T x D, ``W1`` D x F, ``W2`` F x D; S = 2:4 on the sparse tensor cores, d = dense):

============  =====  =====  ========  ==========  ==========  ==========
mode          y1     out    dy2=dW2'  dx          dW1         dW2
============  =====  =====  ========  ==========  ==========  ==========
dense         d      d      d         d           d           d
act24         d      S(h)   d         S(dy1)      S(dy1^T)    S(h^T)
sste          S(W1)  S(W2)  d         d           d           d
sste+tok24    S(W1)  S(W2)  d         d           S(dy1^T)    S(h^T)
act24+sste    S(W1)  S(h)   d         S(dy1)      S(dy1^T)    S(h^T)
============  =====  =====  ========  ==========  ==========  ==========

(``dy2 = dout W2^T`` and ``dx = dy1 W1^T`` with S-STE weights stay dense: the weights are 2:4 along their contraction
axis of the forward only.) Run on the GPU::

  python -m benchmarks.ffn_bound --out $OUT/ffn_bound.json

Records: ``bench="ffn_gemm_bound"``, ``metric="time"``, ``baseline="dense_gemms"`` (the six dense GEMMs), ``ours`` the
mode's GEMMs; plus ``ffn_ms`` / ``dense_ffn_ms`` (the modules' fwd+bwd in the same rounds), ``ffn_ratio`` and
``budget_ms_at_goal``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from benchmarks import _util, ffn
from jsparse.kernels.sparse_matmul import api
from jsparse.kernels.sparse_matmul import reference as ref

# Per mode, the 2:4 operand of each GEMM (None: dense): y1 = x W1, out = h W2, dx = dy1 W1^T, dW1 = x^T dy1 and
# dW2 = h^T dout (dW1 and dW2 share one entry: token-wise 2:4 on dy1^T and h^T); dy2 = dout W2^T is always dense.
MODES = {
    "act24": dict(y1=None, out="h", dx="dy1", dw="tokens"),
    "sste": dict(y1="w1", out="w2", dx=None, dw=None),
    "sste+tok24": dict(y1="w1", out="w2", dx=None, dw="tokens"),
    "act24+sste": dict(y1="w1", out="h", dx="dy1", dw="tokens"),
}
GOAL = ffn.GOAL


def sparse_gemms(spec: dict) -> int:
  """How many of the six GEMMs run 2:4."""
  return sum(spec[k] is not None for k in ("y1", "out", "dx")) + (2 if spec["dw"] else 0)


def operands(T: int, D: int, F: int, dtype):
  """Dense operands: x, W1, W2, dout, h = relu(y)^2 and dy1 = g * relu(y) (the compress kernels prune them)."""
  ks = jax.random.split(jax.random.key(1), 6)
  x_TxD = jax.random.normal(ks[0], (T, D), jnp.float32).astype(dtype)
  w1_DxF = (jax.random.normal(ks[1], (D, F), jnp.float32) / D ** 0.5).astype(dtype)
  w2_FxD = (jax.random.normal(ks[2], (F, D), jnp.float32) / F ** 0.5).astype(dtype)
  dout_TxD = jax.random.normal(ks[3], (T, D), jnp.float32).astype(dtype)
  r_TxF = jnp.maximum(jax.random.normal(ks[4], (T, F), jnp.float32), 0.0)
  h_TxF = (r_TxF * r_TxF).astype(dtype)
  dy1_TxF = (jax.random.normal(ks[5], (T, F), jnp.float32) * r_TxF).astype(dtype)
  return x_TxD, w1_DxF, w2_FxD, dout_TxD, h_TxF, dy1_TxF


def gemm_functions(T: int, D: int, F: int, arrays) -> dict:
  """``{mode: jitted fn()}`` running the mode's six GEMMs on operands packed here (outside the timed call)."""
  from jsparse.kernels.cusparselt import ops

  x_TxD, w1_DxF, w2_FxD, dout_TxD, h_TxF, dy1_TxF = arrays
  search = api.search_mode()
  no_slot_F = jnp.full((F,), -1, jnp.int32)
  packed = dict(  # the sparse-A role matrices, compressed 2:4 along K (pruned by the kernels' own rules)
      h=ops.compress(h_TxF), dy1=ops.compress(dy1_TxF),
      hT=ops.compress_t(h_TxF, no_slot_F, 0)[0], dy1T=ops.compress_t(dy1_TxF, no_slot_F, 0)[0],
      w1T=ops.compress(w1_DxF.T), w2T=ops.compress(w2_FxD.T))
  w1T_FxD = w1_DxF.T  # the dense dx GEMM's B, row-major (the recipe transposes W1 once per step)
  packed, w1T_FxD = jax.block_until_ready((packed, w1T_FxD))

  def sparse_mm(a, b, m, k):
    return ops.matmul(a, b, m=m, k=k, mode=0, search=search)

  def make(spec):
    @jax.jit
    def run(x, w1, w2, dout, h, dy1, w1T, p):
      # mode 3: out (n, m) = dense @ A.T with A = W.T, the weight-sparse forward's layout (vjp.sparse_b_matmul)
      y1 = ops.matmul(p["w1T"], x, m=F, k=D, mode=3, search=search) if spec["y1"] else ref.matmul(x, w1)
      if spec["out"] == "w2":
        out = ops.matmul(p["w2T"], h, m=D, k=F, mode=3, search=search)
      elif spec["out"] == "h":
        out = sparse_mm(p["h"], w2, T, F)
      else:
        out = ref.matmul(h, w2)
      dy2 = ref.matmul(dout, w2.T)
      dx = sparse_mm(p["dy1"], w1T, T, F) if spec["dx"] else ref.matmul(dy1, w1.T)
      if spec["dw"]:
        dw1, dw2 = sparse_mm(p["dy1T"], x, F, T), sparse_mm(p["hT"], dout, F, T)
      else:
        dw1, dw2 = ref.matmul(dy1.T, x), ref.matmul(h.T, dout)
      return y1, out, dy2, dx, dw1, dw2

    return lambda: run(x_TxD, w1_DxF, w2_FxD, dout_TxD, h_TxF, dy1_TxF, w1T_FxD, packed)

  fns = {"dense": make(dict(y1=None, out=None, dx=None, dw=None))}
  fns.update({mode: make(flags) for mode, flags in MODES.items()})
  return fns


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--shapes", default="1b,7b")
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args(argv)
  ffn.use_searched_algorithms()
  dtype = jnp.bfloat16
  T = args.tokens
  modes = args.modes.split(",")
  records, rows = [], []
  for shape in args.shapes.split(","):
    D, F = ffn.SHAPES[shape]
    gemms = gemm_functions(T, D, F, operands(T, D, F, dtype))
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (T, D), jnp.float32).astype(dtype)
    g = jax.random.normal(kg, (T, D), jnp.float32).astype(dtype)
    fns = {f"gemms/{m}": gemms[m] for m in ["dense"] + modes}
    for mode in ["squared_relu"] + modes:
      _, fwd_bwd = ffn.functions(ffn.build(mode, None if mode == "squared_relu" else "cusparselt", D, F, dtype))
      fns[f"ffn/{mode}"] = (lambda fb: (lambda: fb(x, g)))(fwd_bwd)
    for fn in fns.values():
      jax.block_until_ready(fn())
    times = ffn.interleaved(fns, (), args.iters, args.rounds)
    dense_gemms, dense_ffn = times["gemms/dense"], times["ffn/squared_relu"]
    print(f"{shape}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()), flush=True)
    for mode in modes:
      ours, ffn_ms = times[f"gemms/{mode}"], times[f"ffn/{mode}"]
      config = dict(shape=shape, tokens=T, d_model=D, d_ff=F, dtype="bfloat16", mode=mode, pass_="fwd+bwd",
                    sparse_gemms=sparse_gemms(MODES[mode]), implementation="cusparselt",
                    cusparselt_search=os.environ["JSPARSE_CUSPARSELT_SEARCH"])
      budget = dense_ffn / GOAL - ours
      records.append(_util.record("ffn_gemm_bound", config=config, metric="time", baseline="dense_gemms", ours=ours,
                                  base=dense_gemms, ffn_ms=ffn_ms, dense_ffn_ms=dense_ffn,
                                  ffn_ratio=dense_ffn / ffn_ms, goal=GOAL, budget_ms_at_goal=budget))
      rows.append(dict(shape=shape, mode=mode, gemms_ms=ours, dense_gemms_ms=dense_gemms,
                       gemm_bound=dense_gemms / ours, ffn_ms=ffn_ms, dense_ffn_ms=dense_ffn,
                       ffn_ratio=dense_ffn / ffn_ms, budget_ms=budget))
    _util.write_results(args.out, records)
  print(f"\ndevice: {_util.device_name()}, T={T}, bf16; budget = dense FFN / {GOAL} - the mode's GEMMs")
  _util.print_table(rows, ["shape", "mode", "gemms_ms", "dense_gemms_ms", "gemm_bound", "ffn_ms", "dense_ffn_ms",
                           "ffn_ratio", "budget_ms"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
