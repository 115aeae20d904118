r"""Tensor-core product of 1-16 rows with a tiled 4-bit weight.

``W`` ``[N, K]`` is stored in the tiled order of :mod:`jlowbit._tiling`
(:func:`jlowbit.tile_4bit`): for each 16-row tile and 64-column block, lane
:math:`l = 4 g + t` of a warp finds its 16 bytes at ``16 l``, the int32
words :math:`t` and :math:`4 + t` of the block (columns :math:`8 t .. 8 t +
7` and :math:`32 + 8 t ..`) of rows :math:`g` and :math:`g + 8`, so a warp
load is 512 contiguous bytes. Each warp owns one tile and multiplies it by
up to 8 rows of ``x`` with ``mma.sync.m16n8k16`` (bfloat16 or float16
operands, float32 accumulation), row ``m`` of ``x`` in column ``m`` of the
B operand (16 rows: two mmas per A operand, ``ROWS = 16``):

* the 4-bit codes become A-fragment registers with no memory access: the
  16-entry table (``quant_map`` rounded to ``x``'s dtype) lives in 8
  registers, the low and high bytes of entries 0-3, 4-7, 8-11, 12-15
  (:func:`register_table`); ``prmt`` picks 4 bytes of 8 by 4 selector
  nibbles, so two ``prmt`` look up 4 codes' low bits among 8 entries, a
  third picks the 0-7 or 8-15 result by the code's bit 3, and two more
  interleave low and high bytes into half-precision pairs, element order;
* the sum over K does not depend on the order of K, so a word's 8
  elements are fed as the A fragment's columns ``2t, 2t+1, 2t+8, 2t+9`` of
  two mmas, and lane ``(g, t)`` loads the same 8 elements of row ``g`` of
  ``x`` (B's column ``g``: rows ``2t, 2t+1, 2t+8, 2t+9``); 4 mmas per
  64-column block, whose result, per lane, is the block's sum for rows
  ``g, g + 8`` and columns ``2t, 2t + 1``;
* the block's absmax multiplies that float32 sum (one FMA per accumulator),
  read from the tiled statistics (nested: the uint8 code, its second-level
  scale found by the block's bitsandbytes index,
  :func:`jlowbit.triton_kernels.common.block_absmax`).

The kernel is written with 1-D tensors of one element per thread whose role
comes from ``%tid.x`` (inline asm), not from Triton's layout. A grid
``(N / 16 / NUM_WARPS * ceil(M / ROWS), SPLIT_K)`` gives each program its
tiles, its ``ROWS`` rows of ``x`` and its range of K; the groups of rows
that share tiles are neighbouring programs, so that with more than
``ROWS`` rows the next group's reads of ``W`` tend to hit L2. ``SPLIT_K >
1`` writes float32 partial products ``[SPLIT_K, M, N]`` that the launcher
adds.

Triton's interpreter cannot run inline PTX: there (``common.INTERPRETED``)
the thread ids are the element indices, the ``prmt`` lookup is the same byte
selection out of the same 8 table words by integer ops
(:func:`_emulated_lookup`), and each mma is computed from every lane's
operands by the fragment layouts of the PTX ISA (:func:`_emulated_mma`,
float32 sums of the same half-precision products), so CPU tests run the
kernel's indexing, tiling, split K and statistics.
"""

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jlowbit.triton_kernels import common
from jlowbit.triton_kernels import gemv4
from jlowbit.triton_kernels.launch import cdiv, launch

# One ``prmt`` lookup of the 4 codes in the low 16 bits of register {s}
# into two half-precision pairs {q0}, {q1} (element order), the table
# words in {t0}..{t7}.
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
  prmt.b32 {q0}, lo, hi, 0x4051;
  prmt.b32 {q1}, lo, hi, 0x6273;
