"""Candidate batch-1 gemv kernel (session 7), not yet measured on a GPU.

The shipped ``jlowbit.triton_kernels.gemv4.gemv_4bit_kernel`` is bound by
shared-memory traffic (``ncu``: L1/TEX 84%, DRAM 33% at 8192 x 8192): one
table gather per weight, plus ``x``, loaded once per step and redistributed
to the threads through shared memory (``STSM`` + ``LDS.128`` + barriers
in its SASS). This candidate loads ``x`` with the tile's full shape
``[BLOCK_N, CHUNKS, 8]`` (the same ``x`` for every row), so Triton puts each
thread's slice straight into its registers (the compiled sm_90 SASS has no
``STSM`` and only the 32 table ``LDS`` per 32 weights; 46 registers instead
of 72), and reads a chunk's 4 words as four ``[BLOCK_N, CHUNKS]`` loads.
Counting shared/L1 wavefronts per warp and step: ~53 instead of ~76, so up to
~1.4x if the pipe stays the limit. It passes the interpreter tests of the
shipped kernel (swap it in and run ``tests/test_ops_matmul4.py``); the device
budget ran out before it could be timed: ``gemv_variants.py`` times it as
``bcast`` beside ``words``.
"""

import triton
import triton.language as tl

from jlowbit.triton_kernels import gemv4


@triton.jit
def _bcast_step(words_ptrs, x_ptrs, absmax_index, lut, absmax_ptr,
               nested_code_ptr, nested_absmax_ptr, offset,
               VALID: tl.constexpr, NESTED: tl.constexpr,
               NESTED_BLOCK: tl.constexpr):
  """``[BLOCK_N, CHUNKS]`` chunk sums of ``W x`` for one K step, each scaled
  by its block's absmax.

  A chunk is 32 consecutive elements of a row: 4 int32 words, read as four
  ``[BLOCK_N, CHUNKS]`` word tensors (``words_ptrs`` points at the first),
  with ``x`` as four ``[BLOCK_N, CHUNKS, 8]`` tensors (``x_ptrs``, the same
  ``x`` for every row). Giving ``x`` the tile's full shape makes Triton load
  it straight into the registers of the thread that owns the chunk, instead
  of loading it once and redistributing it through shared memory (which
  doubled the shared-memory traffic: the kernel is bound by it). Chunks
  from column ``VALID`` on count as 0.
  """
  block_n: tl.constexpr = words_ptrs.shape[0]
  chunks: tl.constexpr = words_ptrs.shape[1]
  if VALID == chunks * 32:
    absmax = gemv4._block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                           offset, absmax_index, True, NESTED, NESTED_BLOCK)
    w0, w1 = tl.load(words_ptrs), tl.load(words_ptrs + 1)
    w2, w3 = tl.load(words_ptrs + 2), tl.load(words_ptrs + 3)
    x0, x1 = tl.load(x_ptrs), tl.load(x_ptrs + 8)
    x2, x3 = tl.load(x_ptrs + 16), tl.load(x_ptrs + 24)
  else:
    ok = (tl.arange(0, chunks) * 32 < VALID)[None, :]
    absmax = gemv4._block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                           offset, absmax_index, ok, NESTED, NESTED_BLOCK)
    w0 = tl.load(words_ptrs, mask=ok, other=0)
    w1 = tl.load(words_ptrs + 1, mask=ok, other=0)
    w2 = tl.load(words_ptrs + 2, mask=ok, other=0)
    w3 = tl.load(words_ptrs + 3, mask=ok, other=0)
    x0 = tl.load(x_ptrs, mask=ok[:, :, None], other=0.0)
    x1 = tl.load(x_ptrs + 8, mask=ok[:, :, None], other=0.0)
    x2 = tl.load(x_ptrs + 16, mask=ok[:, :, None], other=0.0)
    x3 = tl.load(x_ptrs + 24, mask=ok[:, :, None], other=0.0)
  shape: tl.constexpr = (block_n, chunks, 8)
  c0 = tl.reshape(gemv4._word_codes(w0), shape)
  c1 = tl.reshape(gemv4._word_codes(w1), shape)
  c2 = tl.reshape(gemv4._word_codes(w2), shape)
  c3 = tl.reshape(gemv4._word_codes(w3), shape)
  # Word q holds elements 8q .. 8q + 7 of the chunk: the joins' last two
  # axes (q's bits) are permuted alike for codes and x, so the products pair
  # up; the sum over the chunk does not depend on the order.
  codes = tl.join(tl.join(c0, c1), tl.join(c2, c3))
  x = tl.join(tl.join(x0, x1), tl.join(x2, x3)).to(tl.float32)
  values = tl.gather(lut, tl.reshape(codes, (block_n * chunks * 32,)), 0)
  products = tl.reshape(values, (block_n, chunks, 32)) * tl.reshape(
      x, (block_n, chunks, 32))
  return tl.sum(products, axis=2) * absmax


