r"""Optimizer state containers: NamedTuples of plain arrays.

Every moment (Adam's ``mu``/``nu``, AdEMAMix's ``m1``/``m2``/``nu``, ...) is a
:class:`Quantized8bitMoment` ``(codes, absmax)`` of two pytrees with the
parameters' structure. Per parameter leaf, **either**

* 8-bit storage: ``codes`` uint8 in the leaf's shape and ``absmax`` float32
  ``[ceil(size / block_size)]`` over blocks of the row-major flattened leaf;
  the moment is ``codebook[codes] * absmax[block]`` with the codebook a
  package constant (:func:`jlowbit.codebooks.dynamic`, signed for first
  moments, unsigned for second moments), never part of the state; **or**
* float storage, for leaves whose global size is below ``min_8bit_size``
  (and every leaf of the ``*_32bit`` optimizers,
  ``min_8bit_size=FLOAT32_STATE``): ``codes`` is the moment itself in the
  leaf's shape, float32 (float64 for a float64 parameter), and ``absmax`` is
  ``None``.

So a leaf's storage shows in the state (``absmax`` is ``None`` or not, the
``codes`` dtype is uint8 or float32) and is fixed at ``init`` from the
parameter's shape alone. Every array sits at a parameter's position in a
params-shaped tree (no per-parameter sub-structure), which is what
``flax.nnx.Optimizer`` and sharding rules written for the parameters expect.
"""

import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlowbit import codebooks

DEFAULT_BLOCK_SIZE = 256  # bitsandbytes' optimizer block size
DEFAULT_MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size
# A min_8bit_size no leaf reaches: every leaf keeps float state.
FLOAT32_STATE = sys.maxsize


class Quantized8bitMoment(NamedTuple):
  """One moment of all parameter leaves (see the module docstring).

  Attributes:
    codes: pytree like the params; per leaf uint8 codes (8-bit storage) or
      the float32 moment (float32 storage), in the leaf's shape.
    absmax: pytree like the params; per leaf float32
      ``[ceil(size / block_size)]`` block scales (8-bit storage) or ``None``
      (float32 storage).
  """
  codes: Any
  absmax: Any


class ScaleByAdam8bitState(NamedTuple):
  """State of :func:`~jlowbit.scale_by_adam_8bit`.

  Attributes:
    count: int32 scalar, steps taken.
    mu: first moment (signed codebook), see the module docstring.
    nu: second moment (unsigned codebook).
  """
  count: jax.Array
  mu: Any
  nu: Any


class ScaleByAdemamix8bitState(NamedTuple):
  """State of :func:`~jlowbit.scale_by_ademamix_8bit`.

  Attributes:
    count: int32 scalar, steps taken.
    m1: fast EMA of the gradient (signed codebook).
    m2: slow EMA of the gradient (signed codebook).
    nu: second moment (unsigned codebook).
  """
  count: jax.Array
  m1: Any
  m2: Any
  nu: Any


class ScaleByLion8bitState(NamedTuple):
  """State of :func:`~jlowbit.scale_by_lion_8bit`.

  Attributes:
    count: int32 scalar, steps taken.
    mu: momentum (signed codebook).
  """
  count: jax.Array
  mu: Any


class ScaleByMomentum8bitState(NamedTuple):
  """State of :func:`~jlowbit.scale_by_momentum_8bit`.

  Attributes:
    count: int32 scalar, steps taken.
    trace: momentum buffer (signed codebook).
  """
  count: jax.Array
  trace: Any


class ScaleByRms8bitState(NamedTuple):
  """State of :func:`~jlowbit.scale_by_rms_8bit`.

  Attributes:
    count: int32 scalar, steps taken.
    nu: EMA of the squared gradient (unsigned codebook).
  """
  count: jax.Array
  nu: Any


class ScaleByRss8bitState(NamedTuple):
  """State of :func:`~jlowbit.scale_by_rss_8bit`.

  Attributes:
    count: int32 scalar, steps taken.
    sum_of_squares: running sum of squared gradients (unsigned codebook).
  """
  count: jax.Array
  sum_of_squares: Any


class Storage(NamedTuple):
  """How a transformation stores its moments (static configuration).

  Attributes:
    block_size: elements per absmax block of 8-bit leaves.
    min_8bit_size: leaves of at least this many elements are 8-bit.
  """
  block_size: int
  min_8bit_size: int

  def uses_8bit(self, shape: tuple[int, ...]) -> bool:
    """Whether a leaf of ``shape`` gets 8-bit state: its (global) size is at
    least ``min_8bit_size`` and not zero."""
    size = math.prod(shape)
    return size > 0 and size >= self.min_8bit_size

  def float_dtype(self, dtype) -> jnp.dtype:
    """The dtype of a float-state moment of a ``dtype`` parameter: float32,
    or float64 for float64 (with ``jax_enable_x64``)."""
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(jnp.float32, dtype))


def zero_code_index(signed: bool) -> int:
  """Index of the code 0.0 in the signed/unsigned dynamic codebook."""
  return int(np.argmin(np.abs(codebooks.dynamic(signed))))


def init_moment(params: Any, *, signed: bool,
                storage: Storage) -> Quantized8bitMoment:
  """The all-zero moment of ``params`` (uses only ``.shape`` and ``.dtype``).

  8-bit leaves (:meth:`Storage.uses_8bit`) get codes that all point at the
  code 0.0 (what quantizing zeros gives) and zero absmax; the others float
  zeros (:meth:`Storage.float_dtype`).
  """
  def codes(p):
    if storage.uses_8bit(tuple(p.shape)):
      return jnp.full(p.shape, zero_code_index(signed), dtype=jnp.uint8)
    return jnp.zeros(p.shape, storage.float_dtype(p.dtype))

  def absmax(p):
    if not storage.uses_8bit(tuple(p.shape)):
      return None
    return jnp.zeros((-(-math.prod(p.shape) // storage.block_size),),
                     jnp.float32)

  return Quantized8bitMoment(jax.tree.map(codes, params),
                             jax.tree.map(absmax, params))
