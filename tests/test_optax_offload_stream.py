"""``offload_state(..., chunks=)``: 8-bit moments streamed through the device.

The state stays in ``pinned_host`` memory; the update equals the
non-offloaded optimizer's: bit for bit for the 8-bit state with the kernels
(the Triton interpreter here), within a few ulps where XLA computes the
float math (``impl="xla"``, and the direction of float32 Adam, which XLA
computes from the old state): XLA rounds the same float32 expression an
ulp differently in a loop body than fused into the whole step.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlowbit
from jlowbit.optax_transforms import offload

# XLA-computed float math: a few ulps apart (module docstring).
ULPS = 8

HAS_PINNED_HOST = "pinned_host" in {
    m.kind for m in jax.devices()[0].addressable_memories()}
pytestmark = pytest.mark.skipif(
    not HAS_PINNED_HOST, reason="the backend has no pinned_host memory")


def _params():
  keys = jax.random.split(jax.random.key(0), 4)
  # Stacked layers (streamed), a matrix (streamed), a 1-D 8-bit leaf (moved
  # in whole), a small leaf with float state (moved in whole).
  return {"layers": jax.random.normal(keys[0], (8, 16, 128), jnp.float32),
          "embed": jax.random.normal(keys[1], (100, 256), jnp.float32),
          "bias": jax.random.normal(keys[2], (8192,), jnp.float32),
          "small": jax.random.normal(keys[3], (16,), jnp.float32)}


def _grads(step):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(100 + step), p.shape, p.dtype),
      _params())


def _assert_close(got, want, ulps):
  """uint8 (codes) equal; floats within ``ulps`` units in the last place of
  the leaf's largest magnitude (an update ``-lr * (d + wd * p)`` can cancel,
  so per-element ulps of the result say little)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype and got.shape == want.shape
  if ulps and np.issubdtype(want.dtype, np.floating) and want.size:
    scale = np.spacing(np.max(np.abs(want)).astype(want.dtype))
    np.testing.assert_array_less(np.abs(got - want), ulps * scale + 1e-30)
  else:
    np.testing.assert_array_equal(got, want)


def _assert_on_host(state):
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    want = "pinned_host" if leaf.ndim >= 1 else "device"
    assert leaf.sharding.memory_kind == want, (jax.tree_util.keystr(path), want)


def _run(tx, steps, donate=True):
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update, donate_argnums=(1,) if donate else ())
  history = []
  for step in range(steps):
    updates, state = update(_grads(step), state, params)
    params = optax.apply_updates(params, updates)
    history.append((updates, state))
  return history


_XLA = {
    "adamw_8bit": lambda: jlowbit.adamw_8bit(1e-2, impl="xla"),
    "ademamix_8bit": lambda: jlowbit.ademamix_8bit(1e-2, impl="xla"),
    "lion_8bit": lambda: jlowbit.lion_8bit(1e-3, impl="xla"),
    "chain": lambda: optax.chain(
        jlowbit.percentile_clipping(50),
        jlowbit.sgd_8bit(1e-2, momentum=0.9, impl="xla")),
}


def _without_small(tx_params):
  """The params without the float-state leaf: a jitted update with donated
  state whose float moment (in pinned_host memory) has the shape and dtype
  of an update aborts on the CPU backend of jax 0.10 ("PjRtBuffer's memory
  kind does not match sharding's memory kind": the donated host buffer is
  aliased to the device output), with or without ``chunks``."""
  return {k: v for k, v in tx_params.items() if k != "small"}


@pytest.mark.parametrize("name, chunks", [
    *((name, 4) for name in _XLA),
    ("ademamix_8bit", 3),  # chunks that divide no leading axis
])
def test_streamed_matches_plain_and_keeps_state_on_host(name, chunks):
  want = _run(_XLA[name](), 3, donate=False)
  got = _run(jlowbit.offload_state(_XLA[name](), chunks=chunks), 3,
             donate=False)
  for (updates, state), (want_updates, want_state) in zip(got, want):
    _assert_on_host(state)
    jax.tree.map(lambda g, w: _assert_close(g, w, ULPS), updates, want_updates)
    jax.tree.map(lambda g, w: _assert_close(g, w, ULPS), state, want_state)


