"""``lowbit.update_and_apply``: one step that writes the parameters.

For jlowbit's aliases the 8-bit leaves' kernel (or its jnp twin) writes the
new parameters itself; the result must be what ``tx.update`` followed by
``optax.apply_updates`` gives (same state, parameters within a rounding),
with the chain's schedules and masks. Any other optimizer takes exactly
that unfused path.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import KERNEL_IMPLS

import jlowbit as lowbit


def _tree(dtype=jnp.float32):
  """An 8-bit leaf (2-D, partial blocks), a float-state leaf and a 0-d one."""
  keys = jax.random.split(jax.random.key(0), 3)
  return {"w": jax.random.normal(keys[0], (48, 300), dtype),
          "b": jax.random.normal(keys[1], (300,), dtype),
          "s": jnp.asarray(0.5, dtype)}


def _grads(params, t):
  return jax.tree.map(
      lambda p: (0.1 * jax.random.normal(jax.random.key(t), p.shape)).astype(p.dtype),
      params)


def _unfused(tx):
  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step)


def _fused(tx):
  return jax.jit(functools.partial(lowbit.update_and_apply, tx))


def _run(step, tx, params, steps=3):
  state = tx.init(params)
  for t in range(steps):
    params, state = step(_grads(params, t), state, params)
  return params, state


def _assert_trees_close(got, want, rtol):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=rtol, atol=1e-7)


MATRIX_ONLY = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
SCHEDULE = optax.linear_schedule(1e-2, 1e-3, 5)
OPTIMIZERS = {
    "adamw schedules mask": lambda: lowbit.adamw_8bit(
        SCHEDULE, weight_decay=optax.linear_schedule(0.1, 0.0, 5),
        mask=MATRIX_ONLY, impl="xla"),
    "adam": lambda: lowbit.adam_8bit(1e-2, impl="xla"),
    "ademamix": lambda: lowbit.ademamix_8bit(1e-2, impl="xla"),
    "lion mask tree": lambda: lowbit.lion_8bit(
        1e-3, weight_decay=0.1, mask={"w": True, "b": False, "s": True},
        impl="xla"),
    "sgd coupled": lambda: lowbit.sgd_8bit(1e-2, weight_decay=0.1, impl="xla"),
    "rmsprop coupled": lambda: lowbit.rmsprop_8bit(1e-2, weight_decay=0.1,
                                                   impl="xla"),
    "adagrad": lambda: lowbit.adagrad_8bit(1e-2, impl="xla"),
    "adamw_32bit": lambda: lowbit.adamw_32bit(1e-2),
    "chain clip": lambda: lowbit.chain(
        optax.clip_by_global_norm(0.05), optax.scale(2.0),
        lowbit.adamw_8bit(1e-2, impl="xla")),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_step_equals_update_then_apply(name):
  tx = OPTIMIZERS[name]()
  assert getattr(tx.update, "update_and_apply", None) is not None
  params = _tree()
  want = _run(_unfused(tx), tx, params)
  got = _run(_fused(tx), tx, params)
  _assert_trees_close(got[0], want[0], rtol=1e-6)
  _assert_trees_close(got[1], want[1], rtol=1e-6)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_fused_kernel_step(impl):
  """The kernel path through the front end, bfloat16 parameters: within one
  bfloat16 rounding of the unfused step."""
  tx = lowbit.adamw_8bit(1e-2, weight_decay=0.1, impl=impl)
  params = _tree(jnp.bfloat16)
  want = _run(_unfused(lowbit.adamw_8bit(1e-2, weight_decay=0.1, impl="xla")),
              tx, params, steps=1)
  got = _run(_fused(tx), tx, params, steps=1)
  _assert_trees_close(got[0], want[0], rtol=2.0**-7)
  _assert_trees_close(got[1], want[1], rtol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: optax.adamw(1e-2),
    lambda: lowbit.lamb_8bit(1e-2, impl="xla"),
    lambda: optax.inject_hyperparams(lowbit.adamw_8bit)(learning_rate=1e-2),
    lambda: optax.chain(optax.clip(1.0), lowbit.adamw_8bit(1e-2, impl="xla")),
    lambda: lowbit.chain(lowbit.adamw_8bit(1e-2, impl="xla"), optax.scale(0.5)),
], ids=["optax", "lamb", "inject_hyperparams", "optax.chain", "chain, last unfused"])
def test_other_optimizers_take_update_then_apply(make):
  tx = make()
  params = _tree()
  want = _run(_unfused(tx), tx, params, steps=2)
  got = _run(_fused(tx), tx, params, steps=2)
  _assert_trees_close(got[0], want[0], rtol=0)
  _assert_trees_close(got[1], want[1], rtol=0)


def test_donated_params_and_state():
  tx = lowbit.adamw_8bit(1e-2, impl="xla")
  params = _tree()
  state = tx.init(params)
  step = jax.jit(functools.partial(lowbit.update_and_apply, tx),
                 donate_argnums=(1, 2))
  for t in range(2):
    grads = _grads(params, t)
    params, state = step(grads, state, params)
  assert int(state[0].count) == 2
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_nnx_optimizer_steps_like_nnx_optimizer():
  """``lowbit.nn.Optimizer``: the fused step inside ``nnx.jit``, the same
  parameters and state as ``nnx.Optimizer`` with the same ``tx``."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def train(optimizer_cls):
    model = nnx.Linear(300, 48, rngs=nnx.Rngs(0))
    optimizer = optimizer_cls(model, lowbit.adamw_8bit(1e-2, impl="xla"),
                              wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
      grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
      optimizer.update(model, grads)

    for t in range(2):
      step(model, optimizer, jax.random.normal(jax.random.key(t), (8, 300)))
    return nnx.state(model, nnx.Param), nnx.state(optimizer)

  got, want = train(lowbit.nn.Optimizer), train(nnx.Optimizer)
  _assert_trees_close(jax.tree.leaves(got[0]), jax.tree.leaves(want[0]), 1e-6)
  _assert_trees_close(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), 1e-6)
