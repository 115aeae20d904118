r"""8-bit blockwise quantization with a 256-entry codebook.

The row-major flattened tensor is cut into blocks of ``block_size`` elements
(the last may be partial). For block :math:`b`:

.. math::
  a_b = \max_{i \in b} |x_i|, \qquad
  c_i = \operatorname*{arg\,min}_k |\mathrm{code}_k - x_i / a_b|, \qquad
  \hat x_i = \mathrm{code}_{c_i} \, a_b

with ties going to the lower index. The arg-min is evaluated without
dividing: the exact float32 decision thresholds :math:`t_k` between
neighbouring codes (computed once per codebook on the host) are compared as
:math:`t_k a_b \le x_i`, a correctly rounded product that XLA (CPU and GPU)
and Triton evaluate identically, so every backend returns the same codes.
:math:`a_b = 0` is treated as 1: an all-zero block quantizes to the code of 0
and dequantizes to zeros, never NaN.

Non-finite input: a block holding NaN gets ``absmax = NaN`` and dequantizes
to NaN; a block holding ``±inf`` gets ``absmax = inf`` and dequantizes to
non-finite values. Nothing non-finite is silently turned finite.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jlowbit import _formats
from jlowbit import _impl
from jlowbit import _search
from jlowbit import _twins
from jlowbit import _validation as val
from jlowbit import codebooks


@struct.dataclass
class Quantized8bit:
  """An 8-bit blockwise-quantized array (a pytree; metadata is static).

  Attributes:
    codes: uint8, the original array's shape: indices into ``code``.
    absmax: float32 ``[ceil(size / block_size)]``: per-block scale.
    code: float32 ``[256]``: the codebook, sorted.
    block_size: elements per block (static).
    dtype: name of the original dtype, the default for dequantization (static).
  """
  codes: jax.Array
  absmax: jax.Array
  code: jax.Array
  block_size: int = struct.field(pytree_node=False)
  dtype: str = struct.field(pytree_node=False)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


def quantize_blockwise_reference(
    x: jax.Array, code: jax.Array, block_size: int,
    uniform: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Pure-jnp quantization: returns (codes uint8 ``[n]``, absmax float32).

  With ``uniform`` (float32 in ``[0, 1)``, ``x``'s size) each element is
  rounded stochastically between its neighbouring codes
  (:func:`jlowbit._twins.stochastic_index`) instead of to the nearest.
  """
  blocks = _twins.blocked(x, block_size)
  absmax = _twins.block_absmax(blocks)
  scale = _twins.block_scale(absmax)[:, None]
  stochastic = uniform is not None  # from the lower bracketing code
  tree = jnp.asarray(_search.code_tree(code, floor=stochastic))
  codes = _twins.scaled_tree_index(blocks, scale, tree)
  if stochastic:
    codes = _twins.stochastic_index(
        blocks, scale, codes, jnp.asarray(code), jnp.asarray(_search.code_gaps(code)),
        _twins.blocked(uniform, block_size))
  return codes.astype(jnp.uint8).reshape(-1)[:x.size], absmax


def dequantize_blockwise_reference(codes: jax.Array, code: jax.Array,
                                   absmax: jax.Array, block_size: int,
                                   dtype) -> jax.Array:
  """Pure-jnp dequantization of flat ``codes``: returns ``dtype[n]``."""
  n = codes.size
  padded = jnp.pad(codes.reshape(-1), (0, absmax.shape[0] * block_size - n))
  values = code[padded.reshape(-1, block_size).astype(jnp.int32)] * absmax[:, None]
  return values.reshape(-1)[:n].astype(dtype)


def _kernels():
  from jlowbit.triton_kernels import blockwise8  # pylint: disable=g-import-not-at-top
  return blockwise8


def _quantize(x, code, block_size, impl):
  flat = x.reshape(-1)
  if flat.size == 0:
    return jnp.zeros((0,), jnp.uint8), jnp.zeros((0,), jnp.float32)
  if impl == "xla":
    return quantize_blockwise_reference(flat, code, block_size)
  search, buckets, steps = _search.code_search(code)
  return _kernels().quantize_blockwise(flat, jnp.asarray(search),
                                       jnp.asarray(buckets), steps, block_size, impl)


@functools.partial(jax.jit, static_argnames=("block_size", "dtype", "impl"))
def _dequantize(codes, code, absmax, block_size, dtype, impl):
  flat = codes.reshape(-1)
  if flat.size == 0:
    return jnp.zeros(codes.shape, dtype)
  if impl == "xla":
    out = dequantize_blockwise_reference(flat, code, absmax, block_size, dtype)
  else:
    out = _kernels().dequantize_blockwise(flat, code, absmax, block_size, dtype, impl)
  return out.reshape(codes.shape)


def quantize_blockwise(x: jax.Array, code: jax.Array | None = None, *,
                       block_size: int = 4096,
                       impl: str | None = None) -> Quantized8bit:
  """Quantizes ``x`` to 8 bits per element, blockwise.

  Args:
    x: float32, bfloat16 or float16 array of any shape (0-d and empty too).
    code: float32 ``[256]`` sorted codebook, a concrete array (not traced
      inside ``jax.jit``; close over it); default
      :func:`jlowbit.codebooks.dynamic` (signed).
    block_size: elements per block, one of 64, 128, ..., 4096.
    impl: ``None`` | ``"triton"`` | ``"xla"`` | ``"interpret"`` (see
      :mod:`jlowbit._impl`).

  Returns:
    A :class:`Quantized8bit` with ``codes`` of ``x.shape`` (uint8) and
    ``absmax`` float32 ``[ceil(x.size / block_size)]``.

  Example:
    >>> import jax.numpy as jnp, jlowbit
    >>> q = jlowbit.quantize_blockwise(jnp.linspace(-1, 1, 300), block_size=256)
    >>> q.codes.shape, q.absmax.shape
    ((300,), (2,))
  """
  x = val.as_float_array(x, "x")
  val.check_block_size(block_size, "block_size", _formats.BLOCK_SIZES_8BIT)
  block_size = int(block_size)
  code = codebooks.dynamic(True) if code is None else code
  code = val.check_codebook(code, "code", 256)
  impl = _impl.resolve_impl(impl)
  codes, absmax = _quantize(x, code, block_size, impl)
  return Quantized8bit(codes=codes.reshape(x.shape), absmax=absmax,
                       code=jnp.asarray(code),
                       block_size=block_size, dtype=jnp.dtype(x.dtype).name)


def dequantize_blockwise(q: Quantized8bit, dtype=None, *,
                         impl: str | None = None) -> jax.Array:
  """Reconstructs ``code[codes] * absmax`` in ``dtype`` (default: ``q.dtype``).

  Args:
    q: the result of :func:`quantize_blockwise`.
    dtype: float32, bfloat16 or float16; default the quantized array's dtype.
    impl: see :func:`quantize_blockwise`.

  Returns:
    An array of ``q.shape`` and ``dtype``.
  """
  if not isinstance(q, Quantized8bit):
    raise TypeError(f"q must be a Quantized8bit (from quantize_blockwise), got "
                    f"{type(q).__name__}")
  dtype = val.check_float_dtype(q.dtype if dtype is None else dtype, "dtype")
  expected = -(-q.size // q.block_size)
  if q.absmax.shape != (expected,):
    raise ValueError(f"q.absmax.shape={tuple(q.absmax.shape)} does not match "
                     f"{q.shape=} and {q.block_size=}: expected ({expected},)")
  impl = _impl.resolve_impl(impl)
  return _dequantize(q.codes, q.code, q.absmax, q.block_size, dtype, impl)
