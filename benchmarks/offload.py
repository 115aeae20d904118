"""Largest GPT-style model whose training step fits: optax AdamW vs 8-bit vs 8-bit + offload.

Run on a GPU (random weights and tokens, nothing is downloaded)::

  python benchmarks/offload.py [--width 4096] [--depths 8 16 24 32 40 48]
      [--batch 1] [--seq 1024] [--fsdp] [--json offload.json]

and as a CPU smoke test (a tiny model; with ``--fsdp`` over 8 host devices,
which the script asks XLA for before JAX starts)::

  python benchmarks/offload.py --tiny [--fsdp]

The model is :mod:`gpt` (``benchmarks/gpt.py``): width 4096, 128-wide
heads, scanned and rematerialized blocks, float32 parameters, bfloat16
compute. One training step is ``jax.jit``-ed with parameters and state
donated: loss and gradients, the optimizer's update,
``optax.apply_updates``.

``--fsdp``: FSDP over all the process's devices (one process per host, all
its GPUs in one mesh with an ``AxisType.Explicit`` axis ``"fsdp"``, so that
the 8-bit kernels see the shardings and update shard by shard):
parameters, gradients and optimizer state sharded along each matrix's
largest leading axis (:func:`gpt.fsdp_specs`; the state by
``jlowbit.state_shardings``, also the step's ``out_shardings``), the batch
too (``--batch`` is per device), weights gathered in bfloat16 layer by
layer for the matmuls (:func:`gpt.fsdp_loss`).

Rows, per optimizer and depth (depths are tried in ascending order until
one does not fit in device memory):

* ``optax adamw``: ``optax.adamw``, float32 moments (16 bytes per parameter
  with the parameters and gradients);
* ``jlowbit adamw_8bit``: 8-bit moments (~10 bytes per parameter);
* ``jlowbit adamw_8bit + offload``: the same state kept in ``pinned_host``
  memory between steps by ``jlowbit.offload_state`` (~8 bytes per parameter
  on the device between steps);
* ``jlowbit adamw_8bit + offload(chunks=N)``: ``offload_state(...,
  chunks=N)``: the 8-bit moments streamed through the device ``N`` slices
  of each leaf's leading axis at a time (a loop), so that only about
  ``1 / N`` of the state is on the device during the update (``--chunks``,
  default 8).

Each row: ``step_s``, the median wall time of ``--steps`` steps after one
untimed (compiling) step; ``step_device_gb``, the compiled step's planned
bytes per device; ``peak_device_gb``, the largest of the devices' peak
bytes in use (``peak_device_gb_each``: per device; each configuration runs
in a fresh process); ``state_bytes_per_param``, the bytes of optimizer
state the first device holds (its shards, in whichever memory
``state_memory_kinds`` names) per parameter of the model;
``collectives``, the compiled step's collective instructions by kind and
element type (static counts: FSDP gathers bfloat16 weights and
reduce-scatters their gradients, XLA:CPU in float32; a ``u8`` gather would
be 8-bit state);
``update_collectives``, those of the optimizer's update compiled alone with
the step's shardings (none: the update is shard-local); ``wall_s``, the
configuration's whole time. The summary: the largest model per optimizer,
step times against optax's and state bytes per parameter at the deepest
model optax fits.

Multi-GPU runs (issue 15), on ``nvidia-h200-x2`` from the repository
root with ``.whl/jax_triton-0.3.1-py3-none-any.whl`` carried (the wheel
``/work/shared/gpu/prepare.sh`` downloads), one command per call (each
within the 10-minute limit; the JSON is rewritten after every row)::

  python3 -m pip install -q --no-deps .whl/*.whl && PYTHONPATH=. python3 -m pytest -x -q -m gpu tests/test_optax_sharding.py && PYTHONPATH=. python3 -m pytest -x -q tests/test_optax_sharding.py
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=.; python3 -m pip install -q --no-deps .whl/*.whl; python3 benchmarks/offload.py --fsdp --batch 8 --steps 2 --depths 40 --json $OUT/fsdp2_d40.json
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=.; python3 -m pip install -q --no-deps .whl/*.whl; python3 benchmarks/offload.py --fsdp --batch 8 --steps 2 --optimizers "optax adamw" --chunks --depths 64 72 80 88 --json $OUT/fsdp2_optax.json
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=.; python3 -m pip install -q --no-deps .whl/*.whl; python3 benchmarks/offload.py --fsdp --batch 8 --steps 2 --optimizers "jlowbit adamw_8bit" --chunks --depths 96 104 112 120 --json $OUT/fsdp2_8bit.json
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=.; python3 -m pip install -q --no-deps .whl/*.whl; python3 benchmarks/offload.py --fsdp --batch 8 --steps 2 --optimizers --chunks 8 --depths 120 128 136 144 152 --json $OUT/fsdp2_stream.json

On ``nvidia-h200-x4``: the same commands with ``fsdp4_*.json`` and the
depths ``40``; ``120 128 136 144 152`` (optax); ``176 184 192 200 208``
(8-bit); ``224 240 256 272`` (streamed offload). The depths bracket each
optimizer's limit as estimated from the single-H200 run
(``benchmarks/RESULTS.md`` section 4: 16.9 bytes per parameter at the
step's peak for optax, 12.0 for 8-bit; the parameters' share divided by
the devices) and from planned bytes of the FSDP steps compiled for host
devices; a list whose first depth does not fit needs a lower start. The
depth-40 run (8.18B parameters, the largest model optax fits on one H200)
times all four optimizers on one model: step time against optax, state
bytes per parameter (target <= 2.05 / devices). The whole offload
(``jlowbit adamw_8bit + offload``) plans the 8-bit peak (RESULTS section
4), so it is timed there and not searched.
"""

