r"""One optimizer step that writes the parameters: :func:`update_and_apply`.

optax splits a step in two: ``tx.update`` returns updates, which
``optax.apply_updates`` adds to the parameters. For an 8-bit optimizer that
costs memory traffic the kernel could save: the update kernel writes the
direction (or XLA recomputes it from the state), and a second pass reads it
back beside the parameters. :func:`update_and_apply` does both in one:

.. code-block:: python

  tx = lowbit.adamw_8bit(1e-3, weight_decay=0.01)
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, state, batch):
    grads = jax.grad(loss)(params, batch)
    return lowbit.update_and_apply(tx, grads, state, params)

For the chains of jlowbit's aliases (``adam[w]_8bit``, ``ademamix_8bit``,
``lion_8bit``, ``sgd_8bit``, ``rmsprop_8bit``, ``adagrad_8bit`` and their
``*_32bit`` twins) the kernel reads each 8-bit leaf's parameter with its
gradient and moments and writes the new parameter in place (float32 AdamW:
16 bytes a parameter instead of 22); the learning rate and weight decay
(schedules and masks included) are those of the chain, and the new state
is the one ``tx.update`` returns. The parameters equal ``tx.update`` +
``optax.apply_updates`` up to rounding: the step is computed in float32 and
rounded once (optax rounds the update to the gradient's dtype first, and
a coupled decay's ``g + wd * p`` too). Sharded leaves are stepped
shard-locally (each device's kernel writes its parameter shards); leaves
with float32 state and offloaded (streamed) state take the parameter step
in ``jax.numpy`` after their update (same values, unfused).
:func:`chain` puts transformations of the gradients (clipping, say) before
such an alias and stays fused. Any other optimizer (any optax
``GradientTransformation``, a jlowbit alias wrapped in
``optax.inject_hyperparams``, ``optax.chain`` or ``MultiSteps``,
``lamb_8bit``/``lars_8bit``, whose trust ratio needs every update before
the step) takes ``tx.update`` and ``optax.apply_updates``: same results,
no fusion.
"""

from collections.abc import Callable
from typing import Any

import jax
import optax


