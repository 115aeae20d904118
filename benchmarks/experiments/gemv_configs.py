"""Tile configurations of the 4-bit gemv, and the 4-bit (de)quantize kernels.

Run on an NVIDIA GPU from the repository root (about 2 minutes on an H100)::

  python benchmarks/experiments/gemv_configs.py [--shapes 4096x4096 ...]

gemv: ``x @ W.T`` for bf16 ``x`` ``[K]`` and ``W`` ``[N, K]`` NF4 block_size
64, timed for each :class:`GemvConfig` over enough distinct weights that
nothing stays in L2, next to the same product with a dense bf16 ``W``. Each
config is first checked against :func:`jlowbit.gemv_4bit_reference`
(``err``: max |y - ref| / max |ref|; ``ok`` when below 1e-2).

quant: quantize / dequantize_4bit (NF4, block_size 64) of 256M elements for
float32 and bfloat16 with 4 and 8 warps per program, calling the launchers
directly so that the module's warp counts take effect; codes and values are
checked bit for bit against the XLA reference on 16M + 37 elements.
``--impl interpret --shapes 64x256 --quant-size 8192 --check-size 4133`` is
a (slow, CPU) smoke run of the script itself (bfloat16 dequantize then
shows ok=False: the interpreter rounds to bfloat16 toward zero).
Effective bandwidth counts each input read once and each output written once.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from timing import hbm_tbps, table, time_jax  # noqa: E402  pylint: disable=g-import-not-at-top

import jlowbit  # noqa: E402  pylint: disable=g-import-not-at-top
from jlowbit import quant4  # noqa: E402  pylint: disable=g-import-not-at-top
from jlowbit.triton_kernels import quant4 as quant4_kernels  # noqa: E402  pylint: disable=g-import-not-at-top
from jlowbit.matmul4 import GemvConfig  # noqa: E402  pylint: disable=g-import-not-at-top

SHAPES = ["4096x4096", "11008x4096", "8192x8192", "28672x8192"]
CONFIGS = [  # (label, config); "default" is GemvConfig.get_default(N, K)
    ("n2 k1024 w4", GemvConfig(block_n=2, block_k=1024, num_warps=4)),
    ("n4 k1024 w4", GemvConfig(block_n=4, block_k=1024, num_warps=4)),
    ("n8 k1024 w4", GemvConfig(block_n=8, block_k=1024, num_warps=4)),
    ("n4 k2048 w8", GemvConfig(block_n=4, block_k=2048, num_warps=8)),
    ("n8 k1024 w8", GemvConfig(block_n=8, block_k=1024, num_warps=8)),
    ("n4 k1024 w4 s2", GemvConfig(block_n=4, block_k=1024, split_k=2)),
    ("n16 k512 w4", GemvConfig(block_n=16, block_k=512, num_warps=4)),
]
L2_BYTES = 100 << 20  # distinct weights per shape: at least twice the 50 MB L2
CHECK_SIZE = (16 << 20) + 37


def _gemv_rows(shape: str, impl: str) -> list[dict]:
  n, k = map(int, shape.split("x"))
  nbytes = n * k // 2 + 4 * n * k // 64
  copies = min(16, max(2, math.ceil(L2_BYTES / nbytes)))
  keys = jax.random.split(jax.random.key(1), copies)
  dense = [jax.random.normal(key, (n, k), jnp.bfloat16) * 0.02 for key in keys]
  w4s = [jlowbit.quantize_4bit(w, block_size=64, impl=impl) for w in dense]
  x = jax.random.normal(jax.random.key(2), (k,), jnp.bfloat16)
  t_dense = time_jax(lambda w: x @ w.T, [(w,) for w in dense])
  del dense
  ref = np.asarray(jlowbit.gemv_4bit_reference(x, w4s[0]), np.float32)
  rows = []
  default = GemvConfig.get_default(n, k)
  configs = [("default", default)] + [c for c in CONFIGS if c[1] != default]
  for label, config in configs:
    def gemv(w4, config=config):
      return jlowbit.gemv_4bit(x, w4, impl=impl, config=config)
    y = np.asarray(jax.jit(gemv)(w4s[0]), np.float32)
    err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
    seconds = time_jax(gemv, [(w4,) for w4 in w4s])
    rows.append(dict(
        shape=shape, config=label if label != "default" else f"default {_label(config)}",
        us=seconds * 1e6, TBps=nbytes / seconds / 1e12, dense_us=t_dense * 1e6,
        speedup=t_dense / seconds, err=err, ok=err < 1e-2))
  return rows


def _label(config: GemvConfig) -> str:
  text = f"n{config.block_n} k{config.block_k} w{config.num_warps}"
  return text + (f" s{config.split_k}" if config.split_k > 1 else "")


def _quantize(x, tables, impl):
  return quant4_kernels.quantize_4bit(x, *tables, 64, False, impl)


def _dequantize(packed, absmax, quant_map, n, dtype, impl):
  return quant4_kernels.dequantize_4bit(packed, quant_map, absmax, n, 64, dtype,
                                        impl)


def _check_quant(dtype, tables, quant_map, n, impl) -> tuple[bool, bool]:
  """(codes and absmax, dequantized values) equal to the XLA reference."""
  x = jax.random.normal(jax.random.key(3), (n,), jnp.float32).astype(dtype)
  packed, absmax = jax.jit(_quantize, static_argnums=2)(x, tables, impl)
  want_packed, want_absmax = quant4.quantize_4bit_reference(x, *tables, 64, False)
  values = jax.jit(_dequantize, static_argnums=(3, 4, 5))(
      packed, absmax, quant_map, n, dtype, impl)
  want = quant4.dequantize_4bit_reference(want_packed, quant_map, want_absmax,
                                          n, 64, dtype)
  codes_ok = np.array_equal(packed, want_packed) and np.array_equal(absmax, want_absmax)
  values_ok = np.array_equal(np.asarray(values, np.float32), np.asarray(want, np.float32))
  return bool(codes_ok), bool(values_ok)


def _quant_rows(n: int, check_n: int, impl: str) -> list[dict]:
  tables = tuple(jnp.asarray(t) for t in quant4.search_tables("nf4"))
  quant_map = jnp.asarray(quant4.default_quant_map("nf4"))
  packed_bytes = n // 2 + 4 * (n // 64)
  rows = []
  defaults = (quant4_kernels.QUANTIZE_WARPS, quant4_kernels.DEQUANTIZE_WARPS)
  for dtype in (jnp.float32, jnp.bfloat16):
    keys = jax.random.split(jax.random.key(0), 2)
    xs = [(jax.random.normal(key, (n,), jnp.float32).astype(dtype),) for key in keys]
    io_bytes = n * jnp.dtype(dtype).itemsize + packed_bytes
    for warps in (4, 8):
      quant4_kernels.QUANTIZE_WARPS = quant4_kernels.DEQUANTIZE_WARPS = warps
      jax.clear_caches()  # the launchers read the warp counts when traced
      oks = _check_quant(dtype, tables, quant_map, check_n, impl)
      t_q = time_jax(lambda x: _quantize(x, tables, impl), xs)
      qs = [jax.jit(_quantize, static_argnums=2)(x, tables, impl) for (x,) in xs]
      t_d = time_jax(lambda p, a, dtype=dtype: _dequantize(p, a, quant_map, n, dtype, impl),
                     qs)
      for op, seconds, ok in (("quantize_4bit", t_q, oks[0]),
                              ("dequantize_4bit", t_d, oks[1])):
        rows.append(dict(op=op, dtype=jnp.dtype(dtype).name, warps=warps,
                         us=seconds * 1e6, TBps=io_bytes / seconds / 1e12,
                         pct_hbm=100 * io_bytes / seconds / 1e12 / hbm_tbps(), ok=ok))
      del qs
  quant4_kernels.QUANTIZE_WARPS, quant4_kernels.DEQUANTIZE_WARPS = defaults
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="+", default=SHAPES, help="NxK gemv shapes")
  parser.add_argument("--sections", nargs="+", default=["gemv", "quant"])
  parser.add_argument("--quant-size", type=int, default=256 << 20)
  parser.add_argument("--check-size", type=int, default=CHECK_SIZE)
  parser.add_argument("--impl", default="triton",
                      help="'interpret' for a CPU smoke run with tiny sizes")
  args = parser.parse_args()
  print("device:", jax.devices()[0].device_kind)
  if "gemv" in args.sections:
    rows = []
    for shape in args.shapes:
      rows += _gemv_rows(shape, args.impl)
      jax.clear_caches()
    print(table(rows, ["shape", "config", "us", "TBps", "dense_us", "speedup", "err", "ok"]))
  if "quant" in args.sections:
    print(table(_quant_rows(args.quant_size, args.check_size, args.impl), ["op", "dtype", "warps", "us", "TBps", "pct_hbm", "ok"]))


if __name__ == "__main__":
  main()
