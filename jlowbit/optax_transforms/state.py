r"""Optimizer state containers: NamedTuples of plain arrays.

Every moment (Adam's ``mu``/``nu``, AdEMAMix's ``m1``/``m2``/``nu``, ...) is a
:class:`Quantized8bitMoment` ``(codes, absmax)`` of two pytrees with the
parameters' structure. Per parameter leaf, **either**

* 8-bit storage: ``codes`` uint8 in the leaf's shape and ``absmax`` float32
  ``shape[:-1] + (ceil(shape[-1] / block_size),)`` over blocks that run along
  the leaf's last axis (:mod:`jlowbit._layout`; for a 1-D leaf, or a last
  axis that ``block_size`` divides, bitsandbytes' blocks of the flattened
  leaf, byte for byte);
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

**Sharding.** ``init`` of a parameter whose sharding is known (a concrete
array with a ``NamedSharding``; a traced one on ``AxisType.Explicit`` axes)
gives its codes (and float moments) the parameter's sharding and its
``absmax`` the same ``PartitionSpec`` (:func:`jlowbit._layout.block_spec`:
the last axis unsharded where the sharding would split blocks), so no block
straddles two devices. The layout depends on the shape alone, never on the
mesh: a checkpoint restores onto any mesh.
:func:`jlowbit.state_shardings` gives these shardings for
``jax.jit(out_shardings=...)`` and checkpoint restores.
"""

import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlowbit import _layout
from jlowbit import _sharding
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
      ``shape[:-1] + (ceil(shape[-1] / block_size),)`` block scales (8-bit
      storage, blocks along the last axis) or ``None`` (float32 storage).
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


def absmax_spec(param, sharding, block_size: int):
  """The ``PartitionSpec`` of an 8-bit ``absmax`` of ``param`` sharded by
  ``sharding`` (:func:`jlowbit._layout.block_spec`)."""
  return _layout.block_spec(tuple(param.shape), sharding.spec,
                            _sharding.axis_sizes(sharding.mesh), block_size)


def _full(shape, value, dtype, param, sharding) -> jax.Array:
  """``jnp.full`` placed by ``sharding`` (``None``: JAX's default)."""
  if sharding is None:
    return jnp.full(shape, value, dtype)
  if isinstance(param, jax.core.Tracer):
    return jnp.full(shape, value, dtype, out_sharding=sharding)
  return jnp.full(shape, value, dtype, device=sharding)


def zero_code_index(signed: bool) -> int:
  """Index of the code 0.0 in the signed/unsigned dynamic codebook."""
  return int(np.argmin(np.abs(codebooks.dynamic(signed))))


def init_moment(params: Any, *, signed: bool,
                storage: Storage) -> Quantized8bitMoment:
  """The all-zero moment of ``params`` (uses only ``.shape`` and ``.dtype``).

  8-bit leaves (:meth:`Storage.uses_8bit`) get codes that all point at the
  code 0.0 (what quantizing zeros gives) and zero absmax; the others float
  zeros (:meth:`Storage.float_dtype`). Sharded as the module docstring says.
  """
  def codes(p):
    sharding = _sharding.leaf_sharding(p)
    if storage.uses_8bit(tuple(p.shape)):
      return _full(p.shape, zero_code_index(signed), jnp.uint8, p, sharding)
    return _full(p.shape, 0, storage.float_dtype(p.dtype), p, sharding)

  def absmax(p):
    if not storage.uses_8bit(tuple(p.shape)):
      return None
    sharding = _sharding.leaf_sharding(p)
    if sharding is not None:
      sharding = _sharding.named(sharding.mesh, absmax_spec(p, sharding,
                                                            storage.block_size),
                                 like=sharding)
    return _full(_layout.absmax_shape(p.shape, storage.block_size), 0,
                 jnp.float32, p, sharding)

  return Quantized8bitMoment(jax.tree.map(codes, params),
                             jax.tree.map(absmax, params))
