"""Static SASS of the fused 8-bit optimizer kernels, on a machine without a GPU.

Compiles ``jlowbit.triton_kernels.optim8.update_kernel`` for one leaf of
512M elements (block size 256) with Triton's own ``ptxas`` for sm_90,
disassembles it with the ``nvdisasm`` Triton ships, and prints per case
the instructions of the kernel divided by the elements a thread updates
(one tile per program, so this is the per-element cost including the
per-tile overhead), the registers per thread and the most frequent
opcodes::

  python benchmarks/experiments/optim8_sass.py [--elements-per-thread 8 16]
      [--dump DIR]

``--dump`` writes each kernel's SASS to ``DIR/<case>.sass``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from jlowbit import algorithms
from jlowbit import update8
from jlowbit.triton_kernels import optim8

N = 512 << 20
BLOCK_SIZE = 256
CASES = [("adamw", "adam", None), ("ademamix", "ademamix", (False, True, False)),
         ("ademamix(nearest)", "ademamix", None), ("lion", "lion", None),
         ("sgd momentum", "momentum", None), ("rmsprop", "rmsprop", None),
         ("adagrad", "adagrad", None)]
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sass(algorithm: str, grad_dtype: str, stochastic, elements_per_thread: int):
  """(SASS text, registers per thread, elements per thread) of one kernel."""
  alg = algorithms.ALGORITHMS[algorithm]
  k = len(alg.moments)
  stochastic = stochastic or (False,) * k
  direction = update8.writes_direction(algorithm, grad_dtype)
  tile = max(optim8.TILE_ELEMENTS, BLOCK_SIZE)
  row_blocks = N // BLOCK_SIZE
  layout = (optim8.Leaf(0, N // tile, N // tile, 1, N // optim8.VECTOR_CHUNK,
                        row_blocks, 0, True, False),)
  kernel = optim8.update_kernel(algorithm, layout, stochastic, direction)
  g = {"float32": "*fp32", "bfloat16": "*bf16"}[grad_dtype]
  signature = {"g_0": g}
  for j in range(k):
    signature.update({f"c{j}_0": "*u8", f"a{j}_0": "*fp32"})
  signature.update(qmaps_ptr="*fp32", buckets_ptr="*u8", hyper_ptr="*fp32",
                   keys_ptr="*u32")
  if direction:
    signature["d_0"] = g
  for j in range(k):
    signature.update({f"oc{j}_0": "*u8", f"oa{j}_0": "*fp32"})
  constexprs = dict(BLOCK_SIZE=BLOCK_SIZE, TILE=tile, CHUNK=optim8.VECTOR_CHUNK,
                    CODE_BITS=optim8.CODE_BITS)
  signature.update({c: "constexpr" for c in constexprs})
  names = list(signature)
  attrs = {(names.index(n),): [["tt.divisibility", 16]]
           for n, t in signature.items() if t.startswith("*")}
  source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                     attrs=attrs)
  num_warps = tile // (32 * elements_per_thread)
  compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=2))
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "kernel.cubin")
    with open(path, "wb") as f:
      f.write(compiled.asm["cubin"])
    sass = subprocess.run([os.path.join(_BIN, "nvdisasm"), "-c", path],
                          capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([os.path.join(_BIN, "cuobjdump"),
                            "--dump-resource-usage", path],
                           capture_output=True, text=True, check=True).stdout
  registers = int(re.search(r"REG:(\d+)", usage).group(1))
  return sass, registers, elements_per_thread


def opcodes(sass: str) -> collections.Counter:
  """Opcode counts (without ``NOP``, ``EXIT``, ``BRA``: padding and the end)."""
  counts = collections.Counter()
  for line in sass.splitlines():
    m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
    if m and m.group(1).split(".")[0] not in ("NOP", "EXIT", "BRA"):
      counts[m.group(1).split(".")[0]] += 1
  return counts


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--elements-per-thread", type=int, nargs="+",
                      default=[optim8.ELEMENTS_PER_THREAD])
  parser.add_argument("--dump")
  args = parser.parse_args()
  print(f"{'case':18s} {'grad':9s} {'elem/thr':>8s} {'instr':>6s} "
        f"{'per elem':>8s} {'regs':>4s}  top opcodes")
  for per_thread in args.elements_per_thread:
    for name, algorithm, stochastic in CASES:
      for dtype in ("float32", "bfloat16"):
        sass, registers, per = compile_sass(algorithm, dtype, stochastic, per_thread)
        counts = opcodes(sass)
        total = sum(counts.values())
        top = ", ".join(f"{k} {v}" for k, v in counts.most_common(10))
        print(f"{name:18s} {dtype:9s} {per:8d} {total:6d} {total / per:8.1f} "
              f"{registers:4d}  {top}", flush=True)
        if args.dump:
          os.makedirs(args.dump, exist_ok=True)
          with open(os.path.join(args.dump, f"{name}_{dtype}_{per}.sass"), "w") as f:
            f.write(sass)


if __name__ == "__main__":
  main()
