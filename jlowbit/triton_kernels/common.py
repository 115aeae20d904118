"""``@triton.jit`` helpers shared by the kernels.

Each helper has a ``jax.numpy`` twin in :mod:`jlowbit._twins` that does
the same float32 operations in the same order, so codes agree bit for bit.
The exceptions are faster routes to the same results: the bucketed search
(:func:`bucket_operands`, :func:`scaled_bucket_bracket`,
:func:`counted_codes`) finds the index of the reference's
:func:`scaled_tree_index` through the same comparisons (equal for every
input: ``tests/test_ground_search.py``, ``tests/test_ops_blockwise8.py``),
and :func:`tile_absmax` reduces in integers.
"""

import os

import triton
import triton.language as tl

from jlowbit import _noise
from jlowbit import _search
from jlowbit import _twins

BUCKET_KEY_SHIFT = tl.constexpr(_search.BUCKET_KEY_SHIFT)
TINY_SCALE = tl.constexpr(_twins.TINY_SCALE)
# quasi_uniform_units: (counter * PHASE_MULTIPLIER + offset) >> UNIFORM_SHIFT,
# 2**24 units in [0, 1).
PHASE_MULTIPLIER = tl.constexpr(_noise.PHASE_MULTIPLIER)
UNIFORM_SHIFT = tl.constexpr(32 - _noise.UNIFORM_BITS)
# Kernels run by Triton's interpreter (imported with TRITON_INTERPRET=1 in
# the worker of jlowbit.triton_kernels.launch) take exact arithmetic where
# compiled ones take GPU approximations with no interpreter counterpart.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
INV_TINY_SCALE = tl.constexpr(1 / _twins.TINY_SCALE)
INF_SCALE_FACTOR = tl.constexpr(2.0 ** -126)  # bucket_operands
ABSMAX_RUN = tl.constexpr(4)  # tile_absmax: elements a thread reduces in floats
# counted_codes: $1-$4 starts, $5-$8 bounds, $9-$12 values -> $0, 4 bytes;
# CMP: le or lt.
_COUNTED_CODES_ASM = """{
  .reg .b32 low, high;
  .reg .pred p;
  prmt.b32 low, $1, $2, 0x3340;
  prmt.b32 high, $3, $4, 0x3340;
  prmt.b32 $0, low, high, 0x5410;
  setp.CMP.f32 p, $5, $9;
  @p add.u32 $0, $0, 0x1;
  setp.CMP.f32 p, $6, $10;
  @p add.u32 $0, $0, 0x100;
  setp.CMP.f32 p, $7, $11;
  @p add.u32 $0, $0, 0x10000;
  setp.CMP.f32 p, $8, $12;
  @p add.u32 $0, $0, 0x1000000;
}"""
COUNTED_CODES_LE = tl.constexpr(_COUNTED_CODES_ASM.replace("CMP", "le"))
COUNTED_CODES_LT = tl.constexpr(_COUNTED_CODES_ASM.replace("CMP", "lt"))
RECIPROCAL_MIN_SCALE = tl.constexpr(_twins.RECIPROCAL_MIN_SCALE)
RECIPROCAL_MAX_SCALE = tl.constexpr(_twins.RECIPROCAL_MAX_SCALE)


