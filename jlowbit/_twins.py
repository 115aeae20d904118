"""Pure ``jax.numpy`` twins of the kernels' shared ``@triton.jit`` helpers.

Each function here mirrors a helper of :mod:`jlowbit.triton_kernels.common`
operation for operation, so the ``impl="xla"`` references and the Triton
kernels round to identical codes. The search tables they read come from
:mod:`jlowbit._search`.
"""

import jax
import jax.numpy as jnp


def blocked(x: jax.Array, block_size: int) -> jax.Array:
  """Flattens ``x`` to float32 ``[blocks, block_size]``, zero-padding the tail."""
  flat = x.reshape(-1).astype(jnp.float32)
  pad = (-flat.size) % block_size
  return jnp.pad(flat, (0, pad)).reshape(-1, block_size)


def block_absmax(blocks: jax.Array) -> jax.Array:
  """``max |x|`` over the last axis of ``blocks`` (``[..., block_size]``);
  NaN anywhere in a block gives NaN.

  (XLA's CPU reduce-max drops NaN on its vectorized path, hence the select.)
  """
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  return jnp.where(jnp.isnan(blocks).any(axis=-1), jnp.float32(jnp.nan), absmax)


def unpack_nibbles(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(high, low) int32 nibbles of uint8 ``packed``: elements ``2i``, ``2i + 1``."""
  packed = packed.astype(jnp.int32)
  return packed >> 4, packed & 15


def scaled_tree_index(x: jax.Array, scale: jax.Array, tree: jax.Array) -> jax.Array:
  """Nearest-code index of ``x / scale`` without dividing (int32, ``x``'s shape).

  Descends the :func:`jlowbit._search.decision_tree` comparing ``tree[node] * scale <= x``:
  a correctly rounded product and a comparison, which every backend (XLA on
  CPU or GPU, Triton compiled or interpreted) evaluates identically, whereas
  XLA on GPU computes ``x / scale`` approximately. NaN maps to 0.

  Args:
    x: float32 values, any shape.
    scale: float32 positive block scale, broadcastable to ``x``.
    tree: float32 ``[2**k]`` from :func:`jlowbit._search.decision_tree`.
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
  magnitude ``>= 2**-41``, :func:`jlowbit._search.bucket_search_table`), so the comparison
  ``t * scale <= x`` never loses its precision to underflow, and the
  kernels' bucketed search (which reasons in relative error) finds the same
  index for tiny blocks too (``v`` moments of unused parameters decay there).
  """
  factor = jnp.where(scale < TINY_SCALE, jnp.float32(2.0 ** 64), jnp.float32(1))
  return x * factor, scale * factor


def block_scale(absmax: jax.Array) -> jax.Array:
  """``absmax`` with 0 replaced by 1, so an all-zero block stays zero."""
  return jnp.where(absmax > 0, absmax, jnp.float32(1))


# Blocks whose absmax lies outside [2**-126, 2**126] take the reciprocal
# bitsandbytes' flush-to-zero arithmetic gives them: inf below (0 included),
# 0 above.
RECIPROCAL_MIN_SCALE = 2.0 ** -126
RECIPROCAL_MAX_SCALE = 2.0 ** 126


def _quotient_estimate(target: jax.Array, mantissa: jax.Array) -> jax.Array:
  """``T / m`` to within a few units (int32): float division, which XLA
  computes approximately on a GPU."""
  return (target / mantissa.astype(jnp.float32)).astype(jnp.int32)


def reciprocal(scale: jax.Array) -> jax.Array:
  """``1 / scale`` correctly rounded to float32 on every backend.

  XLA's float32 division on a GPU is approximate (it misses the correctly
  rounded quotient on about 13% of inputs), so the quotient is rebuilt
  exactly with integers: for ``scale = m * 2**e`` (``m`` its 24-bit
  mantissa) the reciprocal's mantissa is ``q = round(T / m)``, ``T = 2**47``
  (``2**46`` for ``m = 2**23``); an estimate ``q0`` from float division is
  corrected by the exact remainder ``T - m * q0`` (computed modulo ``2**32``,
  where it fits). ``scale`` below ``2**-126`` (subnormal or 0) gives inf,
  above ``2**126`` gives 0 (the reciprocal would be subnormal), NaN gives NaN:
  what bitsandbytes' flush-to-zero reciprocal gives.

  Args:
    scale: float32, non-negative or NaN.

  Returns:
    float32, ``scale``'s shape.
  """
  bits = jax.lax.bitcast_convert_type(scale, jnp.uint32)
  mantissa = (bits & 0x7FFFFF) | 0x800000
  exponent = (bits >> 23).astype(jnp.int32)
  power = mantissa == 0x800000  # T = 2**46 keeps q below 2**24
  target = jnp.where(power, jnp.float32(2.0 ** 46), jnp.float32(2.0 ** 47))
  q = _quotient_estimate(target, mantissa)
  for _ in range(2):  # |q0 - T / m| <= a few units; one step fixes it
    remainder = jax.lax.bitcast_convert_type(
        jnp.uint32(0) - mantissa * q.astype(jnp.uint32), jnp.int32)
    q = q + jnp.floor_divide(2 * remainder + mantissa.astype(jnp.int32),
                             2 * mantissa.astype(jnp.int32))
  result_exponent = jnp.where(power, 254, 253) - exponent
  result = jax.lax.bitcast_convert_type(
      (result_exponent.astype(jnp.uint32) << 23) | (q.astype(jnp.uint32) & 0x7FFFFF),
      jnp.float32)
  result = jnp.where(scale < RECIPROCAL_MIN_SCALE, jnp.float32(jnp.inf), result)
  result = jnp.where(scale > RECIPROCAL_MAX_SCALE, jnp.float32(0), result)
  return jnp.where(jnp.isnan(scale), jnp.float32(jnp.nan), result)


def tree_index(v: jax.Array, tree: jax.Array) -> jax.Array:
  """``count(t <= v)`` over the thresholds of a ``threshold_tree``
  (:func:`jlowbit._search.threshold_tree`; int32, ``v``'s shape).

  Branch-free descent ``node = 2 node + (tree[node] <= v)`` for ``k`` levels
  from the root 1; ``node - 2**k`` is the count. NaN gives 0.
  """
  size = tree.shape[0]
  node = 2 + (tree[1] <= v).astype(jnp.int32)
  for _ in range(size.bit_length() - 2):
    node = 2 * node + (tree[node] <= v).astype(jnp.int32)
  return node - size


def bnb_4bit_index(x: jax.Array, inv_scale: jax.Array, tree: jax.Array,
                   bits: jax.Array, sign_magnitude: bool) -> jax.Array:
  """bitsandbytes' 4-bit code of ``r = x * inv_scale`` (int32, ``x``'s shape).

  ``inv_scale`` is the block's :func:`reciprocal` of its absmax, ``tree``
  the :func:`jlowbit._search.bnb_4bit_tree`. NF4 (``sign_magnitude=False``):
  the number of bitsandbytes' thresholds below ``r``. FP4: sign bit ``8``
  when ``r < 0``, OR-ed with ``bits`` of the number of thresholds below
  ``|r|``. NaN (an all-zero block: ``0 * inf``) gives 0, as in bitsandbytes.
  """
  r = x * inv_scale
  if not sign_magnitude:
    return tree_index(r, tree)
  magnitude = bits[tree_index(jnp.abs(r), tree)]
  return jnp.where(r < 0, magnitude | 8, magnitude)


def stochastic_index(x: jax.Array, scale: jax.Array, floor: jax.Array,
                     code: jax.Array, gaps: jax.Array,
                     uniform: jax.Array) -> jax.Array:
  """Stochastic rounding of ``x / scale`` between its two bracketing codes.

  ``floor`` is the index of the lower bracketing code, the highest with
  ``code[floor] * scale <= x`` (0 when none, and for NaN:
  :func:`scaled_tree_index` through the :func:`jlowbit._search.threshold_tree` of the
  :func:`jlowbit._search.floor_thresholds`). The result is ``floor + 1`` when ``x`` lies
  above the point ``code[floor] + uniform * gaps[floor]``, else ``floor``:
  with probability ``(x / scale - code[floor]) / gaps[floor]`` for uniform
  noise, which keeps the dequantized value's expectation exact. The point
  sits at the fraction ``uniform`` of the bracket, so a low-discrepancy
  ``uniform`` (:func:`jlowbit._noise.quasi_uniform`) spreads a slowly moving value's
  round-ups evenly over steps. Exact codes never move; values below the
  first code, at the last code (a NaN gap) and NaN keep ``floor``.
  Comparisons are division-free, on the operands of
  :func:`exact_comparison_operands`, like the nearest search.

  Args:
    x: float32 values.
    scale: float32 positive block scale, broadcastable to ``x``.
    floor: int32 lower bracketing code indices of ``x / scale``.
    code: float32 ``[2**k]`` sorted codebook.
    gaps: float32 ``[2**k]`` from :func:`jlowbit._search.code_gaps`.
    uniform: float32 in ``[0, 1)``, ``x``'s shape.

  Returns:
    int32 indices, ``x``'s shape.
  """
  x, scale = exact_comparison_operands(x, scale)
  point = code[floor] + uniform * gaps[floor]
  return floor + (point * scale < x).astype(jnp.int32)
