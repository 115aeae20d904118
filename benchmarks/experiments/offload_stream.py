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
      [--variants ...] [--donate-grads] [--json out.json]

(On a CPU, e.g. ``--gb 0.05``, it runs too: the CPU backend has a
``pinned_host`` memory kind, though its memory analysis need not match a
GPU's.)

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
  barrier chain;
* ``scan``: a ``lax.scan`` over the chunk index (a loop XLA cannot unroll
  or hoist transfers out of) whose body ``lax.dynamic_slice``-s chunk ``j``
  of the host array, moves it to the device, updates it and
  ``lax.dynamic_update_slice``-s the host-moved result back into the carried
  (donated) host array; the direction is the scan's stacked output;
* ``scan+prefetch``: the same with chunk ``j + 1`` moved in during
  iteration ``j`` and carried on the device (double buffering: its transfer
  can overlap chunk ``j``'s compute and write-back);
* ``scan+inplace``: ``scan`` with the direction written over the (donated,
  carried) gradient instead of a new stacked output, as an optimizer that
  must not allocate a second parameter-sized buffer would;
* ``scan+xs``: the pattern of XLA's offloaded activations: the host state
  (reshaped to ``[chunks, ...]``) is the scan's ``xs`` (each iteration reads
  its slice, moves it in) and the new state its ``ys`` moved to the host (a
  new host array: twice the state on the host during the step, none of it
  aliased);
* ``scan+xs+prefetch``: ``scan+xs`` with chunk ``j + 1`` of the old state
  moved in during iteration ``j`` (double buffering);
* ``scan+pairs``: both directions of the host link at once. In one host
  array, reading chunk ``j + 1`` before chunk ``j`` is written back makes
  XLA copy the whole array every iteration (``scan+prefetch``;
  ``benchmarks/RESULTS.md`` section 4, run 3). Here the state is two host
  arrays, the even chunks and the odd ones; a loop iteration updates chunks
  ``2k`` and ``2k + 1``: chunk ``2k + 1`` is read from the odd array while
  chunk ``2k`` is written into the even one, and chunk ``2k + 2`` is read
  from the even array (after that write) while chunk ``2k + 1`` is written
  into the odd one. Every read and write of one array is ordered by data,
  so nothing needs copying; the direction is written over the donated
  gradient.

Each row also counts ``state_copies``: copies of a whole state array in the
compiled step. On the CPU backend (jax 0.10) every scan variant has two,
``scan`` included, whose H200 time (run 2) shows the GPU copies nothing:
only a GPU's count tells.

``--donate-grads`` donates the gradient to every variant (``scan+inplace``
always donates it); then each timed step feeds the previous direction in as
the gradient.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ("whole", "slices", "slices+barrier", "pieces", "scan",
            "scan+prefetch", "scan+inplace", "scan+xs", "scan+xs+prefetch",
            "scan+pairs")
# Variants whose state is a tuple of host arrays, and the ones that write the
# direction over the (donated) gradient.
SPLIT_STATE = ("pieces", "scan+pairs")
IN_PLACE = ("scan+inplace", "scan+pairs")


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

  def scanned(s, g, prefetch, inplace):
    n = s.shape[0] // chunks
    take = lambda x, j: jax.lax.dynamic_slice_in_dim(x, j * n, n, 0)
    put = lambda x, y, j: jax.lax.dynamic_update_slice_in_dim(x, y, j * n, 0)
    fetch = lambda s, j: jax.device_put(take(s, j), device)

    def body(carry, j):
      s, g, ahead = carry
      current = ahead if prefetch else fetch(s, j)
      if prefetch:  # chunk j + 1 (the last iteration fetches chunk 0 again)
        ahead = fetch(s, (j + 1) % chunks)
      new, d = _step_math(current, take(g, j))
      s = put(s, jax.device_put(new, host), j)
      if inplace:
        return (s, put(g, d, j), ahead), None
      return (s, g, ahead), d

    ahead = fetch(s, 0) if prefetch else None
    (s, g, _), ds = jax.lax.scan(body, (s, g, ahead), jnp.arange(chunks))
    return s, (g if inplace else ds.reshape(g.shape))

  def scanned_xs(s, g, prefetch):
    n = s.shape[0] // chunks
    stack = lambda x: x.reshape((chunks, n) + x.shape[1:])
    fetch = lambda s, j: jax.device_put(
        jax.lax.dynamic_index_in_dim(s, j, 0, keepdims=False), device)

    def body(ahead, xs):
      if prefetch:  # reads the old state (a loop invariant) one chunk ahead
        j, g_j = xs
        current, ahead = ahead, fetch(s_stacked, (j + 1) % chunks)
      else:
        s_j, g_j = xs
        current = jax.device_put(s_j, device)
      new, d = _step_math(current, g_j)
      return ahead, (jax.device_put(new, host), d)

    s_stacked = stack(s)
    ahead = fetch(s_stacked, 0) if prefetch else None
    xs = (jnp.arange(chunks) if prefetch else s_stacked, stack(g))
    _, (new, ds) = jax.lax.scan(body, ahead, xs)
    return new.reshape(s.shape), ds.reshape(g.shape)

  def pairs(s, g):
    even, odd = s
    n = g.shape[0] // chunks
    take = lambda x, j: jax.lax.dynamic_slice_in_dim(x, j * n, n, 0)
    put = lambda x, y, j: jax.lax.dynamic_update_slice_in_dim(x, y, j * n, 0)
    fetch = lambda x, j: jax.device_put(take(x, j), device)

    def update(x, g, current, k, j):
      new, d = _step_math(current, take(g, j))
      return put(x, jax.device_put(new, host), k), put(g, d, j)

    def body(carry, k):
      even, odd, g, here = carry  # here: chunk 2k, read last iteration
      ahead = fetch(odd, k)  # chunk 2k + 1, while chunk 2k goes out
      even, g = update(even, g, here, k, 2 * k)
      # Chunk 2k + 2 (the last iteration reads chunk 0 again, unused), from
      # the even array as just written, while chunk 2k + 1 goes out.
      here = fetch(even, (k + 1) % (chunks // 2))
      odd, g = update(odd, g, ahead, k, 2 * k + 1)
      return (even, odd, g, here), None

    (even, odd, g, _), _ = jax.lax.scan(
        body, (even, odd, g, fetch(even, 0)), jnp.arange(chunks // 2))
    return (even, odd), g

  return {"whole": whole,
          "scan+pairs": pairs,
          "scan+xs": lambda s, g: scanned_xs(s, g, False),
          "scan+xs+prefetch": lambda s, g: scanned_xs(s, g, True),
          "slices": lambda s, g: sliced(s, g, False),
          "slices+barrier": lambda s, g: sliced(s, g, True),
          "pieces": pieces,
          "scan": lambda s, g: scanned(s, g, False, False),
          "scan+prefetch": lambda s, g: scanned(s, g, True, False),
          "scan+inplace": lambda s, g: scanned(s, g, False, True)}[variant]


def _memory_row(stats) -> dict:
  """The compiled step's planned bytes (``memory_analysis()``), in GB."""
  gb = lambda name: getattr(stats, name, 0) / 1e9
  row = {f"planned_{k}_gb": gb(f"{k}_size_in_bytes")
         for k in ("argument", "output", "alias", "temp", "host_argument",
                   "host_output", "host_alias", "host_temp")}
  row["planned_device_gb"] = (row["planned_argument_gb"] + row["planned_output_gb"]
                              - row["planned_alias_gb"] + row["planned_temp_gb"])
  return row


def run_variant(variant: str, gb: float, chunks: int, steps: int,
                donate_grads: bool = False) -> dict:
  dev = jax.devices()[0]
  host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
  layers, cols = 4 * chunks, 4096
  rows = max(1, int(gb * 1e9 / (layers * cols)))
  shape = (layers, rows, cols)
  g = jax.random.normal(jax.random.key(0), shape, jnp.float32) * 3
  s = jnp.full(shape, 7, jnp.uint8)
  want_s, want_d = jax.jit(_step_math)(s, g)
  # Copies (np.array), so that no numpy view keeps a reference to a buffer
  # a later step donates ("Donation requested for buffer with external
  # reference").
  want_s, want_d = np.array(want_s[:, :8]), np.array(want_d[:, :8])
  n = layers // chunks
  if variant == "pieces":
    s = tuple(jax.device_put(s[j * n:(j + 1) * n], host) for j in range(chunks))
  elif variant == "scan+pairs":
    if chunks % 2:
      raise ValueError(f"scan+pairs needs an even --chunks, got {chunks}")
    by_chunk = s.reshape((chunks // 2, 2, n) + s.shape[1:])
    s = tuple(jax.device_put(by_chunk[:, i].reshape((-1,) + s.shape[1:]), host)
              for i in (0, 1))
  else:
    s = jax.device_put(s, host)
  donate_grads = donate_grads or variant in IN_PLACE
  row = dict(variant=variant, state_gb=np.prod(shape) / 1e9, chunks=chunks,
             grads_gb=4 * np.prod(shape) / 1e9, donate_grads=donate_grads,
             backend=dev.platform)
  step = jax.jit(make_step(variant, chunks),
                 donate_argnums=(0, 1) if donate_grads else 0)
  try:
    compiled = step.lower(s, g).compile()
    stats = compiled.memory_analysis()
    if stats is not None:
      row.update(_memory_row(stats))
    hlo = compiled.as_text()
    row["hlo_while_loops"] = hlo.count(" while(")
    state_shapes = {",".join(map(str, p.shape))
                    for p in (s if variant in SPLIT_STATE else (s,))}
    row["state_copies"] = sum(
        1 for line in hlo.splitlines()
        if re.search(r"= u8\[(%s)\]\S* copy\(" % "|".join(state_shapes), line))
    s, d = step(s, g)
    pieces = s if variant in SPLIT_STATE else (s,)
    got_s = np.concatenate([np.array(p[:, :8]) for p in pieces])
    if variant == "scan+pairs":  # back to chunk order
      got_s = np.stack([p.reshape((chunks // 2, n) + p.shape[1:])
                        for p in np.split(got_s, 2)], 1).reshape(want_s.shape)
    row["correct"] = bool(np.array_equal(got_s, want_s)
                          and np.array_equal(np.array(d[:, :8]), want_d))
    row["state_memory_kinds"] = sorted({p.sharding.memory_kind for p in pieces})
    del got_s, pieces
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      s, d = step(s, d if donate_grads else g)
      jax.block_until_ready((s, d))
      times.append(time.perf_counter() - start)
    row["step_ms"] = statistics.median(times) * 1e3
    row["link_gbps"] = 2 * row["state_gb"] / (row["step_ms"] / 1e3)
    mem = dev.memory_stats() or {}
    if "peak_bytes_in_use" in mem:
      row["peak_device_gb"] = mem["peak_bytes_in_use"] / 1e9
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
  parser.add_argument("--donate-grads", action="store_true")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  parser.add_argument("--json")
  args = parser.parse_args()
  if args.one:
    print("ROW " + json.dumps(run_variant(args.one, args.gb, args.chunks,
                                          args.steps, args.donate_grads)))
    return
  rows = []
  for variant in args.variants:
    result = subprocess.run(
        [sys.executable, __file__, "--one", variant, "--gb", str(args.gb),
         "--chunks", str(args.chunks), "--steps", str(args.steps)]
        + (["--donate-grads"] if args.donate_grads else []),
        capture_output=True, text=True, check=False)
    lines = [l for l in result.stdout.splitlines() if l.startswith("ROW ")]
    row = (json.loads(lines[0][4:]) if lines else
           dict(variant=variant, ok=False, error=result.stderr[-600:]))
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                     args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
