r"""Host-side search tables of the codebooks (numpy, computed once, cached).

Quantizing to the nearest code of a sorted codebook is a count of decision
thresholds: ``index = count(t <= x / scale)``. Every backend compares
``t * scale <= x`` (a correctly rounded product: no division), so all of them
find the same index. This module computes those thresholds exactly
(:func:`decision_thresholds`), lays them out for a branch-free tree descent
(:func:`decision_tree`) and for the kernels' bucketed search
(:func:`bucket_search_table`), and caches them per codebook
(:func:`code_tree`, :func:`code_search`).
"""

import fractions
import functools

import jax
import numpy as np


def _float_key(x: np.ndarray) -> np.ndarray:
  """int64 keys with the order of float32 ``x`` (-0 just below +0)."""
  bits = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
  return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


def _key_float(key: np.ndarray) -> np.ndarray:
  """Inverse of :func:`_float_key`."""
  bits = np.where(key >= 0, key, (-(key + 1)) | 0x80000000)
  return bits.astype(np.uint32).view(np.float32)


def decision_thresholds(code: np.ndarray) -> np.ndarray:
  """Exact decision thresholds of the nearest-code search for ``code``.

  ``t[j - 1]`` is the smallest float32 ``v`` whose nearest code (float32
  arithmetic, ties to the lower index) has index ``>= j``, found by bisection
  over float32 bit patterns in ``(code[j - 1], code[j]]``. The index is
  monotone in ``v``, so the nearest code's index is ``count(t <= v)`` for
  every float32 ``v`` (NaN: 0; ``tests/oracles.py`` checks it).

  Args:
    code: float32 ``[2**k]``, strictly increasing (host values).

  Returns:
    float32 ``[2**k - 1]``, strictly increasing.
  """
  code = np.asarray(code, np.float32)
  below, above = code[:-1], code[1:]
  lo, hi = _float_key(below), _float_key(above)
  while np.any(hi - lo > 1):
    mid = (lo + hi) // 2
    v = _key_float(mid)
    upper = (above - v) < (v - below)
    hi, lo = np.where(upper, mid, hi), np.where(upper, lo, mid)
  return _key_float(hi)


def decision_tree(code: np.ndarray) -> np.ndarray:
  """:func:`decision_thresholds` in breadth-first (Eytzinger) order.

  Node ``i`` (``1 <= i < 2**k``) at depth ``d = floor(log2 i)`` holds the
  threshold of sorted rank ``(2 (i - 2**d) + 1) 2**(k-1-d) - 1``; slot 0 is
  unused (0). Level ``d`` of the search reads only the ``2**d`` contiguous
  entries ``[2**d, 2**(d+1))``, so a warp's gathers touch few cache lines.

  Returns:
    float32 ``[2**k]`` (host values).
  """
  return threshold_tree(decision_thresholds(code))


def floor_thresholds(code: np.ndarray) -> np.ndarray:
  """``code[1:]``: ``count(t <= v)`` over them is the index of the highest
  code ``<= v`` (0 when none), the lower bracketing code of ``v``."""
  return np.asarray(code, np.float32)[1:]


def threshold_tree(thresholds: np.ndarray) -> np.ndarray:
  """Sorted float32 ``[2**k - 1]`` thresholds in the order of
  :func:`decision_tree` (float32 ``[2**k]``, slot 0 unused)."""
  size = thresholds.shape[0] + 1
  levels = size.bit_length() - 1
  node = np.arange(1, size)
  depth = np.floor(np.log2(node)).astype(np.int64)
  rank = (2 * (node - (1 << depth)) + 1) * (1 << (levels - 1 - depth)) - 1
  return np.concatenate([np.zeros(1, np.float32), thresholds[rank]])


BUCKET_KEY_SHIFT = 16  # a bucket key: the float32 bits of x / scale >> 16
BUCKET_KEYS = 1 << (32 - BUCKET_KEY_SHIFT)  # sign, exponent, 7 mantissa bits
_BUCKET_MARGIN = 2.0 ** -18  # relative error allowed in a kernel's x * (1 / scale)
MAX_BUCKET_STEPS = 4
# Keys of magnitudes below this hold [0, ZERO_KEYS_BOUND] of their sign: the
# keys of 0, of the subnormals (a kernel's r may flush to 0) and of every
# finite x of a block of scale inf (jlowbit.triton_kernels.common.bucket_operands).
ZERO_KEYS_BOUND = 2.0 ** -124


