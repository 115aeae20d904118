"""Pure ``jax.numpy`` building blocks shared by the reference (``xla``) ops.

Each mirrors a ``@triton.jit`` helper of :mod:`jlowbit.triton_kernels.common`
operation for operation, so the two backends round to identical codes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def nearest_code_index(v: jax.Array, code: jax.Array) -> jax.Array:
  """Index of the nearest entry of sorted ``code`` to each ``v`` (ties: lower).

  A branch-free binary search (``log2(len(code))`` steps) finds the number of
  codes ``<= v``; the nearer of the two neighbours wins. NaN maps to index 0.

  Args:
    v: float32 values, any shape.
    code: float32 ``[2**k]``, strictly increasing.

  Returns:
    int32 indices, the shape of ``v``.
  """
  size = code.shape[0]
  bits = size.bit_length() - 1
  pos = jnp.zeros(v.shape, jnp.int32)
  for i in range(bits):
    candidate = pos + (1 << (bits - 1 - i))
    pos = jnp.where(code[candidate - 1] <= v, candidate, pos)
  lo = jnp.clip(pos - 1, 0, size - 2)
  hi = lo + 1
  return jnp.where(code[hi] - v < v - code[lo], hi, lo)


def blocked(x: jax.Array, blocksize: int) -> jax.Array:
  """Flattens ``x`` to float32 ``[blocks, blocksize]``, zero-padding the tail."""
  flat = x.reshape(-1).astype(jnp.float32)
  pad = (-flat.size) % blocksize
  return jnp.pad(flat, (0, pad)).reshape(-1, blocksize)


def block_absmax(blocks: jax.Array) -> jax.Array:
  """``max |x|`` of each row of ``blocks``; NaN anywhere in a row gives NaN.

  (XLA's CPU reduce-max drops NaN on its vectorized path, hence the select.)
  """
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  return jnp.where(jnp.isnan(blocks).any(axis=1), jnp.float32(jnp.nan), absmax)


def unpack_nibbles(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(high, low) int32 nibbles of uint8 ``packed``: elements ``2i``, ``2i + 1``."""
  packed = packed.astype(jnp.int32)
  return packed >> 4, packed & 15


def _float_key(x: np.ndarray) -> np.ndarray:
  """int64 keys with the order of float32 ``x`` (-0 just below +0)."""
  bits = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
  return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


def _key_float(key: np.ndarray) -> np.ndarray:
  """Inverse of :func:`_float_key`."""
  bits = np.where(key >= 0, key, (-(key + 1)) | 0x80000000)
  return bits.astype(np.uint32).view(np.float32)


def decision_thresholds(code: np.ndarray) -> np.ndarray:
  """Exact decision thresholds of :func:`nearest_code_index` for ``code``.

  ``t[j - 1]`` is the smallest float32 ``v`` whose nearest code (float32
  arithmetic, ties to the lower index) has index ``>= j``, found by bisection
  over float32 bit patterns in ``(code[j - 1], code[j]]``. The index is
  monotone in ``v``, so ``nearest_code_index(v) == count(t <= v)`` for every
  float32 ``v`` (NaN: 0).

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


def _bucket_ranges() -> tuple[np.ndarray, np.ndarray]:
  """float64 ``[lo, hi]`` of ``x / scale`` covered by each bucket key.

  Key ``k`` holds the float32 values whose bits are ``k << 16`` up to
  ``(k + 1) << 16`` (exclusive); subnormal keys hold ``[0, 2**-126]`` of
  their sign (a kernel's ``r`` may flush there), the infinity keys hold
  ``[inf, inf]`` of their sign and NaN keys hold NaN.
  """
  magnitude = np.arange(BUCKET_KEYS // 2, dtype=np.uint32)
  with np.errstate(invalid="ignore"):
    lo = (magnitude << BUCKET_KEY_SHIFT).view(np.float32).astype(np.float64)
    hi = ((magnitude + 1) << BUCKET_KEY_SHIFT).view(np.float32).astype(np.float64)
  subnormal = lo < np.finfo(np.float32).tiny
  lo[subnormal], hi[subnormal] = 0.0, np.finfo(np.float32).tiny
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
  A key's table entry carries its start and ``t[start]``, so that the first
  comparison needs no gather of its own.
  The comparisons are the tree's, so the result is the same for every ``x``
  of the block (``|x| <= scale``, or ``scale = inf``). NaN keys start (and
  stay) at 0; the keys of ``+-inf`` hold their counts in a block of scale
  ``inf`` and a NaN threshold (no comparison).

  Args:
    thresholds: float32 ``[2**k - 1]``, strictly increasing (host values).

  Returns:
    ``(thresholds, buckets, steps)``: float32 ``[2**k]`` sorted thresholds
    with NaN last (a comparison against it is false), uint32
    ``[BUCKET_KEYS, 2]`` entries by key (the float32 bits of
    ``thresholds[start]``, then ``start``: one little-endian 64-bit word
    for the kernels), and the number of comparisons needed: 0 when the search
    does not apply (more than :data:`MAX_BUCKET_STEPS` comparisons, or a
    nonzero threshold of magnitude below ``2**-41``, too close to 0 for the
    relative-error argument): the kernels then descend the tree.
  """
  thresholds = np.asarray(thresholds, np.float64)
  lo, hi = _bucket_ranges()
  plus_inf, minus_inf = np.isposinf(lo), np.isneginf(hi)
  empty = plus_inf | minus_inf | np.isnan(lo)  # start 0, no comparison
  lo[empty] = hi[empty] = -np.inf
  low = np.where(lo > 0, lo * (1 - _BUCKET_MARGIN), lo * (1 + _BUCKET_MARGIN))
  high = np.where(hi > 0, hi * (1 + _BUCKET_MARGIN), hi * (1 - _BUCKET_MARGIN))
  starts = np.searchsorted(thresholds, low, side="left")
  steps = int(np.max(np.searchsorted(thresholds, high, side="right") - starts))
  if steps > MAX_BUCKET_STEPS or np.any((thresholds != 0)
                                        & (np.abs(thresholds) < 2.0 ** -41)):
    steps = 0
  # x = +-inf lies in a block of scale inf, where t * scale <= x holds for
  # the nonzero t (+inf) or the negative t (-inf): the count, no comparison.
  # (A codebook with an exact-zero threshold *and* steps > 1 would still add
  # one for +inf in the later steps; the shipped codebooks have neither pair:
  # tests/test_search.py.)
  starts[plus_inf] = np.sum(thresholds != 0)
  starts[minus_inf] = np.sum(thresholds < 0)
  padded = np.concatenate([thresholds, [np.nan]]).astype(np.float32)
  first = np.where(plus_inf | minus_inf, np.float32(np.nan), padded[starts])
  buckets = np.stack([first.view(np.uint32), starts.astype(np.uint32)], -1)
  return padded, buckets, steps


def tree_code_index(v: jax.Array, tree: jax.Array) -> jax.Array:
  """:func:`nearest_code_index` through a :func:`decision_tree` (same result).

  Branch-free descent: ``node = 2 node + (tree[node] <= v)`` for ``k``
  levels from the root ``1``; ``node - 2**k`` is the number of thresholds
  ``<= v``, i.e. the nearest code's index. NaN maps to 0.

  Args:
    v: float32 values, any shape.
    tree: float32 ``[2**k]`` from :func:`decision_tree`.

  Returns:
    int32 indices, the shape of ``v``.
  """
  size = tree.shape[0]
  node = jnp.ones(v.shape, jnp.int32)
  for _ in range(size.bit_length() - 1):
    node = 2 * node + (tree[node] <= v).astype(jnp.int32)
  return node - size


def scaled_tree_index(x: jax.Array, scale: jax.Array, tree: jax.Array) -> jax.Array:
  """Nearest-code index of ``x / scale`` without dividing (int32, ``x``'s shape).

  Descends the :func:`decision_tree` comparing ``tree[node] * scale <= x``:
  a correctly rounded product and a comparison, which every backend (XLA on
  CPU or GPU, Triton compiled or interpreted) evaluates identically, whereas
  XLA on GPU computes ``x / scale`` approximately. NaN maps to 0.

  Args:
    x: float32 values, any shape.
    scale: float32 positive block scale, broadcastable to ``x``.
    tree: float32 ``[2**k]`` from :func:`decision_tree`.
  """
  x, scale = exact_comparison_operands(x, scale)
  size = tree.shape[0]
  # The root is one scalar: comparing against it directly (rather than
  # gathering tree[ones]) keeps XLA from constant-folding a huge gather.
  node = 2 + (tree[1] * scale <= x).astype(jnp.int32)
  for _ in range(size.bit_length() - 2):
    node = 2 * node + (tree[node] * scale <= x).astype(jnp.int32)
  return node - size


TINY_SCALE = 2.0 ** -64


def exact_comparison_operands(x: jax.Array, scale: jax.Array):
  """``(x, scale)``, both times ``2**64`` where ``scale < 2**-64`` (exact).

  A threshold times a scale then stays a normal float (for thresholds of
  magnitude ``>= 2**-41``, :func:`bucket_search_table`), so the comparison
  ``t * scale <= x`` never loses its precision to underflow, and the
  kernels' bucketed search (which reasons in relative error) finds the same
  index for tiny blocks too (``v`` moments of unused parameters decay there).
  """
  factor = jnp.where(scale < TINY_SCALE, jnp.float32(2.0 ** 64), jnp.float32(1))
  return x * factor, scale * factor


def block_scale(absmax: jax.Array) -> jax.Array:
  """``absmax`` with 0 replaced by 1, so an all-zero block stays zero."""
  return jnp.where(absmax > 0, absmax, jnp.float32(1))


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


def scaled_4bit_index(x: jax.Array, scale: jax.Array, tree: jax.Array,
                      bits: jax.Array, sign_magnitude: bool) -> jax.Array:
  """4-bit code of ``x / scale``, division-free (int32, ``x``'s shape).

  NF4 (``sign_magnitude=False``): :func:`scaled_tree_index` with the
  :func:`decision_tree` of the 16 sorted levels. FP4: sign bit ``8`` for
  ``x < 0`` OR-ed with ``bits`` of the index of ``|x| / scale`` through the
  tree of the 8 sorted non-negative levels.
  """
  if not sign_magnitude:
    return scaled_tree_index(x, scale, tree)
  magnitude = bits[scaled_tree_index(jnp.abs(x), scale, tree)]
  return jnp.where(x < 0, magnitude | 8, magnitude)


# Noise of element i at step t: frac(i / g + t / phi) in 32-bit fixed point,
# truncated to 24 bits; g the plastic number (phases spread evenly over the
# elements, as in the R2 sequence of Roberts, 2018) and phi the golden ratio
# (the evenest Weyl sequence over steps).
PHASE_MULTIPLIER = 3242174889  # round(2**32 / g)
WEYL_STEP = 2654435769  # round(2**32 / phi), odd: period 2**32 steps
UNIFORM_BITS = 24


def weyl_offset(step: jax.Array) -> jax.Array:
  """uint32 ``step * WEYL_STEP mod 2**32``: how far every element's noise
  has advanced at step ``step`` (units of ``2**-32``)."""
  return jnp.asarray(step).astype(jnp.uint32) * jnp.uint32(WEYL_STEP)


def quasi_uniform(counters: jax.Array, offset: jax.Array) -> jax.Array:
  """Low-discrepancy noise in ``[0, 1)`` (float32, 24 bits) of elements
  ``counters`` (uint32) at a step's ``offset`` (:func:`weyl_offset`).

  Element ``i`` at step ``t`` draws ``frac(i / g + t / phi)`` (``g`` the
  plastic number, ``phi`` the golden ratio): over steps each element's
  noise is a golden-ratio Weyl sequence, uniform and as evenly spread as a
  sequence can be, so stochastic rounding of a slowly moving value rounds
  up at the right rate with far less accumulated error than independent
  draws (``tests/test_stochastic_rounding.py``); over the elements of one
  step the phases are evenly spread too. Integer arithmetic only
  (``(i * PHASE_MULTIPLIER + offset) mod 2**32``, top 24 bits): every
  backend draws the same numbers.
  """
  fixed = counters * jnp.uint32(PHASE_MULTIPLIER) + offset
  return (fixed >> (32 - UNIFORM_BITS)).astype(jnp.float32) * jnp.float32(2.0 ** -UNIFORM_BITS)


def code_gaps(code: np.ndarray) -> np.ndarray:
  """Distances to the next code (float32 ``[2**k]``, host): ``code[i + 1] -
  code[i]``, NaN at the last code."""
  code = np.asarray(code, np.float32)
  return np.concatenate([np.diff(code), [np.nan]]).astype(np.float32)


def stochastic_index(x: jax.Array, scale: jax.Array, floor: jax.Array,
                     code: jax.Array, gaps: jax.Array,
                     uniform: jax.Array) -> jax.Array:
  """Stochastic rounding of ``x / scale`` between its two bracketing codes.

  ``floor`` is the index of the lower bracketing code, the highest with
  ``code[floor] * scale <= x`` (0 when none, and for NaN:
  :func:`scaled_tree_index` through the :func:`threshold_tree` of the
  :func:`floor_thresholds`). The result is ``floor + 1`` when ``x`` lies
  above the point ``code[floor] + uniform * gaps[floor]``, else ``floor``:
  with probability ``(x / scale - code[floor]) / gaps[floor]`` for uniform
  noise, which keeps the dequantized value's expectation exact. The point
  sits at the fraction ``uniform`` of the bracket, so a low-discrepancy
  ``uniform`` (:func:`quasi_uniform`) spreads a slowly moving value's
  round-ups evenly over steps. Exact codes never move; values below the
  first code, at the last code (a NaN gap) and NaN keep ``floor``.
  Comparisons are division-free, on the operands of
  :func:`exact_comparison_operands`, like the nearest search.

  Args:
    x: float32 values.
    scale: float32 positive block scale, broadcastable to ``x``.
    floor: int32 lower bracketing code indices of ``x / scale``.
    code: float32 ``[2**k]`` sorted codebook.
    gaps: float32 ``[2**k]`` from :func:`code_gaps`.
    uniform: float32 in ``[0, 1)``, ``x``'s shape.

  Returns:
    int32 indices, ``x``'s shape.
  """
  x, scale = exact_comparison_operands(x, scale)
  point = code[floor] + uniform * gaps[floor]
  return floor + (point * scale < x).astype(jnp.int32)
