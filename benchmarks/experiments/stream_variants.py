"""Experiment 3: streaming structure of the dequantize kernel (see NOTES.md)."""
import sys

import jax
import jax.numpy as jnp
import triton
import triton.language as tl
import jax_triton as jt

sys.path.insert(0, "benchmarks")
from timing import time_jax  # noqa: E402

N = 64 << 20
BS = 4096


@triton.jit
def copy_kernel(x_ptr, n, out_ptr, TILE: tl.constexpr):
  start = tl.program_id(0).to(tl.int64) * TILE
  offs = tl.arange(0, TILE)
  mask = offs < n - start
  tl.store(out_ptr + start + offs, tl.load(x_ptr + start + offs, mask=mask), mask=mask)


@triton.jit
def deq_scalar(codes_ptr, code_ptr, absmax_ptr, n, out_ptr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
               LOOPS: tl.constexpr):
  for i in tl.static_range(LOOPS):
    start = (tl.program_id(0).to(tl.int64) * LOOPS + i) * TILE
    offs = tl.arange(0, TILE)
    mask = offs < n - start
    c = tl.load(codes_ptr + start + offs, mask=mask, other=0).to(tl.int32)
    a = tl.load(absmax_ptr + start // BLOCK_SIZE)
    v = tl.load(code_ptr + c) * a
    tl.store(out_ptr + start + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def deq_scalar_nomask(codes_ptr, code_ptr, absmax_ptr, n, out_ptr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                      LOOPS: tl.constexpr):
  for i in tl.static_range(LOOPS):
    start = (tl.program_id(0).to(tl.int64) * LOOPS + i) * TILE
    offs = tl.arange(0, TILE)
    c = tl.load(codes_ptr + start + offs).to(tl.int32)
    a = tl.load(absmax_ptr + start // BLOCK_SIZE)
    v = tl.load(code_ptr + c) * a
    tl.store(out_ptr + start + offs, v.to(out_ptr.dtype.element_ty))


def main():
  import jlowbit
  xs = [jax.random.normal(jax.random.key(i), (N,), jnp.float32) for i in range(4)]
  for tile, warps in ((1024, 4), (4096, 4), (4096, 8), (8192, 8)):
    f = lambda x: jt.triton_call(x, N, kernel=copy_kernel, out_shape=jax.ShapeDtypeStruct((N,), jnp.float32),
                                 grid=(N // tile,), num_warps=warps, TILE=tile)
    t = time_jax(f, [(x,) for x in xs])
    print(f"copy fp32 tile={tile} w={warps} {t*1e6:7.1f} us {8*N/t/1e12:5.2f} TB/s")
  t = time_jax(lambda x: x * 2, [(x,) for x in xs])
  print(f"xla x*2 fp32 {t*1e6:7.1f} us {8*N/t/1e12:5.2f} TB/s")
  qs = [jlowbit.quantize_blockwise(x, block_size=BS, impl="xla") for x in xs]
  for dtype in (jnp.float32, jnp.bfloat16):
    want = jlowbit.dequantize_blockwise(qs[0], dtype, impl="xla")
    nbytes = N * (1 + jnp.dtype(dtype).itemsize)
    for kernel in (deq_scalar, deq_scalar_nomask):
      for tile, warps, loops in ((1024, 4, 1), (2048, 4, 1), (4096, 4, 1), (4096, 8, 1), (1024, 4, 4), (2048, 8, 2), (512, 4, 1)):
        f = lambda q: jt.triton_call(q.codes, q.code, q.absmax, N, kernel=kernel,
                                     out_shape=jax.ShapeDtypeStruct((N,), dtype),
                                     grid=(N // (tile * loops),), num_warps=warps, BLOCK_SIZE=BS, TILE=tile, LOOPS=loops)
        ok = bool(jnp.array_equal(f(qs[0]), want))
        t = time_jax(f, [(q,) for q in qs])
        print(f"{kernel.__name__:18s} {jnp.dtype(dtype).name:9s} tile={tile} w={warps} loops={loops} {t*1e6:7.1f} us {nbytes/t/1e12:5.2f} TB/s ok={ok}")


if __name__ == "__main__":
  main()
