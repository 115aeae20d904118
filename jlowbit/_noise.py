"""Stochastic-rounding noise: a counter-based low-discrepancy sequence.

Integer arithmetic only, so the ``jax.numpy`` references, Triton's
interpreter and compiled Triton kernels draw identical numbers.
"""

import jax
import jax.numpy as jnp


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
  draws (``tests/test_reference_rounding.py``); over the elements of one
  step the phases are evenly spread too. Integer arithmetic only
  (``(i * PHASE_MULTIPLIER + offset) mod 2**32``, top 24 bits): every
  backend draws the same numbers.
  """
  fixed = counters * jnp.uint32(PHASE_MULTIPLIER) + offset
  return (fixed >> (32 - UNIFORM_BITS)).astype(jnp.float32) * jnp.float32(2.0 ** -UNIFORM_BITS)


def element_uniform(size: int, offset: jax.Array, counter_offset: int) -> jax.Array:
  """The noise of ``size`` consecutive elements: float32 ``[size]``,
  :func:`quasi_uniform` of the counters ``counter_offset + arange(size)``
  (modulo ``2**32``) at the step's ``offset`` (:func:`weyl_offset`)."""
  counters = (jnp.arange(size, dtype=jnp.uint32)
              + jnp.uint32(counter_offset % (1 << 32)))
  return quasi_uniform(counters, offset)
