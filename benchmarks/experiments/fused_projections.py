"""Would fusing a Llama layer's 4-bit projections speed up batch-1 decode?

A Llama-3-8B decoder layer makes seven 4-bit matvecs per token: q, k, v (one
input), o, gate, up (one input), down. Decode (``benchmarks/decode.py``)
streams ~4.98 GB a token at 1.2 TB/s (``benchmarks/RESULTS.md``, issue 12),
well below what the gemv reaches on large weights, and the small weights
are the slow ones: 4096x4096 runs at ~20% of HBM, 28672x8192 at ~39%.
Concatenating q, k and v (6144x4096) and gate and up (28672x4096) along the
output features would make five launches into two larger ones per layer.
The bytes are the same (with block 64 dividing the 4096 inputs, the fused
weight's blocks are the separate weights' blocks), so only launch count and
per-launch efficiency change.

For each layout (``bnb``, ``tiled``) and row count, this times the two
groups and a whole layer's seven (or, fused, four) products, separate
against fused, over ``--copies`` distinct weight sets (nothing stays in
L2): ``kernel_us``, the GPU time of the kernels (a profiler trace,
:func:`timing.time_jax_device`), and ``wall_us``, the jitted call's wall
time per set (:func:`timing.time_jax`: the launch gaps that decode's in-jit
loop also pays). Run on the GPU machine from the repository root::

  python benchmarks/experiments/fused_projections.py [--rows 1 4]
      [--layouts bnb tiled] [--copies 4] [--json OUT]

``--tiny`` (shapes / 32, ``impl="xla"``, wall time only) runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
from timing import hbm_tbps, table, time_jax, time_jax_device  # noqa: E402

import jlowbit  # noqa: E402

HIDDEN, KV, INTERMEDIATE = 4096, 1024, 14336  # Llama-3-8B
# Separate products -> fused ones; each entry (out_features, in_features).
GROUPS = {
    "qkv": ([(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN)],
            [(HIDDEN + 2 * KV, HIDDEN)]),
    "gate_up": ([(INTERMEDIATE, HIDDEN)] * 2, [(2 * INTERMEDIATE, HIDDEN)]),
}
# o and down are single products either way.
LAYER_REST = [(HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE)]
GROUPS["layer"] = (GROUPS["qkv"][0] + GROUPS["gate_up"][0] + LAYER_REST,
                   GROUPS["qkv"][1] + GROUPS["gate_up"][1] + LAYER_REST)


def _weights(shapes, layout: str, copies: int, scale: int, seed: int):
  """``copies`` sets of NF4 weights (block 64) of ``shapes`` / ``scale``."""
  sets = []
  for c in range(copies):
    keys = jax.random.split(jax.random.key(seed * 1000 + c), len(shapes))
    sets.append(tuple(
        jlowbit.quantize_4bit(
            jax.random.normal(k, (o // scale, i // scale), jnp.bfloat16) * 0.02,
            block_size=64, quant_type="nf4", layout=layout)
        for k, (o, i) in zip(keys, shapes)))
  return sets


def _products(x_by_input: dict, impl: str):
  """The group's products: each weight times the ``x`` of its input width."""
  def run(*weights):
    return [jlowbit.matmul_4bit(x_by_input[w.shape[1]], w, impl=impl)
            for w in weights]
  return run


def measure(group: str, layout: str, rows: int, copies: int, tiny: bool,
            impl: str) -> list[dict]:
  scale = 32 if tiny else 1
  out = []
  for form, shapes in zip(("separate", "fused"), GROUPS[group]):
    sets = _weights(shapes, layout, copies, scale, seed=len(shapes))
    widths = {i // scale for _, i in shapes}
    x_by_input = {w: jax.random.normal(jax.random.key(w), (rows, w), jnp.bfloat16)
                  for w in widths}
    fn = _products(x_by_input, impl)
    nbytes = sum(o * i // scale**2 // 2 + 4 * o * i // scale**2 // 64
                 for o, i in shapes)
    row = dict(group=group, form=form, layout=layout, rows=rows,
               products=len(shapes), weight_MB=nbytes / 1e6,
               wall_us=1e6 * time_jax(fn, sets))
    if not tiny:
      row["kernel_us"] = 1e6 * time_jax_device(fn, sets)
      row["kernel_TBps"] = nbytes / (row["kernel_us"] / 1e6) / 1e12
      row["kernel_pct_hbm"] = 100 * row["kernel_TBps"] / hbm_tbps()
    out.append(row)
  for key in ("wall_us", "kernel_us"):
    if key in out[0]:
      out[1][f"{key}_fused_vs_separate"] = out[1][key] / out[0][key]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, nargs="+", default=[1])
  parser.add_argument("--layouts", nargs="+", choices=["bnb", "tiled"],
                      default=["bnb", "tiled"])
  parser.add_argument("--groups", nargs="+", choices=sorted(GROUPS),
                      default=["qkv", "gate_up", "layer"])
  parser.add_argument("--copies", type=int, default=4)
  parser.add_argument("--tiny", action="store_true",
                      help="CPU smoke test: shapes / 32, impl='xla', wall time")
  parser.add_argument("--json")
  args = parser.parse_args()
  impl = "xla" if args.tiny else None
  rows = []
  for layout in args.layouts:
    for n in args.rows:
      for group in args.groups:
        for row in measure(group, layout, n, args.copies, args.tiny, impl):
          rows.append(row)
          print(json.dumps(row), flush=True)
  columns = ["group", "form", "layout", "rows", "products", "weight_MB",
             "wall_us", "kernel_us", "kernel_pct_hbm",
             "kernel_us_fused_vs_separate", "wall_us_fused_vs_separate"]
  print(table(rows, [c for c in columns if any(c in r for r in rows)]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, args=vars(args),
                     rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
