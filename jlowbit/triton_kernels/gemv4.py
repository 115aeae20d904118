"""Fused 4-bit matrix-vector product ``y = x @ W^T`` and its launcher.

``W`` is ``[N, K]`` (out, in) quantized by :func:`jlowbit.quantize_4bit`: its
row-major flattened elements are packed two per byte with one absmax per
``BLOCK_SIZE`` elements. A program owns ``BLOCK_N`` output rows and streams
their packed bytes once, ``BLOCK_K`` columns at a time: unpack the nibbles,
look the codes up in the 16-entry table (an L1-resident 64-byte gather),
multiply by ``x`` and accumulate in float32. The dequantized ``W`` never
exists in memory; the weight costs 0.5 byte per element of HBM traffic plus
one float32 absmax per block.

``K`` (in_features) is a ``tl.constexpr``: a static shape under JAX anyway,
it gives the compiler the row alignment for 16-byte loads and a fixed trip
count (and Triton's interpreter cannot loop to a runtime bound).

Two kernels:

* :func:`gemv_4bit_kernel` (``K % BLOCK_SIZE == 0``, the case of every real
  layer). A step's ``[BLOCK_N, BLOCK_K]`` tile is handled as one flat vector
  (rows one after the other): Triton then gives the packed bytes, the codes,
  the table gather and ``x`` one consistent layout with 16-byte loads (a 2-D
  tile makes it pick a lane-per-row layout for the gather and shuffle data
  through shared memory). Each thread sums its ``V`` contiguous products
  in registers, scales the sum by the block's absmax and accumulates into a
  per-thread ``[BLOCK_N, groups, SEG // V]`` tile that is reduced once after
  the K loop. Full steps are unmasked; a ``K`` that ``BLOCK_K`` does not
  divide ends with one masked step. Rows past ``N`` (``EVEN_N`` false) re-read
  row ``N - 1`` and are not stored. ``SPLIT_K > 1`` cuts ``K`` into that many
  ranges (grid axis 1) that write float32 partial sums ``[SPLIT_K, N]``; the
  launcher adds them, for layers with too few rows to fill the GPU.
* :func:`gemv_4bit_general_kernel` (any ``K`` and block size): per-element
  flat index, nibble select and absmax gather.
"""

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jlowbit.triton_kernels import common
from jlowbit.triton_kernels.launch import cdiv, launch

