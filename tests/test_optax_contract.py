"""8-bit optimizers behave like optax optimizers (cf. optax's alias_test.py).

Convergence runs use ``min_8bit_size=1`` so even these tiny problems keep
8-bit state.
"""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jlowbit as lowbit
from test_optax_numerics import inner_state

# (alias name, kwargs) as optax's _OPTIMIZERS_UNDER_TEST, learning rates
# chosen so both 8-bit and 32-bit state solve both problems in 10k steps.
OPTIMIZERS = [
    ("adam", dict(learning_rate=1e-1)),
    ("adamw", dict(learning_rate=1e-1, weight_decay=1e-4)),
    ("ademamix", dict(learning_rate=3e-2, weight_decay=1e-4)),
    ("lion", dict(learning_rate=3e-3, weight_decay=1e-4)),
    ("sgd", dict(learning_rate=1e-3, momentum=0.9)),
    ("rmsprop", dict(learning_rate=5e-3)),
    ("adagrad", dict(learning_rate=1.0)),
    ("lamb", dict(learning_rate=3e-3)),
    ("lars", dict(learning_rate=1.0)),
]
IDS = [name for name, _ in OPTIMIZERS]


def make(name, kwargs, bits=8, **config):
  """The ``name`` alias; 8-bit ones get ``config`` (default min_8bit_size=1)."""
  if bits == 32:
    return getattr(lowbit, f"{name}_32bit")(**kwargs)
  config = dict(dict(min_8bit_size=1, impl="xla"), **config)
  return getattr(lowbit, f"{name}_8bit")(**kwargs, **config)


def parabola():
  final = jnp.array([1.0, -1.0, 1.0])
  return jnp.array([-1.0, 10.0, 1.0]), final, lambda p: jnp.sum((p - final)**2)


def rosenbrock():
  objective = lambda p: (1 - p[0])**2 + 100 * (p[1] - p[0]**2)**2
  return jnp.zeros(2), jnp.ones(2), objective


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("target", [parabola, rosenbrock])
@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=IDS)
def test_converges(name, kwargs, target, bits):
  tx = make(name, kwargs, bits)
  initial, final, objective = target()

  @jax.jit
  def solve(params):
    def step(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(objective)(params), state, params)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(step, (params, tx.init(params)), length=10_000)[0][0]

  np.testing.assert_allclose(solve(initial), final, rtol=3e-2, atol=3e-2)


def _tree():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.standard_normal((32, 48)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(5), jnp.bfloat16)}


def _grads(params, i):
  return jax.tree.map(
      lambda p: jnp.cos(p.astype(jnp.float32) * (i + 1)).astype(p.dtype),
      params)


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=IDS)
def test_traced_once_while_the_schedule_moves(name, kwargs):
  kwargs = dict(kwargs, learning_rate=optax.linear_schedule(1e-2, 1e-4, 4))
  tx = make(name, kwargs, min_8bit_size=64)
  traces = []

  @jax.jit
  def step(params, state, i):
    traces.append(1)
    updates, state = tx.update(_grads(params, i), state, params)
    return optax.apply_updates(params, updates), state

  params = _tree()
  state = tx.init(params)
  history = []
  for i in range(5):
    params, state = step(params, state, i)
    history.append(params)
  assert len(traces) == 1
  assert not np.array_equal(history[-1]["w"], history[-2]["w"])


