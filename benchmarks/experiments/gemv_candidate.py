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

from jlowbit.triton_kernels import common
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
    absmax = common.block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                                 offset, absmax_index, True, NESTED, NESTED_BLOCK)
    w0, w1 = tl.load(words_ptrs), tl.load(words_ptrs + 1)
    w2, w3 = tl.load(words_ptrs + 2), tl.load(words_ptrs + 3)
    x0, x1 = tl.load(x_ptrs), tl.load(x_ptrs + 8)
    x2, x3 = tl.load(x_ptrs + 16), tl.load(x_ptrs + 24)
  else:
    ok = (tl.arange(0, chunks) * 32 < VALID)[None, :]
    absmax = common.block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr,
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
  prmt.b32 la, {t0}, {t1}, s7;
  prmt.b32 lb, {t2}, {t3}, s7;
  prmt.b32 lo, la, lb, sel;
  prmt.b32 ha, {t4}, {t5}, s7;
  prmt.b32 hb, {t6}, {t7}, s7;
  prmt.b32 hi, ha, hb, sel;
  prmt.b32 {q0}, lo, hi, {order0};
  prmt.b32 {q1}, lo, hi, {order1};
"""
_ARG_TABLE = {f"t{i}": f"${9 + i}" for i in range(8)}  # table operands $9-$16


def _half_lookup(s: str, table: dict, pairs: tuple[str, str],
                 element_order: bool) -> str:
  """The lookup of the 4 codes in the low 16 bits of register ``s`` into
  the bfloat16 pairs ``pairs``: by nibble (``(n0, n1), (n2, n3)``, low
  half first), or with ``element_order`` by element (``(e0, e1), (e2,
  e3)``; element ``e`` is nibble ``e ^ 1``)."""
  orders = ("0x4051", "0x6273") if element_order else ("0x5140", "0x7362")
  return _LOOKUP_PAIRS.format(s=s, q0=pairs[0], q1=pairs[1],
                              order0=orders[0], order1=orders[1], **table)


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
          + _half_lookup("$8", _ARG_TABLE, ("p0", "p1"), False)
          + out.format(0, 1, 2, 3) + "shr.u32 s, $8, 16;\n"
          + _half_lookup("s", _ARG_TABLE, ("p0", "p1"), False)
          + out.format(4, 5, 6, 7) + "}")


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


# --- Variant "mma": dequantize into tensor-core operand registers. ---
#
# Every CUDA-core design above needs ~5-6 instructions per weight (table
# lookup, conversion to float32, FMA, x) and stalls on latency. Here a warp
# multiplies 16 rows of ``W`` by ``x`` with ``mma.sync.m16n8k16`` (bf16 in,
# float32 accumulation): the ``prmt`` lookups stop at bfloat16 pairs, which
# are already the A operand's registers, and the tensor core does the
# multiply-adds and the sum over the 4 lanes of a row group. ``x`` goes in
# all 8 columns of B, so each of those lanes ends up with its rows' full
# sums (columns are equal) and no cross-lane reduction is left.
#
# Lane ``l`` (group ``g = l // 4``, ``t = l % 4``) owns rows ``g`` and
# ``g + 8`` of its warp's 16 and, per 64-column absmax block, the int32
# words ``t`` and ``4 + t`` of each (elements ``8 t .. 8 t + 7`` and
# ``32 + 8 t ..``). The sum over K does not depend on the order of K, so the
# word's 8 elements are fed as the A fragment's logical columns ``2t, 2t+1,
# 2t+8, 2t+9`` of two mmas, and the lane puts the same 8 elements of ``x``
# in B's matching rows: 4 mmas per block, then one absmax FMA per row.
#
# The kernel is written with 1-D tensors of one element per thread whose
# roles come from ``%tid.x`` (read by inline asm), not from Triton's layout:
# whatever layout Triton picks, each thread computes for the lane it is.
def _mma_lookup(word: str, p: str, table: dict) -> str:
  """The 8 codes of register ``word`` -> bfloat16 pairs ``{p}0 .. {p}3`` in
  element order (elements 0-1, 2-3, 4-5, 6-7)."""
  return (_half_lookup(word, table, (f"{p}0", f"{p}1"), True)
          + f"  shr.u32 s, {word}, 16;\n"
          + _half_lookup("s", table, (f"{p}2", f"{p}3"), True))


_MMA = ("  mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{{d0, d1, d2, d3}}, {{{a}}}, {{{b}}}, {{d0, d1, d2, d3}};\n")


def _mma_blocks_asm(blocks: int, columns: bool = False) -> str:
  """The asm of ``blocks`` 64-column blocks. Operands: each block's outputs
  (the row g and row g + 8 sums; with ``columns`` all four accumulators
  d0..d3, columns 2t and 2t + 1 of rows g and g + 8), then per block its 4
  words (row g pair 0, pair 1, row g + 8 pair 0, pair 1), then per block
  its 8 ``x`` pairs (pair 0's four, pair 1's four), then the 8 table words."""
  outputs = 4 if columns else 2
  words, xs = outputs * blocks, (outputs + 4) * blocks
  table = {f"t{i}": f"${(outputs + 12) * blocks + i}" for i in range(8)}
  text = ("{\n.reg .b32 s, s7, t, sel, la, lb, lo, ha, hb, hi, "
          "g0, g1, g2, g3, h0, h1, h2, h3;\n.reg .f32 d0, d1, d2, d3;\n")
  for block in range(blocks):
    w, x = words + 4 * block, xs + 8 * block
    text += "".join(f"mov.f32 d{i}, 0f00000000;\n" for i in range(4))
    for pair in range(2):
      text += _mma_lookup(f"${w + pair}", "g", table)
      text += _mma_lookup(f"${w + 2 + pair}", "h", table)
      b = x + 4 * pair
      text += _MMA.format(a="g0, h0, g1, h1", b=f"${b}, ${b + 1}")
      text += _MMA.format(a="g2, h2, g3, h3", b=f"${b + 2}, ${b + 3}")
    kept = (0, 1, 2, 3) if columns else (0, 2)
    text += "".join(f"mov.b32 ${outputs * block + i}, d{d};\n"
                    for i, d in enumerate(kept))
  return text + "}"


_MMA_BLOCK_ASM = tl.constexpr(_mma_blocks_asm(1))
_MMA_2BLOCK_ASM = tl.constexpr(_mma_blocks_asm(2))
_MMA_COLUMNS_ASM = tl.constexpr(_mma_blocks_asm(1, columns=True))


@triton.jit
def _lane_table(table_ptr, lane):
  """The 8 :func:`register_table` words from copy ``lane`` (ordinary
  registers: ptxas keeps provably uniform values in uniform registers)."""
  spread = table_ptr + lane
  return (tl.load(spread), tl.load(spread + 32), tl.load(spread + 64),
          tl.load(spread + 96), tl.load(spread + 128), tl.load(spread + 160),
          tl.load(spread + 192), tl.load(spread + 224))


@triton.jit
def _thread_ids(like):
  """``(lane, warp)`` of the thread that holds each element of ``like``."""
  tid = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [like],
                                  dtype=tl.int32, is_pure=True, pack=1)
  return tid % 32, tid // 32


@triton.jit
def _row_lane(K_SPLIT: tl.constexpr, NUM_WARPS: tl.constexpr):
  """This thread's ``lane``, its ``t``, its rows ``g`` and ``g + 8`` of
  the warp's 16 (row-major ``W``) and the first column of the program's K
  range."""
  lane, warp = _thread_ids(tl.zeros([32 * NUM_WARPS], tl.int32))
  row_g = ((tl.program_id(0) * NUM_WARPS + warp) * 16 + lane // 4).to(tl.int64)
  return lane, lane % 4, row_g, row_g + 8, tl.program_id(1) * K_SPLIT


@triton.jit
def gemv_mma_kernel(x_ptr, packed_ptr, table_ptr, absmax_ptr, N, y_ptr,
                    K: tl.constexpr, SPLIT_K: tl.constexpr,
                    NUM_WARPS: tl.constexpr, BLOCKS: tl.constexpr):
  """block_size 64, ``N % 16 == 0``, ``K % (64 BLOCKS SPLIT_K) == 0``; one
  asm (all its loads issued first) takes ``BLOCKS`` (1 or 2) blocks; ``y`` is
  ``[SPLIT_K, N]``; launch with ``num_warps=NUM_WARPS``. A warp owns 16
  rows; ``table_ptr`` holds :func:`register_table`."""
  THREADS: tl.constexpr = 32 * NUM_WARPS
  K_SPLIT: tl.constexpr = K // SPLIT_K
  lane, t, row_g, row_h, k_first = _row_lane(K_SPLIT, NUM_WARPS)
  words = packed_ptr.to(tl.pointer_type(tl.int32))
  wg_ptr = words + row_g * (K // 8) + k_first // 8 + t
  wh_ptr = words + row_h * (K // 8) + k_first // 8 + t
  xp_ptr = x_ptr.to(tl.pointer_type(tl.int32)) + k_first // 2 + 4 * t
  ag_ptr = absmax_ptr + row_g * (K // 64) + k_first // 64
  ah_ptr = absmax_ptr + row_h * (K // 64) + k_first // 64
  table = _lane_table(table_ptr, lane)
  acc_g = tl.zeros([THREADS], tl.float32)
  acc_h = tl.zeros([THREADS], tl.float32)
  for step in range(K_SPLIT // (64 * BLOCKS)):
    if BLOCKS == 1:
      block = step
      xb = xp_ptr + block * 32
      sums = tl.inline_asm_elementwise(
          _MMA_BLOCK_ASM, "=r,=r" + ",r" * 20,
          [tl.load(wg_ptr + block * 8), tl.load(wg_ptr + block * 8 + 4),
           tl.load(wh_ptr + block * 8), tl.load(wh_ptr + block * 8 + 4),
           tl.load(xb), tl.load(xb + 1), tl.load(xb + 2), tl.load(xb + 3),
           tl.load(xb + 16), tl.load(xb + 17), tl.load(xb + 18),
           tl.load(xb + 19), table[0], table[1], table[2], table[3],
           table[4], table[5], table[6], table[7]], (tl.float32, tl.float32),
          is_pure=True, pack=1)
      acc_g += sums[0] * tl.load(ag_ptr + block)
      acc_h += sums[1] * tl.load(ah_ptr + block)
    else:
      b0 = 2 * step
      xa = xp_ptr + b0 * 32
      xc = xa + 32
      sums = tl.inline_asm_elementwise(
          _MMA_2BLOCK_ASM, "=r,=r,=r,=r" + ",r" * 32,
          [tl.load(wg_ptr + b0 * 8), tl.load(wg_ptr + b0 * 8 + 4),
           tl.load(wh_ptr + b0 * 8), tl.load(wh_ptr + b0 * 8 + 4),
           tl.load(wg_ptr + b0 * 8 + 8), tl.load(wg_ptr + b0 * 8 + 12),
           tl.load(wh_ptr + b0 * 8 + 8), tl.load(wh_ptr + b0 * 8 + 12),
           tl.load(xa), tl.load(xa + 1), tl.load(xa + 2), tl.load(xa + 3),
           tl.load(xa + 16), tl.load(xa + 17), tl.load(xa + 18),
           tl.load(xa + 19),
           tl.load(xc), tl.load(xc + 1), tl.load(xc + 2), tl.load(xc + 3),
           tl.load(xc + 16), tl.load(xc + 17), tl.load(xc + 18),
           tl.load(xc + 19), table[0], table[1], table[2], table[3],
           table[4], table[5], table[6], table[7]],
          (tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True,
          pack=1)
      acc_g += sums[0] * tl.load(ag_ptr + b0) + sums[2] * tl.load(ag_ptr + b0 + 1)
      acc_h += sums[1] * tl.load(ah_ptr + b0) + sums[3] * tl.load(ah_ptr + b0 + 1)
  out = y_ptr + tl.program_id(1) * N
  tl.store(out + row_g, acc_g.to(y_ptr.dtype.element_ty), mask=t == 0)
  tl.store(out + row_h, acc_h.to(y_ptr.dtype.element_ty), mask=t == 0)


@triton.jit
def _fold(v):
  """int32 ``[THREADS, 4]`` -> ``[THREADS]`` xor of each row (all loaded
  bits reach the output, so no load is optimized away)."""
  return tl.reduce(v, 1, _xor)


@triton.jit
def _xor(a, b):
  return a ^ b


@triton.jit
def stream_rows_kernel(x_ptr, packed_ptr, absmax_ptr, N, y_ptr,
                       K: tl.constexpr, SPLIT_K: tl.constexpr,
                       NUM_WARPS: tl.constexpr, WIDE: tl.constexpr):
  """The memory traffic of :func:`gemv_mma_kernel` with trivial arithmetic:
  is its access pattern what limits it? Lane ``(g, t)`` of a warp reads
  rows ``g`` and ``g + 8`` of 16 per 128 columns: ``WIDE`` = one 16-byte
  load of words ``4t .. 4t+3`` per row (64 contiguous bytes per row per warp
  load) and 64 bytes of ``x``; else ``gemv_mma_kernel``'s pattern, words
  ``t, 4+t, 8+t, 12+t`` as four 4-byte loads."""
  THREADS: tl.constexpr = 32 * NUM_WARPS
  K_SPLIT: tl.constexpr = K // SPLIT_K
  lane, t, row_g, row_h, k_first = _row_lane(K_SPLIT, NUM_WARPS)
  words = packed_ptr.to(tl.pointer_type(tl.int32))
  four = tl.arange(0, 4)
  if WIDE:
    wg_ptr = (words + row_g * (K // 8) + k_first // 8 + 4 * t)[:, None] + four[None, :]
    wh_ptr = (words + row_h * (K // 8) + k_first // 8 + 4 * t)[:, None] + four[None, :]
  else:
    wg_ptr = (words + row_g * (K // 8) + k_first // 8 + t)[:, None] + 4 * four[None, :]
    wh_ptr = (words + row_h * (K // 8) + k_first // 8 + t)[:, None] + 4 * four[None, :]
  xp_ptr = (x_ptr.to(tl.pointer_type(tl.int32)) + k_first // 2 + 16 * t)[:, None] + four[None, :]
  ag_ptr = absmax_ptr + row_g * (K // 64) + k_first // 64 + t // 2
  ah_ptr = absmax_ptr + row_h * (K // 64) + k_first // 64 + t // 2
  acc = tl.zeros([THREADS], tl.int32)
  facc = tl.zeros([THREADS], tl.float32)
  for step in range(K_SPLIT // 128):
    acc ^= _fold(tl.load(wg_ptr + step * 16)) ^ _fold(tl.load(wh_ptr + step * 16))
    xb = xp_ptr + step * 64
    acc ^= (_fold(tl.load(xb)) ^ _fold(tl.load(xb + 4)) ^ _fold(tl.load(xb + 8))
            ^ _fold(tl.load(xb + 12)))
    facc += tl.load(ag_ptr + step * 2) + tl.load(ah_ptr + step * 2)
  out = y_ptr + tl.program_id(1) * N
  tl.store(out + row_g, (acc.to(tl.float32) + facc).to(y_ptr.dtype.element_ty),
           mask=t == 0)


@triton.jit
def stream_flat_kernel(words_ptr, y_ptr, LOOPS: tl.constexpr,
                       LOADS: tl.constexpr, NUM_WARPS: tl.constexpr):
  """The read ceiling at a given size, no layout at all: program ``p`` xors
  the int32 words ``[p T L, (p + 1) T L)`` (``T = LOADS * 128 * NUM_WARPS``
  words, ``L = LOOPS``), ``LOADS`` independent 16-byte loads per thread per
  iteration (each warp load 512 contiguous bytes). Compared with the gemv at
  the same bytes it says how much of the gap is the access pattern and
  how much is the size (launch, ramp-up, tail)."""
  THREADS: tl.constexpr = 32 * NUM_WARPS
  TILE: tl.constexpr = LOADS * THREADS * 4
  base = words_ptr + tl.program_id(0).to(tl.int64) * (LOOPS * TILE)
  offs = (tl.arange(0, LOADS)[:, None, None] * (THREADS * 4)
          + tl.arange(0, THREADS)[None, :, None] * 4
          + tl.arange(0, 4)[None, None, :])
  acc = tl.zeros([THREADS, 4], tl.int32)
  for i in range(LOOPS):
    acc ^= tl.reduce(tl.load(base + i * TILE + offs), 0, _xor)
  tl.store(y_ptr + tl.program_id(0) * THREADS + tl.arange(0, THREADS),
           _fold(acc))


# --- Variant "mma tiled": the same arithmetic on a repacked weight. ---
#
# ``stream_rows_kernel`` shows that reading 16 rows a few dozen bytes at a
# time caps the bandwidth at 1.7-2.8 TB/s. Here ``W`` is repacked (once, at
# load time in a library) so that each warp load is 512 contiguous bytes:
# unit ``(row tile, 64-column block)`` holds, for lane ``l = 4 g + t``, the
# 16 bytes ``W[g][t], W[g][4 + t], W[g + 8][t], W[g + 8][4 + t]`` (int32
# words ``t`` and ``4 + t`` of the block, rows ``g`` and ``g + 8`` of the
# tile); units are ordered tile-major, so a warp walks its tile along K.
# The absmax is tiled alike: ``[N / 16, K / 64, 16]``.


def repack_tiled(packed, absmax, n: int, k: int):
  """(packed, absmax) in bitsandbytes' row-major order -> the tiled order
  of :func:`gemv_mma_tiled_kernel` (torch tensors, ``n % 16 == 0``, ``k %
  64 == 0``, block size 64)."""
  import torch  # pylint: disable=g-import-not-at-top
  words = packed.view(-1).view(torch.int32)
  words = words.reshape(n // 16, 2, 8, k // 64, 2, 4)  # tile, h, g, kb, j, t
  tiled = words.permute(0, 3, 2, 5, 1, 4).contiguous()  # tile, kb, g, t, h, j
  tiled_absmax = absmax.reshape(n // 16, 16, k // 64).permute(0, 2, 1).contiguous()
  return tiled.view(-1).view(packed.dtype), tiled_absmax.view(-1)


@triton.jit
def _split4(v):
  """``[T, 4]`` -> its 4 columns, each ``[T]``."""
  even, odd = tl.split(tl.reshape(v, (v.shape[0], 2, 2)))
  c0, c2 = tl.split(even)
  c1, c3 = tl.split(odd)
  return c0, c1, c2, c3


@triton.jit
def _tiled_lane(tiled_ptr, absmax_ptr, K: tl.constexpr, K_SPLIT: tl.constexpr,
                NUM_WARPS: tl.constexpr):
  """This thread's role on the :func:`repack_tiled` layout: ``lane``, its
  group ``g`` and ``t``, the warp's row tile, the first 64-column block of
  this program's K range, its 16-byte word pointers ``[THREADS, 4]`` and
  its row g absmax pointer (row g + 8 is 8 further)."""
  THREADS: tl.constexpr = 32 * NUM_WARPS
  lane, warp = _thread_ids(tl.zeros([THREADS], tl.int32))
  tile = (tl.program_id(0) * NUM_WARPS + warp).to(tl.int64)
  kb_first = tl.program_id(1) * (K_SPLIT // 64)
  unit = tile * (K // 64) + kb_first
  w_ptrs = (tiled_ptr.to(tl.pointer_type(tl.int32)) + unit * 128
            + 4 * lane)[:, None] + tl.arange(0, 4)[None, :]
  a_ptr = absmax_ptr + unit * 16 + lane // 4
  return lane, lane // 4, lane % 4, tile, kb_first, w_ptrs, a_ptr


@triton.jit
def gemv_mma_tiled_kernel(x_ptr, tiled_ptr, table_ptr, absmax_ptr, N, y_ptr,
                          K: tl.constexpr, SPLIT_K: tl.constexpr,
                          NUM_WARPS: tl.constexpr, STREAM: tl.constexpr,
                          UNROLL: tl.constexpr = 1):
  """:func:`gemv_mma_kernel` (one block per asm) reading the layout of
  :func:`repack_tiled`; ``STREAM``: trivial arithmetic instead of the
  mmas (the layout's bandwidth alone); ``UNROLL`` blocks per loop step (their
  loads issued together: more bytes in flight per warp)."""
  THREADS: tl.constexpr = 32 * NUM_WARPS
  K_SPLIT: tl.constexpr = K // SPLIT_K
  lane, g, t, tile, kb_first, w_ptrs, a_ptr = _tiled_lane(
      tiled_ptr, absmax_ptr, K, K_SPLIT, NUM_WARPS)
  four = tl.arange(0, 4)
  x_ptrs = (x_ptr.to(tl.pointer_type(tl.int32)) + kb_first * 32
            + 4 * t)[:, None] + four[None, :]
  table = _lane_table(table_ptr, lane)
  acc_g = tl.zeros([THREADS], tl.float32)
  acc_h = tl.zeros([THREADS], tl.float32)
  for block0 in range(0, K_SPLIT // 64, UNROLL):
    for u in tl.static_range(UNROLL):
      block = block0 + u
      w0, w1, w2, w3 = _split4(tl.load(w_ptrs + block * 128))
      x0, x1, x2, x3 = _split4(tl.load(x_ptrs + block * 32))
      x4, x5, x6, x7 = _split4(tl.load(x_ptrs + block * 32 + 16))
      if STREAM:
        bits = w0 ^ w1 ^ w2 ^ w3 ^ x0 ^ x1 ^ x2 ^ x3 ^ x4 ^ x5 ^ x6 ^ x7
        sum_g = bits.to(tl.float32)
        sum_h = sum_g
      else:
        sums = tl.inline_asm_elementwise(
            _MMA_BLOCK_ASM, "=r,=r" + ",r" * 20,
            [w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, table[0],
             table[1], table[2], table[3], table[4], table[5], table[6],
             table[7]], (tl.float32, tl.float32), is_pure=True, pack=1)
        sum_g = sums[0]
        sum_h = sums[1]
      acc_g += sum_g * tl.load(a_ptr + block * 16)
      acc_h += sum_h * tl.load(a_ptr + block * 16 + 8)
  out = y_ptr + tl.program_id(1) * N + tile * 16 + g
  tl.store(out, acc_g.to(y_ptr.dtype.element_ty), mask=t == 0)
  tl.store(out + 8, acc_h.to(y_ptr.dtype.element_ty), mask=t == 0)


@triton.jit
def matmul_mma_tiled_kernel(x_ptr, tiled_ptr, table_ptr, absmax_ptr, M, N,
                            y_ptr, K: tl.constexpr, SPLIT_K: tl.constexpr,
                            NUM_WARPS: tl.constexpr, UNROLL: tl.constexpr = 1):
  """``y [SPLIT_K, M, N] = x [M, K] W^T`` for ``M <= 8`` bf16 rows of ``x``
  on the :func:`repack_tiled` layout: :func:`gemv_mma_tiled_kernel` with
  row ``m`` of ``x`` in column ``m`` of B (lanes of group ``g`` load row
  ``g``, zeros past ``M``), so up to 8 rows cost one gemv's loads and
  instructions; a lane keeps the accumulators of columns ``2t, 2t + 1``."""
  THREADS: tl.constexpr = 32 * NUM_WARPS
  K_SPLIT: tl.constexpr = K // SPLIT_K
  lane, g, t, tile, kb_first, w_ptrs, a_ptr = _tiled_lane(
      tiled_ptr, absmax_ptr, K, K_SPLIT, NUM_WARPS)
  four = tl.arange(0, 4)
  x_ok = (g < M)[:, None]
  x_ptrs = (x_ptr.to(tl.pointer_type(tl.int32)) + g.to(tl.int64) * (K // 2)
            + kb_first * 32 + 4 * t)[:, None] + four[None, :]
  table = _lane_table(table_ptr, lane)
  acc0 = tl.zeros([THREADS], tl.float32)  # row g, column 2t
  acc1 = tl.zeros([THREADS], tl.float32)  # row g, column 2t + 1
  acc2 = tl.zeros([THREADS], tl.float32)  # row g + 8, column 2t
  acc3 = tl.zeros([THREADS], tl.float32)  # row g + 8, column 2t + 1
  for block0 in range(0, K_SPLIT // 64, UNROLL):
    for u in tl.static_range(UNROLL):
      block = block0 + u
      w0, w1, w2, w3 = _split4(tl.load(w_ptrs + block * 128))
      x0, x1, x2, x3 = _split4(tl.load(x_ptrs + block * 32, mask=x_ok, other=0))
      x4, x5, x6, x7 = _split4(tl.load(x_ptrs + block * 32 + 16, mask=x_ok,
                                       other=0))
      d = tl.inline_asm_elementwise(
          _MMA_COLUMNS_ASM, "=r,=r,=r,=r" + ",r" * 20,
          [w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, table[0], table[1],
           table[2], table[3], table[4], table[5], table[6], table[7]],
          (tl.float32,) * 4, is_pure=True, pack=1)
      absmax_g = tl.load(a_ptr + block * 16)
      absmax_h = tl.load(a_ptr + block * 16 + 8)
      acc0 += d[0] * absmax_g
      acc1 += d[1] * absmax_g
      acc2 += d[2] * absmax_h
      acc3 += d[3] * absmax_h
  out = y_ptr + tl.program_id(1) * M * N + tile * 16 + g
  dtype = y_ptr.dtype.element_ty
  m0 = 2 * t
  tl.store(out + m0 * N, acc0.to(dtype), mask=m0 < M)
  tl.store(out + (m0 + 1) * N, acc1.to(dtype), mask=m0 + 1 < M)
  tl.store(out + m0 * N + 8, acc2.to(dtype), mask=m0 < M)
  tl.store(out + (m0 + 1) * N + 8, acc3.to(dtype), mask=m0 + 1 < M)
