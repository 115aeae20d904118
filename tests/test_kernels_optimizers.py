"""The fused Triton optimizer kernels agree with ``impl="xla"``.

Each step starts both implementations from the same state (the xla one), so
differences do not compound. Bounds (float32 math both sides; the GPU may
contract ``a*b + c`` into FMAs): codes differ by at most 1 on at most 0.1% of
elements (a value on a rounding boundary), absmax within 1e-6 relative,
directions within a few float32 ulp, or 1 ulp of the gradient's dtype
(Triton's interpreter casts float32 to bfloat16 by truncation), except for
the same 0.1% (Lion's sign may flip where its argument is ~0).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import KERNEL_IMPLS

from jlowbit.algorithms import ALGORITHMS
from test_optax_numerics import BLOCKS

# impl -> leaf shapes: a few thousand elements in the interpreter, larger
# awkward sizes on the GPU. ``(7,)`` stays float32 (min_8bit_size=64).
SHAPES = {
    "interpret": {"a": (3000,), "b": (40, 70), "c": (7,)},
    "triton": {"a": (1_000_003,), "b": (517, 1029), "c": (7,)},
}
STEPS = 3
DIRECTION_RTOL = {"float32": 1e-5, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def _check_close(actual, expected, rtol, atol):
  actual, expected = (np.asarray(x, np.float32) for x in (actual, expected))
  far = ~np.isclose(actual, expected, rtol=rtol, atol=atol)
  assert np.count_nonzero(far) <= max(2, actual.size // 1000)


@pytest.mark.parametrize("dtype,block_size", [("float32", 64),
                                              ("bfloat16", 256)])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_kernel_step_equals_xla(impl, algorithm, dtype, block_size):
  block, kwargs = BLOCKS[algorithm]
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s), dtype)
            for k, s in SHAPES[impl].items()}
  txs = {i: block(**kwargs, block_size=block_size, min_8bit_size=64, impl=i)
         for i in ("xla", impl)}
  steps = {i: jax.jit(tx.update) for i, tx in txs.items()}
  state = txs["xla"].init(params)
  for t in range(STEPS):
    grads = jax.tree.map(
        lambda p, t=t: jnp.asarray(rng.standard_normal(p.shape) * 0.1, dtype),
        params)
    d_ref, ref = steps["xla"](grads, state)
    d, new = steps[impl](grads, state)
    jax.tree.map(lambda a, b: _check_close(
        a, b, DIRECTION_RTOL[dtype], 1e-6 * float(jnp.abs(b).max())), d, d_ref)
    for field in ref._fields[1:]:
      got, want = getattr(new, field), getattr(ref, field)
      np.testing.assert_allclose(got.codes["c"], want.codes["c"], rtol=1e-5,
                                 atol=1e-7)
      for key in ("a", "b"):
        diff = np.abs(np.asarray(got.codes[key], np.int32)
                      - np.asarray(want.codes[key], np.int32))
        assert diff.max() <= 1, (field, key, t)
        assert np.count_nonzero(diff) <= max(2, diff.size // 1000)
        np.testing.assert_allclose(got.absmax[key], want.absmax[key], rtol=1e-6)
    assert int(new.count) == int(ref.count) == t + 1
    state = ref


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_kernel_alias_in_a_jitted_training_loop(impl):
  """adamw_8bit through the kernel: params track impl="xla" over 5 steps."""
  import optax  # pylint: disable=g-import-not-at-top
  import jlowbit as lowbit  # pylint: disable=g-import-not-at-top
  shapes = SHAPES[impl]
  rng = np.random.default_rng(1)
  p0 = {k: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32)
        for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rng.standard_normal(s) * 0.01, jnp.float32)
            for k, s in shapes.items()} for _ in range(5)]

  def run(i):
    tx = lowbit.adamw_8bit(optax.linear_schedule(1e-3, 1e-4, 5),
                           min_8bit_size=64, impl=i)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    p, s = p0, tx.init(p0)
    for g in grads:
      u, s = step(g, s, p)
      p = optax.apply_updates(p, u)
    return p

  # A requantized code may land one step away at a rounding boundary (FMA
  # contraction on the GPU); over 5 steps that moves a parameter by at most a
  # few lr * 1e-2, and only a handful of elements ever do.
  def close(a, b):
    diff = np.abs(np.asarray(a) - np.asarray(b))
    assert diff.max() < 1e-4 and np.mean(diff > 1e-5) < 1e-5

  jax.tree.map(close, run(impl), run("xla"))


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_a_tree_updates_in_one_launch_per_dtype(impl):
  """Six 8-bit leaves (two gradient dtypes) and one float32-state leaf: two
  kernel launches in the jitted step, whatever the number of leaves."""
  from jlowbit import adamw_8bit  # pylint: disable=g-import-not-at-top
  shapes = {f"w{i}": (64 * (i + 1),) for i in range(4)} | {"b": (7,)}
  params = {k: jnp.ones(s, jnp.float32) for k, s in shapes.items()}
  params |= {"h0": jnp.ones((4, 64), jnp.bfloat16),
             "h1": jnp.ones((1008,), jnp.bfloat16)}
  tx = adamw_8bit(1e-3, block_size=64, min_8bit_size=64, impl=impl)
  state = tx.init(params)
  step = jax.jit(tx.update)
  if impl == "interpret":
    launches = str(jax.make_jaxpr(step)(params, state, params)).count("pure_callback")
  else:
    launches = step.lower(params, state, params).as_text().count("triton_kernel_call")
  assert launches == 2
  xla = adamw_8bit(1e-3, block_size=64, min_8bit_size=64, impl="xla")
  d, _ = step(params, state, params)
  d_ref, _ = jax.jit(xla.update)(params, state, params)
  jax.tree.map(lambda a, b: _check_close(a, b, 2.0**-7, 1e-7), d, d_ref)