def _assert_states_close(a, b):
  """Float state within float32 rounding; codes off by at most one."""
  assert a.dtype == b.dtype and a.shape == b.shape
  if a.dtype == jnp.uint8:
    diff = np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32))
    assert diff.max(initial=0) <= 1 and np.count_nonzero(diff) <= 2
  else:
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=IDS)
def test_inject_hyperparams_gives_identical_results(name, kwargs):
  factory = getattr(lowbit, f"{name}_8bit")
  config = dict(min_8bit_size=64, impl="xla")
  plain = factory(**kwargs, **config)
  injected = optax.inject_hyperparams(
      factory, static_args=lowbit.STATIC_ARGS)(**kwargs, **config)
  # float32 only: inject_hyperparams' float32 learning rate would promote a
  # bfloat16 leaf's updates to float32 (optax behaviour, not ours).
  params = jax.tree.map(lambda p: p.astype(jnp.float32), _tree())
  s_plain, s_inj = jax.jit(plain.init)(params), jax.jit(injected.init)(params)
  for i in range(3):
    grads = _grads(params, i)
    u_plain, s_plain = jax.jit(plain.update)(grads, s_plain, params)
    u_inj, s_inj = jax.jit(injected.update)(grads, s_inj, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                         atol=1e-9),
                 u_inj, u_plain)
  jax.tree.map(_assert_states_close, s_inj.inner_state, s_plain)
  # The learning rate is a device value: changing it does not retrace.
  s_inj.hyperparams["learning_rate"] = jnp.asarray(0.5)
  u_half, _ = jax.jit(injected.update)(grads, s_inj, params)
  assert not np.allclose(u_half["w"], u_inj["w"])


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=IDS)
def test_inject_hyperparams_with_default_config_needs_no_static_args(name, kwargs):
  """Regression: with block_size and min_8bit_size left at their defaults,
  optax.inject_hyperparams used to turn them into arrays and raise."""
  factory = getattr(lowbit, f"{name}_8bit")
  injected = optax.inject_hyperparams(factory)(**kwargs, impl="xla")
  plain = factory(**kwargs, impl="xla")
  params = jax.tree.map(lambda p: p.astype(jnp.float32), _tree())
  state, s_plain = jax.jit(injected.init)(params), plain.init(params)
  grads = _grads(params, 0)
  updates, state = jax.jit(injected.update)(grads, state, params)
  want, _ = plain.update(grads, s_plain, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-9), updates, want)
  assert "block_size" not in state.hyperparams


def test_inject_hyperparams_with_explicit_ints_needs_static_args():
  injected = optax.inject_hyperparams(lowbit.adamw_8bit)(learning_rate=1e-3,
                                                         block_size=64)
  with pytest.raises(TypeError, match="static_args=jlowbit.STATIC_ARGS"):
    jax.jit(injected.init)(_tree())


def test_32bit_twin_in_inject_hyperparams():
  injected = optax.inject_hyperparams(lowbit.adamw_32bit)(learning_rate=1e-3)
  params = _tree()
  state = jax.jit(injected.init)(params)
  jax.jit(injected.update)(_grads(params, 0), state, params)


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=IDS)
def test_accepts_extra_args(name, kwargs):
  tx = make(name, kwargs)
  params = _tree()
  updates, _ = jax.jit(lambda s: tx.update(
      _grads(params, 0), s, params, unexpected_extra_arg=1))(tx.init(params))
  assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=IDS)
def test_init_on_shape_dtype_structs_and_stable_state(name, kwargs):
  tx = make(name, kwargs, min_8bit_size=64)
  params = _tree()
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                          params)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  from_abstract = tx.init(abstract)
  state = tx.init(params)
  assert shapes(from_abstract) == shapes(state)
  assert shapes(jax.eval_shape(tx.init, abstract)) == shapes(state)
  _, updated = jax.jit(tx.update)(_grads(params, 0), state, params)
  assert shapes(updated) == shapes(state)
  assert inner_state(state)[1].codes["w"].dtype == jnp.uint8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_updates_keep_the_gradient_dtype(dtype):
  params = {"w": jnp.ones((64, 128), dtype), "b": jnp.ones((3,), dtype)}
  for name, kwargs in OPTIMIZERS:
    tx = make(name, kwargs, min_8bit_size=64)
    updates, _ = tx.update(params, tx.init(params), params)
    assert all(u.dtype == jnp.dtype(dtype) for u in jax.tree.leaves(updates))


