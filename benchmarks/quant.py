"""Quantization benchmarks: effective TB/s and 4-bit gemv vs dense bf16.

Run on an NVIDIA GPU::

  python benchmarks/quant.py [--json out.json] [--sizes 64M 256M] [--bnb]

Effective bandwidth counts each input read once and each output written once
(quantize: x + codes + absmax; dequantize: codes + absmax + output). JAX ops
are timed by the GPU durations of their kernels in a profiler trace
(``timing.time_jax_device``): the executable's wall clock would add host
dispatch, which for kernels of tens of microseconds is as large as the
kernel. gemv times ``x @ W.T`` for batch-1 ``x`` with W 4-bit NF4
(block_size 64) against the same product with W dense bf16, each over
several distinct weights so nothing stays in L2. batch times ``x @ W.T`` for 1-1024 rows of ``x`` the same way
(``jlowbit.matmul_4bit``: the gemv for one row and the fused small-batch
kernel up to 16 rows, dequantize + dense product for prefill-sized
batches), with W in bitsandbytes' layout (``nf4``) and in the tiled layout
(``tiled``, :func:`jlowbit.tile_4bit`: the tensor-core kernel up to 16
rows, with the bytes it moves as TB/s and % of HBM). ``--bnb`` adds bitsandbytes' own kernels, timed in the
same run with torch CUDA events.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import jax
import jax.numpy as jnp

import jlowbit
from timing import hbm_tbps, table, time_jax_device, time_torch

GEMV_SHAPES = [(4096, 4096), (11008, 4096), (8192, 8192), (28672, 8192)]


def _parse_size(text: str) -> int:
  units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
  return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _inputs(n: int, dtype, copies: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), copies)
  return [(jax.random.normal(k, (n,), jnp.float32).astype(dtype),) for k in keys]


def _row(op, n, dtype, seconds, nbytes, extra=None):
  row = dict(op=op, n=f"{n >> 20}M", dtype=jnp.dtype(dtype).name,
             us=seconds * 1e6, TBps=nbytes / seconds / 1e12,
             pct_hbm=100 * nbytes / seconds / 1e12 / hbm_tbps())
  row.update(extra or {})
  return row


def bench_blockwise8(n: int, dtype, block_size: int, copies: int) -> list[dict]:
  xs = _inputs(n, dtype, copies)
  itemsize = jnp.dtype(dtype).itemsize
  absmax_bytes = 4 * math.ceil(n / block_size)
  quant = lambda x: jlowbit.quantize_blockwise(x, block_size=block_size)
  t_q = time_jax_device(quant, xs)
  qs = [(quant(*x),) for x in xs]
  t_d = time_jax_device(lambda q: jlowbit.dequantize_blockwise(q), qs)
  tag = dict(block_size=block_size, impl="jlowbit")
  return [_row("quantize_blockwise", n, dtype, t_q, n * itemsize + n + absmax_bytes, tag),
          _row("dequantize_blockwise", n, dtype, t_d, n + absmax_bytes + n * itemsize, tag)]


def bench_4bit(n: int, dtype, copies: int, quant_type: str = "nf4") -> list[dict]:
  xs = _inputs(n, dtype, copies)
  itemsize = jnp.dtype(dtype).itemsize
  packed = n // 2 + 4 * math.ceil(n / 64)
  quant = lambda x: jlowbit.quantize_4bit(x, block_size=64, quant_type=quant_type)
  t_q = time_jax_device(quant, xs)
  qs = [(quant(*x),) for x in xs]
  t_d = time_jax_device(lambda q: jlowbit.dequantize_4bit(q), qs)
  tag = dict(block_size=64, impl=f"jlowbit {quant_type}")
  return [_row("quantize_4bit", n, dtype, t_q, n * itemsize + packed, tag),
          _row("dequantize_4bit", n, dtype, t_d, packed + n * itemsize, tag)]


def bench_bnb_quant(n: int, dtype_name: str, copies: int) -> list[dict]:
  import bitsandbytes.functional as F  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  dtype = getattr(torch, dtype_name)
  xs = [(torch.randn(n, device="cuda", dtype=dtype),) for _ in range(copies)]
  itemsize = xs[0][0].element_size()
  absmax_bytes = 4 * math.ceil(n / 4096)
  t_q = time_torch(lambda x: F.quantize_blockwise(x, blocksize=4096), xs)
  qs = [F.quantize_blockwise(x, blocksize=4096) for (x,) in xs]
  t_d = time_torch(lambda q: F.dequantize_blockwise(q[0], q[1]), [(q,) for q in qs])
  tag = dict(block_size=4096, impl="bitsandbytes")
  rows = [_row("quantize_blockwise", n, dtype_name, t_q, n * itemsize + n + absmax_bytes, tag),
          _row("dequantize_blockwise", n, dtype_name, t_d, n + absmax_bytes + n * itemsize, tag)]
  packed = n // 2 + 4 * math.ceil(n / 64)
  t_q4 = time_torch(lambda x: F.quantize_4bit(x, blocksize=64, quant_type="nf4"), xs)
  q4 = [F.quantize_4bit(x, blocksize=64, quant_type="nf4") for (x,) in xs]
  t_d4 = time_torch(lambda q: F.dequantize_4bit(q[0], q[1]), [(q,) for q in q4])
  tag = dict(block_size=64, impl="bitsandbytes nf4")
  rows += [_row("quantize_4bit", n, dtype_name, t_q4, n * itemsize + packed, tag),
           _row("dequantize_4bit", n, dtype_name, t_d4, packed + n * itemsize, tag)]
  return rows


def bench_gemv(out_features: int, in_features: int, copies: int, bnb: bool) -> dict:
  keys = jax.random.split(jax.random.key(1), copies)
  weights = [jax.random.normal(k, (out_features, in_features), jnp.bfloat16) * 0.02 for k in keys]
  x = jax.random.normal(jax.random.key(2), (1, in_features), jnp.bfloat16)
  w4s = [jlowbit.quantize_4bit(w, block_size=64, quant_type="nf4") for w in weights]
  t_dense = time_jax_device(lambda w: x @ w.T, [(w,) for w in weights])
  t_4bit = time_jax_device(lambda w4: jlowbit.gemv_4bit(x, w4), [(w4,) for w4 in w4s])
  bytes_4bit = out_features * in_features // 2 + 4 * out_features * in_features // 64
  row = dict(shape=f"{out_features}x{in_features}", dense_bf16_us=t_dense * 1e6,
             nf4_gemv_us=t_4bit * 1e6, speedup=t_dense / t_4bit,
             nf4_TBps=bytes_4bit / t_4bit / 1e12)
  del weights
  if bnb:
    row.update(_bnb_gemv(out_features, in_features, copies))
  return row


def bench_batch(out_features: int, in_features: int, rows: int,
                copies: int) -> dict:
  """``x [rows, K] @ W.T``: ``jlowbit.matmul_4bit`` with W in bitsandbytes'
  layout (the gemv for one row, the fused small-batch kernel up to 16,
  dequantize + dense product beyond) and in the tiled layout (the
  tensor-core kernel up to 16 rows) against dense bf16 ``x @ W.T``, kernel
  time of each; ``tiled_TBps`` counts W's packed bytes and float32 absmax,
  ``x`` and ``y`` once. For 9-16 rows ``tiled_m8_us`` times the tiled kernel
  with 8 rows per program (``TiledConfig(block_m=8)``: two programs per
  tile) beside the default 16 (one program, W read once)."""
  keys = jax.random.split(jax.random.key(1), copies)
  weights = [jax.random.normal(k, (out_features, in_features), jnp.bfloat16) * 0.02 for k in keys]
  x = jax.random.normal(jax.random.key(2), (rows, in_features), jnp.bfloat16)
  w4s = [jlowbit.quantize_4bit(w, block_size=64, quant_type="nf4") for w in weights]
  tiled = [jlowbit.tile_4bit(w4) for w4 in w4s]
  t_dense = time_jax_device(lambda w: x @ w.T, [(w,) for w in weights])
  t_4bit = time_jax_device(lambda w4: jlowbit.matmul_4bit(x, w4), [(w4,) for w4 in w4s])
  t_tiled = time_jax_device(lambda w4: jlowbit.matmul_4bit(x, w4),
                            [(w4,) for w4 in tiled])
  n_bytes = (out_features * in_features // 2 + 4 * out_features * in_features // 64
             + 2 * rows * (in_features + out_features))
  row = dict(shape=f"{out_features}x{in_features}", rows=rows,
             dense_bf16_us=t_dense * 1e6, nf4_us=t_4bit * 1e6,
             nf4_vs_dense=t_4bit / t_dense, tiled_us=t_tiled * 1e6,
             tiled_vs_dense=t_tiled / t_dense,
             tiled_TBps=n_bytes / t_tiled / 1e12,
             tiled_pct_hbm=100 * n_bytes / t_tiled / 1e12 / hbm_tbps())
  if 8 < rows <= jlowbit.matmul4.TILED_ROWS:
    config = dataclasses.replace(jlowbit.TiledConfig.get_default(out_features),
                                 block_m=8)
    row["tiled_m8_us"] = 1e6 * time_jax_device(
        lambda w4: jlowbit.matmul_4bit(x, w4, config=config),
        [(w4,) for w4 in tiled])
  return row


def _bnb_gemv(out_features: int, in_features: int, copies: int) -> dict:
  import bitsandbytes as bnb  # pylint: disable=g-import-not-at-top
  import bitsandbytes.functional as F  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  weights = [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
             for _ in range(copies)]
  x = torch.randn(1, 1, in_features, device="cuda", dtype=torch.bfloat16)
  q = [F.quantize_4bit(w, blocksize=64, quant_type="nf4") for w in weights]
  t_bnb = time_torch(lambda p, s: bnb.matmul_4bit(x, p.t(), quant_state=s), q)
  t_torch = time_torch(lambda w: x @ w.t(), [(w,) for w in weights])
  return dict(bnb_nf4_us=t_bnb * 1e6, torch_dense_us=t_torch * 1e6)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", nargs="+", default=["64M", "256M"])
  parser.add_argument("--sections", nargs="+", default=["q8", "q4", "gemv", "batch"])
  parser.add_argument("--rows", nargs="+", type=int,
                      default=[1, 4, 8, 16, 256, 1024],
                      help="batch section: rows of x")
  parser.add_argument("--bnb", action="store_true", help="also time bitsandbytes")
  parser.add_argument("--json", help="write all rows to this file")
  args = parser.parse_args()
  print("device:", jax.devices()[0].device_kind, "| impl:", jlowbit.resolve_impl(None))
  results = {"device": jax.devices()[0].device_kind, "quant": [], "gemv": [],
             "batch": []}
  for size in map(_parse_size, args.sizes):
    copies = 4 if size <= (64 << 20) else 2
    for dtype in (jnp.float32, jnp.bfloat16):
      if "q8" in args.sections:
        results["quant"] += bench_blockwise8(size, dtype, 4096, copies)
        results["quant"] += bench_blockwise8(size, dtype, 256, copies)
      if "q4" in args.sections:
        results["quant"] += bench_4bit(size, dtype, copies)
      if args.bnb:
        results["quant"] += bench_bnb_quant(size, jnp.dtype(dtype).name, copies)
  print(table(results["quant"], ["op", "impl", "n", "dtype", "block_size", "us", "TBps", "pct_hbm"]))
  if "gemv" in args.sections:
    for shape in GEMV_SHAPES:
      copies = max(2, 8 * 4096 * 4096 // (shape[0] * shape[1]))
      results["gemv"].append(bench_gemv(*shape, copies, args.bnb))
    print(table(results["gemv"], ["shape", "dense_bf16_us", "nf4_gemv_us", "speedup", "nf4_TBps",
                                  "bnb_nf4_us", "torch_dense_us"]))
  if "batch" in args.sections:
    for shape in GEMV_SHAPES:
      copies = max(2, 8 * 4096 * 4096 // (shape[0] * shape[1]))
      for rows in args.rows:
        results["batch"].append(bench_batch(*shape, rows, copies))
    print(table(results["batch"], ["shape", "rows", "dense_bf16_us", "nf4_us", "nf4_vs_dense",
                                   "tiled_us", "tiled_vs_dense", "tiled_TBps",
                                   "tiled_pct_hbm", "tiled_m8_us"]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
