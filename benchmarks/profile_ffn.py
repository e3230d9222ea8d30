"""Where an FFN mode's time goes: GPU kernel time per kernel, from a JAX profiler trace (no nsys needed).

Runs the jitted fwd or fwd+bwd of ``benchmarks.ffn``'s modules a few times under ``jax.profiler.trace`` with a
Perfetto trace, sums the device events by kernel name (and the XLA op that launched them, where the trace says) and
prints the largest. ``--out DIR`` also keeps one JSON per (mode, implementation, pass). The cuSPARSELt algorithm
search is on, as in ``benchmarks.ffn``.

  python -m benchmarks.profile_ffn --modes squared_relu/xla,act24/cusparselt --shape 1b --out $OUT/prof
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

from benchmarks import ffn


def device_events(trace_dir: str) -> list[dict]:
  """The complete ("X") events of the trace's GPU processes."""
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise RuntimeError(f"profile_ffn: no perfetto trace under {trace_dir}")
  with gzip.open(sorted(paths)[-1]) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {pid for pid, name in procs.items() if "GPU" in name or "gpu" in name}
  if not gpu:
    print(f"profile_ffn: no GPU process in the trace (processes: {sorted(procs.values())})", file=sys.stderr)
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu]


def summarize(events: list[dict], calls: int) -> list[dict]:
  """Per kernel: total microseconds per call, launches per call, the XLA op(s) named in the event args."""
  total = collections.defaultdict(float)
  count = collections.Counter()
  ops = collections.defaultdict(set)
  for e in events:
    name = e["name"]
    total[name] += float(e.get("dur", 0.0))
    count[name] += 1
    args = e.get("args", {})
    for key in ("hlo_op", "long_name", "tf_op"):
      if key in args:
        ops[name].add(str(args[key])[:120])
  rows = [dict(kernel=k, us_per_call=total[k] / calls, launches_per_call=count[k] / calls, ops=sorted(ops[k])[:4])
          for k in total]
  return sorted(rows, key=lambda r: -r["us_per_call"])


def profile(fn, args, calls: int) -> list[dict]:
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
    return summarize(device_events(tmp), calls)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--modes", default="squared_relu/xla,act24/cusparselt", help="mode/implementation,...")
  p.add_argument("--shape", default="1b")
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--passes", default="fwd+bwd")
  p.add_argument("--calls", type=int, default=3)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  ffn.use_searched_algorithms()
  D, F = ffn.SHAPES[args.shape]
  dtype = jnp.bfloat16
  kx, kg = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (args.tokens, D), jnp.float32).astype(dtype)
  g = jax.random.normal(kg, (args.tokens, D), jnp.float32).astype(dtype)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  for entry in args.modes.split(","):
    mode, impl = entry.split("/")
    module = ffn.build(mode, None if impl == "default" else impl, D, F, dtype)
    fwd, fwd_bwd = ffn.functions(module)
    for pass_ in args.passes.split(","):
      fn, call_args = (fwd, (x,)) if pass_ == "fwd" else (fwd_bwd, (x, g))
      rows = profile(fn, call_args, args.calls)
      total = sum(r["us_per_call"] for r in rows)
      print(f"\n== {args.shape} {pass_} {mode}/{impl}: {total / 1e3:.3f} ms of kernels per call, "
            f"{sum(r['launches_per_call'] for r in rows):.0f} launches", flush=True)
      for r in rows[:args.top]:
        print(f"  {r['us_per_call']:9.1f} us  x{r['launches_per_call']:<4.0f} {r['kernel'][:90]}  {r['ops']}")
      if args.out:
        tag = f"{args.shape}_{pass_}_{mode}_{impl}".replace("/", "_").replace("+", "p")
        with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
          json.dump(dict(total_us=total, rows=rows), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
