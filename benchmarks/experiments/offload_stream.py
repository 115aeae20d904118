"""Can XLA stream host-resident optimizer state through the GPU in chunks?

The design question behind chunked offload (issue 13): ``offload_state``
today moves the whole state to the device inside the step, so the step's
peak device memory is the same as without offload. Streaming needs XLA to
(1) move *part* of a ``pinned_host`` array to the device, (2) write a
device result back into part of a (donated) host array, and (3) keep only a
few chunks on the device at a time. This script tries each way of writing
that in JAX, each in a fresh process, on a toy "optimizer": uint8 state
``s`` of shape ``[L, R, C]`` in host memory, float32 gradients ``g`` on the
device, ``s' = s + round(g)``, ``d = g * s'`` (the direction, returned like
optax updates). Per variant: whether it compiles and runs, the result
checked against the unchunked one, the compiled step's planned device bytes,
the process's peak device bytes, and the median step time::

  python benchmarks/experiments/offload_stream.py [--gb 8] [--chunks 8]

Variants:

* ``whole``: ``device_put`` the whole state in, compute, ``device_put`` out
  (today's ``offload_state``);
* ``slices``: static slices of the host array moved in chunk by chunk,
  written back by ``.at[j].set`` of a host-moved chunk into the donated
  host array;
* ``slices+barrier``: the same with ``lax.optimization_barrier`` tying
  chunk ``j + 1``'s transfer in to chunk ``j - 1``'s result (at most about
  two chunks in flight);
* ``pieces``: the state stored as a tuple of per-chunk host arrays (no
  slicing of host arrays), chunks moved in and out one by one, with the
  barrier chain.
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

VARIANTS = ("whole", "slices", "slices+barrier", "pieces")


def _step_math(s, g):
  new = (s.astype(jnp.int32) + jnp.round(g).astype(jnp.int32)) & 255
  new = new.astype(jnp.uint8)
  return new, g * new.astype(jnp.float32)


def make_step(variant: str, chunks: int):
  device, host = jax.memory.Space.Device, jax.memory.Space.Host

  def whole(s, g):
    new, d = _step_math(jax.device_put(s, device), g)
    return jax.device_put(new, host), d

  def sliced(s, g, barrier):
    n = s.shape[0] // chunks
    ds, done = [], []
    for j in range(chunks):
      src = s[j * n:(j + 1) * n]
      if barrier and j >= 2:
        src, _ = jax.lax.optimization_barrier((src, done[j - 2]))
      new, d = _step_math(jax.device_put(src, device), g[j * n:(j + 1) * n])
      back = jax.device_put(new, host)
      done.append(back)
      ds.append(d)
    for j, back in enumerate(done):
      s = s.at[j * n:(j + 1) * n].set(back)
    return s, jnp.concatenate(ds)

  def pieces(s, g):
    n = g.shape[0] // chunks
    out, ds = [], []
    for j, piece in enumerate(s):
      if j >= 2:
        piece, _ = jax.lax.optimization_barrier((piece, out[j - 2]))
      new, d = _step_math(jax.device_put(piece, device), g[j * n:(j + 1) * n])
      out.append(jax.device_put(new, host))
      ds.append(d)
    return tuple(out), jnp.concatenate(ds)

  return {"whole": whole,
          "slices": lambda s, g: sliced(s, g, False),
          "slices+barrier": lambda s, g: sliced(s, g, True),
          "pieces": pieces}[variant]


def run_variant(variant: str, gb: float, chunks: int, steps: int) -> dict:
  dev = jax.devices()[0]
  host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
  layers, cols = 4 * chunks, 4096
  rows = max(1, int(gb * 1e9 / (layers * cols)))
  shape = (layers, rows, cols)
  g = jax.random.normal(jax.random.key(0), shape, jnp.float32) * 3
  s = jnp.full(shape, 7, jnp.uint8)
  want_s, want_d = jax.jit(_step_math)(s, g)
  want_s, want_d = np.asarray(want_s[:, :8]), np.asarray(want_d[:, :8])
  n = layers // chunks
  if variant == "pieces":
    s = tuple(jax.device_put(s[j * n:(j + 1) * n], host) for j in range(chunks))
  else:
    s = jax.device_put(s, host)
  row = dict(variant=variant, state_gb=np.prod(shape) / 1e9, chunks=chunks)
  step = jax.jit(make_step(variant, chunks), donate_argnums=0)
  try:
    compiled = step.lower(s, g).compile()
    stats = compiled.memory_analysis()
    row["planned_device_gb"] = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                                - stats.alias_size_in_bytes + stats.temp_size_in_bytes) / 1e9
    row["planned_temp_gb"] = stats.temp_size_in_bytes / 1e9
    s, d = step(s, g)
    got_s = np.concatenate([np.asarray(p) for p in s]) if variant == "pieces" else np.asarray(s)
    row["correct"] = bool(np.array_equal(got_s[:, :8], want_s)
                          and np.array_equal(np.asarray(d[:, :8]), want_d))
    kinds = {p.sharding.memory_kind for p in (s if variant == "pieces" else (s,))}
    row["state_memory_kinds"] = sorted(kinds)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      s, d = step(s, g)
      jax.block_until_ready((s, d))
      times.append(time.perf_counter() - start)
    row["step_ms"] = statistics.median(times) * 1e3
    row["link_gbps"] = 2 * row["state_gb"] / (row["step_ms"] / 1e3)
    mem = dev.memory_stats() or {}
    row["peak_device_gb"] = mem.get("peak_bytes_in_use", 0) / 1e9
    row["ok"] = True
  except Exception as e:  # pylint: disable=broad-except
    row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:400]}")
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gb", type=float, default=8.0, help="state bytes / 1e9")
  parser.add_argument("--chunks", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
  parser.add_argument("--one", help=argparse.SUPPRESS)
  parser.add_argument("--json")
  args = parser.parse_args()
  if args.one:
    print("ROW " + json.dumps(run_variant(args.one, args.gb, args.chunks, args.steps)))
    return
  rows = []
  for variant in args.variants:
    result = subprocess.run(
        [sys.executable, __file__, "--one", variant, "--gb", str(args.gb),
         "--chunks", str(args.chunks), "--steps", str(args.steps)],
        capture_output=True, text=True, check=False)
    lines = [l for l in result.stdout.splitlines() if l.startswith("ROW ")]
    row = (json.loads(lines[0][4:]) if lines else
           dict(variant=variant, ok=False, error=result.stderr[-600:]))
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
