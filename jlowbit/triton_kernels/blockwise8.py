"""8-bit blockwise quantize / dequantize kernels and their launchers.

A program handles ``BLOCKS`` consecutive quantization blocks of ``BLOCKSIZE``
elements of the row-major flattened tensor as one ``[BLOCKS, BLOCKSIZE]``
tile: one read of the input, one write of the codes and the absmax.
"""

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jlowbit.triton_kernels import common
from jlowbit.triton_kernels.launch import cdiv, launch

TILE_ELEMENTS = 4096  # elements per program (several small blocks share one)


@triton.jit
def _tile_offsets(pid, BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr):
  block = pid * BLOCKS + tl.arange(0, BLOCKS)
  offsets = block.to(tl.int64)[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
  return block, offsets


@triton.jit
def quantize_blockwise_kernel(x_ptr, code_ptr, n, codes_ptr, absmax_ptr,
                              BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr,
                              CODE_BITS: tl.constexpr):
  block, offsets = _tile_offsets(tl.program_id(0), BLOCKSIZE, BLOCKS)
  mask = offsets < n
  x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
  absmax = common.row_absmax(x)
  codes = common.quantize_tile(x, absmax, code_ptr, CODE_BITS)
  tl.store(codes_ptr + offsets, codes.to(tl.uint8), mask=mask)
  tl.store(absmax_ptr + block, absmax, mask=block < tl.cdiv(n, BLOCKSIZE))


@triton.jit
def dequantize_blockwise_kernel(codes_ptr, code_ptr, absmax_ptr, n, out_ptr,
                                BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr):
  block, offsets = _tile_offsets(tl.program_id(0), BLOCKSIZE, BLOCKS)
  mask = offsets < n
  codes = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.int32)
  absmax = tl.load(absmax_ptr + block, mask=block < tl.cdiv(n, BLOCKSIZE), other=0.0)
  values = tl.load(code_ptr + codes) * absmax[:, None]
  tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks_per_program(blocksize: int) -> int:
  return max(1, TILE_ELEMENTS // blocksize)


def quantize_blockwise(x: jax.Array, code: jax.Array, blocksize: int, impl: str):
  """Launches the quantize kernel on flat ``x``; returns (codes, absmax)."""
  n = x.size
  n_blocks = cdiv(n, blocksize)
  blocks = _blocks_per_program(blocksize)
  return launch(
      __name__, "quantize_blockwise_kernel", x, code, n,
      out_shape=(jax.ShapeDtypeStruct((n,), jnp.uint8),
                 jax.ShapeDtypeStruct((n_blocks,), jnp.float32)),
      grid=(cdiv(n_blocks, blocks),), impl=impl, num_warps=8,
      BLOCKSIZE=blocksize, BLOCKS=blocks,
      CODE_BITS=code.shape[0].bit_length() - 1)


def dequantize_blockwise(codes: jax.Array, code: jax.Array, absmax: jax.Array,
                         blocksize: int, dtype, impl: str) -> jax.Array:
  """Launches the dequantize kernel on flat ``codes``; returns flat values."""
  n = codes.size
  blocks = _blocks_per_program(blocksize)
  (out,) = launch(
      __name__, "dequantize_blockwise_kernel", codes, code, absmax, n,
      out_shape=(jax.ShapeDtypeStruct((n,), dtype),),
      grid=(cdiv(absmax.shape[0], blocks),), impl=impl, num_warps=8,
      BLOCKSIZE=blocksize, BLOCKS=blocks)
  return out
