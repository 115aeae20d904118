"""Parameter dtypes as optax takes them (regression: float64 parameters
were rejected, and so were plain numpy float64 arrays with x64 disabled)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ALL_IMPLS

import jlowbit as lowbit

NAMES = ["adam", "adamw", "ademamix", "lion", "sgd", "rmsprop", "adagrad",
         "lamb", "lars"]


def _params(dtype):
  return {"w": jnp.linspace(-1, 1, 4096, dtype=dtype).reshape(64, 64),
          "b": jnp.linspace(-1, 1, 5, dtype=dtype)}


@pytest.mark.parametrize("name", NAMES)
def test_32bit_twins_do_float64_math_like_optax(name):
  with jax.enable_x64(True):
    params = _params(jnp.float64)
    tx = getattr(lowbit, f"{name}_32bit")(1e-3)
    state = tx.init(params)
    for leaf in jax.tree.leaves(state):
      assert leaf.dtype in (jnp.int32, jnp.float64)
    grads = jax.tree.map(lambda p: 1e-3 * p + 1e-12, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert all(u.dtype == jnp.float64 for u in jax.tree.leaves(updates))
    assert all(l.dtype in (jnp.int32, jnp.float64) for l in jax.tree.leaves(state))
    if name == "adam":  # the same float64 numbers as optax.adam
      want, _ = optax.adam(1e-3).update(grads, optax.adam(1e-3).init(params))
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
                   updates, want)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_8bit_optimizers_take_float64_params(name, impl):
  with jax.enable_x64(True):
    params = _params(jnp.float64)
    tx = getattr(lowbit, f"{name}_8bit")(1e-3, impl=impl)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: 1e-3 * p, params)
    updates, state = tx.update(grads, state, params)
    assert all(u.dtype == jnp.float64 for u in jax.tree.leaves(updates))
    new = optax.apply_updates(params, updates)
    assert all(np.isfinite(l).all() for l in jax.tree.leaves(new))
    # 8-bit leaves keep 8-bit state (float32 math); small ones float64.
    moment = [s for s in state if isinstance(s, tuple) and hasattr(s, "count")]
    inner = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(
        s, lowbit.Quantized8bitMoment)) if isinstance(s, lowbit.Quantized8bitMoment)]
    assert inner and all(m.codes["w"].dtype == jnp.uint8 for m in inner)
    assert all(m.codes["b"].dtype == jnp.float64 for m in inner)
    del moment


def test_8bit_float64_matches_float32_math():
  with jax.enable_x64(True):
    params = _params(jnp.float64)
    grads = jax.tree.map(lambda p: 1e-3 * p, params)
    tx = lowbit.adamw_8bit(1e-3, impl="xla")
    u64, _ = tx.update(grads, tx.init(params), params)
    p32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    g32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    u32, _ = tx.update(g32, tx.init(p32), p32)
    np.testing.assert_allclose(u64["w"], u32["w"], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_numpy_float64_arrays_are_converted_like_jax_does(name):
  params = {"w": np.linspace(-1, 1, 4096).reshape(64, 64), "b": np.ones(5)}
  for bits in (8, 32):
    tx = getattr(lowbit, f"{name}_{bits}bit")(1e-3)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(lambda p: 1e-3 * p, params), state,
                           params)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))


def test_learning_rate_annotation_is_the_optax_type_not_a_string():
  """optax's own learning-rate-schedule test reads this annotation
  (regression: ``from __future__ import annotations`` made it a string)."""
  for name in NAMES:
    for bits in (8, 32):
      parameter = inspect.signature(
          getattr(lowbit, f"{name}_{bits}bit")).parameters["learning_rate"]
      assert parameter.annotation is optax.ScalarOrSchedule


def test_no_public_signature_has_string_annotations():
  for name in dir(lowbit):
    value = getattr(lowbit, name)
    if not callable(value) or name.startswith("_") or inspect.isclass(value):
      continue
    signature = inspect.signature(value)
    annotations = [p.annotation for p in signature.parameters.values()]
    annotations.append(signature.return_annotation)
    assert not any(isinstance(a, str) for a in annotations), name
