"""The optimizer step alone with ``offload_state(..., chunks=N)``: planned
device bytes, peak, step time, agreement with the non-offloaded step.

Parameters like a transformer's (issue 13): a stacked block leaf
``[layers, width, 4 * width]`` and an embedding ``[vocab, width]``, float32;
``jlowbit.adamw_8bit``. The jitted step (parameters and state donated) makes
a gradient from the parameters (an intermediate, as in training), runs the
optimizer and applies the update. Configurations, each in a fresh process:

* ``device``: no offload (state in device memory);
* ``offload``: ``offload_state(tx)`` (whole state moved in and out);
* ``chunks=N``: ``offload_state(tx, chunks=N)``.

::

  python benchmarks/experiments/offload_chunks.py [--layers 32] [--width 4096]
      [--chunks 4 8 32] [--json out.json]

(``--layers 4 --width 256 --vocab 1000`` runs on a CPU.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlowbit


def make_tx(config: str):
  tx = jlowbit.adamw_8bit(1e-3, weight_decay=0.1)
  if config == "device":
    return tx
  if config == "offload":
    return jlowbit.offload_state(tx)
  return jlowbit.offload_state(tx, chunks=int(config.removeprefix("chunks=")))


def _memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  gb = lambda name: getattr(stats, name, 0) / 1e9
  row = {f"planned_{k}_gb": gb(f"{k}_size_in_bytes")
         for k in ("argument", "output", "alias", "temp", "host_argument",
                   "host_output", "host_alias", "host_temp")}
  row["planned_device_gb"] = (row["planned_argument_gb"] + row["planned_output_gb"]
                              - row["planned_alias_gb"] + row["planned_temp_gb"])
  return row


def run(config: str, layers: int, width: int, vocab: int, steps: int) -> dict:
  tx = make_tx(config)
  params = {"blocks": jnp.zeros((layers, width, 4 * width), jnp.float32),
            "embed": jnp.zeros((vocab, width), jnp.float32)}
  n = sum(p.size for p in jax.tree.leaves(params))
  row = dict(config=config, params=n, params_gb=4 * n / 1e9, layers=layers,
             width=width, vocab=vocab)

  @jax.jit
  def setup(key):
    keys = jax.random.split(key, 2)
    p = {k: jax.random.normal(kk, v.shape, jnp.float32) * 0.02
         for kk, (k, v) in zip(keys, sorted(params.items()))}
    return p, tx.init(p)

  def step(params, state, t):
    grads = jax.tree.map(lambda p: jnp.sin(p * 50.0 + t) * 1e-2, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  try:
    params, state = setup(jax.random.key(0))
    row["state_gb"] = sum(l.nbytes for l in jax.tree.leaves(state)) / 1e9
    compiled = step.lower(params, state, jnp.float32(0)).compile()
    row.update(_memory(compiled))
    row["hlo_while_loops"] = compiled.as_text().count(" while(")
    params, state = step(params, state, jnp.float32(0))
    jax.block_until_ready(params)
    times = []
    for i in range(steps):
      start = time.perf_counter()
      params, state = step(params, state, jnp.float32(i + 1))
      jax.block_until_ready((params, state))
      times.append(time.perf_counter() - start)
    row["step_ms"] = statistics.median(times) * 1e3
    row["state_memory_kinds"] = sorted({
        l.sharding.memory_kind for l in jax.tree.leaves(state) if l.ndim})
    # A fingerprint of the result, to compare configurations.
    row["checksum"] = {k: float(jnp.sum(jnp.abs(v))) for k, v in params.items()}
    row["sample"] = np.asarray(params["blocks"][-1, 0, :8]).tolist()
    codes = state[0].mu.codes if config == "device" else state[0].mu.codes
    row["codes_checksum"] = {k: int(jnp.sum(jax.device_put(
        v, jax.memory.Space.Device).astype(jnp.int32))) for k, v in codes.items()}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      row["peak_device_gb"] = stats["peak_bytes_in_use"] / 1e9
    row["ok"] = True
  except Exception as e:  # pylint: disable=broad-except
    row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:400]}")
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--width", type=int, default=4096)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--chunks", type=int, nargs="*", default=[4, 8, 32])
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--configs", nargs="+",
                      help="run these configurations only (e.g. device "
                      "'chunks=8'; one per run when dumping with "
                      "XLA_FLAGS=--xla_dump_to=..., as every process "
                      "numbers its modules from 0)")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  parser.add_argument("--json")
  args = parser.parse_args()
  if args.one:
    print("ROW " + json.dumps(run(args.one, args.layers, args.width,
                                  args.vocab, args.steps)), flush=True)
    return
  configs = ["device", "offload"] + [f"chunks={c}" for c in args.chunks]
  configs = args.configs or configs
  rows = []
  for config in configs:
    result = subprocess.run(
        [sys.executable, __file__, "--one", config, "--layers", str(args.layers),
         "--width", str(args.width), "--vocab", str(args.vocab),
         "--steps", str(args.steps)], capture_output=True, text=True, check=False)
    lines = [l for l in result.stdout.splitlines() if l.startswith("ROW ")]
    row = (json.loads(lines[0][4:]) if lines else
           dict(config=config, ok=False, error=result.stderr[-800:]))
    if rows and row.get("ok") and rows[0].get("ok"):
      row["max_rel_diff_vs_device"] = max(
          abs(a - b) / max(abs(b), 1e-30)
          for a, b in zip(row["sample"], rows[0]["sample"]))
      row["codes_equal_device"] = row["codes_checksum"] == rows[0]["codes_checksum"]
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                     args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