@pytest.mark.parametrize("make", [
    lambda: jlowbit.ademamix_8bit(1e-2, block_size=64, min_8bit_size=64,
                                  impl="interpret"),
    lambda: jlowbit.lion_8bit(1e-3, block_size=64, min_8bit_size=64,
                              impl="interpret"),
], ids=["ademamix_8bit", "lion_8bit"])
def test_streamed_kernel_update_is_bit_identical(make):
  """The kernel (interpreted) writes these algorithms' directions: state and
  updates bit for bit, stochastic rounding included (AdEMAMix's slow EMA:
  each slice keeps its elements' noise counters)."""
  params = {"layers": jax.random.normal(jax.random.key(0), (4, 8, 64)),
            "embed": jax.random.normal(jax.random.key(1), (6, 128))}
  grads = jax.tree.map(lambda p: jnp.sin(p * 3.0), params)
  plain, tx = make(), jlowbit.offload_state(make(), chunks=2)
  want = jax.jit(plain.update)(grads, plain.init(params), params)
  got = jax.jit(tx.update)(grads, tx.init(params), params)
  _assert_on_host(got[1])
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_streamed_update_loops_over_slices_in_place():
  """The compiled update has a loop whose body moves one slice of the state:
  chunk 4 of the stacked leaf (8 -> 2 layers) and of the embedding
  (100 -> 25 rows), in one loop; with the state donated, the slices are
  written into the host arrays in place, with no copy of a whole leaf's codes
  (reading slice j + 1 before writing slice j back made XLA copy them in
  every iteration: 38.7 s a step for 23 GB of state on an H200)."""
  tx = jlowbit.offload_state(jlowbit.adamw_8bit(1e-2, impl="xla"), chunks=4)
  params = _without_small(_params())
  state = tx.init(params)
  lowered = jax.jit(tx.update, donate_argnums=1).lower(
      jax.tree.map(jnp.ones_like, params), state, params)
  hlo = lowered.as_text()
  assert hlo.count("stablehlo.while") == 1
  assert "tensor<2x16x128xui8>" in hlo and "tensor<25x256xui8>" in hlo
  copies = [line for line in lowered.compile().as_text().splitlines()
            if re.search(r"= u8\[(8,16,128|100,256)\]\S* copy\(", line)]
  assert not copies, copies


def test_stream_plan():
  assert offload._chunk_count(8, 4) == 4
  assert offload._chunk_count(100, 8) == 5
  assert offload._chunk_count(7, 4) == 1
  assert offload._chunk_count(3, 8) == 3
  grads = [jnp.zeros((8, 16)), jnp.zeros((4096,)), jnp.zeros((7, 3, 4))]
  with offload._streaming(4):
    assert offload.stream_plan(grads) == ({0: 4, 2: 1}, [1])
  assert offload.stream_plan(grads) == ({0: 1, 2: 1}, [1])


@pytest.mark.parametrize("chunks", [0, -1, 2.0])
def test_bad_chunks_raise(chunks):
  with pytest.raises(ValueError, match="must be None or a positive int"):
    jlowbit.offload_state(jlowbit.adamw_8bit(1e-3), chunks=chunks)


def test_streamed_under_multisteps_and_inject_hyperparams():
  def make(offloaded):
    tx = optax.inject_hyperparams(jlowbit.adamw_8bit,
                                  static_args=jlowbit.STATIC_ARGS)(
        learning_rate=1e-2, impl="xla")
    if offloaded:
      tx = jlowbit.offload_state(tx, chunks=4)
    return optax.MultiSteps(tx, every_k_schedule=2)
  got, want = _run(make(True), 4, donate=False), _run(make(False), 4, donate=False)
  for (updates, state), (want_updates, _) in zip(got, want):
    jax.tree.map(lambda g, w: _assert_close(g, w, ULPS), updates, want_updates)
  _assert_on_host(got[-1][1].inner_opt_state)


def test_streamed_state_donated():
  """Donated state (as a training step does): updated in place, on the host."""
  tx = lambda: jlowbit.offload_state(jlowbit.adamw_8bit(1e-2, impl="xla"),
                                     chunks=4)
  params = _without_small(_params())
  state = tx().init(params)
  update = jax.jit(tx().update, donate_argnums=1)
  plain = jlowbit.adamw_8bit(1e-2, impl="xla")
  want_state = plain.init(params)
  for step in range(2):
    grads = {k: v for k, v in _grads(step).items() if k != "small"}
    updates, state = update(grads, state, params)
    want, want_state = jax.jit(plain.update)(grads, want_state, params)
    _assert_on_host(state)
    jax.tree.map(lambda g, w: _assert_close(g, w, ULPS), updates, want)


