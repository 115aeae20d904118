r"""Per-leaf optimizer math: the pure-jnp twin of the fused Triton update.

Every algorithm maps ``(g, moments, hyper)`` to ``(direction, new moments)``
in float32, ``g = grad.astype(float32)``; ``hyper`` is one float32 vector of
hyperparameters (device array, so changing values never recompile):

============  ===================================  ==============================
algorithm     ``hyper``                            math
============  ===================================  ==============================
``adam``      ``[b1, b2, eps, inv_bc1,``           :math:`m = b_1 m + (1-b_1) g`,
              ``inv_sqrt_bc2]``                    :math:`v = b_2 v + (1-b_2) g^2`,
                                                   :math:`d = (m/bc_1) / (\sqrt{v}/\sqrt{bc_2} + \epsilon)`
``ademamix``  ``[b1, b2, b3, alpha, eps,``         :math:`m_1 = b_1 m_1 + (1-b_1) g`,
              ``inv_bc1, inv_sqrt_bc2]``           :math:`m_2 = b_3 m_2 + (1-b_3) g`,
                                                   :math:`\nu = b_2 \nu + (1-b_2) g^2`,
                                                   :math:`d = (m_1/bc_1 + \alpha m_2) / (\sqrt{\nu}/\sqrt{bc_2} + \epsilon)`
``lion``      ``[b1, b2]``                         :math:`d = \mathrm{sign}(b_1 m + (1-b_1) g)`,
                                                   then :math:`m = b_2 m + (1-b_2) g`
``momentum``  ``[momentum, first]``                :math:`m = g` if ``first`` (step 1) else
                                                   :math:`\mu m + g`; :math:`d = m`
``rmsprop``   ``[decay, eps]``                     :math:`v = \rho v + (1-\rho) g^2`,
                                                   :math:`d = g / (\sqrt{v} + \epsilon)`
``adagrad``   ``[eps]``                            :math:`v = v + g^2`,
                                                   :math:`d = g / (\sqrt{v} + \epsilon)`
============  ===================================  ==============================

``bc1 = 1 - b1**t`` and ``bc2 = 1 - b2**t`` at step ``t`` (1-based), passed
as ``inv_bc1 = 1 / bc1`` and ``inv_sqrt_bc2 = 1 / sqrt(bc2)`` (computed once
per step, the divisions by them become multiplications); ``b3`` and
``alpha`` are the values already scheduled for this step. Weight decay and
the learning rate are not part of this math: the optax aliases chain them.

:func:`update_8bit_reference` reads 8-bit moments ``(codes, absmax)``,
dequantizes (``code[codes] * absmax``), runs the math and requantizes with the
rules of :func:`jlowbit.blockwise8.quantize_blockwise_reference`; it is the
``impl="xla"`` backend and the twin of
``jlowbit.triton_kernels.optim8.fused_update``. :func:`update_fp32` is the
same math on float32 moments (the state of small leaves and of the
``*_32bit`` optimizers).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jlowbit import _reference as ref
from jlowbit import _validation as val
from jlowbit import blockwise8
from jlowbit import codebooks

Moments = tuple[jax.Array, ...]


def _adam(g, moments, h):
  m, v = moments
  b1, b2, eps, inv_bc1, inv_sqrt_bc2 = h
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  return (m * inv_bc1) / (jnp.sqrt(v) * inv_sqrt_bc2 + eps), (m, v)


def _ademamix(g, moments, h):
  m1, m2, nu = moments
  b1, b2, b3, alpha, eps, inv_bc1, inv_sqrt_bc2 = h
  m1 = b1 * m1 + (1 - b1) * g
  m2 = b3 * m2 + (1 - b3) * g
  nu = b2 * nu + (1 - b2) * g * g
  d = (m1 * inv_bc1 + alpha * m2) / (jnp.sqrt(nu) * inv_sqrt_bc2 + eps)
  return d, (m1, m2, nu)


def _lion(g, moments, h):
  (m,) = moments
  b1, b2 = h
  d = jnp.sign(b1 * m + (1 - b1) * g)
  return d, (b2 * m + (1 - b2) * g,)


def _momentum(g, moments, h):
  (m,) = moments
  momentum, first = h
  m = jnp.where(first != 0, g, momentum * m + g)
  return m, (m,)


def _rmsprop(g, moments, h):
  (v,) = moments
  decay, eps = h
  v = decay * v + (1 - decay) * g * g
  return g / (jnp.sqrt(v) + eps), (v,)


def _adagrad(g, moments, h):
  (v,) = moments
  (eps,) = h
  v = v + g * g
  return g / (jnp.sqrt(v) + eps), (v,)


_MATH: dict[str, Callable] = {
    "adam": _adam, "ademamix": _ademamix, "lion": _lion,
    "momentum": _momentum, "rmsprop": _rmsprop, "adagrad": _adagrad,
}

ALGORITHMS = tuple(_MATH)

# Per algorithm, whether each moment (in state order) uses the signed codebook.
MOMENT_SIGNED: dict[str, tuple[bool, ...]] = {
    "adam": (True, False), "ademamix": (True, True, False), "lion": (True,),
    "momentum": (True,), "rmsprop": (False,), "adagrad": (False,),
}

HYPER_NAMES: dict[str, tuple[str, ...]] = {
    "adam": ("b1", "b2", "eps", "inv_bc1", "inv_sqrt_bc2"),
    "ademamix": ("b1", "b2", "b3", "alpha", "eps", "inv_bc1", "inv_sqrt_bc2"),
    "lion": ("b1", "b2"),
    "momentum": ("momentum", "first"),
    "rmsprop": ("decay", "eps"),
    "adagrad": ("eps",),
}


def _check(algorithm: str, moments: tuple, hyper: jax.Array) -> None:
  val.check_choice(algorithm, "algorithm", ALGORITHMS)
  if len(moments) != len(MOMENT_SIGNED[algorithm]):
    raise ValueError(f"algorithm={algorithm!r} takes "
                     f"{len(MOMENT_SIGNED[algorithm])} moments, got "
                     f"{len(moments)}")
  expected = (len(HYPER_NAMES[algorithm]),)
  if tuple(hyper.shape) != expected:
    raise ValueError(f"hyper.shape={tuple(hyper.shape)} does not match "
                     f"algorithm={algorithm!r}: expected {expected} = "
                     f"[{', '.join(HYPER_NAMES[algorithm])}]")


def update_fp32(algorithm: str, grad: jax.Array, moments_fp32: Moments,
                hyper: jax.Array) -> tuple[jax.Array, Moments]:
  """One step of ``algorithm`` with float32 moments.

  Args:
    algorithm: one of :data:`ALGORITHMS`.
    grad: float32/bfloat16/float16 gradient, any shape.
    moments_fp32: float32 moments of ``grad.shape``, in the order of
      :data:`MOMENT_SIGNED`.
    hyper: float32 vector laid out as :data:`HYPER_NAMES`.

  Returns:
    ``(direction, new_moments)``: direction in ``grad``'s dtype and shape,
    new float32 moments.
  """
  _check(algorithm, moments_fp32, hyper)
  hyper = hyper.astype(jnp.float32)
  g = grad.astype(jnp.float32)
  d, new = _MATH[algorithm](g, tuple(m.astype(jnp.float32) for m in moments_fp32),
                            tuple(hyper[i] for i in range(hyper.shape[0])))
  return d.astype(grad.dtype), new


def codebook(signed: bool) -> jax.Array:
  """The moment codebook as a float32 ``[256]`` device constant (never state).

  Quantization takes the numpy :func:`jlowbit.codebooks.dynamic` itself: its
  decision thresholds are computed on the host.
  """
  return jnp.asarray(codebooks.dynamic(signed))


def element_uniform(size: int, offset: jax.Array, counter_offset: int) -> jax.Array:
  """The rounding noise of a leaf's ``size`` elements: float32 ``[size]``,
  :func:`jlowbit._reference.quasi_uniform` of the counters ``counter_offset
  + arange(size)`` (modulo ``2**32``) at the step's ``offset``."""
  counters = (jnp.arange(size, dtype=jnp.uint32)
              + jnp.uint32(counter_offset % (1 << 32)))
  return ref.quasi_uniform(counters, offset)


