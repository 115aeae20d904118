"""Small-batch 4-bit product: split K against tile sizes, timed in JAX.

``jlowbit.matmul_4bit`` with explicit ``SmallBatchConfig``s at 4 and 16 rows
(kernel time from a profiler trace, partial-sum reduction included) beside
dense bf16 ``x @ W.T``. ``--prefill`` instead launches the fused kernel
itself at 256 and 1024 rows with large tiles (``matmul_4bit`` sends more
than 16 rows to dequantize + dense product): does dequantizing in registers
beat writing the bf16 weight to HBM and reading it back?::

  python benchmarks/experiments/small_split.py [--prefill] [--json OUT]
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jlowbit  # noqa: E402
from jlowbit.triton_kernels import gemv4  # noqa: E402
from timing import time_jax_device  # noqa: E402  pylint: disable=g-import-not-at-top

SHAPES = [(4096, 4096), (11008, 4096), (8192, 8192), (28672, 8192)]
# (block_m, block_n, block_k, num_warps, num_stages) for 256+ rows.
PREFILL_TILES = [(64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
                 (128, 128, 64, 8, 3), (128, 128, 128, 8, 3),
                 (128, 256, 64, 8, 3), (64, 128, 128, 4, 4)]


def prefill_rows(n: int, k: int, weights, w4s) -> list[dict]:
  """The fused kernel at 256 and 1024 rows (large tiles) vs dense bf16 and
  vs ``matmul_4bit`` (dequantize + dense product)."""
  rows_out = []
  for m in (256, 1024):
    x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
    dense = time_jax_device(lambda w, x=x: x @ w.T, [(w,) for w in weights])
    unfused = time_jax_device(lambda w4, x=x: jlowbit.matmul_4bit(x, w4),
                              [(w4,) for w4 in w4s])
    for block_m, block_n, block_k, warps, stages in PREFILL_TILES:
      def fused(w4, x=x, block_m=block_m, block_n=block_n, block_k=block_k,
                warps=warps, stages=stages):
        return gemv4.matmul_4bit_small(
            x, w4.packed, w4.quant_map, w4.absmax, None, n, w4.block_size,
            "triton", block_m=block_m, block_n=block_n, block_k=block_k,
            num_warps=warps, num_stages=stages, split_k=1)
      try:
        t = time_jax_device(fused, [(w4,) for w4 in w4s])
      except Exception as e:  # pylint: disable=broad-except
        print(f"{n}x{k} m{m} tile {block_m}x{block_n}x{block_k} failed: {e!r}"[:500])
        continue
      y, want = fused(w4s[0]), jlowbit.matmul_4bit(x, w4s[0])
      err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - want.astype(jnp.float32)))
                  / jnp.max(jnp.abs(want.astype(jnp.float32))))
      row = dict(shape=f"{n}x{k}", rows=m, tile=f"{block_m}x{block_n}x{block_k}"
                 f" w{warps} st{stages}", us=t * 1e6, dense_us=dense * 1e6,
                 unfused_us=unfused * 1e6, vs_dense=t / dense, err=err)
      rows_out.append(row)
      print(json.dumps(row), flush=True)
  return rows_out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--json")
  parser.add_argument("--prefill", action="store_true")
  args = parser.parse_args()
  rows_out = []
  for n, k in SHAPES:
    copies = max(2, 8 * 4096 * 4096 // (n * k))
    keys = jax.random.split(jax.random.key(1), copies)
    weights = [jax.random.normal(key, (n, k), jnp.bfloat16) * 0.02 for key in keys]
    w4s = [jlowbit.quantize_4bit(w, block_size=64) for w in weights]
    if args.prefill:
      rows_out += prefill_rows(n, k, weights, w4s)
      del weights, w4s
      continue
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
  if args.prefill:
    for shape in dict.fromkeys(r["shape"] for r in rows_out):
      for m in (256, 1024):
        cands = [r for r in rows_out if r["shape"] == shape and r["rows"] == m
                 and r["err"] < 1e-2]
        if cands:
          best = min(cands, key=lambda r: r["us"])
          print(f"{shape:>11} m{m:<5} {best['tile']:>22} {best['us']:7.1f} us  "
                f"dense {best['dense_us']:7.1f}  unfused {best['unfused_us']:7.1f}"
                f"  x{best['vs_dense']:.2f}")
    return
  for shape in dict.fromkeys(r["shape"] for r in rows_out):
    for m in (4, 16):
      cands = [r for r in rows_out if r["shape"] == shape and r["rows"] == m]
      best = min(cands, key=lambda r: r["us"])
      print(f"{shape:>11} m{m:<3} n{best['block_n']} s{best['split_k']} w{best['warps']}"
            f" {best['us']:7.1f} us  dense {best['dense_us']:7.1f} us  x{best['vs_dense']:.2f}")


if __name__ == "__main__":
  main()
