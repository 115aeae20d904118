"""Launch configurations of the fused parameter step (``update_and_apply``).

The kernel that writes the parameters moves 16 bytes a float32 AdamW
parameter where the update alone moves 8, so the elements per thread and
the tile that suited the update (``optim8.ELEMENTS_PER_THREAD``,
``optim8.TILE_ELEMENTS``; optimizer run 8) may not suit it
(``optim8.APPLY_TILE_ELEMENTS``). This times the
jitted, donated ``lowbit.update_and_apply`` step (``optim.time_steps``,
median of 10 x 10 steps; ``--unfused``: ``tx.update`` then
``optax.apply_updates``) for each ``elements_per_thread x tile`` pair.

Run on an NVIDIA GPU from the repository root::

  python benchmarks/experiments/apply_configs.py --optimizers adamw_8bit \
      --dtypes float32 --configs 8x2048 4x2048 16x4096
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optim import OPTIMIZERS, make_tree, time_steps  # noqa: E402  pylint: disable=g-import-not-at-top
from timing import hbm_tbps, table  # noqa: E402  pylint: disable=g-import-not-at-top

from jlowbit.triton_kernels import optim8  # noqa: E402  pylint: disable=g-import-not-at-top

# Bytes a parameter the fused step moves at least, by the params' itemsize.
STATE_BYTES = {"adamw_8bit": 4, "ademamix_8bit": 6, "lion_8bit": 2, "sgd_8bit": 2}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--optimizers", nargs="+", choices=sorted(STATE_BYTES),
                      default=["adamw_8bit"])
  parser.add_argument("--dtypes", nargs="+", default=["float32"])
  parser.add_argument("--size", default="512M")
  parser.add_argument("--configs", nargs="+", default=["8x2048", "4x2048", "16x4096"],
                      help="ELEMENTS_PER_THREADxTILE_ELEMENTS")
  parser.add_argument("--unfused", action="store_true")
  parser.add_argument("--json")
  args = parser.parse_args()
  n = int(args.size[:-1]) << 20
  rows = []
  for dtype in args.dtypes:
    itemsize = jnp.dtype(dtype).itemsize
    for name in args.optimizers:
      for config in args.configs:
        per_thread, tile = map(int, config.split("x"))
        optim8.ELEMENTS_PER_THREAD = per_thread
        optim8.TILE_ELEMENTS = optim8.APPLY_TILE_ELEMENTS = tile
        seconds, _ = time_steps(OPTIMIZERS[name][0](), *make_tree([(n,)], dtype),
                                fused=not args.unfused)
        traffic = 3 * itemsize + STATE_BYTES[name]
        row = dict(optimizer=name, dtype=dtype, fused=not args.unfused,
                   per_thread=per_thread, tile=tile,
                   ms=seconds * 1e3,
                   pct_hbm=100 * traffic * n / seconds / 1e12 / hbm_tbps())
        rows.append(row)
        print(table([row], list(row)), flush=True)
  print()
  print(table(rows, list(rows[0])))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