def rounding_key(count: jax.Array) -> jax.Array:
  """The uint32 rounding-noise offset of step ``count``
  (:func:`jlowbit._reference.weyl_offset`)."""
  return ref.weyl_offset(count)


def update_8bit_reference(
    algorithm: str, grad: jax.Array,
    moments: tuple[tuple[jax.Array, jax.Array], ...], hyper: jax.Array, *,
    block_size: int, stochastic: tuple[bool, ...] | None = None,
    key: jax.Array | None = None, counter_offset: int = 0,
) -> tuple[jax.Array, tuple[tuple[jax.Array, jax.Array], ...]]:
  """One step of ``algorithm`` with 8-bit blockwise moments (pure jnp).

  Args:
    algorithm: one of :data:`ALGORITHMS`.
    grad: float32/bfloat16/float16 gradient, any shape.
    moments: per moment (order of :data:`MOMENT_SIGNED`) a pair
      ``(codes uint8 grad.shape, absmax float32 [ceil(grad.size / block_size)])``.
    hyper: float32 vector laid out as :data:`HYPER_NAMES`.
    block_size: elements per quantization block.
    stochastic: per moment, whether it is requantized by stochastic rounding
      instead of to the nearest code; ``None``: none is.
    key: uint32 scalar (:func:`rounding_key` of the step), needed when any
      moment rounds stochastically.
    counter_offset: the noise counter of the leaf's first element
      (:func:`element_uniform`); elements of one step must not share one.

  Returns:
    ``(direction, new_moments)``: direction in ``grad``'s dtype and shape, new
    moments as ``(codes, absmax)`` pairs of the same shapes and dtypes.
  """
  _check(algorithm, moments, hyper)
  signed = MOMENT_SIGNED[algorithm]
  stochastic = check_stochastic(algorithm, stochastic, key)
  d, new = update_fp32(algorithm, grad.reshape(-1),
                       _dequantized(algorithm, moments, block_size), hyper)
  requantized = []
  for value, s, sr in zip(new, signed, stochastic):
    uniform = element_uniform(value.size, key, counter_offset) if sr else None
    codes, absmax = blockwise8.quantize_blockwise_reference(
        value, codebooks.dynamic(s), block_size, uniform)
    requantized.append((codes.reshape(grad.shape), absmax))
  return d.reshape(grad.shape), tuple(requantized)


