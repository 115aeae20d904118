"""4-bit (NF4 / FP4) blockwise quantize / dequantize kernels and launchers.

A program handles one tile of ``TILE = BLOCKS * BLOCK_SIZE`` (4096) elements
of the row-major flattened tensor, i.e. ``TILE / 2`` packed bytes (element
``2i`` in the high nibble of byte ``i``, ``2i + 1`` in the low nibble): one
read of the input, one write of the packed bytes and the absmax.

Memory is touched only through contiguous tiles: the elements are loaded
(stored) as one ``[TILE]`` vector and paired up by ``tl.split`` /
``tl.join`` of its ``[TILE / 2, 2]`` view, never by two stride-2 accesses.
Full tiles run without masks: jax-triton does not tell the compiler that
``n`` is a multiple of 16, so a mask ``offsets < n`` makes it emit 1-, 2- or
4-byte accesses instead of 16-byte ones; only the last, partial tile takes
the masked path.

:func:`dequantize_4bit_tiled_kernel` reads a weight in the tiled order of
:mod:`jlowbit._tiling` (``UNITS`` consecutive 512-byte units of one 16-row
tile per program), permutes the loaded bytes back to row-major order in
registers and writes the 16 rows' ``64 UNITS`` columns: the same values as
:func:`dequantize_4bit_kernel` on the untiled bytes, with no untiled copy.
"""

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jlowbit.triton_kernels import common
from jlowbit.triton_kernels.launch import cdiv, launch

TILE = 4096  # elements per program; a multiple of every supported block_size
QUANTIZE_WARPS = 4
DEQUANTIZE_WARPS = 4