@triton.jit
def gemv_bcast_kernel(x_ptr, packed_ptr, quant_map_ptr, absmax_ptr,
                     nested_code_ptr, nested_absmax_ptr, offset_ptr, N, y_ptr,
                     K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, NESTED: tl.constexpr,
                     NESTED_BLOCK: tl.constexpr, EVEN_N: tl.constexpr):
  """``K % (SPLIT_K * BLOCK_SIZE) == 0``, ``BLOCK_SIZE >= 32``; ``y`` is
  ``[SPLIT_K, N]``.

  A program owns ``BLOCK_N`` rows and one of ``SPLIT_K`` ranges of K, read
  ``BLOCK_K`` columns (``BLOCK_K / 32`` chunks per row) per step;
  ``EVEN_N``: ``N % BLOCK_N == 0``.
  """
  CHUNKS: tl.constexpr = BLOCK_K // 32
  K_SPLIT: tl.constexpr = K // SPLIT_K
  TAIL: tl.constexpr = K_SPLIT % BLOCK_K
  k_first = tl.program_id(1) * K_SPLIT
  rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
  load_rows = rows
  if not EVEN_N:  # re-read the last row instead of masking every load
    load_rows = tl.minimum(rows, N - 1)
  load_rows = load_rows.to(tl.int64)
  chunk = tl.arange(0, CHUNKS)
  words_ptrs = (packed_ptr.to(tl.pointer_type(tl.int32))
                + (load_rows * (K // 8) + k_first // 8)[:, None]
                + (chunk * 4)[None, :])
  x_ptrs = (x_ptr + k_first + (load_rows * 0)[:, None, None]
            + (chunk * 32)[None, :, None] + tl.arange(0, 8)[None, None, :])
  absmax_index = ((load_rows * (K // BLOCK_SIZE) + k_first // BLOCK_SIZE)[:, None]
                  + (chunk * 32 // BLOCK_SIZE)[None, :])
  lut = tl.load(quant_map_ptr + tl.arange(0, 16))
  offset = 0.0
  if NESTED:
    offset = tl.load(offset_ptr)
  stats = (absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset)
  acc = tl.zeros([BLOCK_N, CHUNKS], tl.float32)
  for step in range(K_SPLIT // BLOCK_K):
    k0 = step * BLOCK_K
    acc += _bcast_step(words_ptrs + k0 // 8, x_ptrs + k0,
                      absmax_index + k0 // BLOCK_SIZE, lut, *stats, BLOCK_K,
                      NESTED, NESTED_BLOCK)
  if TAIL > 0:
    k0 = K_SPLIT - TAIL
    acc += _bcast_step(words_ptrs + k0 // 8, x_ptrs + k0,
                      absmax_index + k0 // BLOCK_SIZE, lut, *stats, TAIL,
                      NESTED, NESTED_BLOCK)
  y = tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty)
  if EVEN_N:
    tl.store(y_ptr + tl.program_id(1) * N + rows, y)
  else:
    tl.store(y_ptr + tl.program_id(1) * N + rows, y, mask=rows < N)
