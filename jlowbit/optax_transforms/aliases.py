r"""Ready-to-use optimizers: ``optax.chain``\ s of the 8-bit building blocks.

Like ``optax.adamw``, each alias is the direction of a ``scale_by_*_8bit``
transformation, weight decay through ``optax.add_decayed_weights`` and the
learning rate through ``optax.scale_by_learning_rate``:

* decoupled decay (AdamW, AdEMAMix, Lion, LAMB): ``chain(scale_by_*,
  add_decayed_weights, scale_by_learning_rate)``, i.e.
  :math:`p \leftarrow p - \eta (d + \lambda p)`;
* coupled (L2) decay (SGD, RMSprop, Adagrad): ``chain(add_decayed_weights,
  scale_by_*, scale_by_learning_rate)``, i.e. :math:`g \leftarrow g + \lambda p`
  before the moments see it (torch semantics).

A ``weight_decay`` given as the Python number 0 without a mask is left out of
the chain (an ``optax.identity`` takes its place, the state is the same), so
such optimizers do not need ``params`` in ``update``.

Every ``*_8bit`` alias takes the keyword-only ``block_size`` (``None``:
256), ``min_8bit_size`` (``None``: 4096) and ``impl=None`` (see
:mod:`jlowbit.optax_transforms.transforms`); its ``*_32bit`` twin runs the same
math with float32 state for every leaf (float64 for float64 parameters) and
takes the same arguments except those three. Both work under
``optax.inject_hyperparams`` as they are; 8-bit aliases given an explicit
``block_size`` or ``min_8bit_size`` need ``static_args=jlowbit.STATIC_ARGS``
there.
"""

from typing import Any

import optax

from jlowbit.optax_transforms import apply
from jlowbit.optax_transforms import state as state_lib
from jlowbit.optax_transforms import transforms


def adam_8bit(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.9,
              b2: Any = 0.999, eps: Any = 1e-8, *,
              block_size: int | None = None,
              min_8bit_size: int | None = None,
              impl: str | None = None
              ) -> optax.GradientTransformationExtraArgs:
  r"""Adam with 8-bit blockwise moments.

  .. math::
    p \leftarrow p - \eta \, \frac{m_t / (1-\beta_1^t)}
        {\sqrt{v_t} / \sqrt{1-\beta_2^t} + \epsilon}

  (moments as :func:`~jlowbit.scale_by_adam_8bit`).

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    b1, b2, eps: see :func:`~jlowbit.scale_by_adam_8bit`.
    block_size, min_8bit_size, impl: see the module docstring.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, jlowbit as lowbit
    >>> params = {"w": jnp.ones((64, 128))}
    >>> tx = lowbit.adam_8bit(1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((64, 128))}, state)
    >>> params = optax.apply_updates(params, updates)
  """
  return apply.fusable_chain(
      transforms.scale_by_adam_8bit(b1, b2, eps, block_size=block_size,
                                    min_8bit_size=min_8bit_size, impl=impl),
      learning_rate)


