"""4-bit (NF4 / FP4) blockwise quantize / dequantize kernels and launchers.

A program handles ``BLOCKS`` consecutive quantization blocks of ``BLOCKSIZE``
elements of the row-major flattened tensor. Element ``2i`` and ``2i + 1``
share byte ``i`` (high and low nibble), so the program works on two
``[BLOCKS, BLOCKSIZE // 2]`` tiles, the even and the odd elements, which line
up with the ``[BLOCKS, BLOCKSIZE // 2]`` tile of packed bytes: one read of the
input, one write of the packed bytes and the absmax.
"""

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jlowbit.triton_kernels import common
from jlowbit.triton_kernels.launch import cdiv, launch

TILE_ELEMENTS = 4096  # elements per program (several small blocks share one)


@triton.jit
def _byte_offsets(pid, BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr):
  """Block ids ``[BLOCKS]`` and int64 byte offsets ``[BLOCKS, BLOCKSIZE // 2]``."""
  half: tl.constexpr = BLOCKSIZE // 2
  block = pid * BLOCKS + tl.arange(0, BLOCKS)
  byte = block.to(tl.int64)[:, None] * half + tl.arange(0, half)[None, :]
  return block, byte


@triton.jit
def quantize_4bit_kernel(x_ptr, tree_ptr, bits_ptr, n, packed_ptr, absmax_ptr,
                         BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr,
                         SIGN_MAGNITUDE: tl.constexpr):
  block, byte = _byte_offsets(tl.program_id(0), BLOCKSIZE, BLOCKS)
  even = 2 * byte
  has_even = even < n
  has_odd = even + 1 < n
  x_even = tl.load(x_ptr + even, mask=has_even, other=0.0).to(tl.float32)
  x_odd = tl.load(x_ptr + even + 1, mask=has_odd, other=0.0).to(tl.float32)
  absmax = common.pair_row_absmax(x_even, x_odd)
  scale = common.block_scale(absmax)[:, None]
  high = common.scaled_4bit_index(x_even, scale, tree_ptr, bits_ptr,
                                  SIGN_MAGNITUDE)
  low = common.scaled_4bit_index(x_odd, scale, tree_ptr, bits_ptr,
                                 SIGN_MAGNITUDE)
  low = tl.where(has_odd, low, 0)  # odd n: the last low nibble is 0
  tl.store(packed_ptr + byte, ((high << 4) | low).to(tl.uint8), mask=has_even)
  tl.store(absmax_ptr + block, absmax, mask=block < tl.cdiv(n, BLOCKSIZE))


@triton.jit
def dequantize_4bit_kernel(packed_ptr, quant_map_ptr, absmax_ptr, n, out_ptr,
                           BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr):
  block, byte = _byte_offsets(tl.program_id(0), BLOCKSIZE, BLOCKS)
  packed = tl.load(packed_ptr + byte, mask=2 * byte < n, other=0)
  high, low = common.unpack_nibbles(packed)
  absmax = tl.load(absmax_ptr + block, mask=block < tl.cdiv(n, BLOCKSIZE),
                   other=0.0)[:, None]
  values = tl.interleave(tl.load(quant_map_ptr + high) * absmax,
                         tl.load(quant_map_ptr + low) * absmax)
  offsets = (block.to(tl.int64)[:, None] * BLOCKSIZE
             + tl.arange(0, BLOCKSIZE)[None, :])
  tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty),
           mask=offsets < n)


def _blocks_per_program(blocksize: int) -> int:
  return max(1, TILE_ELEMENTS // blocksize)


def quantize_4bit(x: jax.Array, tree: jax.Array, bits: jax.Array,
                  blocksize: int, sign_magnitude: bool, impl: str):
  """Launches the quantize kernel on flat ``x``; returns (packed, absmax).

  ``tree``: float32 decision tree (``jlowbit._reference.decision_tree``) of
  the 16 NF4 levels or the 8 FP4 magnitudes; ``bits``: int32 code of each
  FP4 magnitude (unused for NF4).
  """
  n = x.size
  n_blocks = cdiv(n, blocksize)
  blocks = _blocks_per_program(blocksize)
  return launch(
      __name__, "quantize_4bit_kernel", x, tree, bits, n,
      out_shape=(jax.ShapeDtypeStruct((cdiv(n, 2),), jnp.uint8),
                 jax.ShapeDtypeStruct((n_blocks,), jnp.float32)),
      grid=(cdiv(n_blocks, blocks),), impl=impl, num_warps=8,
      BLOCKSIZE=blocksize, BLOCKS=blocks, SIGN_MAGNITUDE=sign_magnitude)


def dequantize_4bit(packed: jax.Array, quant_map: jax.Array, absmax: jax.Array,
                    n: int, blocksize: int, dtype, impl: str) -> jax.Array:
  """Launches the dequantize kernel; returns ``dtype[n]``."""
  blocks = _blocks_per_program(blocksize)
  (out,) = launch(
      __name__, "dequantize_4bit_kernel", packed, quant_map, absmax, n,
      out_shape=(jax.ShapeDtypeStruct((n,), dtype),),
      grid=(cdiv(absmax.shape[0], blocks),), impl=impl, num_warps=8,
      BLOCKSIZE=blocksize, BLOCKS=blocks)
  return out
