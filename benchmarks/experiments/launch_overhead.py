"""What a Triton kernel costs inside a jitted JAX program beyond its own time.

Run on the GPU machine from the repository root::

  python benchmarks/experiments/launch_overhead.py [--json OUT]

* ``chain``: ``L`` dependent products ``y <- f(W_i, y)`` in one jitted
  function, with tiny ``W_i`` (``64 x 64``), so the kernels themselves take
  about a microsecond: the time per link is what XLA's runtime spends to
  launch one kernel of that kind. Kinds: the fused 4-bit gemv (a custom call
  through jax-triton), a dense ``jnp.dot`` (an XLA kernel), and a chain of
  XLA elementwise ops kept apart by data dependencies.
* ``big``: ``jlowbit.gemv_4bit`` on 8192 x 8192 and 28672 x 8192 NF4 weights in
  the JAX harness of ``benchmarks/timing.py`` (16 distinct weights per
  executable), to set beside the kernel's CUDA-event time from
  ``gemv_variants.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from timing import time_jax  # noqa: E402  pylint: disable=g-import-not-at-top

import jlowbit  # noqa: E402  pylint: disable=g-import-not-at-top


def chain_rows(links: int, impl: str | None = None) -> list[dict]:
  keys = jax.random.split(jax.random.key(0), links)
  dense = [jax.random.normal(k, (64, 64), jnp.float32) / 8 for k in keys]
  w4s = [jlowbit.quantize_4bit(w, block_size=64) for w in dense]
  x = jax.random.normal(jax.random.key(1), (64,), jnp.float32)

  def gemv_chain(ws):
    y = x
    for w4 in ws:
      y = jlowbit.gemv_4bit(y, w4, impl=impl)
    return y

  def dot_chain(ws):
    y = x
    for w in ws:
      y = jnp.dot(w, y, precision=jax.lax.Precision.HIGHEST)
    return y

  def elementwise_chain(ws):
    y = x
    for w in ws:  # a reduction per link keeps XLA from fusing the links
      y = jnp.tanh(y + jnp.sum(w[0]) * y[0])
    return y

  rows = []
  for name, fn, ws in (("gemv_4bit (jax-triton)", gemv_chain, w4s),
                       ("jnp.dot 64x64", dot_chain, dense),
                       ("elementwise + reduce", elementwise_chain, dense)):
    seconds = time_jax(fn, [(ws,)])
    rows.append(dict(test="chain", kind=name, links=links,
                     us_per_link=seconds / links * 1e6))
  return rows


def big_rows() -> list[dict]:
  rows = []
  for n, k in ((8192, 8192), (28672, 8192)):
    nbytes = n * k // 2 + 4 * n * k // 64
    copies = max(2, min(16, (200 << 20) // nbytes))
    keys = jax.random.split(jax.random.key(2), copies)
    w4s = [jlowbit.quantize_4bit(jax.random.normal(key, (n, k), jnp.bfloat16),
                                 block_size=64) for key in keys]
    x = jax.random.normal(jax.random.key(3), (k,), jnp.bfloat16)
    seconds = time_jax(lambda w4: jlowbit.gemv_4bit(x, w4), [(w,) for w in w4s])
    rows.append(dict(test="big", shape=f"{n}x{k}", us=seconds * 1e6,
                     TBps=nbytes / seconds / 1e12, copies=copies))
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--json")
  parser.add_argument("--links", type=int, default=200)
  args = parser.parse_args()
  rows = chain_rows(args.links) + big_rows()
  for row in rows:
    print(json.dumps(row))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
