"""``offload_state``: state in ``pinned_host`` memory, updates bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlowbit

HAS_PINNED_HOST = "pinned_host" in {
    m.kind for m in jax.devices()[0].addressable_memories()}
pytestmark = pytest.mark.skipif(
    not HAS_PINNED_HOST, reason="the backend has no pinned_host memory")


def _params():
  keys = jax.random.split(jax.random.key(0), 3)
  # A leaf with 8-bit state, a small one with float state, a scalar.
  return {"w": jax.random.normal(keys[0], (64, 128), jnp.float32),
          "b": jax.random.normal(keys[1], (16,), jnp.float32),
          "s": jnp.float32(0.5)}


def _grads(step):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(100 + step), p.shape, p.dtype),
      _params())


def _assert_offloaded(state):
  """Arrays of rank >= 1 in pinned_host memory, scalars on the device."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    want = "pinned_host" if leaf.ndim >= 1 else "device"
    assert leaf.sharding.memory_kind == want, (jax.tree_util.keystr(path), want)


def _run(tx, steps, jit):
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  history = []
  for step in range(steps):
    updates, state = update(_grads(step), state, params)
    params = optax.apply_updates(params, updates)
    history.append((updates, state))
  return history


@pytest.mark.parametrize("make", [
    lambda: jlowbit.adamw_8bit(1e-2, min_8bit_size=4096),
    lambda: jlowbit.ademamix_8bit(1e-2, min_8bit_size=4096),
    lambda: jlowbit.lion_8bit(1e-3, min_8bit_size=4096),
    lambda: optax.chain(jlowbit.percentile_clipping(50),
                        jlowbit.sgd_8bit(1e-2, momentum=0.9, min_8bit_size=4096)),
], ids=["adamw_8bit", "ademamix_8bit", "lion_8bit", "chain"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_offload_is_bit_identical_and_keeps_state_on_host(make, jit):
  want = _run(make(), 3, jit)
  got = _run(jlowbit.offload_state(make()), 3, jit)
  for (updates, state), (want_updates, want_state) in zip(got, want):
    _assert_offloaded(state)
    jax.tree.map(np.testing.assert_array_equal, updates, want_updates)
    jax.tree.map(np.testing.assert_array_equal, state, want_state)


def test_offload_init_state_on_host_and_8bit_codes():
  state = jlowbit.offload_state(jlowbit.adamw_8bit(1e-3)).init(
      {"w": jnp.zeros((128, 128))})
  _assert_offloaded(state)
  # The 8-bit storage is unchanged: uint8 codes, float32 absmax.
  adam_state = state[0]
  assert adam_state.mu.codes["w"].dtype == jnp.uint8
  assert adam_state.mu.absmax["w"].dtype == jnp.float32


def test_offload_without_pinned_host_memory_raises(monkeypatch):
  class Memory:
    kind = "device"

  class Device:
    platform, id = "fake", 0

    def addressable_memories(self):
      return [Memory()]

  monkeypatch.setattr(jax, "devices", lambda *args: [Device()])
  with pytest.raises(ValueError, match=r"offload_state needs a 'pinned_host' "
                     r"memory on fake device 0, which has \['device'\]"):
    jlowbit.offload_state(optax.adam(1e-3)).init({"w": jnp.zeros(4)})


def test_offload_under_multisteps_and_inject_hyperparams():
  tx = optax.MultiSteps(
      jlowbit.offload_state(optax.inject_hyperparams(
          jlowbit.adamw_8bit, static_args=jlowbit.STATIC_ARGS)(
              learning_rate=1e-2, min_8bit_size=4096)), every_k_schedule=2)
  plain = optax.MultiSteps(
      optax.inject_hyperparams(jlowbit.adamw_8bit,
                               static_args=jlowbit.STATIC_ARGS)(
          learning_rate=1e-2, min_8bit_size=4096), every_k_schedule=2)
  for (updates, _), (want, _) in zip(_run(tx, 4, True), _run(plain, 4, True)):
    jax.tree.map(np.testing.assert_array_equal, updates, want)


@pytest.mark.parametrize("make", [
    lambda: optax.adam(1e-2),
    lambda: jlowbit.adamw_8bit(1e-2, block_size=64, min_8bit_size=64),
], ids=["optax_adam", "adamw_8bit"])
def test_offload_of_sharded_state_keeps_sharding(make):
  """A (4, 2) mesh of host devices (the last 8 of the 9 that
  tests/conftest.py asks for): the offloaded state keeps each leaf's
  PartitionSpec in pinned_host memory, the 8-bit update stays shard-local
  (no collective in the compiled step), updates equal the unsharded ones."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  if jax.device_count() < 9:
    pytest.skip("needs the 9 host devices of tests/conftest.py")
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), devices=jax.devices()[-8:],
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  spec = {"w": P("fsdp", "tp"), "b": P("tp")}
  params = {"w": jax.random.normal(jax.random.key(0), (32, 256), jnp.float32),
            "b": jnp.ones((16,), jnp.float32)}
  grads = jax.tree.map(lambda p: p * 0.01 + 0.001, params)
  plain = make()
  want, _ = jax.jit(plain.update)(grads, plain.init(params), params)
  sharded = {k: NamedSharding(mesh, spec[k]) for k in params}
  params, grads = jax.device_put((params, grads), (sharded, sharded))
  tx = jlowbit.offload_state(make())
  with jax.set_mesh(mesh):
    state = tx.init(params)
    update = jax.jit(tx.update)
    hlo = update.lower(grads, state, params).compile().as_text()
    updates, state = update(grads, state, params)
  jax.tree.map(np.testing.assert_array_equal, updates, want)
  assert not any(f" {c}" in hlo for c in ("all-gather(", "all-reduce(",
                                          "all-to-all(", "reduce-scatter("))
  moments = state[0].mu
  if isinstance(moments, jlowbit.Quantized8bitMoment):
    moments = moments.codes
  for k in params:
    assert moments[k].sharding.memory_kind == "pinned_host", k
    assert tuple(moments[k].sharding.spec) == tuple(spec[k]), (k, moments[k].sharding.spec)
  # state_shardings says so too (step counts: on the device, replicated).
  shardings = jlowbit.state_shardings(tx, params)
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert s.memory_kind == ("pinned_host" if x.ndim else "device")
    if x.ndim:
      assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


def test_offload_with_nnx_optimizer():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.Linear(128, 64, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, jlowbit.offload_state(jlowbit.adamw_8bit(1e-3)), wrt=nnx.Param)
  reference = nnx.Linear(128, 64, rngs=nnx.Rngs(0))
  plain = nnx.Optimizer(reference, jlowbit.adamw_8bit(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  x = jax.random.normal(jax.random.key(1), (4, 128))
  for _ in range(2):
    step(model, optimizer, x)
    step(reference, plain, x)
  _assert_offloaded(nnx.state(optimizer, nnx.OptState))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param),
               nnx.state(reference, nnx.Param))


def test_offloaded_state_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = jlowbit.offload_state(jlowbit.adamw_8bit(1e-3))
  params = {"w": jax.random.normal(jax.random.key(0), (128, 128))}
  state = tx.init(params)
  _, state = jax.jit(tx.update)(jax.tree.map(lambda p: p * 0.1, params),
                                state, params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  # Restored into the offloaded shardings: byte-exact, back in host memory.
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      state)
  restored = checkpointer.restore(tmp_path / "state", target)
  _assert_offloaded(restored)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
