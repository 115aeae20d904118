"""Where the time of a jitted jlowbit op goes: a profiler trace of its kernels.

Run on the GPU machine from the repository root::

  python benchmarks/experiments/jax_trace.py OUT_DIR

Profiles one jitted executable that calls ``gemv_4bit`` on four distinct
8192 x 8192 NF4 weights and ``dequantize_4bit`` on two 64M-element
tensors, writes the Perfetto trace (``OUT_DIR/**/*.trace.json.gz``), the
optimized HLO and thunk sequence (``OUT_DIR/hlo``), and prints each GPU
kernel's name and duration as the trace records them.
"""

import glob
import gzip
import json
import os
import sys

out = sys.argv[1]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_dump_to={out}/hlo --xla_dump_hlo_as_text"
                           " --xla_dump_hlo_module_re=jlowbit_probe")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top

import jlowbit  # noqa: E402  pylint: disable=g-import-not-at-top

keys = jax.random.split(jax.random.key(0), 6)
w4s = [jlowbit.quantize_4bit(jax.random.normal(k, (8192, 8192), jnp.bfloat16))
       for k in keys[:4]]
t4s = [jlowbit.quantize_4bit(jax.random.normal(k, (64 << 20,), jnp.bfloat16))
       for k in keys[4:]]
x = jax.random.normal(jax.random.key(1), (8192,), jnp.bfloat16)


def jlowbit_probe(w4s, t4s):
  return ([jlowbit.gemv_4bit(x, w4) for w4 in w4s]
          + [jlowbit.dequantize_4bit(t4) for t4 in t4s])


fn = jax.jit(jlowbit_probe)
jax.block_until_ready(fn(w4s, t4s))
jax.block_until_ready(fn(w4s, t4s))
with jax.profiler.trace(f"{out}/trace", create_perfetto_trace=True):
  for _ in range(3):
    jax.block_until_ready(fn(w4s, t4s))

for path in glob.glob(f"{out}/trace/**/*.trace.json.gz", recursive=True):
  events = json.load(gzip.open(path))["traceEvents"]
  threads = {(e.get("pid"), e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      where = threads.get((e.get("pid"), e.get("tid")), "")
      if "stream" in where.lower() or "gpu" in where.lower():
        print(f"{e['ts']:16.1f} {e['dur']:9.1f} us  {where[:20]:20s} {e['name'][:90]}")
