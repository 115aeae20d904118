r"""The optimizer algorithms with 8-bit state: one table, one entry each.

Every algorithm maps ``(g, moments, hyper)`` to ``(direction, new moments)``
in float32, ``g = grad.astype(float32)``; ``hyper`` is one float32 vector of
hyperparameters (a device array, so changing values never recompile):

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

First moments use the signed dynamic codebook, second moments the unsigned
one (:func:`jlowbit.codebooks.dynamic`). The Triton kernels implement each
``math`` as a ``@triton.jit`` function of the same name
(``jlowbit.triton_kernels.optim8``); adding an algorithm means one entry
here and one kernel body there.

**Overflow.** Finite gradients never give NaN or infinite moments. The
algorithms that square the gradient (Adam, AdEMAMix, RMSprop, Adagrad) first
clamp it to ``[-GRADIENT_LIMIT, GRADIENT_LIMIT]`` (``2**63``), so that
``g**2`` stays finite: unclamped, a gradient element above ``1.8e19`` makes
``v`` infinite, which freezes that parameter for good in float32 state
(``m / inf = 0``, as in optax) and turns its whole 8-bit block into NaN
(``0 * inf``). Adam's and AdEMAMix's directions are invariant to the
gradient's scale, so the clamp leaves their first step unchanged, and their
moments, averages of values within ``2**126``, stay within it. The moments
that can still grow past ``MOMENT_LIMIT`` (``2**126``: Adagrad's sum, a
momentum buffer, Lion's average of unclamped gradients; ``saturates``)
saturate there before 8-bit requantization (NaN stays NaN), which keeps
``1 / absmax`` a normal float32 for the kernels' search.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

# Gradients are clamped to this magnitude where they are squared, and stored
# 8-bit moments to MOMENT_LIMIT (see "Overflow" above).
GRADIENT_LIMIT = 2.0 ** 63
MOMENT_LIMIT = 2.0 ** 126

Moments = tuple[jax.Array, ...]
Math = Callable[[jax.Array, Moments, tuple[jax.Array, ...]],
                tuple[jax.Array, Moments]]


def _clamped(g):
  return jnp.clip(g, -GRADIENT_LIMIT, GRADIENT_LIMIT)


def adam_math(g, moments, h):
  m, v = moments
  b1, b2, eps, inv_bc1, inv_sqrt_bc2 = h
  g = _clamped(g)
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  return (m * inv_bc1) / (jnp.sqrt(v) * inv_sqrt_bc2 + eps), (m, v)


def ademamix_math(g, moments, h):
  m1, m2, nu = moments
  b1, b2, b3, alpha, eps, inv_bc1, inv_sqrt_bc2 = h
  g = _clamped(g)
  m1 = b1 * m1 + (1 - b1) * g
  m2 = b3 * m2 + (1 - b3) * g
  nu = b2 * nu + (1 - b2) * g * g
  d = (m1 * inv_bc1 + alpha * m2) / (jnp.sqrt(nu) * inv_sqrt_bc2 + eps)
  return d, (m1, m2, nu)


def lion_math(g, moments, h):
  (m,) = moments
  b1, b2 = h
  d = jnp.sign(b1 * m + (1 - b1) * g)
  return d, (b2 * m + (1 - b2) * g,)


def momentum_math(g, moments, h):
  (m,) = moments
  momentum, first = h
  m = jnp.where(first != 0, g, momentum * m + g)
  return m, (m,)


def rmsprop_math(g, moments, h):
  (v,) = moments
  decay, eps = h
  g = _clamped(g)
  v = decay * v + (1 - decay) * g * g
  return g / (jnp.sqrt(v) + eps), (v,)


def adagrad_math(g, moments, h):
  (v,) = moments
  (eps,) = h
  g = _clamped(g)
  v = v + g * g
  return g / (jnp.sqrt(v) + eps), (v,)


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One optimizer algorithm.

  Attributes:
    name: the key in :data:`ALGORITHMS`.
    moments: names of its moments, in state order (the fields of its optax
      state, e.g. ``("mu", "nu")``).
    signed: per moment, whether it uses the signed dynamic codebook (else
      the unsigned one: second moments).
    hyper: the layout of its float32 ``hyper`` vector.
    math: ``(g, moments, hyper) -> (direction, new_moments)``, ``jax.numpy``
      (``hyper`` as a tuple of scalars); the Triton kernel's twin.
    exact_direction_dtype: a narrower dtype holding every direction value
      exactly (Lion's signs in bfloat16), which a kernel may write instead
      of the gradient's dtype; ``None``: none.
    saturates: whether its moments can grow past ``MOMENT_LIMIT`` and are
      clamped to it before requantization (see "Overflow").
  """
  name: str
  moments: tuple[str, ...]
  signed: tuple[bool, ...]
  hyper: tuple[str, ...]
  math: Math
  exact_direction_dtype: str | None = None
  saturates: bool = False


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("adam", ("mu", "nu"), (True, False),
              ("b1", "b2", "eps", "inv_bc1", "inv_sqrt_bc2"), adam_math),
    Algorithm("ademamix", ("m1", "m2", "nu"), (True, True, False),
              ("b1", "b2", "b3", "alpha", "eps", "inv_bc1", "inv_sqrt_bc2"),
              ademamix_math),
    Algorithm("lion", ("mu",), (True,), ("b1", "b2"), lion_math,
              exact_direction_dtype="bfloat16", saturates=True),
    Algorithm("momentum", ("trace",), (True,), ("momentum", "first"),
              momentum_math, saturates=True),
    Algorithm("rmsprop", ("nu",), (False,), ("decay", "eps"), rmsprop_math),
    Algorithm("adagrad", ("sum_of_squares",), (False,), ("eps",),
              adagrad_math, saturates=True),
)}
