"""``nnx.Optimizer`` whose step lets the 8-bit kernel write the parameters.

:class:`Optimizer` is a drop-in ``flax.nnx.Optimizer``: the same
constructor, state and checkpoints; its :meth:`~Optimizer.update` steps
through :func:`jlowbit.update_and_apply`, so for jlowbit's aliases
(``lowbit.adamw_8bit(...)`` and the others) the kernel reads each 8-bit
parameter with its gradient and moments and writes it in place (no
``updates`` tree is materialized), and any other ``tx`` runs as in
``nnx.Optimizer``.

.. code-block:: python

  optimizer = lowbit.nn.Optimizer(model, lowbit.adamw_8bit(1e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    grads = nnx.grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
"""

from typing import Any

from flax import nnx

from jlowbit.optax_transforms.apply import update_and_apply


class Optimizer(nnx.Optimizer):
  """``nnx.Optimizer`` stepped by :func:`jlowbit.update_and_apply`."""

  def update(self, model: Any, grads: Any, /, **kwargs: Any) -> Any:
    """Updates the optimizer state and ``model``'s parameters from ``grads``.

    Args:
      model: the module whose ``wrt`` variables the optimizer was made for.
      grads: the gradients derived from ``nnx.grad``.
      **kwargs: extra arguments of ``tx.update``
        (``GradientTransformationExtraArgs``); given any, the step is
        ``nnx.Optimizer.update``'s (unfused).

    Returns:
      ``None`` when fused (no updates tree exists: the kernel writes the
      parameters), else ``nnx.Optimizer.update``'s updates.
    """
    if kwargs or getattr(self.tx.update, "update_and_apply", None) is None:
      return super().update(model, grads, **kwargs)
    graph = {} if getattr(self, "graph", None) is None else {"graph": self.graph}
    params = nnx.as_pure(nnx.state(model, self.wrt, **graph))
    grads = nnx.as_pure(nnx.state(grads, self.wrt, **graph))
    new_params, new_state = update_and_apply(
        self.tx, grads, nnx.as_pure(self.opt_state), params)
    nnx.update(model, new_params)
    nnx.update(self.opt_state, nnx.state(new_state, **graph))
    self.step[...] += 1
    return None