from __future__ import annotations

import os
import re
import sys

if "--tiny" in sys.argv and "--fsdp" in sys.argv:
  # Eight host devices for the CPU smoke test, before JAX starts (this
  # replaces a count set by a caller, such as tests/conftest.py's 9).
  os.environ["XLA_FLAGS"] = " ".join(
      [re.sub(r"--xla_force_host_platform_device_count=\d+", "",
              os.environ.get("XLA_FLAGS", "")).strip(),
       "--xla_force_host_platform_device_count=8"]).strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import contextlib
import dataclasses
import gc
import json
import statistics
import subprocess
import time

import jax
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jlowbit

import gpt
from gpt import Shape


def optimizers() -> dict:
  return {
      "optax adamw": lambda: optax.adamw(1e-4, weight_decay=0.1),
      "jlowbit adamw_8bit": lambda: jlowbit.adamw_8bit(1e-4, weight_decay=0.1),
      "jlowbit adamw_8bit + offload": lambda: jlowbit.offload_state(
          jlowbit.adamw_8bit(1e-4, weight_decay=0.1)),
  }


_STREAMED = re.compile(r"jlowbit adamw_8bit \+ offload\(chunks=(\d+)\)")


def streamed_name(chunks: int) -> str:
  return f"jlowbit adamw_8bit + offload(chunks={chunks})"


def make_optimizer(name: str) -> optax.GradientTransformation:
  """An optimizer of :func:`optimizers`, or a streamed offload
  (:func:`streamed_name`)."""
  if name in optimizers():
    return optimizers()[name]()
  match = _STREAMED.fullmatch(name)
  if match is None:
    raise ValueError(f"unknown optimizer {name!r}")
  return jlowbit.offload_state(jlowbit.adamw_8bit(1e-4, weight_decay=0.1),
                               chunks=int(match.group(1)))


def _out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _memory(compiled) -> dict:
  """The compiled step's planned memory: device bytes (arguments, outputs
  not aliased to donated arguments, temporaries) and host bytes."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  device = (stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  host = (getattr(stats, "host_argument_size_in_bytes", 0)
          + getattr(stats, "host_temp_size_in_bytes", 0))
  return dict(step_device_gb=device / 1e9, step_host_gb=host / 1e9)


_COLLECTIVE = re.compile(
    r"= \(?(\w+)\[[^\n]*? (all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\(")


def collectives(hlo: str) -> dict[str, int]:
  """Collective instructions of compiled HLO text by kind and element type
  (``"all-gather bf16": 3``; an async pair counts once)."""
  counts: dict[str, int] = {}
  for match in _COLLECTIVE.finditer(hlo):
    key = f"{match.group(2)} {match.group(1)}"
    counts[key] = counts.get(key, 0) + 1
  return dict(sorted(counts.items()))


def _state_bytes(state, device) -> int:
  """Bytes of ``state``'s shards on ``device`` (any memory kind)."""
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
             for shard in leaf.addressable_shards if shard.device == device)


