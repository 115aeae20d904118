"""State made by one configuration is refused by another, with an error that
names what does not match (regression: a block_size=64 state used to be
silently reshaped by a block_size=256 optimizer)."""

import jax
import jax.numpy as jnp
import optax
import pytest

import jlowbit as lowbit

PARAMS = {"w": jnp.ones((4096,)), "b": jnp.ones((3,))}


def _update(tx, state):
  return tx.update(PARAMS, state, PARAMS)


def test_block_size_64_state_with_block_size_256_optimizer():
  state = lowbit.adamw_8bit(1e-3, block_size=64, impl="xla").init(PARAMS)
  with pytest.raises(ValueError, match=r"state.mu\['w'\] absmax is float32\(64,\), "
                     r"but block_size=256 needs float32\(16,\).*another block_size"):
    _update(lowbit.adamw_8bit(1e-3, block_size=256, impl="xla"), state)


def test_block_size_256_state_with_block_size_64_optimizer():
  state = lowbit.adamw_8bit(1e-3, block_size=256, impl="xla").init(PARAMS)
  with pytest.raises(ValueError, match=r"absmax is float32\(16,\), but "
                     r"block_size=64 needs float32\(64,\)"):
    _update(lowbit.adamw_8bit(1e-3, block_size=64, impl="xla"), state)


def test_another_optimizers_state_is_refused():
  state = lowbit.rmsprop_8bit(1e-3, impl="xla").init(PARAMS)
  with pytest.raises(TypeError, match=r"state is a ScaleByRms8bitState, expected "
                     r"a ScaleByRss8bitState.*another optimizer"):
    _update(lowbit.adagrad_8bit(1e-3, impl="xla"), state)


def test_min_8bit_size_mismatch_is_refused():
  state = lowbit.adam_8bit(1e-3, min_8bit_size=8192, impl="xla").init(PARAMS)
  with pytest.raises(ValueError, match=r"state.mu\['w'\] is unquantized but this "
                     r"optimizer keeps a leaf of 4096 elements 8-bit"):
    _update(lowbit.adam_8bit(1e-3, impl="xla"), state)
  state = lowbit.adam_8bit(1e-3, min_8bit_size=1, impl="xla").init(PARAMS)
  with pytest.raises(ValueError, match=r"state.mu\['b'\] is 8-bit but this "
                     r"optimizer keeps a leaf of 3 elements unquantized"):
    _update(lowbit.adam_8bit(1e-3, impl="xla"), state)


def test_32bit_state_with_8bit_optimizer_is_refused():
  state = lowbit.lion_32bit(1e-4).init(PARAMS)
  with pytest.raises(ValueError, match=r"state.mu\['w'\] is unquantized"):
    _update(lowbit.lion_8bit(1e-4, impl="xla"), state)


def test_shape_and_structure_mismatches_are_refused():
  tx = lowbit.adamw_8bit(1e-3, impl="xla")
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=r"updates\['w'\].shape=\(4095,\) does not "
                     r"match the optimizer state's state.mu\['w'\].shape=\(4096,\)"):
    tx.update({"w": jnp.ones((4095,)), "b": jnp.ones((3,))}, state)
  with pytest.raises(ValueError, match="structure"):
    tx.update({"w": jnp.ones((4096,))}, state)


def test_matching_state_passes_inside_chains_and_jit():
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   lowbit.adamw_8bit(1e-3, block_size=64, impl="xla"))
  state = tx.init(PARAMS)
  updates, state = jax.jit(tx.update)(PARAMS, state, PARAMS)
  assert updates["w"].shape == (4096,)
