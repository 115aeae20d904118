"""Where an optimizer step's time goes: wall clock vs GPU kernel time.

Run on an NVIDIA GPU from the repository root::

  python benchmarks/experiments/step_profile.py --case gpt2 --opt adamw_8bit
  ncu --clock-control none --profile-from-start off \
      --metrics gpu__time_duration.sum --csv \
      python benchmarks/experiments/step_profile.py --case gpt2 --opt adamw_8bit --profile

Without ``--profile``: the wall-clock median of a jitted, donated step (as in
``benchmarks/optim.py``) and the number of custom calls and fusions in the
compiled step. With ``--profile``: one step between ``cuProfilerStart`` and
``cuProfilerStop``, so that ``ncu`` lists the kernels of exactly one step
with their GPU durations.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optim import OPTIMIZERS, gpt2_small_shapes, jitted_steps, make_tree, time_steps  # noqa: E402  pylint: disable=g-import-not-at-top

CASES = {"gpt2": gpt2_small_shapes, "leaf128M": lambda: [(128 << 20,)],
         "leaf512M": lambda: [(512 << 20,)]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", choices=sorted(CASES), default="gpt2")
  parser.add_argument("--opt", choices=sorted(OPTIMIZERS), default="adamw_8bit")
  parser.add_argument("--profile", action="store_true")
  args = parser.parse_args()
  tx = OPTIMIZERS[args.opt][0]()
  params, grads = make_tree(CASES[args.case](), jax.numpy.float32)
  if args.profile:
    state = tx.init(params)
    step = jitted_steps(tx)
    for _ in range(3):
      params, state = step(params, state, grads)
    jax.block_until_ready(params)
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuProfilerStart()
    params, state = step(params, state, grads)
    jax.block_until_ready(params)
    cuda.cuProfilerStop()
    return
  state = tx.init(params)
  hlo = jitted_steps(tx).lower(params, state, grads).compile().as_text()
  calls = len(re.findall(r"custom-call\(", hlo))
  fusions = len(re.findall(r"= .*fusion\(", hlo))
  dispatch = _dispatch_seconds(params, state, grads)
  seconds, _ = time_steps(tx, params, grads)
  print(f"{args.case} {args.opt}: {seconds * 1e3:.3f} ms/step, "
        f"{calls} custom calls, {fusions} fusions in the compiled step, "
        f"{len(jax.tree.leaves((params, state, grads)))} argument buffers, "
        f"{dispatch * 1e3:.3f} ms to dispatch a step that does nothing "
        f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})", flush=True)


def _dispatch_seconds(params, state, grads, steps: int = 50) -> float:
  """Seconds per call of a donated jitted step that returns its inputs."""
  noop = jax.jit(lambda p, s, g: (p, s), donate_argnums=(0, 1))
  params, state = jax.tree.map(jax.numpy.copy, (params, state))
  params, state = jax.block_until_ready(noop(params, state, grads))
  start = time.perf_counter()
  for _ in range(steps):
    params, state = noop(params, state, grads)
  jax.block_until_ready(params)
  return (time.perf_counter() - start) / steps


if __name__ == "__main__":
  main()
