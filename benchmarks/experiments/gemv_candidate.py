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
def _step_loads(words_ptrs, x_ptrs, absmax_index, absmax_ptr, nested_code_ptr,
                nested_absmax_ptr, offset, VALID: tl.constexpr,
                NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr):
  """One K step's absmax ``[BLOCK_N, CHUNKS]``, the chunks' four words
  ``w0..w3`` ``[BLOCK_N, CHUNKS]`` and their ``x`` ``x0..x3`` ``[BLOCK_N,
  CHUNKS, 8]``; chunks from column ``VALID`` on read as 0."""
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
  return absmax, w0, w1, w2, w3, x0, x1, x2, x3


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
  absmax, w0, w1, w2, w3, x0, x1, x2, x3 = _step_loads(
      words_ptrs, x_ptrs, absmax_index, absmax_ptr, nested_code_ptr,
      nested_absmax_ptr, offset, VALID, NESTED, NESTED_BLOCK)
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
                     NESTED_BLOCK: tl.constexpr, EVEN_N: tl.constexpr,
                     PRMT: tl.constexpr):
  """``K % (SPLIT_K * BLOCK_SIZE) == 0``, ``BLOCK_SIZE >= 32``; ``y`` is
  ``[SPLIT_K, N]``. ``PRMT``: variant ``prmt`` (below), ``quant_map_ptr``
  holding :func:`register_table`.

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
  if PRMT:
    lut = _spread_table(quant_map_ptr, BLOCK_N, CHUNKS)
  else:
    lut = tl.load(quant_map_ptr + tl.arange(0, 16))
  offset = 0.0
  if NESTED:
    offset = tl.load(offset_ptr)
  stats = (absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset)
  acc = tl.zeros([BLOCK_N, CHUNKS], tl.float32)
  for step in range(K_SPLIT // BLOCK_K):
    k0 = step * BLOCK_K
    acc += _candidate_step(words_ptrs + k0 // 8, x_ptrs + k0,
                           absmax_index + k0 // BLOCK_SIZE, lut, *stats,
                           BLOCK_K, NESTED, NESTED_BLOCK, PRMT)
  if TAIL > 0:
    k0 = K_SPLIT - TAIL
    acc += _candidate_step(words_ptrs + k0 // 8, x_ptrs + k0,
                           absmax_index + k0 // BLOCK_SIZE, lut, *stats, TAIL,
                           NESTED, NESTED_BLOCK, PRMT)
  y = tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty)
  if EVEN_N:
    tl.store(y_ptr + tl.program_id(1) * N + rows, y)
  else:
    tl.store(y_ptr + tl.program_id(1) * N + rows, y, mask=rows < N)


# --- Variant "prmt": the 16-entry table in registers, no shared memory. ---
#
# The table is passed as eight int32 words: the low bytes of the bfloat16
# entries 0-3, 4-7, 8-11, 12-15, then their high bytes. ``prmt`` picks 4 bytes
# out of 8 by 4 selector nibbles, so one ``prmt`` looks up 4 codes (their low
# 3 bits) among 8 entries; a third ``prmt`` takes each byte from the 0-7 or
# the 8-15 lookup by the code's bit 3 (selector ``0x3210 | 4 * bit3``). Two
# more interleave low and high bytes into bfloat16 pairs, and a shift or a
# mask makes each a float32: ~3.5 ALU instructions per weight, no
# shared-memory access (the gather costs one ``LDS`` each).
_LOOKUP_PAIRS = """
  and.b32 s7, {s}, 0x7777;
  shr.u32 t, {s}, 1;
  and.b32 t, t, 0x4444;
  or.b32 sel, t, 0x3210;
  prmt.b32 la, $9, $10, s7;
  prmt.b32 lb, $11, $12, s7;
  prmt.b32 lo, la, lb, sel;
  prmt.b32 ha, $13, $14, s7;
  prmt.b32 hb, $15, $16, s7;
  prmt.b32 hi, ha, hb, sel;
  prmt.b32 p0, lo, hi, 0x5140;
  prmt.b32 p1, lo, hi, 0x7362;
"""
_FLOAT32_OUT = """
  shl.b32 ${0}, p0, 16;
  and.b32 ${1}, p0, 0xFFFF0000;
  shl.b32 ${2}, p1, 16;
  and.b32 ${3}, p1, 0xFFFF0000;