def test_streamed_sharded_state_stays_shard_local():
  """A (4, 2) mesh of host devices: stacked and matrix leaves sharded along
  their later axes stream (the leading axis is not sharded); a leaf whose
  leading axis is sharded is moved in whole. State keeps its specs in
  pinned_host memory, no collective, updates and state equal the unsharded
  ones (stochastic rounding included)."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  if jax.device_count() < 9:
    pytest.skip("needs the 9 host devices of tests/conftest.py")
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), devices=jax.devices()[-8:],
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  spec = {"w": P("fsdp", "tp"), "stack": P(None, "fsdp", "tp"),
          "m": P(None, "tp"), "b": P("tp")}
  params = {"w": jax.random.normal(jax.random.key(0), (32, 256)),
            "stack": jax.random.normal(jax.random.key(1), (4, 32, 256)),
            "m": jax.random.normal(jax.random.key(2), (8, 256)),
            "b": jnp.ones((512,))}
  grads = jax.tree.map(lambda p: p * 0.01 + 0.001, params)
  make = lambda: jlowbit.ademamix_8bit(1e-2, block_size=64, min_8bit_size=64,
                                       impl="xla")
  plain = make()
  want, want_state = jax.jit(plain.update)(grads, plain.init(params), params)
  sharded = {k: NamedSharding(mesh, spec[k]) for k in params}
  params, grads = jax.device_put((params, grads), (sharded, sharded))
  tx = jlowbit.offload_state(make(), chunks=4)
  with jax.set_mesh(mesh):
    state = tx.init(params)
    update = jax.jit(tx.update)
    hlo = update.lower(grads, state, params).compile().as_text()
    updates, state = update(grads, state, params)
  assert " while(" in hlo
  assert not any(f" {c}" in hlo for c in ("all-gather(", "all-reduce(",
                                          "all-to-all(", "reduce-scatter("))
  jax.tree.map(lambda g, w: _assert_close(g, w, ULPS), updates, want)
  jax.tree.map(lambda g, w: _assert_close(g, w, ULPS), state, want_state)
  for moment in state[0][1:]:
    for k in params:
      for tree in (moment.codes, moment.absmax):
        assert tree[k].sharding.memory_kind == "pinned_host", k
        assert tuple(tree[k].sharding.spec) == tuple(spec[k]), k


def test_streamed_with_nnx_optimizer():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.Linear(128, 64, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, jlowbit.offload_state(jlowbit.adamw_8bit(1e-3, impl="xla"),
                                   chunks=4), wrt=nnx.Param)
  reference = nnx.Linear(128, 64, rngs=nnx.Rngs(0))
  plain = nnx.Optimizer(reference, jlowbit.adamw_8bit(1e-3, impl="xla"),
                        wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  x = jax.random.normal(jax.random.key(1), (4, 128))
  for _ in range(2):
    step(model, optimizer, x)
    step(reference, plain, x)
  _assert_on_host(nnx.state(optimizer, nnx.OptState))
  jax.tree.map(lambda g, w: _assert_close(g, w, ULPS),
               nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param))


@pytest.mark.parametrize("traced", [False, True])
def test_update_8bit_counter_offsets_split_an_update(traced):
  """A leaf updated alone with ``counter_offsets`` (int or traced) rounds
  stochastically as it does in the call with all leaves."""
  from jlowbit import update8  # pylint: disable=g-import-not-at-top
  grads = [jax.random.normal(jax.random.key(i), (4, 128)) for i in range(2)]
  moments = [((jnp.full(g.shape, 130, jnp.uint8), jnp.full((4, 2), 0.5)),) * 2
             for g in grads]
  kwargs = dict(block_size=64, stochastic=(True, True), step=jnp.int32(3),
                impl="xla")
  hyper = jnp.asarray([0.9, 0.99, 1e-8, 1.0, 1.0], jnp.float32)
  both = update8.update_8bit("adam", grads, moments, hyper, **kwargs)
  offset = grads[0].size

  def alone(offset):
    return update8.update_8bit("adam", grads[1:], moments[1:], hyper,
                               counter_offsets=[offset], **kwargs)
  got = (jax.jit(alone)(jnp.int32(offset)) if traced else alone(offset))
  jax.tree.map(np.testing.assert_array_equal, got[0][1], both[1][1])
  shifted = alone(offset + 1)  # another offset: other noise
  assert not np.array_equal(shifted[0][1][0][0], both[1][1][0][0])
