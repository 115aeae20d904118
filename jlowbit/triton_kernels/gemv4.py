"""Fused products with a 4-bit weight: the batch-1 gemv and the small-batch product.

``W`` is ``[N, K]`` (out, in) quantized by :func:`jlowbit.quantize_4bit`: its
row-major flattened elements are packed two per byte with one absmax per
``BLOCK_SIZE`` elements. The dequantized ``W`` never exists in memory: each
weight costs 0.5 byte of HBM traffic plus its block's statistics.

``K`` (in_features) is a ``tl.constexpr``: a static shape under JAX anyway,
it gives the compiler the row alignment for 16-byte loads and a fixed trip
count (and Triton's interpreter cannot loop to a runtime bound).

How a tile of ``W`` is read (both fast kernels, ``K % BLOCK_SIZE == 0``):
rows are read as int32 words, ``V`` words (``8 V`` elements, one 16-byte
load for ``V = 4``) per thread "chunk", a ``[BLOCK_N, BLOCK_K / 8V, V]``
tile per K step. :func:`_word_codes` unpacks a word's eight codes with
shifts and masks, and ``tl.join`` keeps them in the registers that loaded
the word; the 16-entry table is read with ``tl.gather``, which Triton
serves from shared memory (one 32-bit-addressed load per element, no
64-bit address arithmetic, no bank conflicts: 16 entries, 16 banks). A
chunk never spans two absmax blocks (``BLOCK_SIZE % 8V == 0``), so the
absmax multiplies a chunk's sum, not each element. With nested statistics
(``NESTED``) the kernels read the uint8 absmax codes and dequantize them
per chunk (:func:`jlowbit.triton_kernels.common.block_absmax`): no float32
absmax array is made first.

* :func:`gemv_4bit_kernel` (one row of ``x``): a program owns ``BLOCK_N``
  rows; per step each thread multiplies its chunk by ``x`` and adds the
  scaled chunk sum into a ``[BLOCK_N, CHUNKS]`` accumulator, reduced once
  after the K loop. The loop is software-pipelined: the next step's words,
  absmax and ``x`` are loaded before this step's arithmetic, so every
  thread keeps a 16-byte load in flight while it computes (the kernel is
  bound by memory-level parallelism, not instructions). A ``K`` that
  ``BLOCK_K`` does not divide ends with one masked step. ``SPLIT_K > 1``
  cuts ``K`` into that many ranges (grid axis 1) that write float32 partial
  sums ``[SPLIT_K, N]``; the launcher adds them.
* :func:`matmul_4bit_small_kernel` (a few rows of half-precision ``x``):
  the same tile, times absmax, rounded to ``x``'s dtype and multiplied with
  a ``[BLOCK_M, BLOCK_K]`` tile of ``x`` by ``tl.dot`` (float32
  accumulation).
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
def _word_codes(words):
  """int32 words ``[..., V]`` -> their 8 codes each, ``[..., V, 2, 2, 2]``.

  Flattened, the codes are in element order: byte ``b`` of a word (little
  endian) holds element ``2b`` in its high nibble and ``2b + 1`` in its low
  one. Each ``tl.join`` adds a size-2 axis inside the thread, so the codes
  stay in the registers that loaded the word.
  """
  e0_e4 = tl.join((words >> 4) & 15, (words >> 20) & 15)
  e2_e6 = tl.join((words >> 12) & 15, (words >> 28) & 15)
  e1_e5 = tl.join(words & 15, (words >> 16) & 15)
  e3_e7 = tl.join((words >> 8) & 15, (words >> 24) & 15)
  return tl.join(tl.join(e0_e4, e2_e6), tl.join(e1_e5, e3_e7))


@triton.jit
def _load_step(words_ptrs, absmax_index, absmax_ptr, nested_code_ptr,
               nested_absmax_ptr, offset, VALID: tl.constexpr,
               CHUNKS: tl.constexpr, V: tl.constexpr, NESTED: tl.constexpr,
               NESTED_BLOCK: tl.constexpr):
  """One K step of ``W``: words ``[BLOCK_N, CHUNKS, V]`` and absmax ``[BLOCK_N, CHUNKS]``.

  A chunk is ``8 V`` consecutive elements of a row (``V`` int32 words, one
  16-byte load for ``V = 4``), all in one block; ``absmax_index`` is each
  chunk's block. Chunks from column ``VALID`` on (the ragged end of K) read
  as code 0 with absmax 0; ``VALID == CHUNKS * 8 V`` loads without masks.
  """
  if VALID == CHUNKS * 8 * V:
    words = tl.load(words_ptrs)
    absmax = common.block_absmax(absmax_ptr, nested_code_ptr,
                                 nested_absmax_ptr, offset, absmax_index, True,
                                 NESTED, NESTED_BLOCK)
  else:
    chunk_ok = tl.arange(0, CHUNKS) * (8 * V) < VALID
    words = tl.load(words_ptrs, mask=chunk_ok[None, :, None], other=0)
    absmax = common.block_absmax(absmax_ptr, nested_code_ptr,
                                 nested_absmax_ptr, offset, absmax_index,
                                 chunk_ok[None, :], NESTED, NESTED_BLOCK)
  return words, absmax


@triton.jit
def _load_x(x_ptrs, VALID: tl.constexpr, CHUNKS: tl.constexpr, V: tl.constexpr):
  """``x`` ``[CHUNKS, 8 V]`` of one K step (0 from column ``VALID`` on)."""
  if VALID == CHUNKS * 8 * V:
    return tl.load(x_ptrs)
  chunk_ok = tl.arange(0, CHUNKS) * (8 * V) < VALID
  return tl.load(x_ptrs, mask=chunk_ok[:, None], other=0.0)


@triton.jit
def _chunk_values(words, lut):
  """``quant_map[code]`` of every element of ``words``: float32 ``[BLOCK_N, CHUNKS, 8 V]``."""
  block_n: tl.constexpr = words.shape[0]
  chunks: tl.constexpr = words.shape[1]
  chunk: tl.constexpr = 8 * words.shape[2]
  codes = tl.reshape(_word_codes(words), (block_n * chunks * chunk,))
  return tl.reshape(tl.gather(lut, codes, 0), (block_n, chunks, chunk))


@triton.jit
def _step_sums(words, absmax, x, lut):
  """``[BLOCK_N, CHUNKS]`` chunk sums of ``W x``, each scaled by its absmax."""
  values = _chunk_values(words, lut)
  return tl.sum(values * x.to(tl.float32)[None, :, :], axis=2) * absmax


@triton.jit
def _dot_step(acc, x, words, absmax, lut):
  """``acc + x @ W_tile^T``: the tile dequantized to ``x``'s dtype in registers."""
  block_n: tl.constexpr = words.shape[0]
  weights = _chunk_values(words, lut) * absmax[:, :, None]
  weights = tl.reshape(weights, (block_n, x.shape[1])).to(x.dtype)
  if common.INTERPRETED:  # its dot multiplies bfloat16 bit patterns as ints
    return tl.dot(x.to(tl.float32), tl.trans(weights.to(tl.float32)), acc,
                  input_precision="ieee")
  return tl.dot(x, tl.trans(weights), acc)


