"""Optimizer step benchmarks: jlowbit 8-bit vs optax fp32 (vs bitsandbytes).

Run on an NVIDIA GPU::

  python benchmarks/optim.py [--sizes 16M 128M 512M] [--optimizers ...] [--bnb] [--json out.json]

A step is ``updates, state = tx.update(grads, state, params);
params = optax.apply_updates(params, updates)`` (rows ``*+fused``:
``params, state = lowbit.update_and_apply(tx, grads, state, params)``, the
kernel writing the parameters) jitted with params and state
donated, timed as the median over repeats of 10 back-to-back steps (``ms``:
one dispatch per step, so on trees of many leaves the host's dispatch of
hundreds of argument buffers can dominate) and of 10 steps unrolled in one
jitted call (``ms_in_jit``: what the update costs inside a training step's
executable, where dispatch is paid once and overlaps the GPU). Cases:
one leaf of N fp32/bf16 parameters, and a GPT-2-small-shaped tree (148
leaves, 124M fp32 parameters); for bf16 params also optax with float32
state (``mu_dtype``/``accumulator_dtype``; its default keeps bf16 moments),
column ``in_jit_vs_fp32_state``. ``bytes/param`` is the traffic the step needs
at minimum (each array read once, written once); ``%HBM`` is that traffic
over the measured time against the device's HBM bandwidth
(``timing.hbm_tbps``). State bytes per parameter are
measured from the state pytree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import jlowbit as lowbit
from timing import hbm_tbps, table

# name: (factory, state bytes per param moved per step (read + write) as a
# function of the params' itemsize, optax counterpart)
OPTIMIZERS = {
    "optax.adamw": (lambda: optax.adamw(1e-3, weight_decay=1e-2), lambda s: 4 * s, None),
    "adamw_8bit": (lambda: lowbit.adamw_8bit(1e-3, weight_decay=1e-2), lambda s: 4,
                   "optax.adamw"),
    "optax.contrib.ademamix": (lambda: optax.contrib.ademamix(1e-3, weight_decay=1e-2),
                               lambda s: 6 * s, None),
    "ademamix_8bit": (lambda: lowbit.ademamix_8bit(1e-3), lambda s: 6,
                      "optax.contrib.ademamix"),
    "ademamix_8bit(nearest)": (lambda: lowbit.ademamix_8bit(1e-3, stochastic_rounding=False),
                               lambda s: 6, "optax.contrib.ademamix"),
    "optax.lion": (lambda: optax.lion(1e-4, weight_decay=1e-3), lambda s: 2 * s, None),
    "lion_8bit": (lambda: lowbit.lion_8bit(1e-4), lambda s: 2, "optax.lion"),
    "optax.sgd(momentum)": (lambda: optax.sgd(1e-3, momentum=0.9), lambda s: 2 * s, None),
    "sgd_8bit": (lambda: lowbit.sgd_8bit(1e-3), lambda s: 2, "optax.sgd(momentum)"),
}
# The same 8-bit optimizers stepped by lowbit.update_and_apply (the kernel
# writes the parameters: the state's bytes, the gradient and the parameter
# read and written).
FUSED = "+fused"
OPTIMIZERS.update({name + FUSED: value for name, value in OPTIMIZERS.items()
                   if value[2] is not None})
# For 16-bit params optax keeps 16-bit moments by default; these keep the
# float32 state optax offers (Adam's and AdEMAMix's nu follows the params).
FP32_STATE = {
    "adamw_8bit": ("optax.adamw(mu fp32)", lambda: optax.adamw(
        1e-3, weight_decay=1e-2, mu_dtype=jnp.float32), lambda s: 8 + 2 * s),
    "ademamix_8bit": ("optax.contrib.ademamix(mu fp32)", lambda: optax.contrib.ademamix(
        1e-3, weight_decay=1e-2, mu_dtype=jnp.float32), lambda s: 16 + 2 * s),
    "lion_8bit": ("optax.lion(mu fp32)", lambda: optax.lion(
        1e-4, weight_decay=1e-3, mu_dtype=jnp.float32), lambda s: 8),
    "sgd_8bit": ("optax.sgd(momentum, fp32)", lambda: optax.sgd(
        1e-3, momentum=0.9, accumulator_dtype=jnp.float32), lambda s: 8),
}


def gpt2_small_shapes() -> list[tuple[int, ...]]:
  """The 148 parameter shapes of GPT-2 small (124M parameters)."""
  shapes = [(50257, 768), (1024, 768)]
  for _ in range(12):
    shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,),
               (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
  return shapes + [(768,), (768,)]


def make_tree(shapes, dtype):
  """Parameters and gradients of ``shapes``, both normally distributed.

  The gradients differ element by element, as in training: a constant
  gradient gives every element of a block the same moment and code, so the
  8-bit kernels' table gathers all hit one address, and the step runs
  faster than on real data.
  """
  keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
  params = {f"p{i:03d}": (0.02 * jax.random.normal(k, s, jnp.float32)).astype(dtype)
            for i, (k, s) in enumerate(zip(keys, shapes))}
  grads = {name: (0.01 * jax.random.normal(k, p.shape, jnp.float32)).astype(dtype)
           for k, (name, p) in zip(keys[len(shapes):], params.items())}
  return params, grads


def jitted_steps(tx, steps: int = 1, fused: bool = False):
  """``(params, state, grads) -> (params, state)`` jitted, params and state
  donated: one optimizer step (update, then ``optax.apply_updates``; with
  ``fused`` ``lowbit.update_and_apply``), or ``steps`` of them unrolled
  with an ``optimization_barrier`` between them (so that XLA does not fuse
  across steps)."""
  def one_step(params, state, grads):
    if fused:
      return lowbit.update_and_apply(tx, grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def many_steps(params, state, grads):
    for _ in range(steps):
      params, state = jax.lax.optimization_barrier(one_step(params, state, grads))
    return params, state

  return jax.jit(one_step if steps == 1 else many_steps, donate_argnums=(0, 1))


def time_steps(tx, params, grads, steps: int = 10, repeats: int = 10,
               in_jit: bool = False, fused: bool = False) -> tuple[float, int]:
  """Median seconds per optimizer step, and the state's size in bytes.

  ``in_jit``: the ``steps`` steps run unrolled in one jitted call instead of
  one call each.
  """
  state = tx.init(params)
  state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  step = jitted_steps(tx, steps if in_jit else 1, fused)
  calls = 1 if in_jit else steps
  params, state = jax.block_until_ready(step(params, state, grads))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      params, state = step(params, state, grads)
    jax.block_until_ready(params)
    samples.append((time.perf_counter() - start) / steps)
  return statistics.median(samples), state_bytes


def bench_case(label: str, shapes, dtype, names) -> list[dict]:
  """Rows of ``names`` on ``shapes``; with 16-bit params also the optax
  counterparts with float32 state (:data:`FP32_STATE`)."""
  rows, times = [], {}
  n = sum(int(jnp.prod(jnp.array(s))) for s in shapes)
  itemsize = jnp.dtype(dtype).itemsize
  cases = [(name, *OPTIMIZERS[name]) for name in names]
  if itemsize < 4:
    cases += [(twin, factory, traffic, None) for name, (twin, factory, traffic)
              in FP32_STATE.items() if name in names]
  for name, factory, state_traffic, anchor in cases:
    fused = name.endswith(FUSED)
    seconds, state_bytes = time_steps(factory(), *make_tree(shapes, dtype),
                                      fused=fused)
    in_jit, _ = time_steps(factory(), *make_tree(shapes, dtype), in_jit=True,
                           fused=fused)
    times[name] = seconds, in_jit
    traffic = 3 * itemsize + state_traffic(itemsize)  # + grad, param read/write
    row = dict(case=label, dtype=jnp.dtype(dtype).name, optimizer=name, ms=seconds * 1e3,
               ms_in_jit=in_jit * 1e3, state_B_per_param=state_bytes / n,
               bytes_per_param=traffic,
               pct_hbm=100 * traffic * n / min(seconds, in_jit) / 1e12 / hbm_tbps())
    if anchor:
      row["vs_optax"] = seconds / times[anchor][0]
      row["in_jit_vs_optax"] = in_jit / times[anchor][1]
    rows.append(row)
    print(table([row], list(row)), flush=True)
  for row in rows:
    twin = FP32_STATE.get(row["optimizer"].removesuffix(FUSED), ("",))[0]
    if twin in times:
      row["in_jit_vs_fp32_state"] = row["ms_in_jit"] / 1e3 / times[twin][1]
  return rows


def bench_bnb(label: str, shapes) -> list[dict]:
  """bitsandbytes' 8-bit optimizers and torch fused AdamW on the same shapes."""
  import bitsandbytes as bnb  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  rows = []
  makers = {
      "torch AdamW(fused)": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
      "bnb AdamW8bit": lambda p: bnb.optim.AdamW8bit(p, lr=1e-3),
      "bnb AdEMAMix8bit": lambda p: bnb.optim.AdEMAMix8bit(p, lr=1e-3),
      "bnb Lion8bit": lambda p: bnb.optim.Lion8bit(p, lr=1e-4),
  }
  for name, make in makers.items():
    params = [torch.nn.Parameter(0.02 * torch.randn(s, device="cuda")) for s in shapes]
    for p in params:
      p.grad = 0.01 * torch.randn_like(p)
    opt = make(params)
    opt.step()
    torch.cuda.synchronize()
    samples = []
    for _ in range(10):
      start = torch.cuda.Event(enable_timing=True)
      end = torch.cuda.Event(enable_timing=True)
      start.record()
      for _ in range(10):
        opt.step()
      end.record()
      torch.cuda.synchronize()
      samples.append(start.elapsed_time(end) / 10)
    rows.append(dict(case=label, dtype="float32", optimizer=name, ms=statistics.median(samples)))
    print(table([rows[-1]], list(rows[-1])), flush=True)
    del opt, params
    torch.cuda.empty_cache()
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", nargs="+", default=["16M", "128M", "512M"])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--no-gpt2", action="store_true")
  parser.add_argument("--bnb", action="store_true")
  parser.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS),
                      default=list(OPTIMIZERS),
                      help="which to time (with the optax counterparts they compare to)")
  parser.add_argument("--json")
  args = parser.parse_args()
  wanted = set(args.optimizers) | {OPTIMIZERS[n][2] for n in args.optimizers} - {None}
  names = [n for n in OPTIMIZERS if n in wanted]
  print("device:", jax.devices()[0].device_kind, "| impl:", lowbit.resolve_impl(None), flush=True)
  rows = []
  for size in args.sizes:
    n = int(size[:-1]) << 20
    for dtype in args.dtypes:
      rows += bench_case(f"1 leaf {size}", [(n,)], jnp.dtype(dtype), names)
  if not args.no_gpt2:
    rows += bench_case("GPT-2 small tree", gpt2_small_shapes(), jnp.float32, names)
  if args.bnb:
    for size in args.sizes[-1:]:
      rows += bench_bnb(f"1 leaf {size}", [(int(size[:-1]) << 20,)])
    if not args.no_gpt2:
      rows += bench_bnb("GPT-2 small tree", gpt2_small_shapes())
  print()
  print(table(rows, ["case", "dtype", "optimizer", "ms", "vs_optax", "ms_in_jit",
                     "in_jit_vs_optax", "in_jit_vs_fp32_state", "state_B_per_param",
                     "bytes_per_param", "pct_hbm"]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
