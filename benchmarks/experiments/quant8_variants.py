"""Experiment: variants of the 8-bit (de)quantize kernels, timed side by side.

Kept as the record of what was tried (see benchmarks/NOTES.md).
python benchmarks/experiments/quant8_variants.py
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl
import jax_triton as jt

sys.path.insert(0, "benchmarks")
from timing import time_jax  # noqa: E402

from jlowbit import codebooks  # noqa: E402
from jlowbit.triton_kernels import common  # noqa: E402

N = 64 << 20
BS = 4096


@triton.jit
def deq_flat(codes_ptr, code_ptr, absmax_ptr, n, out_ptr, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
  offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
  mask = offs < n
  c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
  a = tl.load(absmax_ptr + offs // BLOCKSIZE, mask=mask, other=0.0)
  v = tl.load(code_ptr + c) * a
  tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def deq_flat_gather(codes_ptr, code_ptr, absmax_ptr, n, out_ptr, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
  offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
  mask = offs < n
  table = tl.load(code_ptr + tl.arange(0, 256))
  c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
  a = tl.load(absmax_ptr + offs // BLOCKSIZE, mask=mask, other=0.0)
  v = tl.gather(table, c, 0) * a
  tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def q_gather(x_ptr, code_ptr, n, codes_ptr, absmax_ptr, BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr):
  block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
  offs = block.to(tl.int64)[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
  mask = offs < n
  x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
  absmax = common.row_absmax(x)
  v = tl.reshape(x * common.inverse_scale(absmax)[:, None], [BLOCKS * BLOCKSIZE])
  table = tl.load(code_ptr + tl.arange(0, 256))
  pos = tl.zeros(v.shape, tl.int32)
  for i in tl.static_range(8):
    cand = pos + (1 << (7 - i))
    pos = tl.where(tl.gather(table, cand - 1, 0) <= v, cand, pos)
  lo = tl.minimum(tl.maximum(pos - 1, 0), 254)
  hi = lo + 1
  idx = tl.where(tl.gather(table, hi, 0) - v < v - tl.gather(table, lo, 0), hi, lo)
  tl.store(codes_ptr + offs, tl.reshape(idx, [BLOCKS, BLOCKSIZE]).to(tl.uint8), mask=mask)
  tl.store(absmax_ptr + block, absmax, mask=block < tl.cdiv(n, BLOCKSIZE))


def run_deq(kernel, codes, code, absmax, dtype, tile, warps):
  return jt.triton_call(codes, code, absmax, codes.size, kernel=kernel,
                        out_shape=jax.ShapeDtypeStruct(codes.shape, dtype),
                        grid=(triton.cdiv(codes.size, tile),), num_warps=warps,
                        BLOCKSIZE=BS, TILE=tile)


def run_q(x, code, blocks, warps):
  n = x.size
  return jt.triton_call(x, code, n, kernel=q_gather,
                        out_shape=(jax.ShapeDtypeStruct((n,), jnp.uint8),
                                   jax.ShapeDtypeStruct((triton.cdiv(n, BS),), jnp.float32)),
                        grid=(triton.cdiv(n, BS * blocks),), num_warps=warps,
                        BLOCKSIZE=BS, BLOCKS=blocks)


def main():
  import jlowbit
  code = jnp.asarray(codebooks.dynamic(True))
  xs = [jax.random.normal(jax.random.key(i), (N,), jnp.float32) for i in range(4)]
  qs = [jlowbit.quantize_blockwise(x, blocksize=BS, impl="xla") for x in xs]
  ref = jlowbit.dequantize_blockwise(qs[0], impl="xla")
  for dtype in (jnp.float32, jnp.bfloat16):
    out_bytes = N * (1 + jnp.dtype(dtype).itemsize)
    for name, kernel in (("flat", deq_flat), ("flat_gather", deq_flat_gather)):
      for tile, warps in ((4096, 4), (8192, 8), (16384, 8), (2048, 4)):
        try:
          f = lambda q: run_deq(kernel, q.codes, q.code, q.absmax, dtype, tile, warps)
          ok = bool(jnp.array_equal(f(qs[0]).astype(jnp.float32), ref.astype(dtype).astype(jnp.float32)))
          t = time_jax(f, [(q,) for q in qs])
          print(f"deq {name:12s} {jnp.dtype(dtype).name:9s} tile={tile:6d} w={warps} {t*1e6:7.1f} us {out_bytes/t/1e12:5.2f} TB/s ok={ok}")
        except Exception as e:  # pylint: disable=broad-except
          print(f"deq {name} tile={tile} failed: {str(e)[:300]}")
  for blocks, warps in ((1, 4), (1, 8), (2, 8), (1, 16)):
    try:
      f = lambda x: run_q(x, code, blocks, warps)
      codes, _ = f(xs[0])
      ok = bool(jnp.array_equal(codes, qs[0].codes))
      t = time_jax(f, [(x,) for x in xs])
      print(f"q gather blocks={blocks} w={warps} {t*1e6:7.1f} us {N*5/t/1e12:5.2f} TB/s ok={ok}")
    except Exception as e:  # pylint: disable=broad-except
      print(f"q gather blocks={blocks} failed: {str(e)[:300]}")
  # XLA vs numpy reciprocal and the tie cases.
  a = jax.random.uniform(jax.random.key(9), (1 << 20,), jnp.float32, 0.01, 10)
  inv = np.asarray(jax.jit(lambda a: jnp.float32(1) / a)(a))
  print("xla 1/a != numpy:", int((inv != (np.float32(1) / np.asarray(a))).sum()))
  x = jax.random.normal(jax.random.key(3), (1_000_003,)).astype(jnp.bfloat16)
  g = jlowbit.quantize_blockwise(x, blocksize=64, impl="triton")
  w = jlowbit.quantize_blockwise(x, blocksize=64, impl="xla")
  bad = np.nonzero(np.asarray(g.codes) != np.asarray(w.codes))[0]
  xf = np.asarray(x, np.float32)
  am = np.asarray(w.absmax)
  print("absmax equal:", bool(np.array_equal(g.absmax, w.absmax)), "bad:", bad[:5])
  c = codebooks.dynamic(True)
  for i in bad[:5]:
    v = xf[i] * (np.float32(1) / am[i // 64])
    print(i, xf[i], am[i // 64], v, "triton", g.codes[i], c[int(g.codes[i])], "xla", w.codes[i], c[int(w.codes[i])])


if __name__ == "__main__":
  main()
