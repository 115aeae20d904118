"""Largest GPT-style model whose training step fits: optax AdamW vs 8-bit vs 8-bit + offload.

Run on a GPU (random weights and tokens, nothing is downloaded)::

  python benchmarks/offload.py [--width 4096] [--depths 8 16 24 32 40 48]
      [--batch 1] [--seq 1024] [--json offload.json]

and as a CPU smoke test (a tiny model)::

  python benchmarks/offload.py --tiny

The model: token embedding (tied with the output layer), ``depth`` pre-norm
blocks (causal attention with 128-wide heads, a 4x GELU MLP), float32
parameters, bfloat16 compute, each block rematerialized in the backward pass
(so parameters, gradients and optimizer state, not activations, decide what
fits); the blocks' parameters are stacked and the forward pass scans over
them. One training step is ``jax.jit``-ed with parameters and state
donated: loss and gradients, the optimizer's update, ``optax.apply_updates``.

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
  of each leaf's leading axis at a time (a loop; the next slice prefetched),
  so that only about ``2 / N`` of the state is on the device during the
  update (``--chunks``, default 8; ``offload(chunks=N, no prefetch)`` for
  one slice at a time).

``step_s`` is the median wall time of ``--steps`` steps after one untimed
(compiling) step.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

import jlowbit


@dataclasses.dataclass(frozen=True)
class Shape:
  width: int
  depth: int
  vocab: int
  heads: int

  @property
  def params(self) -> int:
    return self.vocab * self.width + self.depth * (12 * self.width ** 2
                                                   + 2 * self.width) + self.width


def init_params(shape: Shape, key: jax.Array) -> dict:
  """float32 parameters; block parameters stacked along a leading depth axis."""
  d, l = shape.width, shape.depth
  keys = jax.random.split(key, 5)
  normal = lambda k, s, fan_in: jax.random.normal(k, s, jnp.float32) / fan_in ** 0.5
  return {
      "embed": normal(keys[0], (shape.vocab, d), d),
      "blocks": {
          "norm1": jnp.ones((l, d), jnp.float32),
          "qkv": normal(keys[1], (l, d, 3 * d), d),
          "out": normal(keys[2], (l, d, d), d),
          "norm2": jnp.ones((l, d), jnp.float32),
          "up": normal(keys[3], (l, d, 4 * d), d),
          "down": normal(keys[4], (l, 4 * d, d), 4 * d),
      },
      "norm": jnp.ones((d,), jnp.float32),
  }


def _rms_norm(x, scale):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)
  return (x32 * scale).astype(jnp.bfloat16)


def loss_fn(params: dict, tokens: jax.Array, heads: int) -> jax.Array:
  """Next-token cross-entropy of a batch of ``tokens`` ``[B, T]``."""
  bf16 = lambda w: w.astype(jnp.bfloat16)
  x = bf16(params["embed"])[tokens]
  b, t, d = x.shape

  @jax.checkpoint
  def block(x, p):
    q, k, v = jnp.split(_rms_norm(x, p["norm1"]) @ bf16(p["qkv"]), 3, axis=-1)
    q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
    attn = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + attn.reshape(b, t, d) @ bf16(p["out"])
    h = jax.nn.gelu(_rms_norm(x, p["norm2"]) @ bf16(p["up"]))
    return x + h @ bf16(p["down"]), None

  x, _ = jax.lax.scan(block, x, params["blocks"])
  logits = (_rms_norm(x, params["norm"]) @ bf16(params["embed"]).T).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1], tokens[:, 1:]).mean()


def optimizers() -> dict:
  return {
      "optax adamw": lambda: optax.adamw(1e-4, weight_decay=0.1),
      "jlowbit adamw_8bit": lambda: jlowbit.adamw_8bit(1e-4, weight_decay=0.1),
      "jlowbit adamw_8bit + offload": lambda: jlowbit.offload_state(
          jlowbit.adamw_8bit(1e-4, weight_decay=0.1)),
  }


_STREAMED = re.compile(
    r"jlowbit adamw_8bit \+ offload\(chunks=(\d+)(, no prefetch)?\)")


def streamed_name(chunks: int, prefetch: bool = True) -> str:
  return (f"jlowbit adamw_8bit + offload(chunks={chunks}"
          f"{'' if prefetch else ', no prefetch'})")


def make_optimizer(name: str) -> optax.GradientTransformation:
  """An optimizer of :func:`optimizers`, or a streamed offload
  (:func:`streamed_name`)."""
  if name in optimizers():
    return optimizers()[name]()
  match = _STREAMED.fullmatch(name)
  if match is None:
    raise ValueError(f"unknown optimizer {name!r}")
  return jlowbit.offload_state(jlowbit.adamw_8bit(1e-4, weight_decay=0.1),
                               chunks=int(match.group(1)),
                               prefetch=match.group(2) is None)


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


def run_one(name: str, shape: Shape, batch: int, seq: int, steps: int) -> dict:
  """One optimizer at one depth: fits or not, median step time."""
  tx = make_optimizer(name)
  row = dict(optimizer=name, width=shape.width, depth=shape.depth,
             params=shape.params, fits=False, step_s=None, error=None)

  @jax.jit
  def setup(key):
    params = init_params(shape, key)
    return params, tx.init(params)

  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, shape.heads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, shape.vocab)
  params = state = None
  try:
    params, state = setup(jax.random.key(0))
    row.update(_memory(step.lower(params, state, tokens).compile()))
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
                   if leaf.ndim >= 1}))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # of this process (each config has one)
      row["peak_device_gb"] = stats["peak_bytes_in_use"] / 1e9
  except Exception as e:  # pylint: disable=broad-except
    if not _out_of_memory(e):
      raise
    row["error"] = str(e).splitlines()[0][:300]
  finally:
    del params, state
    gc.collect()
    jax.clear_caches()
  return row


_ROW_PREFIX = "ROW "


def _run_child(name: str, shape: Shape, args) -> dict:
  """:func:`run_one` in a fresh Python process."""
  config = json.dumps(dict(optimizer=name, shape=dataclasses.asdict(shape)))
  result = subprocess.run(
      [sys.executable, __file__, "--one", config, "--batch", str(args.batch),
       "--seq", str(args.seq), "--steps", str(args.steps)],
      capture_output=True, text=True, check=False)
  for line in result.stdout.splitlines():
    if line.startswith(_ROW_PREFIX):
      return json.loads(line[len(_ROW_PREFIX):])
  raise RuntimeError(f"{name} at depth {shape.depth} failed:\n"
                     f"{result.stderr[-3000:]}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=4096)
  parser.add_argument("--depths", type=int, nargs="+",
                      default=[8, 16, 24, 32, 40, 48, 56, 64])
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--tiny", action="store_true",
                      help="CPU smoke test: width 64, depth 2, seq 16")
  parser.add_argument("--optimizers", nargs="*",
                      default=list(optimizers()), metavar="NAME",
                      help=f"a subset of {list(optimizers())} (the streamed "
                      "offloads of --chunks are added)")
  parser.add_argument("--chunks", type=int, nargs="*", default=[8],
                      help="a 'jlowbit adamw_8bit + offload(chunks=N)' row "
                      "set per N (none: --chunks with no value)")
  parser.add_argument("--no-prefetch", action="store_true",
                      help="also run each --chunks N without prefetching")
  parser.add_argument("--in-process", action="store_true",
                      help="run every configuration in this process (by "
                      "default each runs in a fresh one, so that memory a "
                      "failed configuration held cannot fail the next)")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # a child's config
  parser.add_argument("--json")
  args = parser.parse_args()
  if args.one:
    config = json.loads(args.one)
    row = run_one(config["optimizer"], Shape(**config["shape"]), args.batch,
                  args.seq, args.steps)
    print(_ROW_PREFIX + json.dumps(row), flush=True)
    return
  if args.tiny:
    args.width, args.depths, args.vocab = 64, [2], 256
    args.batch, args.seq, args.steps = 2, 16, 2
    args.in_process = True
  for chunks in args.chunks:
    args.optimizers.append(streamed_name(chunks))
    if args.no_prefetch:
      args.optimizers.append(streamed_name(chunks, prefetch=False))
  for name in args.optimizers:
    make_optimizer(name)  # ValueError for an unknown name
  print("device:", jax.devices()[0].device_kind)
  rows = []
  for name in args.optimizers:
    for depth in args.depths:
      shape = Shape(args.width, depth, args.vocab, max(1, args.width // 128))
      if args.in_process:
        row = run_one(name, shape, args.batch, args.seq, args.steps)
      else:
        row = _run_child(name, shape, args)
      rows.append(row)
      print(json.dumps(row), flush=True)
      if not row["fits"]:
        break
  largest = {name: max((r["params"] for r in rows
                        if r["optimizer"] == name and r["fits"]), default=0)
             for name in args.optimizers}
  summary = dict(largest_params=largest)
  base, eight, offload = list(optimizers())
  offloads = [name for name in args.optimizers
              if name == offload or _STREAMED.fullmatch(name)]
  if largest.get(base):
    summary["params_vs_optax"] = {
        name: largest[name] / largest[base] for name in args.optimizers
        if largest.get(name)}
    if largest.get(offload):
      summary["offload_params_vs_optax"] = largest[offload] / largest[base]
  both = [r["depth"] for r in rows if r["optimizer"] == eight and r["fits"]]
  if both:
    depth = max(both)
    times = {r["optimizer"]: r["step_s"] for r in rows
             if r["depth"] == depth and r["fits"]}
    if offload in times:
      summary["offload_step_cost"] = dict(
          depth=depth, ratio=times[offload] / times[eight])
    summary["step_cost_vs_8bit"] = dict(depth=depth, ratio={
        name: times[name] / times[eight] for name in offloads if name in times})
  print(json.dumps(summary, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, args=vars(args),
                     rows=rows, summary=summary), f, indent=1)


if __name__ == "__main__":
  main()