"""
_MMA = ("  mma.sync.aligned.m16n8k16.row.col.f32.{dtype}.{dtype}.f32 "
        "{{{d}}}, {{{a}}}, {{{b}}}, {{{d}}};\n")


def _word_pairs(word: str, p: str, table: dict) -> str:
  """The 8 codes of register ``word`` -> pairs ``{p}0 .. {p}3`` (elements
  0-1, 2-3, 4-5, 6-7; element ``e`` is nibble ``e ^ 1``)."""
  return (_LOOKUP_PAIRS.format(s=word, q0=f"{p}0", q1=f"{p}1", **table)
          + f"  shr.u32 s, {word}, 16;\n"
          + _LOOKUP_PAIRS.format(s="s", q0=f"{p}2", q1=f"{p}3", **table))


def _block_asm(dtype: str, groups: int) -> str:
  """One lane's 64-column block times ``groups`` (1 or 2) groups of 8 rows
  of ``x``, the lookups shared. Operands: ``4 groups`` outputs (per group
  the accumulators of columns 2t, 2t+1 of row g, then of row g + 8), the 4
  words (row g pair 0, pair 1, row g + 8 pair 0, pair 1), per group its 8
  ``x`` pairs (pair 0's four, pair 1's four), the 8 table words."""
  words, xs = 4 * groups, 4 * groups + 4
  table = {f"t{i}": f"${xs + 8 * groups + i}" for i in range(8)}
  acc = [f"d{i}" for i in range(4 * groups)]
  text = ("{\n.reg .b32 s, s7, t, sel, la, lb, lo, ha, hb, hi, "
          f"g0, g1, g2, g3, h0, h1, h2, h3;\n.reg .f32 {', '.join(acc)};\n")
  text += "".join(f"mov.f32 {d}, 0f00000000;\n" for d in acc)
  for pair in range(2):
    text += _word_pairs(f"${words + pair}", "g", table)
    text += _word_pairs(f"${words + 2 + pair}", "h", table)
    for group in range(groups):
      d = ", ".join(acc[4 * group:4 * group + 4])
      b = xs + 8 * group + 4 * pair
      text += _MMA.format(dtype=dtype, d=d, a="g0, h0, g1, h1",
                          b=f"${b}, ${b + 1}")
      text += _MMA.format(dtype=dtype, d=d, a="g2, h2, g3, h3",
                          b=f"${b + 2}, ${b + 3}")
  return (text + "".join(f"mov.b32 ${i}, {d};\n" for i, d in enumerate(acc))
          + "}")


_BLOCK_ASM_BF16 = tl.constexpr(_block_asm("bf16", 1))
_BLOCK_ASM_F16 = tl.constexpr(_block_asm("f16", 1))
_BLOCK16_ASM_BF16 = tl.constexpr(_block_asm("bf16", 2))
_BLOCK16_ASM_F16 = tl.constexpr(_block_asm("f16", 2))


def register_table(quant_map: jax.Array, dtype) -> jax.Array:
  """int32 ``[8 * 32]``: the 8 table words of ``quant_map`` in ``dtype``
  (bfloat16 / float16), each repeated for the 32 lanes.

  Words 0-3 hold the low bytes of entries 0-3, 4-7, 8-11, 12-15 (entry
  ``4 i + b`` in byte ``b``), words 4-7 their high bytes. Each lane reads
  its own copy: ptxas would keep a provably warp-uniform value in a uniform
  register and copy it back before every ``prmt``.
  """
  bits = jax.lax.bitcast_convert_type(quant_map.astype(dtype), jnp.uint16)
  bits = bits.astype(jnp.uint32).reshape(4, 4)
  shifts = jnp.array([0, 8, 16, 24], jnp.uint32)
  words = jnp.concatenate([jnp.sum((bits & 0xFF) << shifts, axis=1),
                           jnp.sum((bits >> 8) << shifts, axis=1)])
  return jnp.repeat(jax.lax.bitcast_convert_type(words, jnp.int32), 32)


@triton.jit
def _thread_ids(THREADS: tl.constexpr):
  """``(lane, warp)`` of the thread that holds each element of a
  ``[THREADS]`` tensor (the element index when interpreted)."""
  if common.INTERPRETED:
    tid = tl.arange(0, THREADS)
  else:
    tid = tl.inline_asm_elementwise(
        "mov.u32 $0, %tid.x;", "=r,r", [tl.zeros([THREADS], tl.int32)],
        dtype=tl.int32, is_pure=True, pack=1)
  return tid % 32, tid // 32


@triton.jit
def _split4(v):
  """``[T, 4]`` -> its 4 columns, each ``[T]``."""
  even, odd = tl.split(tl.reshape(v, (v.shape[0], 2, 2)))
  c0, c2 = tl.split(even)
  c1, c3 = tl.split(odd)
  return c0, c1, c2, c3


@triton.jit
def _half_value(bits, F16: tl.constexpr):
  """float32 value of the 16-bit half-precision patterns in int32 ``bits``."""
  if F16:
    value = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
  else:
    value = (bits << 16).to(tl.float32, bitcast=True)
  return value


@triton.jit
def _emulated_lookup(codes, table, F16: tl.constexpr):
  """``prmt``'s table lookup by integer ops: float32 value of each code of
  ``codes`` (``[THREADS, ...]``) out of the 8 table words (``[THREADS]``)."""
  group = codes >> 2
  shift = (codes & 3) * 8
  low = table[0][:, None, None]
  high = table[4][:, None, None]
  for i in tl.static_range(1, 4):
    low = tl.where(group == i, table[i][:, None, None], low)
    high = tl.where(group == i, table[4 + i][:, None, None], high)
  return _half_value(((low >> shift) & 0xFF) | (((high >> shift) & 0xFF) << 8),
                     F16)


@triton.jit
def _pair_values(words, F16: tl.constexpr):
  """``x`` words ``[T, 4]`` (two halves each) -> float32 ``[T, 8]`` in the
  nibble order of a weight word (nibble ``n`` is element ``n ^ 1``)."""
  high = _half_value((words >> 16) & 0xFFFF, F16)
  low = _half_value(words & 0xFFFF, F16)
  return tl.reshape(tl.join(high, low), (words.shape[0], 8))


@triton.jit
def _emulated_mma(words, x_first, x_second, table, NUM_WARPS: tl.constexpr,
                  F16: tl.constexpr):
  """The 4 accumulators of each lane after its block's 4 mmas, from every
  lane's operands (the fragment layouts of ``mma.m16n8k16``).

  Lane ``(g, t)`` holds words ``[T, 4]`` (row g word t, row g word 4 + t,
  row g + 8 word t, row g + 8 word 4 + t) and ``x`` row ``g``'s elements
  ``8 t ..`` (``x_first``) and ``32 + 8 t ..`` (``x_second``); it gets the
  block's sums for rows ``g, g + 8`` and ``x`` rows ``2t, 2t + 1``.
  """
  THREADS: tl.constexpr = 32 * NUM_WARPS
  codes = (words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15
  w = _emulated_lookup(codes, table, F16)  # [T, 4 (h j), 8 nibbles]
  w = tl.reshape(w, (NUM_WARPS, 8, 4, 2, 2, 8))  # warp g t h j n
  w = tl.reshape(tl.permute(w, (0, 1, 3, 2, 4, 5)), (NUM_WARPS, 8, 2, 64))
  x = tl.join(_pair_values(x_first, F16), _pair_values(x_second, F16))
  x = tl.reshape(tl.permute(x, (0, 2, 1)), (NUM_WARPS, 8, 64))  # warp c (t j n)
  d = tl.sum(w[:, :, :, None, :] * x[:, None, None, :, :], axis=4)  # g h c
  d = tl.permute(tl.reshape(d, (NUM_WARPS, 8, 2, 4, 2)), (0, 1, 3, 2, 4))
  return _split4(tl.reshape(d, (THREADS, 4)))


@triton.jit
def _block_sums(words, x_first, x_second, table, NUM_WARPS: tl.constexpr,
                F16: tl.constexpr):
  """One 64-column block: the lane's float32 sums (row g: columns 2t, 2t+1;
  row g + 8: columns 2t, 2t+1)."""
  if common.INTERPRETED:
    d0, d1, d2, d3 = _emulated_mma(words, x_first, x_second, table, NUM_WARPS,
                                   F16)
  else:
    w0, w1, w2, w3 = _split4(words)
    x0, x1, x2, x3 = _split4(x_first)
    x4, x5, x6, x7 = _split4(x_second)
    operands = [w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, table[0],
                table[1], table[2], table[3], table[4], table[5], table[6],
                table[7]]
    if F16:
      d0, d1, d2, d3 = tl.inline_asm_elementwise(
          _BLOCK_ASM_F16, "=r,=r,=r,=r" + ",r" * 20, operands,
          (tl.float32,) * 4, is_pure=True, pack=1)
    else:
      d0, d1, d2, d3 = tl.inline_asm_elementwise(
          _BLOCK_ASM_BF16, "=r,=r,=r,=r" + ",r" * 20, operands,
          (tl.float32,) * 4, is_pure=True, pack=1)
  return d0, d1, d2, d3


@triton.jit
def _block_sums16(words, x_first, x_second, y_first, y_second, table,
                  NUM_WARPS: tl.constexpr, F16: tl.constexpr):
  """:func:`_block_sums` for two groups of 8 rows of ``x`` (``x_*``, then
  ``y_*``: the rows 8 further), one lookup of the words for both."""
  if common.INTERPRETED:
    d0, d1, d2, d3 = _emulated_mma(words, x_first, x_second, table, NUM_WARPS,
                                   F16)
    d4, d5, d6, d7 = _emulated_mma(words, y_first, y_second, table, NUM_WARPS,
                                   F16)
  else:
    w0, w1, w2, w3 = _split4(words)
    x0, x1, x2, x3 = _split4(x_first)
    x4, x5, x6, x7 = _split4(x_second)
    y0, y1, y2, y3 = _split4(y_first)
    y4, y5, y6, y7 = _split4(y_second)
    operands = [w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, y0, y1, y2,
                y3, y4, y5, y6, y7, table[0], table[1], table[2], table[3],
                table[4], table[5], table[6], table[7]]
    if F16:
      d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
          _BLOCK16_ASM_F16, "=r," * 7 + "=r" + ",r" * 28, operands,
          (tl.float32,) * 8, is_pure=True, pack=1)
    else:
      d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
          _BLOCK16_ASM_BF16, "=r," * 7 + "=r" + ",r" * 28, operands,
          (tl.float32,) * 8, is_pure=True, pack=1)
  return d0, d1, d2, d3, d4, d5, d6, d7


@triton.jit
def matmul_4bit_tiled_kernel(x_ptr, packed_ptr, table_ptr, absmax_ptr,
                             nested_code_ptr, nested_absmax_ptr, offset_ptr,
                             M, N, y_ptr, K: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, SPLIT_K: tl.constexpr,
                             NUM_WARPS: tl.constexpr, UNROLL: tl.constexpr,
                             ROWS: tl.constexpr, NESTED: tl.constexpr,
                             NESTED_BLOCK: tl.constexpr, F16: tl.constexpr):
  """``y [SPLIT_K, M, N] = x [M, K] W^T`` on the tiled layout.

  ``N % (16 NUM_WARPS) == 0``, ``K % (64 UNROLL SPLIT_K) == 0``,
  ``BLOCK_SIZE % 64 == 0``; launch with ``num_warps=NUM_WARPS`` on the
  grid ``(N / (16 NUM_WARPS) * ceil(M / ROWS), SPLIT_K)``. A program
  takes ``ROWS`` (8 or 16: one or two mma column groups) rows of ``x``,
  bfloat16
  (``F16``: float16) and ``table_ptr`` holds :func:`register_table` in that
  dtype. ``UNROLL`` blocks per loop step (their loads issued together).
  """
  THREADS: tl.constexpr = 32 * NUM_WARPS
  K_SPLIT: tl.constexpr = K // SPLIT_K
  STATS_PER_ROW: tl.constexpr = K // BLOCK_SIZE  # absmax blocks per row
  SPAN: tl.constexpr = BLOCK_SIZE // 64  # 64-column blocks per absmax block
  lane, warp = _thread_ids(THREADS)
  g = lane // 4
  t = lane % 4
  groups = tl.cdiv(M, ROWS)  # of ROWS rows of x
  tile = (tl.program_id(0) // groups * NUM_WARPS + warp).to(tl.int64)
  m_first = tl.program_id(0) % groups * ROWS
  first = tl.program_id(1) * (K_SPLIT // 64)  # first 64-column block
  w_ptrs = (packed_ptr.to(tl.pointer_type(tl.int32))
            + ((tile * (K // 64) + first) * 128 + 4 * lane)[:, None]
            + tl.arange(0, 4)[None, :])
  x_ok = (m_first + g < M)[:, None]
  y_ok = (m_first + 8 + g < M)[:, None]  # the second group (ROWS == 16)
  x_ptrs = (x_ptr.to(tl.pointer_type(tl.int32))
            + (m_first + g).to(tl.int64) * (K // 2) + first * 32
            + 4 * t)[:, None] + tl.arange(0, 4)[None, :]
  y_ptrs = x_ptrs + 8 * (K // 2)
  spread = table_ptr + lane
  table = (tl.load(spread), tl.load(spread + 32), tl.load(spread + 64),
           tl.load(spread + 96), tl.load(spread + 128), tl.load(spread + 160),
           tl.load(spread + 192), tl.load(spread + 224))
  offset = 0.0
  if NESTED:
    offset = tl.load(offset_ptr)
  stats_g = tile * STATS_PER_ROW * 16 + g  # tiled index of row g's block 0
  row_g = tile * 16 + g
  acc0 = tl.zeros([THREADS], tl.float32)  # row g, column 2t
  acc1 = tl.zeros([THREADS], tl.float32)  # row g, column 2t + 1
  acc2 = tl.zeros([THREADS], tl.float32)  # row g + 8, column 2t
  acc3 = tl.zeros([THREADS], tl.float32)  # row g + 8, column 2t + 1
  acc4 = tl.zeros([THREADS], tl.float32)  # the same, columns 8 + 2t, 9 + 2t
  acc5 = tl.zeros([THREADS], tl.float32)
  acc6 = tl.zeros([THREADS], tl.float32)
  acc7 = tl.zeros([THREADS], tl.float32)
  for block0 in range(0, K_SPLIT // 64, UNROLL):
    for u in tl.static_range(UNROLL):
      block = block0 + u
      words = tl.load(w_ptrs + block * 128)
      x_first = tl.load(x_ptrs + block * 32, mask=x_ok, other=0)
      x_second = tl.load(x_ptrs + block * 32 + 16, mask=x_ok, other=0)
      if ROWS == 16:
        d0, d1, d2, d3, d4, d5, d6, d7 = _block_sums16(
            words, x_first, x_second,
            tl.load(y_ptrs + block * 32, mask=y_ok, other=0),
            tl.load(y_ptrs + block * 32 + 16, mask=y_ok, other=0), table,
            NUM_WARPS, F16)
      else:
        d0, d1, d2, d3 = _block_sums(words, x_first, x_second, table,
                                     NUM_WARPS, F16)
      stat = (first + block) // SPAN  # the absmax block in the row
      absmax_g = common.block_absmax(
          absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset,
          stats_g + stat * 16, True, NESTED, NESTED_BLOCK,
          row_g * STATS_PER_ROW + stat)
      absmax_h = common.block_absmax(
          absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset,
          stats_g + stat * 16 + 8, True, NESTED, NESTED_BLOCK,
          (row_g + 8) * STATS_PER_ROW + stat)
      acc0 += d0 * absmax_g
      acc1 += d1 * absmax_g
      acc2 += d2 * absmax_h
      acc3 += d3 * absmax_h
      if ROWS == 16:
        acc4 += d4 * absmax_g
        acc5 += d5 * absmax_g
        acc6 += d6 * absmax_h
        acc7 += d7 * absmax_h
  m0 = m_first + 2 * t
  out = y_ptr + tl.program_id(1).to(tl.int64) * M * N + row_g
  dtype = y_ptr.dtype.element_ty
  tl.store(out + m0 * N, acc0.to(dtype), mask=m0 < M)
  tl.store(out + (m0 + 1) * N, acc1.to(dtype), mask=m0 + 1 < M)
  tl.store(out + m0 * N + 8, acc2.to(dtype), mask=m0 < M)
  tl.store(out + (m0 + 1) * N + 8, acc3.to(dtype), mask=m0 + 1 < M)
  if ROWS == 16:
    m1 = m0 + 8
    tl.store(out + m1 * N, acc4.to(dtype), mask=m1 < M)
    tl.store(out + (m1 + 1) * N, acc5.to(dtype), mask=m1 + 1 < M)
    tl.store(out + m1 * N + 8, acc6.to(dtype), mask=m1 < M)
    tl.store(out + (m1 + 1) * N + 8, acc7.to(dtype), mask=m1 + 1 < M)


def matmul_4bit_tiled(x: jax.Array, packed: jax.Array, quant_map: jax.Array,
                      absmax: jax.Array, nested: tuple | None,
                      out_features: int, block_size: int, impl: str, *,
                      block_m: int, num_warps: int, num_stages: int,
                      split_k: int, unroll: int) -> jax.Array:
  """Launches the tensor-core product ``x`` ``[M, K]`` times tiled ``W``^T.

  Args:
    x: ``[M, K]`` bfloat16 or float16, any ``M >= 1``.
    packed: uint8 ``[N K / 2]`` in the tiled order (:mod:`jlowbit._tiling`).
    quant_map: float32 ``[16]``; the kernel uses it rounded to ``x.dtype``.
    absmax: float32 ``[N K / block_size]`` tiled, or with ``nested`` its
      tiled uint8 codes.
    nested: ``None``, or ``(code, nested_absmax, offset, nested_block_size)``
      (see :func:`jlowbit.triton_kernels.gemv4.gemv_4bit`), the second level
      in bitsandbytes' order of the blocks.
    out_features: ``N``, a multiple of 16.
    block_size: elements per absmax block, a multiple of 64 dividing ``K``.
    impl: ``"triton"`` or ``"interpret"``.
    block_m: rows of ``x`` per program, 8 or 16 (one or two mma column
      groups, the tile's lookups shared); 8 wherever ``M <= 8``.
    num_warps: warps (16-row tiles) per program; halved until it divides
      ``N / 16``.
    num_stages: Triton's software-pipelining depth.
    split_k: ranges K is cut into; halved until ``K`` is a multiple of
      ``64 * unroll * split_k``.
    unroll: 64-column blocks per loop step; halved until ``K`` is a multiple
      of ``64 * unroll``.

  Returns:
    ``[M, N]`` in ``x.dtype``.
  """
  (m, k), n = x.shape, out_features
  rows = 8 if m <= 8 else block_m
  tiles = n // 16
  while tiles % num_warps:
    num_warps //= 2
  while (k // 64) % unroll:
    unroll //= 2
  while split_k > 1 and (k // 64) % (unroll * split_k):
    split_k //= 2
  statistics, nested_block = gemv4.statistics_operands(absmax, nested)
  out_dtype = x.dtype if split_k == 1 else jnp.float32
  (y,) = launch(
      __name__, "matmul_4bit_tiled_kernel", x, packed,
      register_table(quant_map, x.dtype), *statistics, m, n,
      out_shape=(jax.ShapeDtypeStruct((split_k, m, n), out_dtype),),
      grid=(tiles // num_warps * cdiv(m, rows), split_k),
      impl=impl, num_warps=num_warps, num_stages=num_stages, K=k,
      BLOCK_SIZE=block_size, SPLIT_K=split_k, NUM_WARPS=num_warps,
      UNROLL=unroll, ROWS=rows, NESTED=nested is not None,
      NESTED_BLOCK=nested_block,
      F16=x.dtype == jnp.float16)
  if split_k == 1:
    return y[0]
  return jnp.sum(y, axis=0).astype(x.dtype)
