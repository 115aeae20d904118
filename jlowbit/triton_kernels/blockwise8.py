"""8-bit blockwise quantize / dequantize kernels and their launchers.

A program handles one tile of ``TILE = BLOCKS * BLOCK_SIZE`` (4096) elements of
the row-major flattened tensor: one read of the input, one write of the codes
and the absmax. Full tiles run without masks (masked accesses defeat
vectorization: measured 3x slower for bfloat16); only the last, partial tile
takes the masked path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from jlowbit.triton_kernels import common
from jlowbit.triton_kernels.launch import cdiv, launch

TILE = 4096  # elements per program; a multiple of every supported block_size
QUANTIZE_WARPS = 8
DEQUANTIZE_WARPS = 4


@triton.jit
def _quantize_tile(x_ptr, search_ptr, buckets_ptr, codes_ptr, absmax_ptr, start,
                   n, BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr,
                   CODE_BITS: tl.constexpr, STEPS: tl.constexpr,
                   MASKED: tl.constexpr):
  offsets = tl.arange(0, BLOCKS * BLOCK_SIZE)
  blocks = start // BLOCK_SIZE + tl.arange(0, BLOCKS)
  if MASKED:
    mask = offsets < n - start
    x = tl.load(x_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
  else:
    x = tl.load(x_ptr + start + offsets).to(tl.float32)
  codes, absmax = common.quantize_flat_tile(x, search_ptr, buckets_ptr, BLOCK_SIZE,
                                            BLOCKS, CODE_BITS, STEPS)
  codes = codes.to(tl.uint8)
  if MASKED:
    tl.store(codes_ptr + start + offsets, codes, mask=mask)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < tl.cdiv(n, BLOCK_SIZE))
  else:
    tl.store(codes_ptr + start + offsets, codes)
    tl.store(absmax_ptr + blocks, absmax)


@triton.jit
def quantize_blockwise_kernel(x_ptr, search_ptr, buckets_ptr, n, codes_ptr,
                              absmax_ptr, BLOCK_SIZE: tl.constexpr,
                              BLOCKS: tl.constexpr, CODE_BITS: tl.constexpr,
                              STEPS: tl.constexpr):
  """``search_ptr``/``buckets_ptr``/``STEPS``: ``jlowbit._search.code_search``."""
  start = tl.program_id(0).to(tl.int64) * (BLOCKS * BLOCK_SIZE)
  if start + BLOCKS * BLOCK_SIZE <= n:
    _quantize_tile(x_ptr, search_ptr, buckets_ptr, codes_ptr, absmax_ptr, start,
                   n, BLOCK_SIZE, BLOCKS, CODE_BITS, STEPS, False)
  else:
    _quantize_tile(x_ptr, search_ptr, buckets_ptr, codes_ptr, absmax_ptr, start,
                   n, BLOCK_SIZE, BLOCKS, CODE_BITS, STEPS, True)


@triton.jit
def _dequantize_tile(codes_ptr, code_ptr, absmax_ptr, out_ptr, start, n,
                     BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr,
                     MASKED: tl.constexpr):
  offsets = tl.arange(0, BLOCKS * BLOCK_SIZE)
  blocks = start // BLOCK_SIZE + tl.arange(0, BLOCKS)
  if MASKED:
    mask = offsets < n - start
    codes = tl.load(codes_ptr + start + offsets, mask=mask, other=0)
    absmax = tl.load(absmax_ptr + blocks, mask=blocks < tl.cdiv(n, BLOCK_SIZE), other=0.0)
  else:
    codes = tl.load(codes_ptr + start + offsets)
    absmax = tl.load(absmax_ptr + blocks)
  values = tl.load(code_ptr + codes.to(tl.int32)) * common.broadcast_rows(absmax, BLOCKS, BLOCK_SIZE)
  values = values.to(out_ptr.dtype.element_ty)
  if MASKED:
    tl.store(out_ptr + start + offsets, values, mask=mask)
  else:
    tl.store(out_ptr + start + offsets, values)


@triton.jit
def dequantize_blockwise_kernel(codes_ptr, code_ptr, absmax_ptr, n, out_ptr,
                                BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr):
  start = tl.program_id(0).to(tl.int64) * (BLOCKS * BLOCK_SIZE)
  if start + BLOCKS * BLOCK_SIZE <= n:
    _dequantize_tile(codes_ptr, code_ptr, absmax_ptr, out_ptr, start, n,
                     BLOCK_SIZE, BLOCKS, False)
  else:
    _dequantize_tile(codes_ptr, code_ptr, absmax_ptr, out_ptr, start, n,
                     BLOCK_SIZE, BLOCKS, True)


def quantize_blockwise(x: jax.Array, search: jax.Array, buckets: jax.Array,
                       steps: int, block_size: int, impl: str):
  """Quantizes flat ``x``; returns (codes, absmax).

  ``search``, ``buckets``, ``steps``: the codebook's
  :func:`jlowbit._search.code_search` tables.
  """
  n = x.size
  return launch(
      __name__, "quantize_blockwise_kernel", x, search, buckets, n,
      out_shape=(jax.ShapeDtypeStruct((n,), jnp.uint8),
                 jax.ShapeDtypeStruct((cdiv(n, block_size),), jnp.float32)),
      grid=(cdiv(n, TILE),), impl=impl, num_warps=QUANTIZE_WARPS,
      BLOCK_SIZE=block_size, BLOCKS=TILE // block_size,
      CODE_BITS=int(np.log2(search.shape[0])), STEPS=steps)


def dequantize_blockwise(codes: jax.Array, code: jax.Array, absmax: jax.Array,
                         block_size: int, dtype, impl: str) -> jax.Array:
  """Dequantizes flat ``codes``; returns flat ``dtype`` values."""
  n = codes.size
  (out,) = launch(
      __name__, "dequantize_blockwise_kernel", codes, code, absmax, n,
      out_shape=(jax.ShapeDtypeStruct((n,), dtype),),
      grid=(cdiv(n, TILE),), impl=impl, num_warps=DEQUANTIZE_WARPS,
      BLOCK_SIZE=block_size, BLOCKS=TILE // block_size)
  return out