@triton.jit
def _step_sums(packed_ptrs, x_ptrs, absmax_ptrs, quant_map_ptr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEG: tl.constexpr,
               V: tl.constexpr, VALID: tl.constexpr):
  """``[BLOCK_N, BLOCK_K // SEG, SEG // V]`` absmax-scaled partial sums.

  One step: ``packed_ptrs`` ``[BLOCK_N * BLOCK_K // 2]`` and ``x_ptrs``
  ``[BLOCK_N * BLOCK_K]`` (flat, row after row), ``absmax_ptrs``
  ``[BLOCK_N, BLOCK_K // SEG]``. Columns from ``VALID`` on (the ragged end of
  K) count as 0; ``VALID == BLOCK_K`` loads without masks.
  """
  groups: tl.constexpr = BLOCK_K // SEG
  if VALID == BLOCK_K:
    packed = tl.load(packed_ptrs)
    x = tl.load(x_ptrs)
    absmax = tl.load(absmax_ptrs)
  else:
    byte = tl.arange(0, BLOCK_N * BLOCK_K // 2) % (BLOCK_K // 2)
    col = tl.arange(0, BLOCK_N * BLOCK_K) % BLOCK_K
    packed = tl.load(packed_ptrs, mask=2 * byte < VALID, other=0)
    x = tl.load(x_ptrs, mask=col < VALID, other=0.0)
    absmax = tl.load(absmax_ptrs, mask=(tl.arange(0, groups) * SEG < VALID)[None, :],
                     other=0.0)
  high, low = common.unpack_nibbles(packed)
  codes = tl.reshape(tl.join(high, low), (BLOCK_N * BLOCK_K,))
  products = tl.load(quant_map_ptr + codes) * x.to(tl.float32)
  sums = tl.sum(tl.reshape(products, (BLOCK_N, groups, SEG // V, V)), axis=3)
  return sums * absmax[:, :, None]


@triton.jit
def gemv_4bit_kernel(x_ptr, packed_ptr, quant_map_ptr, absmax_ptr, N, y_ptr,
                     K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, V: tl.constexpr,
                     EVEN_N: tl.constexpr):
  """``K % (SPLIT_K * BLOCK_SIZE) == 0``; ``y`` is ``[SPLIT_K, N]``.

  ``V``: elements of ``x`` per 16-byte load (the per-thread run Triton picks
  for the flat tile); ``EVEN_N``: ``N % BLOCK_N == 0``.
  """
  SEG: tl.constexpr = min(BLOCK_K, BLOCK_SIZE)
  K_SPLIT: tl.constexpr = K // SPLIT_K
  TAIL: tl.constexpr = K_SPLIT % BLOCK_K
  half: tl.constexpr = BLOCK_K // 2
  first_row = tl.program_id(0) * BLOCK_N
  k_first = tl.program_id(1) * K_SPLIT
  rows = first_row + tl.arange(0, BLOCK_N)
  byte = tl.arange(0, BLOCK_N * half)
  byte_rows = first_row + byte // half
  load_rows = rows
  if not EVEN_N:  # re-read the last row instead of masking every load
    load_rows = tl.minimum(rows, N - 1)
    byte_rows = tl.minimum(byte_rows, N - 1)
  packed_ptrs = (packed_ptr + byte_rows.to(tl.int64) * (K // 2) + k_first // 2
                 + byte % half)
  x_ptrs = x_ptr + k_first + tl.arange(0, BLOCK_N * BLOCK_K) % BLOCK_K
  absmax_ptrs = (absmax_ptr + load_rows.to(tl.int64)[:, None] * (K // BLOCK_SIZE)
                 + k_first // BLOCK_SIZE
                 + (tl.arange(0, BLOCK_K // SEG) * SEG // BLOCK_SIZE)[None, :])
  acc = tl.zeros([BLOCK_N, BLOCK_K // SEG, SEG // V], tl.float32)
  for step in range(K_SPLIT // BLOCK_K):
    k0 = step * BLOCK_K
    acc += _step_sums(packed_ptrs + k0 // 2, x_ptrs + k0,
                      absmax_ptrs + k0 // BLOCK_SIZE, quant_map_ptr,
                      BLOCK_N, BLOCK_K, SEG, V, BLOCK_K)
  if TAIL > 0:
    k0 = K_SPLIT - TAIL
    acc += _step_sums(packed_ptrs + k0 // 2, x_ptrs + k0,
                      absmax_ptrs + k0 // BLOCK_SIZE, quant_map_ptr,
                      BLOCK_N, BLOCK_K, SEG, V, TAIL)
  y = tl.sum(tl.sum(acc, axis=2), axis=1).to(y_ptr.dtype.element_ty)
  if EVEN_N:
    tl.store(y_ptr + tl.program_id(1) * N + rows, y)
  else:
    tl.store(y_ptr + tl.program_id(1) * N + rows, y, mask=rows < N)


@triton.jit
def gemv_4bit_general_kernel(x_ptr, packed_ptr, quant_map_ptr, absmax_ptr, N,
                             y_ptr, K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
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
              * tl.load(absmax_ptr + flat // BLOCK_SIZE, mask=ok, other=0.0))
    x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc += tl.sum(weight * x[None, :], axis=1)
  tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


def _split_k(k: int, block_size: int, split_k: int) -> int:
  """``split_k`` halved until ``k`` is a multiple of ``split_k * block_size``."""
  while split_k > 1 and k % (split_k * block_size):
    split_k //= 2
  return split_k


def gemv_4bit(x: jax.Array, packed: jax.Array, quant_map: jax.Array,
              absmax: jax.Array, out_features: int, block_size: int, impl: str,
              *, block_n: int, block_k: int, num_warps: int, num_stages: int,
              split_k: int) -> jax.Array:
  """Launches the fused gemv: ``x`` ``[K]`` times 4-bit ``W`` ``[N, K]``^T.

  Args:
    x: ``[K]`` float32 / bfloat16 / float16; the output has its dtype.
    packed: uint8 ``[ceil(N * K / 2)]``.
    quant_map: float32 ``[16]``.
    absmax: float32 ``[ceil(N * K / block_size)]``.
    out_features: ``N``.
    block_size: elements per absmax block.
    impl: ``"triton"`` or ``"interpret"``.
    block_n, block_k, num_warps, num_stages, split_k: the tile sizes of
      :class:`jlowbit.matmul4.GemvConfig`.

  Returns:
    ``[N]`` in ``x.dtype``.
  """
  n, k = out_features, x.shape[0]
  options = dict(impl=impl, num_warps=num_warps, num_stages=num_stages, K=k,
                 BLOCK_SIZE=block_size, BLOCK_N=block_n)
  if k % block_size:
    block_k = max(32, min(block_k, triton.next_power_of_2(k)))
    (y,) = launch(
        __name__, "gemv_4bit_general_kernel", x, packed, quant_map, absmax, n,
        out_shape=(jax.ShapeDtypeStruct((n,), x.dtype),),
        grid=(cdiv(n, block_n),), **options, BLOCK_K=block_k)
    return y
  split_k = _split_k(k, block_size, split_k)
  # The largest power of two <= K / split_k: no step is mostly padding.
  block_k = min(block_k, 1 << ((k // split_k).bit_length() - 1))
  out_dtype = x.dtype if split_k == 1 else jnp.float32
  (y,) = launch(
      __name__, "gemv_4bit_kernel", x, packed, quant_map, absmax, n,
      out_shape=(jax.ShapeDtypeStruct((split_k, n), out_dtype),),
      grid=(cdiv(n, block_n), split_k), **options, BLOCK_K=block_k,
      SPLIT_K=split_k, V=16 // x.dtype.itemsize, EVEN_N=n % block_n == 0)
  if split_k == 1:
    return y[0]
  return jnp.sum(y, axis=0).astype(x.dtype)
