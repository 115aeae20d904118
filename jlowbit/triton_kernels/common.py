"""``@triton.jit`` helpers shared by the kernels.

Each helper has a ``jax.numpy`` twin in :mod:`jlowbit._reference` that does
the same float32 operations in the same order, so codes agree bit for bit.
"""

import triton
import triton.language as tl


@triton.jit
def _max_propagate_nan(a, b):
  return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_absmax(x):
  """``max |x|`` along axis 1 of a 2-D tile; NaN in a row gives NaN."""
  return tl.reduce(tl.abs(x), 1, _max_propagate_nan)


@triton.jit
def inverse_scale(absmax):
  """``1 / absmax`` (correctly rounded), 0 treated as 1: zero blocks stay zero."""
  return tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32),
                        tl.where(absmax > 0, absmax, 1.0))


@triton.jit
def nearest_code_index(v, code_ptr, CODE_BITS: tl.constexpr):
  """Index of the nearest of ``2**CODE_BITS`` sorted codes (ties: lower).

  Binary search for the number of codes ``<= v``, then the nearer neighbour.
  ``v`` is float32 of any tile shape; returns int32 of the same shape.
  """
  size: tl.constexpr = 1 << CODE_BITS
  pos = tl.zeros(v.shape, tl.int32)
  for i in tl.static_range(CODE_BITS):
    candidate = pos + (1 << (CODE_BITS - 1 - i))
    pos = tl.where(tl.load(code_ptr + candidate - 1) <= v, candidate, pos)
  lo = tl.minimum(tl.maximum(pos - 1, 0), size - 2)
  hi = lo + 1
  c_lo = tl.load(code_ptr + lo)
  c_hi = tl.load(code_ptr + hi)
  return tl.where(c_hi - v < v - c_lo, hi, lo)


@triton.jit
def quantize_tile(x, absmax, code_ptr, CODE_BITS: tl.constexpr):
  """Codes of ``x * (1 / absmax)``; ``absmax`` is ``[rows]``, ``x`` ``[rows, cols]``."""
  v = x * inverse_scale(absmax)[:, None]
  return nearest_code_index(v, code_ptr, CODE_BITS)
