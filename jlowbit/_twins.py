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
  """``max |x|`` of each row of ``blocks``; NaN anywhere in a row gives NaN.

  (XLA's CPU reduce-max drops NaN on its vectorized path, hence the select.)
  """
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  return jnp.where(jnp.isnan(blocks).any(axis=1), jnp.float32(jnp.nan), absmax)


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


def scaled_4bit_index(x: jax.Array, scale: jax.Array, tree: jax.Array,
                      bits: jax.Array, sign_magnitude: bool) -> jax.Array:
  """4-bit code of ``x / scale``, division-free (int32, ``x``'s shape).

  NF4 (``sign_magnitude=False``): :func:`scaled_tree_index` with the
  :func:`jlowbit._search.decision_tree` of the 16 sorted levels. FP4: sign bit ``8`` for
  ``x < 0`` OR-ed with ``bits`` of the index of ``|x| / scale`` through the
  tree of the 8 sorted non-negative levels.
  """
  if not sign_magnitude:
    return scaled_tree_index(x, scale, tree)
  magnitude = bits[scaled_tree_index(jnp.abs(x), scale, tree)]
  return jnp.where(x < 0, magnitude | 8, magnitude)


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