@triton.jit
def fast_divide(numerator, denominator):
  """``numerator / denominator`` as ``numerator * rcp.approx(denominator)``
  (within 2 ulp; subnormal denominators flush to 0, so keep them out);
  exact division when interpreted."""
  if INTERPRETED:
    return numerator / denominator
  else:
    return numerator * tl.inline_asm_elementwise(
        "rcp.approx.ftz.f32 $0, $1;", "=r,r", [denominator],
        dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def approx_reciprocal(x):
  """``1 / x`` within a few ulp for positive ``x`` up to the float32 maximum
  (a subnormal result keeps 21 bits), 0 for inf: ``rcp.approx.ftz`` of
  ``x / 4``, times ``1 / 4``; exact division when interpreted."""
  if INTERPRETED:
    return 1.0 / x
  else:
    return 0.25 * tl.inline_asm_elementwise(
        "rcp.approx.ftz.f32 $0, $1;", "=r,r", [0.25 * x], dtype=tl.float32,
        is_pure=True, pack=1)


@triton.jit
def _max_propagate_nan(a, b):
  return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_absmax(x):
  """``max |x|`` along axis 1 of a 2-D tile; NaN in a row gives NaN."""
  return tl.reduce(tl.abs(x), 1, _max_propagate_nan)


@triton.jit
def tile_absmax(x, BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
  """:func:`row_absmax` of a flat tile of ``BLOCKS`` blocks (float32
  ``[BLOCKS]``), reduced across a warp in integers.

  Float maxima of ``|x|`` over runs of ``ABSMAX_RUN`` consecutive elements
  (within a thread), then the integer maximum of their bit patterns over
  each block: the bits of non-negative floats order as the floats do, NaN
  above inf, and a warp reduces 32-bit integers in one ``redux.sync``
  (where a block spans whole warps) instead of five shuffle-and-max steps.
  """
  runs = row_absmax(tl.reshape(x, (BLOCKS * BLOCK_SIZE // ABSMAX_RUN, ABSMAX_RUN)))
  bits = tl.reshape(runs.to(tl.int32, bitcast=True),
                    (BLOCKS, BLOCK_SIZE // ABSMAX_RUN))
  return tl.max(bits, 1).to(tl.float32, bitcast=True)


@triton.jit
def unpack_nibbles(packed):
  """(high, low) int32 nibbles of a uint8 tile: elements ``2i`` and ``2i + 1``."""
  packed = packed.to(tl.int32)
  return packed >> 4, packed & 15


@triton.jit
def quantize_flat_tile(x, search_ptr, buckets_ptr, BLOCK_SIZE: tl.constexpr,
                       BLOCKS: tl.constexpr, CODE_BITS: tl.constexpr,
                       STEPS: tl.constexpr, pairs_ptr=None, units=None,
                       STOCHASTIC: tl.constexpr = False):
  """Blockwise codes of a flat tile of ``BLOCKS`` whole blocks.

  ``x`` is float32 ``[BLOCKS * BLOCK_SIZE]`` (lanes past the data must hold
  0; a multiple of 4 elements per thread); returns (uint8 codes of ``x``'s
  shape, float32 absmax ``[BLOCKS]``):
  the rules of ``jlowbit.blockwise8.quantize_blockwise_reference`` (the
  index of :func:`scaled_tree_index` with :func:`block_scale` of each
  block's absmax). With ``STEPS > 0`` the index is found by
  :func:`scaled_bucket_bracket` (``search_ptr``: the sorted thresholds,
  ``buckets_ptr``: the uint8 bucket entries of
  ``jlowbit._search.bucket_search_table``), else by the decision tree at
  ``search_ptr``. The tile stays one-dimensional so that the table gathers
  keep a coalesced layout. With ``STOCHASTIC`` (bucketed search only) the
  search tables are those of the lower bracketing code
  (``jlowbit._search.code_search(code, floor=True)``), which then rounds
  stochastically (:func:`stochastic_step`) with the noise ``units`` through
  the codebook's (code, scaled gap) pairs at ``pairs_ptr``.
  """
  absmax = tile_absmax(x, BLOCKS, BLOCK_SIZE)
  scale = block_scale(absmax)
  if STEPS > 0:
    factor, scale, inv_scale = bucket_operands(scale)
    x = x * broadcast_rows(factor, BLOCKS, BLOCK_SIZE)
    scale = broadcast_rows(scale, BLOCKS, BLOCK_SIZE)
    start, bound = scaled_bucket_bracket(
        x, scale, broadcast_rows(inv_scale, BLOCKS, BLOCK_SIZE), search_ptr,
        buckets_ptr, STEPS)
    if STOCHASTIC:
      codes = stochastic_step(x, scale, start + (bound <= x).to(tl.int32),
                              pairs_ptr, units)
    else:
      codes = counted_codes(start, bound, x, False)
  else:
    tl.static_assert(not STOCHASTIC, "stochastic rounding needs STEPS > 0")
    codes = scaled_tree_index(x, broadcast_rows(scale, BLOCKS, BLOCK_SIZE),
                              search_ptr, CODE_BITS).to(tl.uint8)
  return codes, absmax


@triton.jit
def dequantize_flat_tile(codes_ptr, absmax_ptr, code_ptr, offsets, mask,
                         BLOCK_SIZE: tl.constexpr):
  """``code[codes] * absmax[block]`` at flat int64 ``offsets`` (float32; 0
  where ``mask`` is false)."""
  codes = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.int32)
  absmax = tl.load(absmax_ptr + offsets // BLOCK_SIZE, mask=mask, other=0.0)
  return tl.load(code_ptr + codes) * absmax


@triton.jit
def block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset,
                 index, mask, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr,
                 nested_index=None):
  """float32 absmax of the 4-bit blocks stored at ``index``; 0 where ``mask``
  is off.

  ``NESTED``: the absmax is 8-bit, ``nested_code[q] * nested_absmax[i //
  NESTED_BLOCK] + offset`` (the float32 operations of
  ``jlowbit.quant4.absmax_float32``), ``i`` the block's index in
  bitsandbytes' order: ``nested_index``, or ``index`` where it is ``None``
  (the codes stored in that order).
  """
  if NESTED:
    q = tl.load(absmax_ptr + index, mask=mask, other=0)
    if nested_index is None:
      scale = tl.load(nested_absmax_ptr + index // NESTED_BLOCK, mask=mask,
                      other=0.0)
    else:
      scale = tl.load(nested_absmax_ptr + nested_index // NESTED_BLOCK,
                      mask=mask, other=0.0)
    absmax = tl.where(mask, tl.load(nested_code_ptr + q) * scale + offset, 0.0)
  else:
    absmax = tl.load(absmax_ptr + index, mask=mask, other=0.0)
  return absmax


@triton.jit
def broadcast_rows(per_block, BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
  """``[BLOCKS]`` -> flat ``[BLOCKS * BLOCK_SIZE]``, each value repeated."""
  return tl.reshape(tl.broadcast_to(per_block[:, None], (BLOCKS, BLOCK_SIZE)),
                    (BLOCKS * BLOCK_SIZE,))


@triton.jit
def block_scale(absmax):
  """``absmax`` with 0 replaced by 1, so an all-zero block stays zero."""
  return tl.where(absmax > 0, absmax, 1.0)


@triton.jit
def tiny_scale_factor(scale):
  """``2**64`` where ``scale < 2**-64``, else 1."""
  return tl.where(scale < TINY_SCALE, INV_TINY_SCALE, 1.0)


@triton.jit
def exact_comparison_operands(x, scale):
  """Twin of ``jlowbit._twins.exact_comparison_operands``: ``(x, scale)``
  times ``2**64`` where ``scale < 2**-64``."""
  factor = tiny_scale_factor(scale)
  return x * factor, scale * factor


@triton.jit
def scaled_tree_index(x, scale, tree_ptr, CODE_BITS: tl.constexpr):
  """Nearest-code index of ``x / scale`` via the decision tree, division-free.

  Twin of ``jlowbit._twins.scaled_tree_index``: compares
  ``tree[node] * scale <= x`` (int32 result, ``x``'s shape; ``scale``
  broadcastable to it).
  """
  x, scale = exact_comparison_operands(x, scale)
  node = tl.full(x.shape, 1, tl.int32)
  for _ in tl.static_range(CODE_BITS):
    node = 2 * node + (tl.load(tree_ptr + node) * scale <= x).to(tl.int32)
  return node - (1 << CODE_BITS)


@triton.jit
def bucket_operands(scale):
  """Per block scale ``s`` (> 0, from :func:`block_scale`): ``(f, s * f,
  inv_scale)`` for :func:`scaled_bucket_bracket` on ``x * f``.

  ``f`` is :func:`exact_comparison_operands`' factor (``2**64`` where ``s <
  2**-64``), which leaves every comparison ``t * s <= x`` as it was, and
  ``inv_scale`` is :func:`approx_reciprocal` of ``s * f``. A block of
  scale ``inf`` takes ``f = inv_scale = 2**-126`` instead (its comparisons
  ``t * inf <= x * f`` depend only on the sign of ``t`` and on whether
  ``x`` is finite, both kept): its key operand ``x * f * inv_scale`` is
  then ``+-inf`` for ``x = +-inf`` and below ``2**-124`` in magnitude for
  a finite ``x``, keys of the same start as ``+-0``
  (``jlowbit._search.ZERO_KEYS_BOUND``), so no ``x`` but NaN gives a NaN
  key: no select per element.
  """
  infinite = scale == float("inf")
  factor = tl.where(infinite, INF_SCALE_FACTOR, tiny_scale_factor(scale))
  scale = scale * factor
  return factor, scale, tl.where(infinite, INF_SCALE_FACTOR,
                                 approx_reciprocal(scale))


@triton.jit
def scaled_bucket_bracket(x, scale, inv_scale, thresholds_ptr, buckets_ptr,
                          STEPS: tl.constexpr):
  """:func:`scaled_tree_index`'s index in ``STEPS + 1`` gathers instead of
  8, as ``(start, bound)``: the index is ``start + (bound <= x)``.

  ``x``, ``scale`` (> 0) and ``inv_scale`` per :func:`bucket_operands`.
  The top 16 bits of ``r = x * inv_scale`` are a key of
  ``jlowbit._search.bucket_search_table``, whose entry (one byte gather,
  ``buckets_ptr``: uint8) is a lower bound ``start`` of the index;
  ``STEPS`` comparisons ``t[index] * scale <= x`` of the sorted thresholds
  ``t`` at ``thresholds_ptr`` (one gather each) finish it, the last left to
  the caller (:func:`counted_codes` fuses it into the packing of the
  codes). A NaN ``x`` has a NaN key: index 0.
  """
  r = x * inv_scale
  key = r.to(tl.uint32, bitcast=True) >> BUCKET_KEY_SHIFT
  start = tl.load(buckets_ptr + key).to(tl.int32)
  bound = tl.load(thresholds_ptr + start) * scale
  for _ in tl.static_range(STEPS - 1):
    start += (bound <= x).to(tl.int32)
    bound = tl.load(thresholds_ptr + start) * scale
  return start, bound


@triton.jit
def counted_codes(start, bound, x, STRICT: tl.constexpr):
  """uint8 codes ``start + (bound < x)`` (``STRICT``) or ``start + (bound <=
  x)`` (NaN compares false); the sum must stay below 256.

  Compiled, the codes are made four at a time (four elements a thread
  holds, so it must hold a multiple of 4): the starts packed into one
  32-bit word by ``prmt``, then each comparison adds its 1 to its byte by
  a predicated add, about 2.75 instructions per code where the select of
  ``start`` or ``start + 1``, a byte mask and the packing take 4.75.
  """
  if INTERPRETED:
    if STRICT:
      return (start + (bound < x).to(tl.int32)).to(tl.uint8)
    else:
      return (start + (bound <= x).to(tl.int32)).to(tl.uint8)
  else:
    return tl.inline_asm_elementwise(
        COUNTED_CODES_LT if STRICT else COUNTED_CODES_LE,
        "=r,r,r,r,r,f,f,f,f,f,f,f,f", [start, bound, x], dtype=tl.uint8,
        is_pure=True, pack=4)


@triton.jit
def reciprocal(scale):
  """``jlowbit._twins.reciprocal``: the correctly rounded ``1 / scale``
  (``div.rn``), inf below ``2**-126``, 0 above ``2**126``, NaN for NaN."""
  inverse = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
  inverse = tl.where(scale < RECIPROCAL_MIN_SCALE, float("inf"), inverse)
  return tl.where(scale > RECIPROCAL_MAX_SCALE, 0.0, inverse)


@triton.jit
def tree_index(v, tree_ptr, CODE_BITS: tl.constexpr):
  """``jlowbit._twins.tree_index`` (``CODE_BITS >= 2``): ``count(t <= v)``.

  The first two levels pick their threshold among the three scalars
  ``tree[1..3]`` (loaded once) with a select instead of a per-element
  gather: about 15% fewer instructions per element for 4-bit codes.
  """
  root = tl.load(tree_ptr + 1) <= v
  second = tl.where(root, tl.load(tree_ptr + 3), tl.load(tree_ptr + 2))
  node = 4 + 2 * root.to(tl.int32) + (second <= v).to(tl.int32)
  for _ in tl.static_range(CODE_BITS - 2):
    node = 2 * node + (tl.load(tree_ptr + node) <= v).to(tl.int32)
  return node - (1 << CODE_BITS)


@triton.jit
def bnb_4bit_index(x, inv_scale, tree_ptr, bits_ptr, SIGN_MAGNITUDE: tl.constexpr):
  """Twin of ``jlowbit._twins.bnb_4bit_index``: bitsandbytes' 4-bit code of
  ``r = x * inv_scale`` (int32, ``x``'s shape). NF4: the count of the
  thresholds below ``r`` (``tree_ptr``: ``jlowbit._search.bnb_4bit_tree``);
  FP4: ``8`` when ``r < 0``, OR-ed with ``bits`` of the count below ``|r|``."""
  r = x * inv_scale
  if SIGN_MAGNITUDE:
    magnitude = tl.load(bits_ptr + tree_index(tl.abs(r), tree_ptr, 3))
    return tl.where(r < 0, magnitude | 8, magnitude)
  else:
    return tree_index(r, tree_ptr, 4)


@triton.jit
def quasi_uniform_units(counters, offset):
  """``jlowbit._noise.quasi_uniform`` in units of ``2**-24`` (float32
  integers in ``[0, 2**24)``): uint32 ``counters``, the step's ``offset``."""
  fixed = counters * tl.full(counters.shape, PHASE_MULTIPLIER, tl.uint32) + offset
  return (fixed >> UNIFORM_SHIFT).to(tl.float32)


@triton.jit
def stochastic_step(x, scale, floor, pairs_ptr, units):
  """``jlowbit._twins.stochastic_index`` on the operands ``x``, ``scale``
  of :func:`bucket_operands` (uint8 codes): ``floor``, the lower bracketing
  code of ``x / scale``, or the next code, by the noise ``units``
  (:func:`quasi_uniform_units`). ``pairs_ptr``: float32 ``[2**k, 2]`` of
  ``code[i]`` and its gap to the next code times ``2**-24`` (so ``units *
  gap`` is the reference's ``uniform * gap``: both scalings by powers of two
  are exact), one 64-bit gather."""
  pair = tl.load(pairs_ptr.to(tl.pointer_type(tl.int64)) + floor)
  code = pair.to(tl.int32).to(tl.float32, bitcast=True)
  gap = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
  return counted_codes(floor, (code + units * gap) * scale, x, True)
