"""The fused 8-bit optimizer kernel alone, against the HBM floor of its bytes.

Times :func:`jlowbit.triton_kernels.optim8.fused_update` on one leaf of N
parameters (random gradient, random 8-bit moments: the codes scatter over
the codebook as in training, unlike a constant gradient whose gathers all
hit one address), the median GPU time of the update kernel itself (from a
profiler trace, :func:`timing.time_jax_device` of the kernels named
``*update_kernel*``: not the copies XLA makes of the undonated
moments), for each value of ``optim8.ELEMENTS_PER_THREAD`` and of
``optim8.TILE_ELEMENTS`` (elements per program) given, and prints the bytes
the kernel moves per parameter (gradient read, codes read and written,
direction written where the kernel writes it; absmax left out) and the
fraction of the device's HBM bandwidth that reaches. Run on the GPU
machine from the repository root::

  python benchmarks/experiments/optim8_kernel.py [--size 512M]
      [--elements-per-thread 8 16] [--tile-elements 1024 2048] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
from timing import hbm_tbps, table, time_jax_device  # noqa: E402

from jlowbit import algorithms  # noqa: E402
from jlowbit import codebooks  # noqa: E402
from jlowbit import update8  # noqa: E402
from jlowbit.triton_kernels import optim8  # noqa: E402

BLOCK_SIZE = 256
CASES = {
    "adam": ([0.9, 0.999, 1e-8, 10.0, 1.2], None),
    "ademamix": ([0.9, 0.999, 0.9999, 5.0, 1e-8, 10.0, 1.2], (False, True, False)),
    "ademamix(nearest)": ([0.9, 0.999, 0.9999, 5.0, 1e-8, 10.0, 1.2], None),
    "lion": ([0.9, 0.99], None),
    "momentum": ([0.9, 0.0], None),
}


def _inputs(algorithm: str, n: int, dtype, seed: int):
  keys = jax.random.split(jax.random.key(seed), 4)
  grad = (1e-2 * jax.random.normal(keys[0], (n,))).astype(dtype)
  moments = []
  for i, signed in enumerate(algorithms.ALGORITHMS[algorithm].signed):
    x = jax.random.normal(keys[i + 1], (n,))
    x = 1e-2 * x if signed else 1e-4 * x * x
    moments.append(update8.quantize_rows_reference(
        x, codebooks.dynamic(signed), BLOCK_SIZE))
  return grad, tuple(moments)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="512M")
  parser.add_argument("--elements-per-thread", type=int, nargs="+", default=[8, 16])
  parser.add_argument("--tile-elements", type=int, nargs="+",
                      default=[optim8.TILE_ELEMENTS],
                      help="elements per program (optim8.TILE_ELEMENTS): "
                      "fewer warps per program, more programs per SM")
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
  parser.add_argument("--json")
  args = parser.parse_args()
  n = int(args.size[:-1]) << {"K": 10, "M": 20, "G": 30}[args.size[-1]]
  rows = []
  for name in args.cases:
    hyper, stochastic = CASES[name]
    algorithm = name.split("(")[0]
    k = len(algorithms.ALGORITHMS[algorithm].moments)
    stochastic = stochastic or (False,) * k
    hyper = jnp.asarray(hyper, jnp.float32)
    keys = jnp.arange(1, dtype=jnp.uint32)
    for dtype in args.dtypes:
      write = update8.writes_direction(algorithm, dtype)
      inputs = [_inputs(algorithm, n, dtype, seed) for seed in range(2)]
      itemsize = jnp.dtype(dtype).itemsize
      moved = itemsize * (1 + write) + 2 * k  # bytes per parameter
      for per_thread, tile in itertools.product(args.elements_per_thread,
                                                args.tile_elements):
        if tile < 32 * per_thread:
          continue  # less than one warp
        optim8.ELEMENTS_PER_THREAD, optim8.TILE_ELEMENTS = per_thread, tile

        def step(grad, moments):
          return optim8.fused_update(
              algorithm, [grad], [moments], hyper, keys, [(0, False)],
              block_size=BLOCK_SIZE, impl="triton", stochastic=stochastic,
              write_direction=write)

        seconds = time_jax_device(step, inputs, kernel="update_kernel")
        rows.append(dict(case=name, dtype=dtype, elements_per_thread=per_thread,
                         tile_elements=max(tile, BLOCK_SIZE),
                         ms=seconds * 1e3, bytes_per_param=moved,
                         tb_per_s=moved * n / seconds / 1e12,
                         pct_hbm=100 * moved * n / seconds / 1e12 / hbm_tbps()))
        print(table(rows[-1:], list(rows[-1])), flush=True)
  print(table(rows, list(rows[0])))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, n=n, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