@triton.jit
def _quantize_tile(x_ptr, tree_ptr, bits_ptr, packed_ptr, absmax_ptr, start, n,
                   BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr,
                   SIGN_MAGNITUDE: tl.constexpr, MASKED: tl.constexpr):
  tile: tl.constexpr = BLOCKS * BLOCK_SIZE
  offsets = tl.arange(0, tile)
  byte = tl.arange(0, tile // 2)
  blocks = start // BLOCK_SIZE + tl.arange(0, BLOCKS)
  if MASKED:
    mask = offsets < n - start
    x = tl.load(x_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
  else:
    x = tl.load(x_ptr + start + offsets).to(tl.float32)
  absmax = common.row_absmax(tl.reshape(x, (BLOCKS, BLOCK_SIZE)))
  inv_scale = common.broadcast_rows(common.reciprocal(absmax), BLOCKS, BLOCK_SIZE)
  codes = common.bnb_4bit_index(x, inv_scale, tree_ptr, bits_ptr, SIGN_MAGNITUDE)
  if MASKED:
    codes = tl.where(mask, codes, 0)  # odd n: the last low nibble is 0
  high, low = tl.split(tl.reshape(codes, (tile // 2, 2)))
  packed = ((high << 4) | low).to(tl.uint8)
  if MASKED:
    tl.store(packed_ptr + start // 2 + byte, packed, mask=2 * byte < n - start)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < tl.cdiv(n, BLOCK_SIZE))
  else:
    tl.store(packed_ptr + start // 2 + byte, packed)
    tl.store(absmax_ptr + blocks, absmax)


@triton.jit
def quantize_4bit_kernel(x_ptr, tree_ptr, bits_ptr, n, packed_ptr, absmax_ptr,
                         BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr,
                         SIGN_MAGNITUDE: tl.constexpr):
  start = tl.program_id(0).to(tl.int64) * (BLOCKS * BLOCK_SIZE)
  if start + BLOCKS * BLOCK_SIZE <= n:
    _quantize_tile(x_ptr, tree_ptr, bits_ptr, packed_ptr, absmax_ptr, start, n,
                   BLOCK_SIZE, BLOCKS, SIGN_MAGNITUDE, False)
  else:
    _quantize_tile(x_ptr, tree_ptr, bits_ptr, packed_ptr, absmax_ptr, start, n,
                   BLOCK_SIZE, BLOCKS, SIGN_MAGNITUDE, True)


@triton.jit
def _dequantize_tile(packed_ptr, quant_map_ptr, absmax_ptr, out_ptr, start, n,
                     BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr,
                     MASKED: tl.constexpr):
  tile: tl.constexpr = BLOCKS * BLOCK_SIZE
  offsets = tl.arange(0, tile)
  byte = tl.arange(0, tile // 2)
  blocks = start // BLOCK_SIZE + tl.arange(0, BLOCKS)
  if MASKED:
    packed = tl.load(packed_ptr + start // 2 + byte, mask=2 * byte < n - start,
                     other=0)
    absmax = tl.load(absmax_ptr + blocks, mask=blocks < tl.cdiv(n, BLOCK_SIZE),
                     other=0.0)
  else:
    packed = tl.load(packed_ptr + start // 2 + byte)
    absmax = tl.load(absmax_ptr + blocks)
  high, low = common.unpack_nibbles(packed)
  codes = tl.reshape(tl.join(high, low), (tile,))
  values = (tl.load(quant_map_ptr + codes)
            * common.broadcast_rows(absmax, BLOCKS, BLOCK_SIZE))
  values = values.to(out_ptr.dtype.element_ty)
  if MASKED:
    tl.store(out_ptr + start + offsets, values, mask=offsets < n - start)
  else:
    tl.store(out_ptr + start + offsets, values)


@triton.jit
def dequantize_4bit_kernel(packed_ptr, quant_map_ptr, absmax_ptr, n, out_ptr,
                           BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr):
  start = tl.program_id(0).to(tl.int64) * (BLOCKS * BLOCK_SIZE)
  if start + BLOCKS * BLOCK_SIZE <= n:
    _dequantize_tile(packed_ptr, quant_map_ptr, absmax_ptr, out_ptr, start, n,
                     BLOCK_SIZE, BLOCKS, False)
  else:
    _dequantize_tile(packed_ptr, quant_map_ptr, absmax_ptr, out_ptr, start, n,
                     BLOCK_SIZE, BLOCKS, True)


@triton.jit
def dequantize_4bit_tiled_kernel(packed_ptr, quant_map_ptr, absmax_ptr, out_ptr,
                                 K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                                 UNITS: tl.constexpr):
  """``W`` ``[N, K]`` from its tiled bytes and tiled float32 absmax; grid
  ``N / 16 * K / (64 UNITS)`` (``UNITS`` divides ``K / 64``)."""
  STEPS: tl.constexpr = K // (64 * UNITS)  # programs per 16-row tile
  tile = tl.program_id(0) // STEPS
  first = tl.program_id(0) % STEPS * UNITS  # first 64-column block
  packed = tl.load(packed_ptr + (tile.to(tl.int64) * (K // 64) + first) * 512
                   + tl.arange(0, 512 * UNITS))
  # Unit u holds, lane (g, t) after lane, the bytes of rows g, g + 8 (h)
  # and words t, 4 + t (j) of its block: to [row (h g), column (u j t byte)].
  packed = tl.reshape(packed, (UNITS, 8, 4, 2, 2, 4))  # u g t h j byte
  packed = tl.reshape(tl.permute(packed, (3, 1, 0, 4, 2, 5)), (16, 32 * UNITS))
  high, low = common.unpack_nibbles(packed)
  codes = tl.reshape(tl.join(high, low), (16, 64 * UNITS))
  stats = ((tile * (K // BLOCK_SIZE) + (first + tl.arange(0, UNITS))
            // (BLOCK_SIZE // 64)) * 16)[None, :] + tl.arange(0, 16)[:, None]
  absmax = tl.broadcast_to(tl.load(absmax_ptr + stats)[:, :, None],
                           (16, UNITS, 64))
  values = tl.load(quant_map_ptr + codes) * tl.reshape(absmax, (16, 64 * UNITS))
  rows = tile.to(tl.int64) * 16 + tl.arange(0, 16)
  columns = first * 64 + tl.arange(0, 64 * UNITS)
  tl.store(out_ptr + rows[:, None] * K + columns[None, :],
           values.to(out_ptr.dtype.element_ty))


def quantize_4bit(x: jax.Array, tree: jax.Array, bits: jax.Array,
                  block_size: int, sign_magnitude: bool, impl: str):
  """Launches the quantize kernel on flat ``x``; returns (packed, absmax).

  ``tree``: float32 threshold tree (``jlowbit._search.bnb_4bit_tree``) of
  the NF4 codes or the FP4 magnitudes; ``bits``: int32 code of each FP4
  magnitude (unused for NF4).
  """
  n = x.size
  return launch(
      __name__, "quantize_4bit_kernel", x, tree, bits, n,
      out_shape=(jax.ShapeDtypeStruct((cdiv(n, 2),), jnp.uint8),
                 jax.ShapeDtypeStruct((cdiv(n, block_size),), jnp.float32)),
      grid=(cdiv(n, TILE),), impl=impl, num_warps=QUANTIZE_WARPS,
      BLOCK_SIZE=block_size, BLOCKS=TILE // block_size,
      SIGN_MAGNITUDE=sign_magnitude)


def dequantize_4bit(packed: jax.Array, quant_map: jax.Array, absmax: jax.Array,
                    n: int, block_size: int, dtype, impl: str) -> jax.Array:
  """Launches the dequantize kernel; returns ``dtype[n]``."""
  (out,) = launch(
      __name__, "dequantize_4bit_kernel", packed, quant_map, absmax, n,
      out_shape=(jax.ShapeDtypeStruct((n,), dtype),),
      grid=(cdiv(n, TILE),), impl=impl, num_warps=DEQUANTIZE_WARPS,
      BLOCK_SIZE=block_size, BLOCKS=TILE // block_size)
  return out


def dequantize_4bit_tiled(packed: jax.Array, quant_map: jax.Array,
                          absmax: jax.Array, shape: tuple[int, int],
                          block_size: int, dtype, impl: str) -> jax.Array:
  """Launches the tiled dequantize kernel; returns ``dtype[N * K]`` row-major.

  ``packed`` and the float32 ``absmax`` in the tiled order of
  :mod:`jlowbit._tiling` (``N % 16 == 0``, ``K % 64 == 0``,
  ``block_size % 64 == 0``, ``K % block_size == 0``).
  """
  n, k = shape
  units = 8  # 8192 elements per program, as TILE
  while (k // 64) % units:
    units //= 2
  (out,) = launch(
      __name__, "dequantize_4bit_tiled_kernel", packed, quant_map, absmax,
      out_shape=(jax.ShapeDtypeStruct((n * k,), dtype),),
      grid=(n // 16 * (k // (64 * units)),), impl=impl,
      num_warps=DEQUANTIZE_WARPS, K=k, BLOCK_SIZE=block_size, UNITS=units)
  return out
