"""Sharded 8-bit optimizer state, on meshes of host devices (CPU) or GPUs.

Blocks run along each leaf's last axis (``jlowbit._layout``), so a leaf
sharded along its leading axes, or along whole blocks of its last axis,
updates shard-locally: the sharded step equals the unsharded one bit for
bit (``xla``, the Triton ``interpret`` path and, on GPUs, compiled
``triton``; stochastic rounding included), its compiled HLO has no
collective, and the state keeps its shardings through ``init``,
``update`` and ``jax.jit`` (optax's own sharding checks, for every
optimizer).

Devices: on the CPU, 8 of the 9 host devices that tests/conftest.py asks
for; on GPUs, all of them (2, 4 or 8; of another count, the first 4 or 2).
The 1-D mesh spans every device, the 2-D mesh is ``(n / 2, 2)`` and needs
4 devices (its tests skip on 2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jlowbit as lowbit


def _devices() -> list:
  """The devices the meshes are built from (the module skips without)."""
  if jax.default_backend() == "gpu":
    gpus = jax.devices()
    count = next((c for c in (8, 4, 2) if c <= len(gpus)), 0)
    if not count:
      pytest.skip(f"needs 2 or more GPUs (found {len(gpus)})",
                  allow_module_level=True)
    return gpus[:count]
  if jax.device_count() < 9:
    pytest.skip("needs 9 host devices (XLA_FLAGS=--xla_force_host_platform_"
                "device_count=9, set by tests/conftest.py before JAX starts) "
                "or 2 or more GPUs", allow_module_level=True)
  # CPU device 0 stays out of the meshes: jax.pure_callback (the Triton
  # interpreter's way in) stages its arguments on it, which deadlocks when
  # that device is itself waiting in a callback of the same program.
  return jax.devices()[-8:]


DEVICES = _devices()
N = len(DEVICES)  # 2, 4 or 8: the sharded axes below divide for each
BLOCK = 64
# Leaves of a 2-D mesh (fsdp=N/2, tp=2): FSDP, tensor-parallel, both, a
# middle axis (heads) sharded, a last axis (100) that is not a multiple of
# the block size with sharded rows, a tiny float-state leaf.
LEAVES_2D = {
    "fsdp": ((16, 128), P("fsdp", None)),
    "tp": ((8, 256), P(None, "tp")),
    "both": ((16, 256), P("fsdp", "tp")),
    "heads": ((8, 2, 128), P("fsdp", "tp", None)),
    "odd": ((8, 100), P("fsdp")),
    "tiny": ((5,), P()),
}
LEAVES_1D = {
    "rows": ((16, 100), P("x", None)),
    "cols": ((4, 1024), P(None, "x")),
    "flat": ((512,), P("x")),
    "replicated": ((3, 70), P()),
}
MESHES = {"1d": ((N,), ("x",), LEAVES_1D),
          "2d": ((N // 2, 2), ("fsdp", "tp"), LEAVES_2D)}
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter",
               "all-reduce")
# Compiled Triton: on GPUs only (conftest.py skips the ``gpu`` marker elsewhere).
TRITON = pytest.mark.gpu


def _mesh(name, axis_type=AxisType.Auto):
  shape, axes, leaves = MESHES[name]
  if name == "2d" and N < 4:
    pytest.skip(f"the 2-D mesh needs 4 devices (have {N})")
  return jax.make_mesh(shape, axes, axis_types=(axis_type,) * len(axes),
                       devices=DEVICES), leaves


def _tree(leaves, seed=0):
  return {k: jax.random.normal(jax.random.key(seed + i), s, jnp.float32)
          for i, (k, (s, _)) in enumerate(leaves.items())}


def _optimizer(impl):
  """AdEMAMix: three moments, one rounded stochastically."""
  return lowbit.ademamix_8bit(1e-2, block_size=BLOCK, min_8bit_size=64, impl=impl)


def _direction(impl):
  """AdEMAMix's direction alone: an eager call of the alias would run its
  decay and learning-rate tail op by op, which XLA's fusions round
  differently (by an ulp) from a jitted one."""
  return lowbit.scale_by_ademamix_8bit(block_size=BLOCK, min_8bit_size=64,
                                       impl=impl)


def _run(tx, params, grads, steps, update=None):
  update = update or tx.update
  state = tx.init(params)
  for i in range(steps):
    updates, state = update(jax.tree.map(lambda g: g * (i + 1), grads), state,
                            params)
  return updates, state


def _spec(x):
  """``x``'s PartitionSpec with one entry per axis."""
  spec = tuple(x.sharding.spec)
  return P(*spec, *(None,) * (x.ndim - len(spec)))