def direction_8bit_reference(
    algorithm: str, grad: jax.Array,
    moments: tuple[tuple[jax.Array, jax.Array], ...], hyper: jax.Array, *,
    block_size: int) -> jax.Array:
  """The direction of :func:`update_8bit_reference` alone (its ``[0]``): the
  math on the dequantized old state, without requantizing."""
  _check(algorithm, moments, hyper)
  d, _ = update_fp32(algorithm, grad.reshape(-1),
                     _dequantized(algorithm, moments, block_size), hyper)
  return d.reshape(grad.shape)


def _dequantized(algorithm: str, moments, block_size: int) -> tuple[jax.Array, ...]:
  """Flat float32 values of ``moments`` (codebooks of ``algorithm``)."""
  return tuple(
      blockwise8.dequantize_blockwise_reference(
          codes.reshape(-1), codebook(s), absmax, block_size, jnp.float32)
      for (codes, absmax), s in zip(moments, MOMENT_SIGNED[algorithm]))


def check_stochastic(algorithm: str, stochastic, key) -> tuple[bool, ...]:
  """``stochastic`` as one bool per moment of ``algorithm``."""
  moments = len(MOMENT_SIGNED[algorithm])
  if stochastic is None:
    return (False,) * moments
  stochastic = tuple(bool(s) for s in stochastic)
  if len(stochastic) != moments:
    raise ValueError(f"stochastic={stochastic} must hold one flag per moment "
                     f"of algorithm={algorithm!r} ({moments})")
  if any(stochastic) and key is None:
    raise ValueError("stochastic rounding needs the step's key "
                     "(update8.rounding_key(count))")
  return stochastic