def _fsdp_shardings(tx, shape: Shape, mesh, specs: dict) -> tuple:
  """``(params, state)`` shardings of FSDP over ``mesh``: the parameters'
  by ``specs``, the state's from ``jlowbit.state_shardings``."""
  abstract = jax.tree.map(
      lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                           sharding=NamedSharding(mesh, spec)),
      jax.eval_shape(lambda: gpt.init_params(shape, jax.random.key(0))), specs)
  return (jax.tree.map(lambda x: x.sharding, abstract),
          jlowbit.state_shardings(tx, abstract))


def run_one(name: str, shape: Shape, batch: int, seq: int, steps: int,
            fsdp: bool = False) -> dict:
  """One optimizer at one depth: fits or not, median step time; ``fsdp``:
  FSDP over all devices with ``batch`` sequences per device."""
  begin = time.perf_counter()
  tx = make_optimizer(name)
  devices = jax.devices() if fsdp else jax.devices()[:1]
  row = dict(optimizer=name, width=shape.width, depth=shape.depth,
             params=shape.params, devices=len(devices),
             batch=batch * len(devices), fits=False, step_s=None, error=None)
  tokens = jax.random.randint(jax.random.key(1), (batch * len(devices), seq),
                              0, shape.vocab)
  if fsdp:
    mesh = jax.make_mesh((len(devices),), (gpt.FSDP,), devices=devices,
                         axis_types=(AxisType.Explicit,))
    specs = gpt.fsdp_specs(shape, len(devices))
    loss_fn = gpt.fsdp_loss(mesh, specs, shape.heads)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P(gpt.FSDP)))
    setup_shardings = _fsdp_shardings(tx, shape, mesh, specs)
    step_shardings = (*setup_shardings, NamedSharding(mesh, P()))
    context = jax.set_mesh(mesh)
  else:
    specs = setup_shardings = step_shardings = None
    loss_fn = lambda params, tokens: gpt.loss_fn(params, tokens, shape.heads)
    context = contextlib.nullcontext()

  def setup(key):
    params = gpt.init_params(shape, key, specs)
    return params, tx.init(params)

  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  setup = jax.jit(setup, out_shardings=setup_shardings)
  step = jax.jit(step, donate_argnums=(0, 1), out_shardings=step_shardings)
  params = state = None
  try:
    with context:
      params, state = setup(jax.random.key(0))
      compiled = step.lower(params, state, tokens).compile()
      row.update(_memory(compiled))
      if fsdp:
        update = jax.jit(tx.update).lower(params, state, params).compile()
        row.update(collectives=collectives(compiled.as_text()),
                   update_collectives=collectives(update.as_text()))
      params, state, loss = step(params, state, tokens)
      jax.block_until_ready(loss)
      times = []
      for _ in range(steps):
        start = time.perf_counter()
        params, state, loss = step(params, state, tokens)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    row.update(fits=True, step_s=statistics.median(times), loss=float(loss),
               state_memory_kinds=sorted({
                   leaf.sharding.memory_kind for leaf in jax.tree.leaves(state)
                   if leaf.ndim >= 1}),
               state_bytes_per_param=_state_bytes(state, devices[0]) / shape.params)
    # Of this process (each configuration has one).
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    if None not in peaks:
      row["peak_device_gb"] = max(peaks) / 1e9
      row["peak_device_gb_each"] = [p / 1e9 for p in peaks]
  except Exception as e:  # pylint: disable=broad-except
    if not _out_of_memory(e):
      raise
    row["error"] = str(e).splitlines()[0][:300]
  finally:
    del params, state
    gc.collect()
    jax.clear_caches()
  row["wall_s"] = time.perf_counter() - begin
  return row


_ROW_PREFIX = "ROW "


def _run_child(name: str, shape: Shape, args) -> dict:
  """:func:`run_one` in a fresh Python process."""
  config = json.dumps(dict(optimizer=name, shape=dataclasses.asdict(shape)))
  result = subprocess.run(
      [sys.executable, __file__, "--one", config, "--batch", str(args.batch),
       "--seq", str(args.seq), "--steps", str(args.steps)]
      + (["--fsdp"] if args.fsdp else []),
      capture_output=True, text=True, check=False)
  for line in result.stdout.splitlines():
    if line.startswith(_ROW_PREFIX):
      return json.loads(line[len(_ROW_PREFIX):])
  raise RuntimeError(f"{name} at depth {shape.depth} failed (exit code "
                     f"{result.returncode}):\n{result.stdout[-2000:]}\n"
                     f"{result.stderr[-3000:]}")