def _full(spec, ndim):
  return P(*spec, *(None,) * (ndim - len(spec)))


def _assert_identical(got, want, float_ulps=0):
  """Equal leaves; floats within ``float_ulps`` units in the last place."""
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, w), g in zip(paths, jax.tree.leaves(got)):
    g, w = np.asarray(g), np.asarray(w)
    if float_ulps and np.issubdtype(w.dtype, np.floating):
      np.testing.assert_array_max_ulp(g, w, maxulp=float_ulps)
      continue
    np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))


# Every mode and impl on one mesh or the other (CI time): an eager call on
# the 1-D mesh (the interpreter's pure_callback under a mesh once failed
# there), explicit axes with the kernel on the 2-D one.
@pytest.mark.parametrize("mesh_name, impl, mode", [
    ("1d", "xla", "eager"), ("1d", "xla", "explicit"), ("1d", "xla", "auto"),
    ("1d", "interpret", "eager"),
    ("2d", "xla", "explicit"), ("2d", "xla", "auto"),
    ("2d", "interpret", "explicit"),
    *(pytest.param(mesh, "triton", mode, marks=TRITON)
      for mesh in sorted(MESHES) for mode in ("eager", "explicit"))])
def test_sharded_update_is_bit_identical_to_unsharded(impl, mode, mesh_name):
  axis_type = AxisType.Explicit if mode == "explicit" else AxisType.Auto
  mesh, leaves = _mesh(mesh_name, axis_type)
  if mode == "eager":
    # A float-state leaf is plain jnp, run op by op when eager: a couple of
    # ulps from the jitted reference, whatever the sharding.
    leaves = {k: v for k, v in leaves.items() if k != "tiny"}
  tx = _direction(impl) if mode == "eager" else _optimizer(impl)
  params, grads = _tree(leaves), _tree(leaves, seed=10)
  steps = 2 if impl == "xla" else 1
  # The unsharded step, jitted: XLA's fusions may move a float32 result by
  # an ulp against op-by-op execution, and a sharded step runs jitted (its
  # shard_map is compiled) even when called eagerly.
  want = _run(tx, params, grads, steps, jax.jit(tx.update))
  shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in leaves.items()}
  params, grads = jax.device_put((params, grads), (shardings, shardings))
  with jax.set_mesh(mesh):
    got = _run(tx, params, grads, steps, None if mode == "eager" else jax.jit(tx.update))
  # XLA:CPU compiles a computation per shard shape, and for some shapes
  # (a 1-D leaf in 64-element shards; GSPMD's own partitioning gives the
  # same) its fused float32 arithmetic rounds an ulp differently from the
  # unsharded program: the xla path's 8-bit codes are identical, its floats
  # within an ulp. The kernel (interpret) path is bit-identical.
  _assert_identical(got, want, float_ulps=1 if impl == "xla" else 0)
  updates, state = got
  for k, (_, spec) in leaves.items():  # directions and codes keep the sharding
    want_spec = _full(shardings[k].spec, updates[k].ndim)
    assert _spec(updates[k]) == want_spec, k
    inner = state if mode == "eager" else state[0]
    assert _spec(inner.m2.codes[k]) == want_spec, k


@pytest.mark.parametrize("impl", ["xla", pytest.param("triton", marks=TRITON)])
def test_sharded_fused_step_equals_unsharded(impl):
  """``lowbit.update_and_apply`` on sharded leaves: the kernel (or its twin)
  writes each device's parameter shards under ``jax.shard_map``; the
  parameters keep their shardings and equal the unsharded step's."""
  mesh, leaves = _mesh("2d", AxisType.Explicit)
  tx = lowbit.adamw_8bit(1e-2, weight_decay=0.1, block_size=BLOCK,
                         min_8bit_size=64, impl=impl)
  step = jax.jit(lambda g, s, p: lowbit.update_and_apply(tx, g, s, p))
  params, grads = _tree(leaves), _tree(leaves, seed=10)
  want = step(grads, tx.init(params), params)
  shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in leaves.items()}
  params, grads = jax.device_put((params, grads), (shardings, shardings))
  with jax.set_mesh(mesh):
    got = step(grads, tx.init(params), params)
  _assert_identical(got, want, float_ulps=1 if impl == "xla" else 0)
  for k in leaves:
    assert _spec(got[0][k]) == _full(shardings[k].spec, got[0][k].ndim), k


