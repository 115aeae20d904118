"""Small-batch 4-bit product: split K against tile sizes, timed in JAX.

``jlowbit.matmul_4bit`` with explicit ``SmallBatchConfig``s at 4 and 16 rows
(kernel time from a profiler trace, partial-sum reduction included) beside
dense bf16 ``x @ W.T``::

  python benchmarks/experiments/small_split.py [--json OUT]
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jlowbit  # noqa: E402
from timing import time_jax_device  # noqa: E402  pylint: disable=g-import-not-at-top

SHAPES = [(4096, 4096), (11008, 4096), (8192, 8192), (28672, 8192)]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--json")
  args = parser.parse_args()
  rows_out = []
  for n, k in SHAPES:
    copies = max(2, 8 * 4096 * 4096 // (n * k))
    keys = jax.random.split(jax.random.key(1), copies)
    weights = [jax.random.normal(key, (n, k), jnp.bfloat16) * 0.02 for key in keys]
    w4s = [jlowbit.quantize_4bit(w, block_size=64) for w in weights]
    for m in (4, 16):
      x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
      dense = time_jax_device(lambda w, x=x: x @ w.T, [(w,) for w in weights])
      for block_n, split_k, warps in [(32, 1, 4), (32, 2, 4), (32, 4, 4),
                                      (32, 8, 4), (16, 4, 4), (16, 8, 4),
                                      (64, 4, 4), (64, 8, 8), (32, 4, 8)]:
        config = jlowbit.SmallBatchConfig(block_n=block_n, split_k=split_k,
                                          num_warps=warps)
        t = time_jax_device(
            lambda w4, x=x, config=config: jlowbit.matmul_4bit(x, w4, config=config),
            [(w4,) for w4 in w4s])
        row = dict(shape=f"{n}x{k}", rows=m, block_n=block_n, split_k=split_k,
                   warps=warps, us=t * 1e6, dense_us=dense * 1e6,
                   vs_dense=t / dense)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    del weights, w4s
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, rows=rows_out), f, indent=1)
  print("\nbest per shape and rows:")
  for shape in dict.fromkeys(r["shape"] for r in rows_out):
    for m in (4, 16):
      cands = [r for r in rows_out if r["shape"] == shape and r["rows"] == m]
      best = min(cands, key=lambda r: r["us"])
      print(f"{shape:>11} m{m:<3} n{best['block_n']} s{best['split_k']} w{best['warps']}"
            f" {best['us']:7.1f} us  dense {best['dense_us']:7.1f} us  x{best['vs_dense']:.2f}")


if __name__ == "__main__":
  main()