def test_in_chain_with_clipping():
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   lowbit.percentile_clipping(50, history=4),
                   lowbit.adamw_8bit(1e-2, min_8bit_size=64, impl="xla"))
  params = _tree()
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(3):
    updates, state = step(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  assert all(np.isfinite(np.asarray(x, np.float32)).all()
             for x in jax.tree.leaves(params))


def test_multi_steps_accumulates_like_one_averaged_step():
  inner = lowbit.adamw_8bit(1e-2, min_8bit_size=64, impl="xla")
  multi = optax.MultiSteps(inner, every_k_schedule=2)
  params = _tree()
  g1, g2 = _grads(params, 0), _grads(params, 1)
  state = multi.init(params)
  step = jax.jit(multi.update)
  u1, state = step(g1, state, params)
  assert all(not np.asarray(u, np.float32).any() for u in jax.tree.leaves(u1))
  u2, state = step(g2, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  expected, _ = jax.jit(inner.update)(mean, inner.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2,
      atol=1e-6), u2, expected)


def test_masked_and_multi_transform():
  params = _tree()
  grads = _grads(params, 0)
  masked = optax.masked(lowbit.adam_8bit(1e-2, min_8bit_size=64, impl="xla"),
                        {"w": True, "b": False})
  updates, _ = jax.jit(masked.update)(grads, masked.init(params), params)
  np.testing.assert_array_equal(updates["b"], grads["b"])
  plain = lowbit.adam_8bit(1e-2, min_8bit_size=64, impl="xla")
  expected, _ = jax.jit(plain.update)({"w": grads["w"]},
                                      plain.init({"w": params["w"]}))
  np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)

  multi = optax.multi_transform(
      {"big": lowbit.lion_8bit(1e-3, min_8bit_size=64, impl="xla"),
       "small": optax.sgd(1e-2)}, {"w": "big", "b": "small"})
  updates, state = jax.jit(multi.update)(grads, multi.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["b"], np.float32),
                             -1e-2 * np.asarray(grads["b"], np.float32),
                             rtol=1e-2)
  w_abs = np.abs(np.asarray(updates["w"]) + 1e-3 * 1e-3 * params["w"])
  np.testing.assert_allclose(w_abs, 1e-3, rtol=1e-5)


class _Mlp(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(16, 256, rngs=rngs)
    self.out = nnx.Linear(256, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def test_flax_nnx_optimizer():
  model = _Mlp(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, lowbit.ademamix_8bit(1e-2, impl="xla"),
                            wrt=nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 16))
  y = jnp.sin(x.sum(axis=1, keepdims=True))

  @nnx.jit
  def train_step(model, optimizer):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(20)]
  assert losses[-1] < 0.5 * losses[0]
  codes = [x for x in jax.tree.leaves(nnx.state(optimizer))
           if x.dtype == jnp.uint8]
  assert [c.shape for c in codes] == [(16, 256)] * 3  # m1, m2, nu


def _run(tx, params, state, start, stop):
  step = jax.jit(tx.update)
  for i in range(start, stop):
    updates, state = step(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_orbax_checkpoint_roundtrip_and_resume(tmp_path):
  tx = optax.chain(lowbit.percentile_clipping(20, history=8),
                   lowbit.ademamix_8bit(optax.cosine_decay_schedule(1e-2, 10),
                                        min_8bit_size=64, impl="xla"))
  params = _tree()
  params, state = _run(tx, params, tx.init(params), 0, 4)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  target = jax.eval_shape(lambda: {"params": params, "opt_state": state})
  restored = checkpointer.restore(tmp_path / "ckpt", target)

  def same_bytes(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  jax.tree.map(same_bytes, restored, {"params": params, "opt_state": state})
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state)

  uninterrupted = _run(tx, params, state, 4, 8)
  resumed = _run(tx, restored["params"], restored["opt_state"], 4, 8)
  jax.tree.map(same_bytes, resumed, uninterrupted)
