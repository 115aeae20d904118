"""Launch configurations of the tiled tensor-core kernel at a Llama layer's shapes.

``TiledConfig.get_default`` was measured for 4 and 8 rows at 8192x8192 and
28672x8192 (``benchmarks/RESULTS.md``, session 9). At the smaller shapes of
a Llama-3-8B layer one row on a tiled weight runs 1.1-1.3x slower than the
gemv on the bitsandbytes layout (4096x4096: 10.5 vs 8.3 µs), which keeps
batch-1 decode on the bitsandbytes layout (224 vs 252 tok/s, session 12), and 16 rows
at 4096x4096 take 1.22x dense bf16. At 4096x4096 the default splits K 16
ways (4096 one-warp programs), and the float32 partial products are summed
by a second kernel after it. (A config the kernel cannot take is halved
where it does not fit: ``jlowbit.triton_kernels.mma4.matmul_4bit_tiled``.)

For each shape and row count this times every :class:`jlowbit.TiledConfig`
of the grid (``--split-k``, ``--num-warps``, ``--unroll``, ``--block-m``
for 9-16 rows): the kernel and the partial sum, GPU time from a profiler
trace (:func:`timing.time_jax_device`, all kernels of the call), over
``--copies`` distinct weights (nothing stays in L2); beside it the default
config, the bitsandbytes-layout kernel (one row: the gemv) and XLA's dense
bf16 product. Every config is first checked against the dense reference
(``err``). Run on the GPU machine from the repository root::

  python benchmarks/experiments/tiled_configs.py [--shapes 4096x4096 ...]
      [--rows 1 16] [--json OUT]

``--impl interpret --shapes 32x128 --rows 1 --split-k 1 2 --num-warps 1
--unroll 1`` is a (CPU) smoke run of the script (wall time).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
from timing import table, time_jax, time_jax_device  # noqa: E402

import jlowbit  # noqa: E402

# Llama-3-8B's projections (q/o, k/v, gate/up, down), fused q|k|v and
# gate|up, and the two large shapes of the issue.
SHAPES = ["4096x4096", "1024x4096", "6144x4096", "14336x4096", "4096x14336",
          "28672x4096", "8192x8192", "28672x8192"]


def _timer(impl: str | None):
  if impl == "interpret" or jax.default_backend() != "gpu":
    return time_jax
  return lambda fn, inputs: time_jax_device(fn, inputs, repeats=5)


def sweep(shape: str, rows: int, args) -> list[dict]:
  out_features, in_features = map(int, shape.split("x"))
  keys = jax.random.split(jax.random.key(out_features + in_features), args.copies)
  dense = [jax.random.normal(k, (out_features, in_features), jnp.bfloat16) * 0.02
           for k in keys]
  bnb = [jlowbit.quantize_4bit(w, block_size=64, quant_type="nf4") for w in dense]
  tiled = [jlowbit.tile_4bit(w4) for w4 in bnb]
  x = jax.random.normal(jax.random.key(rows), (rows, in_features), jnp.bfloat16)
  want = jlowbit.matmul_4bit(x, bnb[0], impl="xla").astype(jnp.float32)
  time = _timer(args.impl)
  base = dict(shape=shape, rows=rows)
  results = [dict(base, config="dense bf16",
                  us=1e6 * time(lambda w: x @ w.T, [(w,) for w in dense])),
             dict(base, config="bnb layout",
                  us=1e6 * time(lambda w4: jlowbit.matmul_4bit(x, w4, impl=args.impl),
                                [(w4,) for w4 in bnb]))]
  default = jlowbit.TiledConfig.get_default(out_features)
  grid = itertools.product(args.block_m if rows > 8 else [8], args.num_warps,
                           args.split_k, args.unroll)
  configs = [("default", default)] + [
      (f"m{m} w{w} s{s} u{u}", jlowbit.TiledConfig(block_m=m, num_warps=w,
                                                    split_k=s, unroll=u))
      for m, w, s, u in grid]
  for name, config in configs:
    fn = lambda w4, config=config: jlowbit.matmul_4bit(
        x, w4, impl=args.impl, config=config)
    got = fn(tiled[0]).astype(jnp.float32)
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    row = dict(base, config=name, us=1e6 * time(fn, [(w4,) for w4 in tiled]),
               err=err, ok=err < 1e-2, **dataclasses.asdict(config))
    results.append(row)
    print(json.dumps(row), flush=True)
  dense_us = results[0]["us"]
  for row in results:
    row["vs_dense"] = row["us"] / dense_us
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="+", default=SHAPES)
  parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
  parser.add_argument("--split-k", type=int, nargs="+", default=[1, 2, 4, 8, 16])
  parser.add_argument("--num-warps", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--unroll", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--block-m", type=int, nargs="+", default=[8, 16])
  parser.add_argument("--copies", type=int, default=8)
  parser.add_argument("--impl", choices=["triton", "interpret"])
  parser.add_argument("--json")
  args = parser.parse_args()
  rows, best = [], []
  for shape, n in itertools.product(args.shapes, args.rows):
    results = sweep(shape, n, args)
    rows += results
    tiled = [r for r in results[2:] if r["ok"]]
    fastest = min(tiled, key=lambda r: r["us"])
    best.append(dict(shape=shape, rows=n, dense_us=results[0]["us"],
                     bnb_us=results[1]["us"], default_us=results[2]["us"],
                     best_us=fastest["us"], best=fastest["config"],
                     best_vs_dense=fastest["vs_dense"],
                     best_vs_bnb=fastest["us"] / results[1]["us"]))
  print(table(best, list(best[0])))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, args=vars(args),
                     best=best, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