def _bucket_ranges() -> tuple[np.ndarray, np.ndarray]:
  """float64 ``[lo, hi]`` of ``x / scale`` covered by each bucket key.

  Key ``k`` holds the float32 values whose bits are ``k << 16`` up to
  ``(k + 1) << 16`` (exclusive); keys of magnitudes below
  :data:`ZERO_KEYS_BOUND` hold ``[0, ZERO_KEYS_BOUND]`` of their sign, the
  infinity keys hold ``[inf, inf]`` of their sign and NaN keys hold NaN.
  """
  magnitude = np.arange(BUCKET_KEYS // 2, dtype=np.uint32)
  with np.errstate(invalid="ignore"):
    lo = (magnitude << BUCKET_KEY_SHIFT).view(np.float32).astype(np.float64)
    hi = ((magnitude + 1) << BUCKET_KEY_SHIFT).view(np.float32).astype(np.float64)
  near_zero = lo < ZERO_KEYS_BOUND
  lo[near_zero], hi[near_zero] = 0.0, ZERO_KEYS_BOUND
  hi[np.isinf(lo)] = np.inf
  hi[np.isnan(lo)] = np.nan
  return np.concatenate([lo, -hi]), np.concatenate([hi, -lo])


def bucket_search_table(thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  """Tables of the bucketed search: the same index as a :func:`threshold_tree`.

  The Triton kernels find ``count(t * scale <= x)`` (``t`` sorted
  thresholds: the :func:`decision_thresholds` for the nearest code's index,
  the :func:`floor_thresholds` for the lower bracketing code's) without the
  tree's 8 dependent gathers: the top 16 bits of ``r = x * (1 / scale)``
  (sign, exponent and 7 mantissa bits) are a bucket key, whose ``start`` is
  a lower bound of the index for every ``x`` the key can hold (``r``
  relatively off by up to ``2**-18``); ``steps`` comparisons
  ``t[index] * scale <= x``, each adding 1, then reach the index exactly.
  A key's entry is its start alone, one byte: the 128 keys of a sign and
  binary exponent share one 128-byte cache line.
  The comparisons are the tree's, so the result is the same for every ``x``
  of the block (``|x| <= scale``, or ``scale = inf``). NaN keys start (and
  stay) at 0 (every comparison with NaN fails). ``x = +-inf`` lies in a
  block of scale ``inf``, where ``t * scale <= x`` holds for the nonzero
  ``t`` (``+inf``) or the negative ``t`` (``-inf``): the key of ``-inf``
  starts at that count, where the thresholds are ``>= 0`` (or the NaN
  last) and each comparison fails; ``+inf`` passes every comparison except
  against a zero threshold or the NaN, so its key starts ``steps`` below
  its count, where ``steps`` nonzero thresholds lead up to it.

  Args:
    thresholds: float32 ``[2**k - 1]`` (``k <= 8``), strictly increasing
      (host values).

  Returns:
    ``(thresholds, buckets, steps)``: float32 ``[2**k]`` sorted thresholds
    with NaN last (a comparison against it is false), uint8
    ``[BUCKET_KEYS]`` starts by key, and the number of comparisons needed:
    0 when the search does not apply (more than :data:`MAX_BUCKET_STEPS`
    comparisons, a nonzero threshold of magnitude below ``2**-41``, too
    close to 0 for the relative-error argument, or no ``steps`` nonzero
    thresholds right below the index of ``+inf``): the kernels then descend
    the tree.
  """
  thresholds = np.asarray(thresholds, np.float64)
  if thresholds.shape[0] > 255:
    raise ValueError(f"thresholds has {thresholds.shape[0]} entries; at most "
                     "255 (8-bit codes: a start is one byte)")
  lo, hi = _bucket_ranges()
  plus_inf, minus_inf = np.isposinf(lo), np.isneginf(hi)
  empty = plus_inf | minus_inf | np.isnan(lo)  # start 0 (+-inf: set below)
  lo[empty] = hi[empty] = -np.inf
  low = np.where(lo > 0, lo * (1 - _BUCKET_MARGIN), lo * (1 + _BUCKET_MARGIN))
  high = np.where(hi > 0, hi * (1 + _BUCKET_MARGIN), hi * (1 - _BUCKET_MARGIN))
  starts = np.searchsorted(thresholds, low, side="left")
  steps = int(np.max(np.searchsorted(thresholds, high, side="right") - starts))
  nonzero = np.sum(thresholds != 0)  # the index of +inf, its start + steps
  if (steps > MAX_BUCKET_STEPS or nonzero < steps
      or np.any(thresholds[nonzero - steps:nonzero] == 0)
      or np.any((thresholds != 0) & (np.abs(thresholds) < 2.0 ** -41))):
    steps = 0
  starts[plus_inf] = nonzero - steps
  starts[minus_inf] = np.sum(thresholds < 0)
  padded = np.concatenate([thresholds, [np.nan]]).astype(np.float32)
  return padded, starts.astype(np.uint8), steps


def _thresholds(data: bytes, floor: bool) -> np.ndarray:
  code = np.frombuffer(data, np.float32)
  return floor_thresholds(code) if floor else decision_thresholds(code)


@functools.lru_cache(maxsize=64)
def _tree_from_bytes(data: bytes, floor: bool) -> np.ndarray:
  tree = threshold_tree(_thresholds(data, floor))
  tree.setflags(write=False)
  return tree


@functools.lru_cache(maxsize=64)
def _search_from_bytes(data: bytes, floor: bool) -> tuple[np.ndarray, np.ndarray, int]:
  thresholds = _thresholds(data, floor)
  search, buckets, steps = bucket_search_table(thresholds)
  if steps == 0:
    search = threshold_tree(thresholds)
  search.setflags(write=False)
  buckets.setflags(write=False)
  return search, buckets, steps


def _concrete_bytes(code) -> bytes:
  if isinstance(code, jax.core.Tracer):
    raise TypeError("code must be a concrete array to quantize with (its "
                    "decision thresholds are computed on the host), not a "
                    "value traced inside jax.jit; close over it instead")
  return np.asarray(code, np.float32).tobytes()


def code_tree(code, floor: bool = False) -> np.ndarray:
  """The cached :func:`decision_tree` of a concrete (not traced) codebook, or
  with ``floor`` the :func:`threshold_tree` of its :func:`floor_thresholds`.

  Raises:
    TypeError: ``code`` is a tracer (thresholds are computed on the host).
  """
  return _tree_from_bytes(_concrete_bytes(code), floor)


def code_search(code, floor: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
  """The cached kernel search tables of a concrete (not traced) codebook.

  ``floor``: search for the lower bracketing code (:func:`floor_thresholds`)
  instead of the nearest one (:func:`decision_thresholds`).

  Returns:
    :func:`bucket_search_table`'s ``(thresholds, buckets, steps)``, with the
    :func:`threshold_tree` in place of the thresholds when ``steps == 0``.

  Raises:
    TypeError: ``code`` is a tracer (thresholds are computed on the host).
  """
  return _search_from_bytes(_concrete_bytes(code), floor)


def code_gaps(code: np.ndarray) -> np.ndarray:
  """Distances to the next code (float32 ``[2**k]``, host): ``code[i + 1] -
  code[i]``, NaN at the last code."""
  code = np.asarray(code, np.float32)
  return np.concatenate([np.diff(code), [np.nan]]).astype(np.float32)


# bitsandbytes' 4-bit quantizers (csrc/kernels.cu, dQuantizeNF4 and
# dQuantizeFP4) take r = x * (1 / absmax) and count the thresholds t with
# r > t, written there as these float literals (FP4: of |r|).
BNB_NF4_THRESHOLDS = (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906",
    "-0.33967943489551544", "-0.23460740596055984", "-0.13791173323988914",
    "-0.045525018125772476", "0.03979014977812767", "0.1202552504837513",
    "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011")
BNB_FP4_THRESHOLDS = ("0.00260417", "0.0859375", "0.20833333", "0.29166667",
                      "0.4166667", "0.583333", "0.8333333")


def float32_literal(text: str) -> np.float32:
  """The float32 nearest to the decimal ``text`` (ties to even), as a C
  compiler reads the literal ``<text>f``.

  ``np.float32(float(text))`` rounds twice (to float64, then float32) and
  differs for decimals next to a float32 midpoint, e.g. four of bitsandbytes'
  NF4 thresholds.
  """
  exact = fractions.Fraction(text)
  guess = np.float32(float(exact))
  candidates = [np.nextafter(guess, np.float32(-np.inf)), guess,
                np.nextafter(guess, np.float32(np.inf))]
  return min(candidates, key=lambda c: (abs(fractions.Fraction(float(c)) - exact),
                                        int(c.view(np.uint32)) & 1))


@functools.cache
def _bnb_4bit_tree(quant_type: str) -> np.ndarray:
  texts = BNB_FP4_THRESHOLDS if quant_type == "fp4" else BNB_NF4_THRESHOLDS
  above = np.float32([float32_literal(t) for t in texts])
  # count(r > t) == count(next_up(t) <= r): the tree's comparison.
  tree = threshold_tree(np.nextafter(above, np.float32(np.inf)))
  tree.setflags(write=False)
  return tree


def bnb_4bit_tree(quant_type: str) -> np.ndarray:
  """The :func:`threshold_tree` of bitsandbytes' 4-bit decision: descending
  it with ``tree[node] <= r`` counts bitsandbytes' thresholds ``t < r``.

  Returns:
    float32 ``[16]`` (NF4: the index is the code) or ``[8]`` (FP4: the index
    of the magnitude, :func:`jlowbit.codebooks.fp4_magnitudes`).
  """
  return _bnb_4bit_tree(quant_type)
