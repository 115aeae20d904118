"""Written direction vs direction from the state: the optimizer step both ways.

``jlowbit.update8.writes_direction`` picks, per algorithm and gradient
dtype, whether the 8-bit kernel writes the update direction or leaves it to
an XLA fusion that recomputes it from the step's old state inside
``optax.apply_updates``. A recomputed direction does not depend on the
kernel, so the two can run at once on the GPU. This times the step (per
call and ``in_jit``, as ``benchmarks/optim.py``) with each choice and
traces one in-jit call: the sum of the kernels' durations against the time
the GPU was busy (their union) shows whether they overlapped.

Run on an NVIDIA GPU from the repository root::

  python benchmarks/experiments/direction_choice.py --optimizers adamw_8bit \
      --dtypes bfloat16 --shapes 512M gpt2
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optim import OPTIMIZERS, gpt2_small_shapes, jitted_steps, make_tree, time_steps  # noqa: E402  pylint: disable=g-import-not-at-top
from timing import gpu_busy, table, traced_events  # noqa: E402  pylint: disable=g-import-not-at-top

from jlowbit import update8  # noqa: E402  pylint: disable=g-import-not-at-top

ALGORITHM = {"adamw_8bit": "adam", "ademamix_8bit": "ademamix",
             "ademamix_8bit(nearest)": "ademamix", "lion_8bit": "lion",
             "sgd_8bit": "momentum"}
SHAPES = {"512M": lambda: [(512 << 20,)], "128M": lambda: [(128 << 20,)],
          "1M": lambda: [(1 << 20,)],
          "gpt2": gpt2_small_shapes}


def _gpu_busy(tx, params, grads, steps: int = 10) -> tuple[float, float, int]:
  """:func:`timing.gpu_busy` per step of ``steps`` unrolled steps in one
  jitted call."""
  run = jitted_steps(tx, steps)
  params, state = jax.block_until_ready(run(params, tx.init(params), grads))
  events, _ = traced_events(lambda: jax.block_until_ready(run(params, state, grads)))
  kernels, busy, streams = gpu_busy(events)
  return kernels / steps, busy / steps, streams


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--optimizers", nargs="+", choices=sorted(ALGORITHM),
                      default=["adamw_8bit"])
  parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
  parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["512M"])
  parser.add_argument("--json")
  args = parser.parse_args()
  rows = []
  for shape, dtype in [(s, d) for s in args.shapes for d in args.dtypes]:
    tree = lambda: make_tree(SHAPES[shape](), jnp.dtype(dtype))  # noqa: E731
    anchors = {OPTIMIZERS[name][2] for name in args.optimizers}
    for name in sorted(anchors) + args.optimizers:
      algorithm = ALGORITHM.get(name)
      choices = ("written", "from state") if algorithm else ("",)
      for choice in choices:
        if algorithm:
          kept = update8._DIRECTION_FROM_STATE[algorithm]  # pylint: disable=protected-access
          others = tuple(d for d in kept if d != jnp.dtype(dtype).name)
          update8._DIRECTION_FROM_STATE[algorithm] = (  # pylint: disable=protected-access
              others + (jnp.dtype(dtype).name,) if choice == "from state" else others)
        try:
          tx = OPTIMIZERS[name][0]()
          seconds, _ = time_steps(tx, *tree())
          in_jit, _ = time_steps(tx, *tree(), in_jit=True)
          kernels, busy, streams = _gpu_busy(tx, *tree())
        finally:
          if algorithm:
            update8._DIRECTION_FROM_STATE[algorithm] = kept  # pylint: disable=protected-access
        rows.append(dict(shape=shape, dtype=jnp.dtype(dtype).name, optimizer=name,
                         direction=choice, ms=seconds * 1e3, ms_in_jit=in_jit * 1e3,
                         kernel_ms=kernels * 1e3, busy_ms=busy * 1e3, streams=streams))
        print(table(rows[-1:], list(rows[-1])), flush=True)
  print(table(rows, list(rows[0])))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
