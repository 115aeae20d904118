r"""Percentile clipping of the gradient (bitsandbytes' ``percentile_clipping``).

The state keeps the squared global gradient norms of the last ``history``
steps in a ring buffer on the device. Each step records
:math:`n_t = \lVert g_t \rVert_2^2` and scales the gradient by

.. math::
  s_t = \min\Big(1, \frac{\sqrt{c_t}}{\sqrt{n_t}}\Big), \qquad
  c_t = \mathrm{sort}(h)_{\lfloor p \cdot k / 100 \rfloor}

where :math:`h` are the :math:`k = \min(t, \text{history})` recorded norms
(the current one included) and :math:`p` the ``percentile``; the index is
capped at :math:`k - 1`, so ``percentile=100`` never clips. With a full
history of 100 this is bitsandbytes' rule (``sqrt(sort(gnorm_vec)[percentile])``).

Differences from bitsandbytes, on purpose: the norm is the global norm of all
leaves (bitsandbytes keeps one history per tensor), and only recorded norms
count (bitsandbytes sorts its zero-initialized buffer, which clips gradients
to zero for the first ~``100 - percentile`` steps).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class PercentileClippingState(NamedTuple):
  """State of :func:`percentile_clipping`.

  Attributes:
    count: int32 scalar, steps taken.
    gnorm_sq_history: float32 ``[history]``: squared global gradient norms,
      written at ``count % history``; entries ``>= count`` are unused.
  """
  count: jax.Array
  gnorm_sq_history: jax.Array


def percentile_clipping(percentile: Any, history: int = 100
                        ) -> optax.GradientTransformationExtraArgs:
  """Clips the gradient's global norm to a percentile of recent norms.

  Args:
    percentile: in [0, 100] (float, array or tracer); 100 disables clipping,
      5 clips to the 6th smallest of the last 100 norms.
    history: number of past squared norms kept (a positive Python int).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`PercentileClippingState`; updates keep their dtypes.

  Example:
    >>> import optax, jlowbit as lowbit
    >>> tx = optax.chain(lowbit.percentile_clipping(5), lowbit.adamw_8bit(1e-3))
  """
  if isinstance(history, bool) or not isinstance(history, int) or history < 1:
    raise ValueError(f"history={history!r} must be a positive Python int")
  if isinstance(percentile, (int, float)) and not 0 <= percentile <= 100:
    raise ValueError(f"percentile={percentile!r} must be in [0, 100]")

  def init_fn(params):
    del params
    return PercentileClippingState(jnp.zeros([], jnp.int32),
                                   jnp.zeros((history,), jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    gnorm_sq = sum((jnp.sum(jnp.square(g.astype(jnp.float32)))
                    for g in jax.tree.leaves(updates)), jnp.float32(0))
    gnorm_sq_history = state.gnorm_sq_history.at[state.count % history].set(
        gnorm_sq)
    count = optax.safe_increment(state.count)
    recorded = jnp.minimum(count, history)
    ordered = jnp.sort(jnp.where(jnp.arange(history) < recorded,
                                 gnorm_sq_history, jnp.inf))
    # floor(p * k / 100) by counting, exact for integer p (no division).
    rank = jnp.asarray(percentile, jnp.float32) * recorded.astype(jnp.float32)
    index = jnp.sum(100 * jnp.arange(1, history + 1, dtype=jnp.float32) <= rank)
    clip_sq = ordered[jnp.clip(index, 0, recorded - 1)]
    scale = jnp.where(gnorm_sq > clip_sq,
                      jnp.sqrt(clip_sq) / jnp.sqrt(gnorm_sq), jnp.float32(1))
    updates = jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)
    return updates, PercentileClippingState(count, gnorm_sq_history)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