def adamw_8bit(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.9,
               b2: Any = 0.999, eps: Any = 1e-8,
               weight_decay: optax.ScalarOrSchedule = 1e-2, mask: Any = None,
               *, block_size: int | None = None,
               min_8bit_size: int | None = None,
               impl: str | None = None) -> optax.GradientTransformationExtraArgs:
  r"""AdamW (decoupled weight decay) with 8-bit blockwise moments.

  .. math::
    p \leftarrow p - \eta \Big(\frac{m_t / (1-\beta_1^t)}
        {\sqrt{v_t} / \sqrt{1-\beta_2^t} + \epsilon} + \lambda p\Big)

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    b1, b2, eps: see :func:`~jlowbit.scale_by_adam_8bit`.
    weight_decay: :math:`\lambda` (float, array or schedule).
    mask: which leaves to decay, as in ``optax.add_decayed_weights``.
    block_size, min_8bit_size, impl: see the module docstring.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  return apply.fusable_chain(
      transforms.scale_by_adam_8bit(b1, b2, eps, block_size=block_size,
                                    min_8bit_size=min_8bit_size, impl=impl),
      learning_rate, weight_decay, mask)


def ademamix_8bit(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.9,
                  b2: Any = 0.999, b3: optax.ScalarOrSchedule = 0.9999,
                  alpha: optax.ScalarOrSchedule = 5.0, eps: Any = 1e-8,
                  weight_decay: optax.ScalarOrSchedule = 1e-2, mask: Any = None,
                  t_alpha: Any = None, t_beta3: Any = None, *,
                  stochastic_rounding: bool = True,
                  block_size: int | None = None,
                  min_8bit_size: int | None = None,
                  impl: str | None = None
                  ) -> optax.GradientTransformationExtraArgs:
  r"""AdEMAMix with 8-bit blockwise moments (defaults of bitsandbytes).

  .. math::
    p \leftarrow p - \eta \Big(\frac{m_1 / (1-\beta_1^t) + \alpha_t m_2}
        {\sqrt{\nu} / \sqrt{1-\beta_2^t} + \epsilon} + \lambda p\Big)

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    b1, b2, b3, alpha, eps, t_alpha, t_beta3: see
      :func:`~jlowbit.scale_by_ademamix_8bit` (``b3`` and ``alpha`` may be
      schedules as in ``optax.contrib.ademamix``; ``t_alpha``/``t_beta3`` are
      bitsandbytes' warm-up horizons).
    weight_decay: :math:`\lambda` (float, array or schedule).
    mask: which leaves to decay, as in ``optax.add_decayed_weights``.
    stochastic_rounding: round the slow EMA :math:`m_2` stochastically
      (default; see :func:`~jlowbit.scale_by_ademamix_8bit`); ``False``
      rounds it to nearest like bitsandbytes' ``AdEMAMix8bit``.
    block_size, min_8bit_size, impl: see the module docstring.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Pagliardini et al., `The AdEMAMix Optimizer: Better, Faster, Older
    <https://arxiv.org/abs/2409.03137>`_, 2024.
  """
  return apply.fusable_chain(
      transforms.scale_by_ademamix_8bit(
          b1, b2, b3, alpha, eps, t_alpha=t_alpha, t_beta3=t_beta3,
          stochastic_rounding=stochastic_rounding, block_size=block_size,
          min_8bit_size=min_8bit_size, impl=impl),
      learning_rate, weight_decay, mask)


def lion_8bit(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.9,
              b2: Any = 0.99, weight_decay: optax.ScalarOrSchedule = 1e-3,
              mask: Any = None, *, block_size: int | None = None,
              min_8bit_size: int | None = None, impl: str | None = None
              ) -> optax.GradientTransformationExtraArgs:
  r"""Lion (decoupled weight decay) with an 8-bit momentum.

  .. math::
    p \leftarrow p - \eta \big(\mathrm{sign}(\beta_1 m + (1-\beta_1) g)
        + \lambda p\big), \qquad m \leftarrow \beta_2 m + (1-\beta_2) g

  Args:
    learning_rate: :math:`\eta` (bitsandbytes' default is 1e-4).
    b1, b2: see :func:`~jlowbit.scale_by_lion_8bit`.
    weight_decay: :math:`\lambda` (float, array or schedule).
    mask: which leaves to decay, as in ``optax.add_decayed_weights``.
    block_size, min_8bit_size, impl: see the module docstring.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, 2023.
  """
  return apply.fusable_chain(
      transforms.scale_by_lion_8bit(b1, b2, block_size=block_size,
                                    min_8bit_size=min_8bit_size, impl=impl),
      learning_rate, weight_decay, mask)


def sgd_8bit(learning_rate: optax.ScalarOrSchedule, momentum: Any = 0.9,
             weight_decay: optax.ScalarOrSchedule = 0.0, *,
             block_size: int | None = None,
             min_8bit_size: int | None = None,
             impl: str | None = None) -> optax.GradientTransformationExtraArgs:
  r"""SGD with heavy-ball momentum in 8 bits and coupled weight decay.

  .. math::
    g \leftarrow g + \lambda p, \quad m_1 = g_1, \quad
    m_t = \mu m_{t-1} + g_t, \quad p \leftarrow p - \eta m_t

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    momentum: :math:`\mu`.
    weight_decay: :math:`\lambda`, added to the gradient (L2).
    block_size, min_8bit_size, impl: see the module docstring.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return apply.fusable_chain(
      transforms.scale_by_momentum_8bit(momentum, block_size=block_size,
                                        min_8bit_size=min_8bit_size, impl=impl),
      learning_rate, weight_decay, coupled=True)


def rmsprop_8bit(learning_rate: optax.ScalarOrSchedule, decay: Any = 0.99,
                 eps: Any = 1e-8, weight_decay: optax.ScalarOrSchedule = 0.0, *,
                 block_size: int | None = None,
                 min_8bit_size: int | None = None,
                 impl: str | None = None
                 ) -> optax.GradientTransformationExtraArgs:
  r"""RMSprop (torch semantics) with an 8-bit second moment.

  .. math::
    g \leftarrow g + \lambda p, \quad v \leftarrow \rho v + (1-\rho) g^2, \quad
    p \leftarrow p - \eta \, g / (\sqrt{v} + \epsilon)

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    decay: :math:`\rho`.
    eps: added to the denominator outside the square root.
    weight_decay: :math:`\lambda`, added to the gradient (L2).
    block_size, min_8bit_size, impl: see the module docstring.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return apply.fusable_chain(
      transforms.scale_by_rms_8bit(decay, eps, block_size=block_size,
                                   min_8bit_size=min_8bit_size, impl=impl),
      learning_rate, weight_decay, coupled=True)


def adagrad_8bit(learning_rate: optax.ScalarOrSchedule, eps: Any = 1e-10,
                 weight_decay: optax.ScalarOrSchedule = 0.0, *,
                 block_size: int | None = None,
                 min_8bit_size: int | None = None,
                 impl: str | None = None
                 ) -> optax.GradientTransformationExtraArgs:
  r"""Adagrad with an 8-bit sum of squared gradients.

  .. math::
    g \leftarrow g + \lambda p, \quad v \leftarrow v + g^2, \quad
    p \leftarrow p - \eta \, g / (\sqrt{v} + \epsilon)

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    eps: added to the denominator outside the square root.
    weight_decay: :math:`\lambda`, added to the gradient (L2).
    block_size, min_8bit_size, impl: see the module docstring.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return apply.fusable_chain(
      transforms.scale_by_rss_8bit(eps, block_size=block_size,
                                   min_8bit_size=min_8bit_size, impl=impl),
      learning_rate, weight_decay, coupled=True)


def lamb_8bit(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.9,
              b2: Any = 0.999, eps: Any = 1e-6,
              weight_decay: optax.ScalarOrSchedule = 0.0, mask: Any = None, *,
              block_size: int | None = None,
              min_8bit_size: int | None = None,
              impl: str | None = None) -> optax.GradientTransformationExtraArgs:
  r"""LAMB (as ``optax.lamb``) with 8-bit Adam moments.

  .. math::
    u = d_{\mathrm{adam}} + \lambda p, \qquad
    p \leftarrow p - \eta \, \frac{\lVert p \rVert}{\lVert u \rVert} \, u

  per leaf (``optax.scale_by_trust_ratio``).

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    b1, b2, eps: see :func:`~jlowbit.scale_by_adam_8bit` (``eps`` defaults to
      1e-6 as in ``optax.lamb``).
    weight_decay: :math:`\lambda` (float, array or schedule).
    mask: which leaves to decay, as in ``optax.add_decayed_weights``.
    block_size, min_8bit_size, impl: see the module docstring.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, 2020.
  """
  return optax.chain(
      transforms.scale_by_adam_8bit(b1, b2, eps, block_size=block_size,
                                    min_8bit_size=min_8bit_size, impl=impl),
      apply.decay_transform(weight_decay, mask),
      optax.scale_by_trust_ratio(),
      optax.scale_by_learning_rate(learning_rate))


def lars_8bit(learning_rate: optax.ScalarOrSchedule,
              weight_decay: optax.ScalarOrSchedule = 0.0,
              weight_decay_mask: Any = True, trust_coefficient: Any = 0.001,
              eps: Any = 0.0, trust_ratio_mask: Any = True,
              momentum: Any = 0.9, *, block_size: int | None = None,
              min_8bit_size: int | None = None, impl: str | None = None
              ) -> optax.GradientTransformationExtraArgs:
  r"""LARS (as ``optax.lars``) with an 8-bit momentum buffer.

  .. math::
    u = \eta \, \kappa \frac{\lVert p \rVert}{\lVert g + \lambda p \rVert}
        (g + \lambda p), \qquad m_t = \mu m_{t-1} + u_t, \qquad
    p \leftarrow p - m_t

  per leaf, :math:`\kappa` the ``trust_coefficient``.

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    weight_decay: :math:`\lambda`.
    weight_decay_mask: which leaves to decay (``True``: all).
    trust_coefficient: :math:`\kappa`.
    eps: added to the trust ratio's denominator.
    trust_ratio_mask: which leaves get the trust ratio (``True``: all).
    momentum: :math:`\mu`.
    block_size, min_8bit_size, impl: see the module docstring.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    You et al., `Large Batch Training of Convolutional Networks
    <https://arxiv.org/abs/1708.03888>`_, 2017.
  """
  return optax.chain(
      apply.decay_transform(weight_decay, weight_decay_mask),
      optax.masked(optax.scale_by_trust_ratio(
          trust_coefficient=trust_coefficient, eps=eps), trust_ratio_mask),
      optax.scale_by_learning_rate(learning_rate),
      transforms.scale_by_momentum_8bit(momentum, block_size=block_size,
                                        min_8bit_size=min_8bit_size, impl=impl))


_FLOAT32 = state_lib.FLOAT32_STATE


def adam_32bit(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.9,
               b2: Any = 0.999, eps: Any = 1e-8
               ) -> optax.GradientTransformationExtraArgs:
  r"""Adam with float32 moments: :func:`adam_8bit`'s math, unquantized.

  Every leaf's moments are float32 arrays in the parameter's shape (float64
  for float64 parameters, with the math in float64).

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    b1, b2, eps: see :func:`~jlowbit.scale_by_adam_8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return adam_8bit(learning_rate, b1, b2, eps, min_8bit_size=_FLOAT32)


def adamw_32bit(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.9,
                b2: Any = 0.999, eps: Any = 1e-8,
                weight_decay: optax.ScalarOrSchedule = 1e-2, mask: Any = None
                ) -> optax.GradientTransformationExtraArgs:
  r"""AdamW with float32 moments: :func:`adamw_8bit`'s math, unquantized.

  Every leaf's moments are float32 arrays in the parameter's shape (float64
  for float64 parameters, with the math in float64).

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    b1, b2, eps: see :func:`~jlowbit.scale_by_adam_8bit`.
    weight_decay: :math:`\lambda` (float, array or schedule).
    mask: which leaves to decay, as in ``optax.add_decayed_weights``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return adamw_8bit(learning_rate, b1, b2, eps, weight_decay, mask,
                    min_8bit_size=_FLOAT32)


def ademamix_32bit(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.9,
                   b2: Any = 0.999, b3: optax.ScalarOrSchedule = 0.9999,
                   alpha: optax.ScalarOrSchedule = 5.0, eps: Any = 1e-8,
                   weight_decay: optax.ScalarOrSchedule = 1e-2,
                   mask: Any = None, t_alpha: Any = None, t_beta3: Any = None
                   ) -> optax.GradientTransformationExtraArgs:
  r"""AdEMAMix with float32 moments: :func:`ademamix_8bit`'s math, unquantized.

  Every leaf's moments are float32 arrays in the parameter's shape (float64
  for float64 parameters, with the math in float64).

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    b1, b2, b3, alpha, eps, t_alpha, t_beta3: see
      :func:`~jlowbit.scale_by_ademamix_8bit`.
    weight_decay: :math:`\lambda` (float, array or schedule).
    mask: which leaves to decay, as in ``optax.add_decayed_weights``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return ademamix_8bit(learning_rate, b1, b2, b3, alpha, eps, weight_decay,
                       mask, t_alpha, t_beta3, min_8bit_size=_FLOAT32)


def lion_32bit(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.9,
               b2: Any = 0.99, weight_decay: optax.ScalarOrSchedule = 1e-3,
               mask: Any = None) -> optax.GradientTransformationExtraArgs:
  r"""Lion with a float32 momentum: :func:`lion_8bit`'s math, unquantized.

  Every leaf's momentum is a float32 array in the parameter's shape (float64
  for float64 parameters, with the math in float64).

  Args:
    learning_rate: :math:`\eta` (bitsandbytes' default is 1e-4).
    b1, b2: see :func:`~jlowbit.scale_by_lion_8bit`.
    weight_decay: :math:`\lambda` (float, array or schedule).
    mask: which leaves to decay, as in ``optax.add_decayed_weights``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return lion_8bit(learning_rate, b1, b2, weight_decay, mask,
                   min_8bit_size=_FLOAT32)


def sgd_32bit(learning_rate: optax.ScalarOrSchedule, momentum: Any = 0.9,
              weight_decay: optax.ScalarOrSchedule = 0.0
              ) -> optax.GradientTransformationExtraArgs:
  r"""SGD with a float32 momentum buffer: :func:`sgd_8bit`'s math, unquantized.

  Every leaf's buffer is a float32 array in the parameter's shape (float64
  for float64 parameters, with the math in float64).

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    momentum: :math:`\mu`.
    weight_decay: :math:`\lambda`, added to the gradient (L2).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return sgd_8bit(learning_rate, momentum, weight_decay,
                  min_8bit_size=_FLOAT32)


def rmsprop_32bit(learning_rate: optax.ScalarOrSchedule, decay: Any = 0.99,
                  eps: Any = 1e-8, weight_decay: optax.ScalarOrSchedule = 0.0
                  ) -> optax.GradientTransformationExtraArgs:
  r"""RMSprop with a float32 second moment: :func:`rmsprop_8bit`'s math,
  unquantized.

  Every leaf's moment is a float32 array in the parameter's shape (float64
  for float64 parameters, with the math in float64).

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    decay: :math:`\rho`.
    eps: added to the denominator outside the square root.
    weight_decay: :math:`\lambda`, added to the gradient (L2).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return rmsprop_8bit(learning_rate, decay, eps, weight_decay,
                      min_8bit_size=_FLOAT32)


def adagrad_32bit(learning_rate: optax.ScalarOrSchedule, eps: Any = 1e-10,
                  weight_decay: optax.ScalarOrSchedule = 0.0
                  ) -> optax.GradientTransformationExtraArgs:
  r"""Adagrad with a float32 sum of squares: :func:`adagrad_8bit`'s math,
  unquantized.

  Every leaf's sum is a float32 array in the parameter's shape (float64 for
  float64 parameters, with the math in float64).

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    eps: added to the denominator outside the square root.
    weight_decay: :math:`\lambda`, added to the gradient (L2).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return adagrad_8bit(learning_rate, eps, weight_decay, min_8bit_size=_FLOAT32)


def lamb_32bit(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.9,
               b2: Any = 0.999, eps: Any = 1e-6,
               weight_decay: optax.ScalarOrSchedule = 0.0, mask: Any = None
               ) -> optax.GradientTransformationExtraArgs:
  r"""LAMB with float32 Adam moments: :func:`lamb_8bit`'s math, unquantized.

  Every leaf's moments are float32 arrays in the parameter's shape (float64
  for float64 parameters, with the math in float64).

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    b1, b2, eps: see :func:`~jlowbit.scale_by_adam_8bit`.
    weight_decay: :math:`\lambda` (float, array or schedule).
    mask: which leaves to decay, as in ``optax.add_decayed_weights``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return lamb_8bit(learning_rate, b1, b2, eps, weight_decay, mask,
                   min_8bit_size=_FLOAT32)


def lars_32bit(learning_rate: optax.ScalarOrSchedule,
               weight_decay: optax.ScalarOrSchedule = 0.0,
               weight_decay_mask: Any = True, trust_coefficient: Any = 0.001,
               eps: Any = 0.0, trust_ratio_mask: Any = True,
               momentum: Any = 0.9) -> optax.GradientTransformationExtraArgs:
  r"""LARS with a float32 momentum buffer: :func:`lars_8bit`'s math,
  unquantized.

  Every leaf's buffer is a float32 array in the parameter's shape (float64
  for float64 parameters, with the math in float64).

  Args:
    learning_rate: :math:`\eta`: float, array or schedule.
    weight_decay, weight_decay_mask, trust_coefficient, eps,
      trust_ratio_mask, momentum: see :func:`lars_8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return lars_8bit(learning_rate, weight_decay, weight_decay_mask,
                   trust_coefficient, eps, trust_ratio_mask, momentum,
                   min_8bit_size=_FLOAT32)