def summarize(rows: list[dict], names: list[str]) -> dict:
  """Largest model per optimizer; step times and state bytes per
  parameter against optax's and the 8-bit optimizer's."""
  largest = {name: max((r["params"] for r in rows
                        if r["optimizer"] == name and r["fits"]), default=0)
             for name in names}
  summary = dict(largest_params=largest)
  base, eight, offload = list(optimizers())
  offloads = [name for name in names
              if name == offload or _STREAMED.fullmatch(name)]
  fitting = lambda name: [r["depth"] for r in rows
                          if r["optimizer"] == name and r["fits"]]
  at = lambda depth: {r["optimizer"]: r for r in rows
                      if r["depth"] == depth and r["fits"]}
  if largest.get(base):
    summary["params_vs_optax"] = {
        name: largest[name] / largest[base] for name in names
        if largest.get(name)}
    if largest.get(offload):
      summary["offload_params_vs_optax"] = largest[offload] / largest[base]
    depth = max(fitting(base))
    same = at(depth)
    summary["at_optax_largest"] = dict(
        depth=depth, devices=same[base]["devices"],
        step_vs_optax={name: r["step_s"] / same[base]["step_s"]
                       for name, r in same.items()},
        state_bytes_per_param={name: r["state_bytes_per_param"]
                               for name, r in same.items()})
  if fitting(eight):
    depth = max(fitting(eight))
    times = {name: r["step_s"] for name, r in at(depth).items()}
    if offload in times:
      summary["offload_step_cost"] = dict(
          depth=depth, ratio=times[offload] / times[eight])
    summary["step_cost_vs_8bit"] = dict(depth=depth, ratio={
        name: times[name] / times[eight] for name in offloads if name in times})
  return summary


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=4096)
  parser.add_argument("--depths", type=int, nargs="+",
                      default=[8, 16, 24, 32, 40, 48, 56, 64])
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--batch", type=int, default=1,
                      help="sequences per step (with --fsdp: per device)")
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--fsdp", action="store_true",
                      help="FSDP over all devices (see the module docstring)")
  parser.add_argument("--tiny", action="store_true",
                      help="CPU smoke test: width 64, depth 2, seq 16")
  parser.add_argument("--optimizers", nargs="*",
                      default=list(optimizers()), metavar="NAME",
                      help=f"a subset of {list(optimizers())} (the streamed "
                      "offloads of --chunks are added)")
  parser.add_argument("--chunks", type=int, nargs="*", default=[8],
                      help="a 'jlowbit adamw_8bit + offload(chunks=N)' row "
                      "set per N (none: --chunks with no value)")
  parser.add_argument("--in-process", action="store_true",
                      help="run every configuration in this process (by "
                      "default each runs in a fresh one, so that memory a "
                      "failed configuration held cannot fail the next)")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # a child's config
  parser.add_argument("--json", help="results, rewritten after every row")
  args = parser.parse_args()
  if args.one:
    config = json.loads(args.one)
    row = run_one(config["optimizer"], Shape(**config["shape"]), args.batch,
                  args.seq, args.steps, args.fsdp)
    print(_ROW_PREFIX + json.dumps(row), flush=True)
    return
  if args.tiny:
    args.width, args.depths, args.vocab = 64, [2], 256
    args.batch, args.seq, args.steps = 2, 16, 2
    args.in_process = True
  for chunks in args.chunks:
    args.optimizers.append(streamed_name(chunks))
  for name in args.optimizers:
    make_optimizer(name)  # ValueError for an unknown name
  device = jax.devices()[0].device_kind
  print("device:", device, f"x {jax.device_count()} (FSDP)" if args.fsdp else "")
  rows = []

  def write(summary=None):
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(device=device, devices=jax.device_count(),
                       args=vars(args), rows=rows, summary=summary), f, indent=1)

  for name in args.optimizers:
    for depth in args.depths:
      shape = Shape(args.width, depth, args.vocab, max(1, args.width // 128))
      if args.in_process:
        row = run_one(name, shape, args.batch, args.seq, args.steps, args.fsdp)
      else:
        row = _run_child(name, shape, args)
      rows.append(row)
      print(json.dumps(row), flush=True)
      write()
      if not row["fits"]:
        break
  summary = summarize(rows, args.optimizers)
  print(json.dumps(summary, indent=1))
  write(summary)


if __name__ == "__main__":
  main()