"""
_HALF_OUT = """
  mov.b32 {{${0}, ${1}}}, p0;
  mov.b32 {{${2}, ${3}}}, p1;
"""


def _lookup_asm(out: str) -> str:
  """The asm of one word (``$8``) -> its 8 values (``$0`` .. ``$7``, by
  nibble), ``out`` the template that writes 4 of them from ``p0, p1``."""
  return ("{\n.reg .b32 s, s7, t, sel, la, lb, lo, ha, hb, hi, p0, p1;\n"
          + _LOOKUP_PAIRS.format(s="$8") + out.format(0, 1, 2, 3)
          + "shr.u32 s, $8, 16;\n"
          + _LOOKUP_PAIRS.format(s="s") + out.format(4, 5, 6, 7) + "}")


_LOOKUP_ASM = tl.constexpr(_lookup_asm(_FLOAT32_OUT))
_PAIRS_ASM = tl.constexpr(_lookup_asm(_HALF_OUT))


def register_table(quant_map):
  """The eight int32 table words of a float32 ``quant_map`` (a torch
  tensor), each repeated 32 times: ``[8 * 32]``."""
  import torch  # pylint: disable=g-import-not-at-top
  bits = quant_map.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
  lo, hi = (bits & 0xFF).reshape(4, 4), (bits >> 8).reshape(4, 4)
  shifts = torch.tensor([0, 8, 16, 24], device=bits.device, dtype=torch.int32)
  words = torch.cat([(lo << shifts).sum(1), (hi << shifts).sum(1)])
  return words.to(torch.int32)[:, None].repeat(1, 32).reshape(-1)


@triton.jit
def _join8(v0, v1, v2, v3, v4, v5, v6, v7):
  """``[..., 8]`` with ``[..., e] = v_e`` (joins stack on a new last axis)."""
  shape: tl.constexpr = v0.shape + [8]
  return tl.reshape(tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)),
                            tl.join(tl.join(v1, v5), tl.join(v3, v7))), shape)


@triton.jit
def _word_values(words, table):
  """float32 ``[..., 8]``: the bfloat16 table entries of each word's 8 codes,
  in element order (element ``e`` is nibble ``e ^ 1``)."""
  n = tl.inline_asm_elementwise(
      _LOOKUP_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
      [words, table[0], table[1], table[2], table[3], table[4], table[5],
       table[6], table[7]], (tl.float32,) * 8, is_pure=True, pack=1)
  return _join8(n[1], n[0], n[3], n[2], n[5], n[4], n[7], n[6])


@triton.jit
def _prmt_step(words_ptrs, x_ptrs, absmax_index, table, absmax_ptr,
               nested_code_ptr, nested_absmax_ptr, offset,
               VALID: tl.constexpr, NESTED: tl.constexpr,
               NESTED_BLOCK: tl.constexpr):
  """As ``_bcast_step``, the table read from registers."""
  absmax, w0, w1, w2, w3, x0, x1, x2, x3 = _step_loads(
      words_ptrs, x_ptrs, absmax_index, absmax_ptr, nested_code_ptr,
      nested_absmax_ptr, offset, VALID, NESTED, NESTED_BLOCK)
  products = (_word_values(w0, table) * x0.to(tl.float32)
              + _word_values(w1, table) * x1.to(tl.float32)
              + _word_values(w2, table) * x2.to(tl.float32)
              + _word_values(w3, table) * x3.to(tl.float32))
  return tl.sum(products, axis=2) * absmax


@triton.jit
def _spread_table(table_ptr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
  """The 8 table words, each a ``[BLOCK_N, CHUNKS]`` tensor.

  The table is stored 32 times and each element reads copy ``i % 32``:
  ptxas keeps a value it can prove warp-uniform in a uniform register and
  copies it back before every ``prmt`` (one extra instruction per lookup).
  """
  spread = table_ptr + (tl.arange(0, BLOCK_N)[:, None] * CHUNKS
                        + tl.arange(0, CHUNKS)[None, :]) % 32
  return (tl.load(spread), tl.load(spread + 32), tl.load(spread + 64),
          tl.load(spread + 96), tl.load(spread + 128), tl.load(spread + 160),
          tl.load(spread + 192), tl.load(spread + 224))


@triton.jit
def _candidate_step(words_ptrs, x_ptrs, absmax_index, lut, absmax_ptr,
                    nested_code_ptr, nested_absmax_ptr, offset,
                    VALID: tl.constexpr, NESTED: tl.constexpr,
                    NESTED_BLOCK: tl.constexpr, PRMT: tl.constexpr):
  """``_prmt_step`` or ``_bcast_step`` (one return: Triton compiles the
  code after a returning ``if`` even when the ``if`` is constant)."""
  if PRMT:
    sums = _prmt_step(words_ptrs, x_ptrs, absmax_index, lut, absmax_ptr,
                      nested_code_ptr, nested_absmax_ptr, offset, VALID,
                      NESTED, NESTED_BLOCK)
  else:
    sums = _bcast_step(words_ptrs, x_ptrs, absmax_index, lut, absmax_ptr,
                       nested_code_ptr, nested_absmax_ptr, offset, VALID,
                       NESTED, NESTED_BLOCK)
  return sums


# --- Variant "dot": table in registers, products on the tensor cores. ---
#
# The same ``prmt`` lookups, stopped at the bfloat16 pairs (no float32
# conversion), and ``tl.dot`` with ``x`` padded to 16 rows: the products and
# sums cost no ALU instructions, the tile reaches the dot operand's layout
# through shared memory (one 16-byte store per 8 weights, ``ldmatrix`` for
# the read). One K step is one absmax block, so the block's scale multiplies
# the dot's ``[BLOCK_M, BLOCK_N]`` result instead of every weight. Serves
# one row (the gemv) and up to 16 (the small batch) alike.


# --- Variant "dot": table in registers, products on the tensor cores. ---
#
# The same ``prmt`` lookups, stopped at the bfloat16 pairs (no float32
# conversion), and ``tl.dot`` with ``x`` padded to 16 rows: the products and
# sums cost no ALU instructions, the tile reaches the dot operand's layout
# through shared memory (one 16-byte store per 8 weights, ``ldmatrix`` for
# the read). One K step is one absmax block, so the block's scale multiplies
# the dot's ``[BLOCK_M, BLOCK_N]`` result instead of every weight. Serves
# one row (the gemv) and up to 16 (the small batch) alike.


@triton.jit
def _word_bf16(words, table):
  """bfloat16 ``[..., 8]`` of each word's 8 codes, in element order."""
  n = tl.inline_asm_elementwise(
      _PAIRS_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
      [words, table[0], table[1], table[2], table[3], table[4], table[5],
       table[6], table[7]], (tl.int16,) * 8, is_pure=True, pack=1)
  return _join8(n[1], n[0], n[3], n[2], n[5], n[4], n[7],
                n[6]).to(tl.bfloat16, bitcast=True)