@pytest.mark.parametrize("impl, axis_type", [
    ("xla", AxisType.Explicit), ("xla", AxisType.Auto),
    ("interpret", AxisType.Explicit),
    pytest.param("triton", AxisType.Explicit, marks=TRITON)])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_update_hlo_has_no_collectives(mesh_name, impl, axis_type):
  mesh, leaves = _mesh(mesh_name, axis_type)
  shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in leaves.items()}
  params = jax.device_put(_tree(leaves), shardings)
  for tx, allowed in [(_optimizer(impl), ()),
                      (optax.chain(optax.clip_by_global_norm(1.0), _optimizer(impl)),
                       ("all-reduce",))]:  # the global norm needs one
    with jax.set_mesh(mesh):
      state = tx.init(params)
      hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
    found = {c for c in COLLECTIVES if f" {c}(" in hlo or f" {c}-start(" in hlo}
    assert found <= set(allowed), found
  assert "all-reduce" in hlo  # the check sees collectives where there are some


@pytest.mark.parametrize("impl", [
    "xla", "interpret", pytest.param("triton", marks=TRITON)])
def test_leaf_whose_shards_split_blocks_is_gathered_and_exact(impl):
  """(16, 1000) with its last axis over N devices: shards of 1000 / N
  elements (125, 250 or 500) cut 64-element blocks, so that leaf is
  computed with its last axis gathered (absmax replicated along it); the
  result is still the unsharded one."""
  mesh = jax.make_mesh((N,), ("x",), axis_types=(AxisType.Explicit,),
                       devices=DEVICES)
  tx = _optimizer(impl)
  params = {"w": jax.random.normal(jax.random.key(0), (16, 1000))}
  grads = {"w": jax.random.normal(jax.random.key(1), (16, 1000))}
  want = _run(tx, params, grads, 1, jax.jit(tx.update))
  sharding = {"w": NamedSharding(mesh, P(None, "x"))}
  params, grads = jax.device_put((params, grads), (sharding, sharding))
  with jax.set_mesh(mesh):
    state0 = tx.init(params)
    got = _run(tx, params, grads, 1, jax.jit(tx.update))
  _assert_identical(got, want)
  assert jax.typeof(state0[0].m1.absmax["w"]).sharding.spec == P(None, None)
  assert jax.tree.map(jax.typeof, state0) == jax.tree.map(jax.typeof, got[1])
  assert _spec(got[0]["w"]) == P(None, "x")


OPTIMIZERS = {
    name: getattr(lowbit, name)(1e-3)
    for name in ("adam_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "sgd_8bit",
                 "rmsprop_8bit", "adagrad_8bit", "lamb_8bit", "lars_8bit",
                 "adam_32bit", "adamw_32bit", "ademamix_32bit", "lion_32bit",
                 "sgd_32bit", "rmsprop_32bit", "adagrad_32bit", "lamb_32bit",
                 "lars_32bit")}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optax_state_sharding_checks(name):
  """optax/_src/sharding_test.py, with a leaf large enough for 8-bit state:
  state types (shardings included) equal after init and update, and
  preserved under jax.jit."""
  optimizer = OPTIMIZERS[name]
  mesh = jax.make_mesh((N,), ("x",), axis_types=(AxisType.Explicit,),
                       devices=DEVICES)
  sharding = NamedSharding(mesh, P(None, "x"))
  with jax.set_mesh(mesh):
    params = jnp.zeros((2, 8, 256), dtype=jnp.float16, out_sharding=sharding)
    state0 = optimizer.init(params)
    _, state1 = optimizer.update(params, state0, params)
    types = lambda tree: jax.tree.map(jax.typeof, tree)
    assert types(state0) == types(state1)
    assert types(jax.jit(optimizer.init)(params)) == types(state0)
    _, state2 = jax.jit(optimizer.update)(params, state0, params)
    assert types(state2) == types(state1)
  if name.endswith("_8bit"):
    moments = [m for m in jax.tree.leaves(
        state0, is_leaf=lambda x: isinstance(x, lowbit.Quantized8bitMoment))
               if isinstance(m, lowbit.Quantized8bitMoment)]
    assert moments and all(m.codes.dtype == jnp.uint8 for m in moments)
    assert all(jax.typeof(m.absmax).sharding.spec == P(None, "x", None)
               for m in moments)


