"""Fused 4-bit matrix-vector product ``y = x @ W^T`` and its launcher.

``W`` is ``[N, K]`` (out, in) quantized by :func:`jlowbit.quantize_4bit`: its
row-major flattened elements are packed two per byte with one absmax per
``BLOCKSIZE`` elements. Each program owns ``BLOCK_N`` output rows and streams
their packed bytes once, ``BLOCK_K`` columns at a time: unpack the nibbles,
look the codes up in the 16-entry table, multiply by ``x`` and accumulate in
float32. The dequantized ``W`` never exists in memory; the weight costs 0.5
byte per element of HBM traffic plus one float32 absmax per block.

``K`` (in_features) is a ``tl.constexpr``: a static shape under JAX anyway,
it gives the compiler the row alignment for wide loads and a fixed trip count
(and Triton's interpreter cannot loop to a runtime bound).

Two kernels:

* :func:`gemv_4bit_kernel` (``K % BLOCKSIZE == 0``, the case of every real
  layer): a ``BLOCK_K`` chunk of a row is ``GROUPS`` whole absmax blocks (or a
  part of one), loaded as a ``[BLOCK_N, GROUPS, HALF]`` byte tile with
  contiguous rows (wide vector loads); the products are summed per group and
  scaled by the group's absmax once.
* :func:`gemv_4bit_general_kernel` (any ``K`` and block size): per-element
  flat index, nibble select and absmax gather.
"""

from __future__ import annotations

import dataclasses

import jax
import triton
import triton.language as tl

from jlowbit.triton_kernels import common
from jlowbit.triton_kernels.launch import cdiv, launch


@dataclasses.dataclass(frozen=True)
class GemvConfig:
  """Tile sizes of the fused 4-bit gemv.

  Attributes:
    block_n: output rows per program (power of two).
    block_k: input columns per loop step (power of two, >= 32).
    num_warps: warps per program.
    num_stages: software-pipelining depth of the K loop.
  """
  block_n: int = 16
  block_k: int = 512
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_n", "block_k", "num_warps"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two")
    if self.block_k < 32:
      raise ValueError(f"block_k={self.block_k} must be >= 32")

  @classmethod
  def get_default(cls, out_features: int | None = None,
                  in_features: int | None = None) -> GemvConfig:
    """Defaults for an H100-class GPU (memory bound: 0.5 byte per weight).

    16 rows x 512 columns per step moves 4 KiB of packed weight per program
    per step (two 16-byte loads per thread at 4 warps). Layers with few
    output rows use 8 or 4 rows per program to keep enough programs in
    flight; narrow inputs shrink ``block_k``.
    """
    block_n = 16
    if out_features is not None:
      while block_n > 4 and cdiv(out_features, block_n) < 512:
        block_n //= 2
    block_k = 512
    if in_features is not None:
      block_k = max(32, min(block_k, triton.next_power_of_2(in_features)))
    return cls(block_n=block_n, block_k=block_k)


@triton.jit
def gemv_4bit_kernel(x_ptr, packed_ptr, quant_map_ptr, absmax_ptr, N, y_ptr,
                     K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                     BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                     BLOCK_K: tl.constexpr, HALF: tl.constexpr):
  """``K % BLOCKSIZE == 0``; a step is ``GROUPS`` groups of ``2 * HALF`` columns."""
  rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
  row_ok = rows < N
  group = tl.arange(0, GROUPS)
  byte_in_step = group[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [G, H]
  row_bytes = rows.to(tl.int64) * (K // 2)
  row_blocks = rows.to(tl.int64) * (K // BLOCKSIZE)  # first absmax of each row
  acc = tl.zeros([BLOCK_N], tl.float32)
  for b0 in range(0, K // 2, BLOCK_K // 2):  # in bytes: 16-byte aligned rows
    byte = b0 + byte_in_step                                # [G, H]
    byte_ok = byte < K // 2
    packed = tl.load(packed_ptr + row_bytes[:, None, None] + byte[None, :, :],
                     mask=row_ok[:, None, None] & byte_ok[None, :, :], other=0)
    high, low = common.unpack_nibbles(packed)
    x_even = tl.load(x_ptr + 2 * byte, mask=byte_ok, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + 2 * byte + 1, mask=byte_ok, other=0.0).to(tl.float32)
    products = (tl.load(quant_map_ptr + high) * x_even[None, :, :]
                + tl.load(quant_map_ptr + low) * x_odd[None, :, :])
    group_byte = b0 + group * HALF                          # [G]
    absmax = tl.load(
        absmax_ptr + row_blocks[:, None] + (2 * group_byte // BLOCKSIZE)[None, :],
        mask=row_ok[:, None] & (group_byte < K // 2)[None, :], other=0.0)
    acc += tl.sum(tl.sum(products, axis=2) * absmax, axis=1)
  tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def gemv_4bit_general_kernel(x_ptr, packed_ptr, quant_map_ptr, absmax_ptr, N,
                             y_ptr, K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
  """Any ``K``: element ``(r, k)`` is flat index ``r * K + k`` of ``W``."""
  rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
  row_ok = rows < N
  row_elements = rows.to(tl.int64) * K
  acc = tl.zeros([BLOCK_N], tl.float32)
  for k0 in range(0, K, BLOCK_K):
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    ok = row_ok[:, None] & col_ok[None, :]
    flat = row_elements[:, None] + cols[None, :]
    high, low = common.unpack_nibbles(
        tl.load(packed_ptr + flat // 2, mask=ok, other=0))
    code = tl.where(flat % 2 == 0, high, low)
    weight = (tl.load(quant_map_ptr + code)
              * tl.load(absmax_ptr + flat // BLOCKSIZE, mask=ok, other=0.0))
    x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc += tl.sum(weight * x[None, :], axis=1)
  tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv_4bit(x: jax.Array, packed: jax.Array, quant_map: jax.Array,
              absmax: jax.Array, out_features: int, blocksize: int, impl: str,
              config: GemvConfig | None = None) -> jax.Array:
  """Launches the fused gemv: ``x`` ``[K]`` times 4-bit ``W`` ``[N, K]``^T.

  Args:
    x: ``[K]`` float32 / bfloat16 / float16; the output has its dtype.
    packed: uint8 ``[ceil(N * K / 2)]``.
    quant_map: float32 ``[16]``.
    absmax: float32 ``[ceil(N * K / blocksize)]``.
    out_features: ``N``.
    blocksize: elements per absmax block.
    impl: ``"triton"`` or ``"interpret"``.
    config: tile sizes; default :meth:`GemvConfig.get_default`.

  Returns:
    ``[N]`` in ``x.dtype``.
  """
  n, k = out_features, x.shape[0]
  config = config or GemvConfig.get_default(n, k)
  out_shape = (jax.ShapeDtypeStruct((n,), x.dtype),)
  grid = (cdiv(n, config.block_n),)
  options = dict(grid=grid, impl=impl, num_warps=config.num_warps,
                 num_stages=config.num_stages)
  if k % blocksize == 0:
    step = min(config.block_k, blocksize)
    (y,) = launch(
        __name__, "gemv_4bit_kernel", x, packed, quant_map, absmax, n,
        out_shape=out_shape, **options, K=k, BLOCKSIZE=blocksize,
        BLOCK_N=config.block_n, GROUPS=max(1, config.block_k // blocksize),
        BLOCK_K=config.block_k, HALF=step // 2)
  else:
    (y,) = launch(
        __name__, "gemv_4bit_general_kernel", x, packed, quant_map, absmax, n,
        out_shape=out_shape, **options, K=k, BLOCKSIZE=blocksize,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k)
  return y