@triton.jit
def _tile_pointers(packed_ptr, N, k_first, K: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   CHUNKS: tl.constexpr, V: tl.constexpr, EVEN_N: tl.constexpr):
  """Word pointers ``[BLOCK_N, CHUNKS, V]`` and absmax indices ``[BLOCK_N,
  CHUNKS]`` of this program's rows from column ``k_first`` on; rows past
  ``N`` (``EVEN_N`` false) re-read row ``N - 1`` instead of masking."""
  rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
  if not EVEN_N:
    rows = tl.minimum(rows, N - 1)
  rows = rows.to(tl.int64)
  chunk = tl.arange(0, CHUNKS)
  words_ptrs = (packed_ptr.to(tl.pointer_type(tl.int32))
                + (rows * (K // 8) + k_first // 8)[:, None, None]
                + (chunk * V)[None, :, None] + tl.arange(0, V)[None, None, :])
  absmax_index = ((rows * (K // BLOCK_SIZE) + k_first // BLOCK_SIZE)[:, None]
                  + (chunk * (8 * V) // BLOCK_SIZE)[None, :])
  return words_ptrs, absmax_index


@triton.jit
def gemv_4bit_kernel(x_ptr, packed_ptr, quant_map_ptr, absmax_ptr,
                     nested_code_ptr, nested_absmax_ptr, offset_ptr, N, y_ptr,
                     K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     V: tl.constexpr, SPLIT_K: tl.constexpr,
                     NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr,
                     EVEN_N: tl.constexpr):
  """``K % (SPLIT_K * BLOCK_SIZE) == 0``, ``BLOCK_SIZE % (8 V) == 0``; ``y``
  is ``[SPLIT_K, N]``.

  A program owns ``BLOCK_N`` rows and one of ``SPLIT_K`` ranges of K, read
  ``BLOCK_K`` columns per step; ``EVEN_N``: ``N % BLOCK_N == 0``.
  """
  CHUNKS: tl.constexpr = BLOCK_K // (8 * V)
  K_SPLIT: tl.constexpr = K // SPLIT_K
  TAIL: tl.constexpr = K_SPLIT % BLOCK_K
  k_first = tl.program_id(1) * K_SPLIT
  words_ptrs, absmax_index = _tile_pointers(
      packed_ptr, N, k_first, K, BLOCK_SIZE, BLOCK_N, CHUNKS, V, EVEN_N)
  x_ptrs = (x_ptr + k_first + (tl.arange(0, CHUNKS) * (8 * V))[:, None]
            + tl.arange(0, 8 * V)[None, :])
  lut = tl.load(quant_map_ptr + tl.arange(0, 16))
  offset = 0.0
  if NESTED:
    offset = tl.load(offset_ptr)
  stats = (absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset)
  # Software pipelining: the next step's loads are issued before this
  # step's arithmetic, so each thread keeps a load in flight while it works.
  words, absmax = _load_step(words_ptrs, absmax_index, *stats, BLOCK_K,
                             CHUNKS, V, NESTED, NESTED_BLOCK)
  x = _load_x(x_ptrs, BLOCK_K, CHUNKS, V)
  acc = tl.zeros([BLOCK_N, CHUNKS], tl.float32)
  for step in range(1, K_SPLIT // BLOCK_K):
    k0 = step * BLOCK_K
    next_words, next_absmax = _load_step(
        words_ptrs + k0 // 8, absmax_index + k0 // BLOCK_SIZE, *stats,
        BLOCK_K, CHUNKS, V, NESTED, NESTED_BLOCK)
    next_x = _load_x(x_ptrs + k0, BLOCK_K, CHUNKS, V)
    acc += _step_sums(words, absmax, x, lut)
    words, absmax, x = next_words, next_absmax, next_x
  acc += _step_sums(words, absmax, x, lut)
  if TAIL > 0:
    k0 = K_SPLIT - TAIL
    words, absmax = _load_step(
        words_ptrs + k0 // 8, absmax_index + k0 // BLOCK_SIZE, *stats, TAIL,
        CHUNKS, V, NESTED, NESTED_BLOCK)
    acc += _step_sums(words, absmax, _load_x(x_ptrs + k0, TAIL, CHUNKS, V), lut)
  rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
  y = tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty)
  if EVEN_N:
    tl.store(y_ptr + tl.program_id(1) * N + rows, y)
  else:
    tl.store(y_ptr + tl.program_id(1) * N + rows, y, mask=rows < N)


@triton.jit
def matmul_4bit_small_kernel(x_ptr, packed_ptr, quant_map_ptr, absmax_ptr,
                             nested_code_ptr, nested_absmax_ptr, offset_ptr,
                             M, N, y_ptr, K: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             V: tl.constexpr, SPLIT_K: tl.constexpr,
                             NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr,
                             EVEN_N: tl.constexpr):
  """``y`` ``[SPLIT_K, M, N]`` = ``x`` ``[M, K]`` times ``W``^T for a few rows of ``x``.

  ``K % (SPLIT_K * BLOCK_SIZE) == 0``, ``BLOCK_SIZE % (8 V) == 0``. Grid
  ``(N / BLOCK_N, M / BLOCK_M, SPLIT_K)``: a program dequantizes its
  ``[BLOCK_N, BLOCK_K]`` tiles of ``W`` in its range of K in registers (as
  the gemv does, times absmax, in ``x``'s dtype) and multiplies them with
  ``x`` ``[BLOCK_M, BLOCK_K]`` on the tensor cores (``tl.dot``, float32
  accumulation): ``W`` is read once per ``BLOCK_M`` rows of ``x`` and never
  written out. ``SPLIT_K > 1`` writes float32 partial products (one per
  range of K) that the launcher adds: a layer with few row blocks still
  occupies every SM.
  """
  CHUNKS: tl.constexpr = BLOCK_K // (8 * V)
  K_SPLIT: tl.constexpr = K // SPLIT_K
  TAIL: tl.constexpr = K_SPLIT % BLOCK_K
  k_first = tl.program_id(2) * K_SPLIT
  words_ptrs, absmax_index = _tile_pointers(
      packed_ptr, N, k_first, K, BLOCK_SIZE, BLOCK_N, CHUNKS, V, EVEN_N)
  m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
  m_ok = m < M
  x_ptrs = (x_ptr + m.to(tl.int64)[:, None] * K + k_first
            + tl.arange(0, BLOCK_K)[None, :])
  lut = tl.load(quant_map_ptr + tl.arange(0, 16))
  offset = 0.0
  if NESTED:
    offset = tl.load(offset_ptr)
  stats = (absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset)
  acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
  for step in range(K_SPLIT // BLOCK_K):
    k0 = step * BLOCK_K
    words, absmax = _load_step(
        words_ptrs + k0 // 8, absmax_index + k0 // BLOCK_SIZE, *stats,
        BLOCK_K, CHUNKS, V, NESTED, NESTED_BLOCK)
    x = tl.load(x_ptrs + k0, mask=m_ok[:, None], other=0.0)
    acc = _dot_step(acc, x, words, absmax, lut)
  if TAIL > 0:
    k0 = K_SPLIT - TAIL
    words, absmax = _load_step(
        words_ptrs + k0 // 8, absmax_index + k0 // BLOCK_SIZE, *stats, TAIL,
        CHUNKS, V, NESTED, NESTED_BLOCK)
    x = tl.load(x_ptrs + k0, other=0.0,
                mask=m_ok[:, None] & (tl.arange(0, BLOCK_K) < TAIL)[None, :])
    acc = _dot_step(acc, x, words, absmax, lut)
  n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
  y_ptrs = (y_ptr + tl.program_id(2).to(tl.int64) * M * N
            + m.to(tl.int64)[:, None] * N + n[None, :])
  tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
           mask=m_ok[:, None] & (n < N)[None, :])


@triton.jit
def gemv_4bit_general_kernel(x_ptr, packed_ptr, quant_map_ptr, absmax_ptr,
                             nested_code_ptr, nested_absmax_ptr, offset_ptr, N,
                             y_ptr, K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr):
  """Any ``K``: element ``(r, k)`` is flat index ``r * K + k`` of ``W``."""
  rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
  row_ok = rows < N
  row_elements = rows.to(tl.int64) * K
  offset = 0.0
  if NESTED:
    offset = tl.load(offset_ptr)
  acc = tl.zeros([BLOCK_N], tl.float32)
  for k0 in range(0, K, BLOCK_K):
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    ok = row_ok[:, None] & col_ok[None, :]
    flat = row_elements[:, None] + cols[None, :]
    high, low = common.unpack_nibbles(
        tl.load(packed_ptr + flat // 2, mask=ok, other=0))
    code = tl.where(flat % 2 == 0, high, low)
    absmax = common.block_absmax(absmax_ptr, nested_code_ptr,
                                 nested_absmax_ptr, offset, flat // BLOCK_SIZE,
                                 ok, NESTED, NESTED_BLOCK)
    weight = tl.load(quant_map_ptr + code) * absmax
    x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc += tl.sum(weight * x[None, :], axis=1)
  tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


def _split_k(k: int, block_size: int, split_k: int) -> int:
  """``split_k`` halved until ``k`` is a multiple of ``split_k * block_size``."""
  while split_k > 1 and k % (split_k * block_size):
    split_k //= 2
  return split_k


def statistics_operands(absmax: jax.Array, nested: tuple | None):
  """The kernels' four statistics operands and the nested block size.

  Without ``nested`` the three nested operands are placeholders (``absmax``
  again) that the kernels never read.
  """
  if nested is None:
    return (absmax, absmax, absmax, absmax), 1
  code, nested_absmax, offset, nested_block = nested
  offset = jnp.reshape(offset, (1,)).astype(jnp.float32)
  return (absmax, code, nested_absmax, offset), nested_block


def chunk_words(block_size: int) -> int:
  """int32 words per thread chunk: 4 (a 16-byte load), fewer for tiny blocks
  (a chunk never spans two blocks)."""
  return min(4, block_size // 8)


def gemv_4bit(x: jax.Array, packed: jax.Array, quant_map: jax.Array,
              absmax: jax.Array, nested: tuple | None, out_features: int,
              block_size: int, impl: str, *, block_n: int, block_k: int,
              num_warps: int, num_stages: int, split_k: int) -> jax.Array:
  """Launches the fused gemv: ``x`` ``[K]`` times 4-bit ``W`` ``[N, K]``^T.

  Args:
    x: ``[K]`` float32 / bfloat16 / float16; the output has its dtype.
    packed: uint8 ``[ceil(N * K / 2)]``.
    quant_map: float32 ``[16]``.
    absmax: float32 ``[ceil(N * K / block_size)]``, or with ``nested`` its
      uint8 codes.
    nested: ``None``, or ``(code, nested_absmax, offset, nested_block_size)``
      of 8-bit statistics: float32 ``[256]``, float32 ``[ceil(blocks /
      nested_block_size)]``, float32 ``[]``, int; the kernel reads the uint8
      ``absmax`` and dequantizes it per block.
    out_features: ``N``.
    block_size: elements per absmax block.
    impl: ``"triton"`` or ``"interpret"``.
    block_n, block_k, num_warps, num_stages, split_k: the tile sizes of
      :class:`jlowbit.matmul4.GemvConfig`.

  Returns:
    ``[N]`` in ``x.dtype``.
  """
  n, k = out_features, x.shape[0]
  statistics, nested_block = statistics_operands(absmax, nested)
  options = dict(impl=impl, num_warps=num_warps, num_stages=num_stages, K=k,
                 BLOCK_SIZE=block_size, BLOCK_N=block_n,
                 NESTED=nested is not None, NESTED_BLOCK=nested_block)
  args = (x, packed, quant_map, *statistics, n)
  if k % block_size or k % 8:
    block_k = max(32, min(block_k, triton.next_power_of_2(k)))
    (y,) = launch(
        __name__, "gemv_4bit_general_kernel", *args,
        out_shape=(jax.ShapeDtypeStruct((n,), x.dtype),),
        grid=(cdiv(n, block_n),), **options, BLOCK_K=block_k)
    return y
  split_k = _split_k(k, block_size, split_k)
  words = chunk_words(block_size)
  # The largest power of two <= K / split_k: no step is mostly padding.
  block_k = max(8 * words, min(block_k, 1 << ((k // split_k).bit_length() - 1)))
  out_dtype = x.dtype if split_k == 1 else jnp.float32
  (y,) = launch(
      __name__, "gemv_4bit_kernel", *args,
      out_shape=(jax.ShapeDtypeStruct((split_k, n), out_dtype),),
      grid=(cdiv(n, block_n), split_k), **options, BLOCK_K=block_k,
      V=words, SPLIT_K=split_k, EVEN_N=n % block_n == 0)
  if split_k == 1:
    return y[0]
  return jnp.sum(y, axis=0).astype(x.dtype)


def matmul_4bit_small(x: jax.Array, packed: jax.Array, quant_map: jax.Array,
                      absmax: jax.Array, nested: tuple | None,
                      out_features: int, block_size: int, impl: str, *,
                      block_m: int, block_n: int, block_k: int, num_warps: int,
                      num_stages: int, split_k: int) -> jax.Array:
  """Launches the fused small-batch product: ``x`` ``[M, K]`` times ``W``^T.

  Args:
    x: ``[M, K]`` bfloat16 or float16 (the tensor cores' input dtype), ``K
      % block_size == 0``.
    packed, quant_map, absmax, nested, out_features, block_size, impl: see
      :func:`gemv_4bit`.
    block_m, block_n, block_k, num_warps, num_stages, split_k: the tile
      sizes of :class:`jlowbit.matmul4.SmallBatchConfig`.

  Returns:
    ``[M, N]`` in ``x.dtype``.
  """
  (m, k), n = x.shape, out_features
  statistics, nested_block = statistics_operands(absmax, nested)
  words = chunk_words(block_size)
  split_k = _split_k(k, block_size, split_k)
  block_k = max(8 * words, min(block_k, 1 << ((k // split_k).bit_length() - 1)))
  out_dtype = x.dtype if split_k == 1 else jnp.float32
  (y,) = launch(
      __name__, "matmul_4bit_small_kernel", x, packed, quant_map, *statistics,
      m, n, out_shape=(jax.ShapeDtypeStruct((split_k, m, n), out_dtype),),
      grid=(cdiv(n, block_n), cdiv(m, block_m), split_k), impl=impl,
      num_warps=num_warps, num_stages=num_stages, K=k, BLOCK_SIZE=block_size,
      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, V=words,
      SPLIT_K=split_k, NESTED=nested is not None, NESTED_BLOCK=nested_block,
      EVEN_N=n % block_n == 0)
  if split_k == 1:
    return y[0]
  return jnp.sum(y, axis=0).astype(x.dtype)
