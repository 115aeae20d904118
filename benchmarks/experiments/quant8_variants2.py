"""Experiment 2: dequantize layouts and decision-tree quantize (see NOTES.md)."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl
import jax_triton as jt

sys.path.insert(0, "benchmarks")
from timing import time_jax  # noqa: E402

from jlowbit import codebooks, _reference as ref  # noqa: E402
from jlowbit.triton_kernels import common  # noqa: E402

N = 64 << 20
BS = 4096


@triton.jit
def deq_i32(codes_ptr, code_ptr, absmax_ptr, n, out_ptr, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
  start = tl.program_id(0).to(tl.int64) * TILE
  offs = tl.arange(0, TILE)
  mask = offs < n - start
  c = tl.load(codes_ptr + start + offs, mask=mask, other=0).to(tl.int32)
  a = tl.load(absmax_ptr + start // BLOCKSIZE + offs // BLOCKSIZE, mask=mask, other=0.0)
  v = tl.load(code_ptr + c) * a
  tl.store(out_ptr + start + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def deq_rep(codes_ptr, code_ptr, absmax_ptr, n, out_ptr, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
  start = tl.program_id(0).to(tl.int64) * TILE
  offs = tl.arange(0, TILE // 32)[:, None] * 32 + tl.arange(0, 32)[None, :]
  mask = offs < n - start
  c = tl.load(codes_ptr + start + offs, mask=mask, other=0).to(tl.int32)
  a = tl.load(absmax_ptr + start // BLOCKSIZE + offs // BLOCKSIZE, mask=mask, other=0.0)
  table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 256))[:, None], (256, 32))
  v = tl.gather(table, c, 0) * a
  tl.store(out_ptr + start + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def deq_nogather(codes_ptr, code_ptr, absmax_ptr, n, out_ptr, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
  # Upper bound: same traffic, no table lookup (wrong values; timing only).
  start = tl.program_id(0).to(tl.int64) * TILE
  offs = tl.arange(0, TILE)
  mask = offs < n - start
  c = tl.load(codes_ptr + start + offs, mask=mask, other=0).to(tl.float32)
  a = tl.load(absmax_ptr + start // BLOCKSIZE + offs // BLOCKSIZE, mask=mask, other=0.0)
  tl.store(out_ptr + start + offs, (c * a).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def q_tree(x_ptr, tree_ptr, n, codes_ptr, absmax_ptr, BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr,
           SCALED: tl.constexpr):
  start = tl.program_id(0).to(tl.int64) * (BLOCKS * BLOCKSIZE)
  offs = tl.arange(0, BLOCKS * BLOCKSIZE)
  mask = offs < n - start
  x = tl.load(x_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
  absmax = common.row_absmax(tl.reshape(x, (BLOCKS, BLOCKSIZE)))
  if SCALED:
    scale = tl.where(absmax > 0, absmax, 1.0)
    s = tl.reshape(tl.broadcast_to(scale[:, None], (BLOCKS, BLOCKSIZE)), (BLOCKS * BLOCKSIZE,))
    node = tl.full(x.shape, 1, tl.int32)
    for _ in tl.static_range(8):
      node = 2 * node + (tl.load(tree_ptr + node) * s <= x).to(tl.int32)
    idx = node - 256
  else:
    s = tl.reshape(tl.broadcast_to(common.inverse_scale(absmax)[:, None], (BLOCKS, BLOCKSIZE)), (BLOCKS * BLOCKSIZE,))
    idx = common.tree_code_index(x * s, tree_ptr, 8)
  tl.store(codes_ptr + start + offs, idx.to(tl.uint8), mask=mask)
  blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
  tl.store(absmax_ptr + blk, absmax, mask=blk < tl.cdiv(n, BLOCKSIZE))


def main():
  import jlowbit
  code = jnp.asarray(codebooks.dynamic(True))
  tree = jnp.asarray(ref.decision_tree(codebooks.dynamic(True)))
  xs = [jax.random.normal(jax.random.key(i), (N,), jnp.float32) for i in range(4)]
  qs = [jlowbit.quantize_blockwise(x, blocksize=BS, impl="xla") for x in xs]
  ref_out = jlowbit.dequantize_blockwise(qs[0], impl="xla")
  for dtype in (jnp.float32, jnp.bfloat16):
    nbytes = N * (1 + jnp.dtype(dtype).itemsize)
    t = time_jax(lambda q: jlowbit.dequantize_blockwise(q, dtype, impl="xla"), [(q,) for q in qs])
    print(f"deq xla          {jnp.dtype(dtype).name:9s} {t*1e6:7.1f} us {nbytes/t/1e12:5.2f} TB/s")
    for name, kernel in (("i32", deq_i32), ("rep", deq_rep), ("nogather", deq_nogather)):
      for tile, warps in ((2048, 4), (4096, 4), (4096, 8), (1024, 2)):
        try:
          f = lambda q: jt.triton_call(q.codes, q.code, q.absmax, N, kernel=kernel,
                                       out_shape=jax.ShapeDtypeStruct((N,), dtype), grid=(N // tile,),
                                       num_warps=warps, BLOCKSIZE=BS, TILE=tile)
          ok = bool(jnp.array_equal(f(qs[0]), ref_out.astype(dtype)))
          t = time_jax(f, [(q,) for q in qs])
          print(f"deq {name:12s} {jnp.dtype(dtype).name:9s} tile={tile:6d} w={warps} {t*1e6:7.1f} us {nbytes/t/1e12:5.2f} TB/s ok={ok}")
        except Exception as e:  # pylint: disable=broad-except
          print(f"deq {name} tile={tile} failed: {str(e)[:400]}")
  for dtype in (jnp.float32, jnp.bfloat16):
    xd = [x.astype(dtype) for x in xs]
    want = jlowbit.quantize_blockwise(xd[0], blocksize=BS, impl="xla").codes
    nbytes = N * (1 + jnp.dtype(dtype).itemsize)
    for scaled in (False, True):
      for blocks, warps in ((1, 4), (1, 8), (1, 16)):
        f = lambda x: jt.triton_call(x, tree, N, kernel=q_tree,
                                     out_shape=(jax.ShapeDtypeStruct((N,), jnp.uint8),
                                                jax.ShapeDtypeStruct((N // BS,), jnp.float32)),
                                     grid=(N // (BS * blocks),), num_warps=warps,
                                     BLOCKSIZE=BS, BLOCKS=blocks, SCALED=scaled)
        try:
          mism = int(jnp.sum(f(xd[0])[0] != want))
          t = time_jax(f, [(x,) for x in xd])
          print(f"q tree scaled={scaled} {jnp.dtype(dtype).name} w={warps} {t*1e6:7.1f} us {nbytes/t/1e12:5.2f} TB/s mismatches_vs_xla={mism}")
        except Exception as e:  # pylint: disable=broad-except
          print(f"q tree failed: {str(e)[:400]}")


if __name__ == "__main__":
  main()