def update_and_apply(optimizer: optax.GradientTransformation, grads: Any,
                     state: optax.OptState, params: Any
                     ) -> tuple[Any, optax.OptState]:
  """One step of ``optimizer``: ``(new_params, new_state)``.

  Fused (the kernel writes the parameters) for the chains of jlowbit's
  aliases; ``optimizer.update`` then ``optax.apply_updates`` for every
  other optimizer (see the module docstring).

  Args:
    optimizer: an optax ``GradientTransformation``.
    grads: gradients, a tree like ``params``.
    state: ``optimizer``'s state.
    params: the parameters.

  Returns:
    ``(new_params, new_state)``. Under ``jax.jit`` with ``params`` and
    ``state`` donated, the kernels update both in place.
  """
  fused = getattr(optimizer.update, "update_and_apply", None)
  if fused is not None:
    return fused(grads, state, params)
  updates, state = optimizer.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def chain(*transforms: optax.GradientTransformation
          ) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(*transforms)`` that :func:`update_and_apply` runs fused
  when its last transformation is fused (a jlowbit alias): the others
  transform the gradients as in ``optax.chain``, then the last one's
  kernel writes the parameters. E.g. gradient clipping before an 8-bit
  AdamW: ``lowbit.chain(optax.clip_by_global_norm(1.0),
  lowbit.adamw_8bit(1e-3))``. Same state and results as ``optax.chain``.
  """
  tx = optax.chain(*transforms)
  last = transforms and getattr(transforms[-1].update, "update_and_apply", None)
  if not last:
    return tx

  def fused(grads, state, params):
    new_state = []
    for transform, inner in zip(transforms[:-1], state[:-1]):
      grads, inner = transform.update(grads, inner, params)
      new_state.append(inner)
    params, inner = last(grads, state[-1], params)
    return params, (*new_state, inner)

  tx.update.update_and_apply = fused
  return tx


def _leaf_flags(mask: Any, grads: Any) -> Any:
  """A bool per leaf of ``grads`` from an ``optax.masked``-style ``mask``
  (a tree, a prefix of one, or a callable of the updates; its leaves
  concrete bools, as ``optax.masked`` needs them)."""
  tree = mask(grads) if callable(mask) else mask
  return jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub),
                      tree, grads)


def _decay_schedule(state: Any) -> tuple[Any, Callable[[Any], Any]]:
  """(the step count, a rebuild with the count advanced) of the state of
  ``optax.add_decayed_weights`` with a schedule (``WeightDecaySchedule``,
  inside ``MaskedState`` when masked)."""
  if isinstance(state, optax.MaskedState):
    count, rebuild = _decay_schedule(state.inner_state)
    return count, lambda: optax.MaskedState(rebuild())
  return state.count, lambda: state._replace(
      count=optax.safe_increment(state.count))


def decay_transform(weight_decay: Any, mask: Any) -> optax.GradientTransformation:
  """``add_decayed_weights``, or ``identity`` for a literal zero, unmasked decay
  (both have the state ``EmptyState``)."""
  if _no_decay(weight_decay, mask):
    return optax.identity()
  return optax.add_decayed_weights(weight_decay, mask)


def _no_decay(weight_decay: Any, mask: Any) -> bool:
  return (mask is None and isinstance(weight_decay, (int, float))
          and weight_decay == 0)


def fusable_chain(scale: optax.GradientTransformationExtraArgs,
                  learning_rate: optax.ScalarOrSchedule,
                  weight_decay: Any = None, mask: Any = None,
                  coupled: bool = False) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(scale, decay_transform(weight_decay, mask),
  scale_by_learning_rate(learning_rate))`` (the decay first when
  ``coupled``; left out when ``weight_decay`` is ``None``), which
  :func:`update_and_apply` runs fused.

  Args:
    scale: a ``scale_by_*_8bit`` transformation.
    learning_rate: float, array or schedule.
    weight_decay: float, array or schedule, or ``None`` (no decay step).
    mask: which leaves decay, as in ``optax.add_decayed_weights``.
    coupled: add the decay to the gradient (before ``scale``), not to the
      direction.
  """
  lr_tx = optax.scale_by_learning_rate(learning_rate)
  decay = None if weight_decay is None else decay_transform(weight_decay, mask)
  parts = [scale, lr_tx] if decay is None else (
      [decay, scale, lr_tx] if coupled else [scale, decay, lr_tx])
  tx = optax.chain(*parts)
  at = {id(part): i for i, part in enumerate(parts)}
  decays = weight_decay is not None and not _no_decay(weight_decay, mask)

  def fused(grads, state, params):
    new_state = list(state)
    lr_state = state[at[id(lr_tx)]]
    if callable(learning_rate):
      lr = learning_rate(lr_state.count)
      new_state[at[id(lr_tx)]] = lr_state._replace(
          count=optax.safe_increment(lr_state.count))
    else:
      lr = learning_rate
    wd, flags = 0.0, jax.tree.map(lambda _: False, grads)
    if decays:
      if callable(weight_decay):
        count, advanced = _decay_schedule(state[at[id(decay)]])
        wd = weight_decay(count)
        new_state[at[id(decay)]] = advanced()
      else:
        wd = weight_decay
      flags = (jax.tree.map(lambda _: True, grads) if mask is None
               else _leaf_flags(mask, grads))
    new_params, new_state[at[id(scale)]] = scale.update.parameter_step(
        grads, state[at[id(scale)]], params, learning_rate=lr,
        weight_decay=wd, decays=flags, coupled=coupled)
    return new_params, tuple(new_state)

  tx.update.update_and_apply = fused
  return tx