@triton.jit
def matmul_dot_kernel(x_ptr, packed_ptr, table_ptr, absmax_ptr, M, N, y_ptr,
                      K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      EVEN_N: tl.constexpr):
  """``y [M, N] = x [M, K] W^T``, bf16 ``x``, ``M <= BLOCK_M``, one K step
  per absmax block (``K % BLOCK_SIZE == 0``)."""
  WORDS: tl.constexpr = BLOCK_SIZE // 8
  rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
  load_rows = rows
  if not EVEN_N:
    load_rows = tl.minimum(rows, N - 1)
  load_rows = load_rows.to(tl.int64)
  words_ptrs = (packed_ptr.to(tl.pointer_type(tl.int32))
                + (load_rows * (K // 8))[:, None] + tl.arange(0, WORDS)[None, :])
  absmax_ptrs = absmax_ptr + load_rows * (K // BLOCK_SIZE)
  m = tl.arange(0, BLOCK_M)
  x_ptrs = x_ptr + m[:, None] * K + tl.arange(0, BLOCK_SIZE)[None, :]
  table = _spread_table(table_ptr, BLOCK_N, WORDS)
  acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
  for step in range(K // BLOCK_SIZE):
    words = tl.load(words_ptrs + step * WORDS)
    absmax = tl.load(absmax_ptrs + step)
    x = tl.load(x_ptrs + step * BLOCK_SIZE, mask=(m < M)[:, None], other=0.0)
    w = tl.reshape(_word_bf16(words, table), (BLOCK_N, BLOCK_SIZE))
    acc += tl.dot(x, tl.trans(w)) * absmax[None, :]
  y_ptrs = y_ptr + m[:, None] * N + rows[None, :]
  tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
           mask=(m < M)[:, None] & (rows < N)[None, :])


# --- Variant "rows": each thread owns one chunk of ROWS rows. ---
#
# What the three variants above share: a thread owns one chunk of one row,
# so each thread loads (or receives through shared memory) 64 bytes of ``x``
# for every 16 bytes of ``W``, and those loads are strided across the warp
# (16 L1 wavefronts per 16-byte load instead of 4). L1 traffic, not the
# table, is what bounds them (the ``prmt`` variant, with no table loads, is
# slower than the gather one). Here a thread owns the same chunk of ``ROWS``
# rows (``ROWS`` separate ``[CHUNKS, V]`` loads share one layout), so ``x``
# is loaded and converted once per step and used ``ROWS`` times.


@triton.jit
def _row_sums(words, absmax, x, lut_or_table, PRMT: tl.constexpr):
  """``[CHUNKS]`` chunk sums of one row: ``words [CHUNKS, 4]``, float32 ``x
  [CHUNKS, 32]``."""
  chunks: tl.constexpr = words.shape[0]
  if PRMT:
    values = tl.reshape(_word_values(words, lut_or_table), (chunks, 32))
  else:
    values = gemv4._chunk_values(words[None, :, :], lut_or_table)
    values = tl.reshape(values, (chunks, 32))
  return tl.sum(values * x, axis=1) * absmax


@triton.jit
def gemv_rows_kernel(x_ptr, packed_ptr, table_ptr, absmax_ptr, N, y_ptr,
                     K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
                     PRMT: tl.constexpr):
  """``N % ROWS == 0``, ``K % BLOCK_K == 0``, ``BLOCK_SIZE % 32 == 0``;
  ``ROWS`` in 1, 2, 4; ``PRMT``: ``table_ptr`` holds :func:`register_table`,
  else the float32 table (gathered)."""
  CHUNKS: tl.constexpr = BLOCK_K // 32
  chunk = tl.arange(0, CHUNKS)
  row0 = (tl.program_id(0) * ROWS).to(tl.int64)
  base = (packed_ptr.to(tl.pointer_type(tl.int32)) + (chunk * 4)[:, None]
          + tl.arange(0, 4)[None, :])
  p0 = base + row0 * (K // 8)
  p1 = base + (row0 + 1) * (K // 8)
  p2 = base + (row0 + 2) * (K // 8)
  p3 = base + (row0 + 3) * (K // 8)
  a_base = absmax_ptr + chunk * 32 // BLOCK_SIZE
  x_ptrs = x_ptr + chunk[:, None] * 32 + tl.arange(0, 32)[None, :]
  if PRMT:
    lut = _spread_table(table_ptr, CHUNKS, 4)
  else:
    lut = tl.load(table_ptr + tl.arange(0, 16))
  acc0 = tl.zeros([CHUNKS], tl.float32)
  acc1 = tl.zeros([CHUNKS], tl.float32)
  acc2 = tl.zeros([CHUNKS], tl.float32)
  acc3 = tl.zeros([CHUNKS], tl.float32)
  for step in range(K // BLOCK_K):
    k0 = step * BLOCK_K
    x = tl.load(x_ptrs + k0).to(tl.float32)
    a = a_base + k0 // BLOCK_SIZE
    acc0 += _row_sums(tl.load(p0 + k0 // 8),
                      tl.load(a + row0 * (K // BLOCK_SIZE)), x, lut, PRMT)
    if ROWS > 1:
      acc1 += _row_sums(tl.load(p1 + k0 // 8),
                        tl.load(a + (row0 + 1) * (K // BLOCK_SIZE)), x, lut,
                        PRMT)
    if ROWS > 2:
      acc2 += _row_sums(tl.load(p2 + k0 // 8),
                        tl.load(a + (row0 + 2) * (K // BLOCK_SIZE)), x, lut,
                        PRMT)
      acc3 += _row_sums(tl.load(p3 + k0 // 8),
                        tl.load(a + (row0 + 3) * (K // BLOCK_SIZE)), x, lut,
                        PRMT)
  out = y_ptr.dtype.element_ty
  tl.store(y_ptr + row0, tl.sum(acc0).to(out))
  if ROWS > 1:
    tl.store(y_ptr + row0 + 1, tl.sum(acc1).to(out))
  if ROWS > 2:
    tl.store(y_ptr + row0 + 2, tl.sum(acc2).to(out))
    tl.store(y_ptr + row0 + 3, tl.sum(acc3).to(out))