def test_state_shardings_helper_matches_init_and_feeds_jit():
  mesh, leaves = _mesh("2d")
  tx = optax.chain(optax.clip_by_global_norm(1.0), _optimizer("xla"))
  abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, spec))
              for k, (s, spec) in leaves.items()}
  shardings = lowbit.state_shardings(tx, abstract)
  params = jax.device_put(_tree(leaves), {k: a.sharding for k, a in abstract.items()})
  same = lambda tree, scalars=True: jax.tree.all(jax.tree.map(
      lambda x, s: (not scalars and x.ndim == 0)
      or x.sharding.is_equivalent_to(s, x.ndim), tree, shardings))
  # Eager init places the moments itself (its step counter stays on the
  # default device).
  assert same(tx.init(params), scalars=False)
  assert same(jax.jit(tx.init, out_shardings=shardings)(params))
  inner = shardings[1][0]
  assert inner.m1.absmax["heads"].spec == P("fsdp", "tp", None)
  assert inner.m1.absmax["tiny"] is None and inner.count.spec == P()
  with pytest.raises(TypeError, match=r"params must be arrays or jax.ShapeDtypeStructs "
                     "with a jax.sharding.NamedSharding"):
    lowbit.state_shardings(tx, {"w": jnp.zeros((4, 64))})


def test_update_inside_users_shard_map():
  """Called inside jax.shard_map, the optimizer takes each device's shards
  as leaves: with blocks within shards, the unsharded step's result."""
  mesh, leaves = _mesh("2d")
  leaves = {k: v for k, v in leaves.items() if k != "odd"}
  tx = lowbit.adam_8bit(1e-2, block_size=BLOCK, min_8bit_size=64, impl="xla")
  params, grads = _tree(leaves), _tree(leaves, seed=10)
  want = _run(tx, params, grads, 2, jax.jit(tx.update))
  specs = {k: spec for k, (_, spec) in leaves.items()}
  abstract = {k: jax.ShapeDtypeStruct(p.shape, p.dtype,
                                      sharding=NamedSharding(mesh, specs[k]))
              for k, p in params.items()}
  state_specs = jax.tree.map(lambda s: s.spec, lowbit.state_shardings(tx, abstract))
  update = jax.jit(jax.shard_map(tx.update, mesh=mesh,
                                 in_specs=(specs, state_specs, specs),
                                 out_specs=(specs, state_specs)))
  params, grads = jax.device_put((params, grads), (
      {k: NamedSharding(mesh, s) for k, s in specs.items()},) * 2)
  state = jax.jit(tx.init, out_shardings=lowbit.state_shardings(tx, abstract))(params)
  for i in range(2):
    updates, state = update(jax.tree.map(lambda g: g * (i + 1), grads), state, params)
  _assert_identical((updates, state), want)


@pytest.mark.parametrize("target", [((N, 1), ("fsdp", "tp")), ((N,), ("fsdp",))])
def test_orbax_round_trip_onto_another_mesh(tmp_path, target):
  ocp = pytest.importorskip("orbax.checkpoint")
  mesh, leaves = _mesh("2d")
  tx = _optimizer("xla")
  shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in leaves.items()}
  params = jax.device_put(_tree(leaves), shardings)
  _, state = _run(tx, params, jax.device_put(_tree(leaves, 10), shardings), 2)
  path = tmp_path / "state"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, state)
  new_mesh = jax.make_mesh(*target, devices=DEVICES)
  new_specs = {k: P(*[a if a in new_mesh.axis_names else None for a in spec])
               for k, (_, spec) in leaves.items()}
  abstract_params = {k: jax.ShapeDtypeStruct(
      s, jnp.float32, sharding=NamedSharding(new_mesh, new_specs[k]))
                     for k, (s, _) in leaves.items()}
  new_shardings = lowbit.state_shardings(tx, abstract_params)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
      new_shardings)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, abstract_state)
  _assert_identical(restored, state)
  assert jax.tree.map(lambda x: x.sharding, restored) == new_shardings
