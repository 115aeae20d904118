"""Stochastic rounding of 8-bit moments (AdEMAMix's slow EMA).

The noise is a counter-based, low-discrepancy sequence (``quasi_uniform``)
shared by the jnp reference and the Triton kernels; rounding picks one of
the two codes around a value with the probabilities that keep its
expectation exact (``stochastic_index``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles

import jlowbit as lowbit
from jlowbit import _noise
from jlowbit import _search
from jlowbit import _twins
from jlowbit import blockwise8
from jlowbit import codebooks
from jlowbit import update8

CODE = codebooks.dynamic(True)


def test_quasi_uniform_is_a_plastic_phase_plus_golden_steps():
  """Element i at step t draws frac(i / g + t / phi) (g the plastic number,
  phi the golden ratio): exactly the top 24 bits of its 32-bit fixed-point
  form, close to the real sequence while the fixed point's rounding stays
  small."""
  g, phi = 1.32471795724474602596, (1 + 5**0.5) / 2
  for t in (0, 1, 7, 100_000):
    i = [0, 1, 2, 1000, 99_999, 123_456_789, 2**32 - 1]
    got = np.asarray(_noise.quasi_uniform(jnp.asarray(i, jnp.uint32),
                                       _noise.weyl_offset(jnp.int32(t))))
    fixed = [((k * _noise.PHASE_MULTIPLIER + t * _noise.WEYL_STEP) % 2**32 >> 8) / 2**24
             for k in i]
    np.testing.assert_array_equal(got, np.float32(fixed))
    if t < 1000:
      real = np.mod(np.array(i[:5]) / g + t / phi, 1.0)
      distance = np.abs(got[:5] - real)
      np.testing.assert_array_less(np.minimum(distance, 1 - distance), 1e-5)


def test_quasi_uniform_is_uniform_over_elements():
  u = np.asarray(_noise.quasi_uniform(jnp.arange(1 << 16, dtype=jnp.uint32),
                                   _noise.weyl_offset(jnp.int32(5))))
  assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
  counts = np.histogram(u, bins=16, range=(0, 1))[0]
  np.testing.assert_allclose(counts, (1 << 16) / 16, rtol=0.05)


def test_quasi_uniform_spreads_each_element_evenly_over_steps():
  """Each element's noise over N steps leaves no gap wider than ~3/N in
  [0, 1) (three-gap theorem; independent draws would leave ~ln(N)/N)."""
  steps = 1024
  offsets = _noise.weyl_offset(jnp.arange(steps))
  u = jax.vmap(lambda o: _noise.quasi_uniform(jnp.arange(8, dtype=jnp.uint32), o))(offsets)
  for element in np.asarray(u).T:
    spread = np.sort(element)
    assert np.diff(np.append(spread, spread[0] + 1)).max() < 3.0 / steps
  assert len({tuple(np.asarray(u)[:4, i]) for i in range(8)}) == 8  # own phases


def _values(n=4096, seed=0):
  x = np.random.default_rng(seed).uniform(-1, 1, n).astype(np.float32)
  return np.concatenate([x, CODE[::17], [0.0, -0.0, 1.0, -1.0]]).astype(np.float32)


def _stochastic(x, uniform, scale=1.0):
  x, scale = jnp.asarray(x), jnp.float32(scale)
  floor = _twins.scaled_tree_index(x, scale,
                                jnp.asarray(_search.code_tree(CODE, floor=True)))
  return np.asarray(_twins.stochastic_index(
      x, scale, floor, jnp.asarray(CODE), jnp.asarray(_search.code_gaps(CODE)),
      jnp.asarray(uniform, jnp.float32)))


def _bracket(v):
  lo = np.clip(np.searchsorted(CODE, v, side="right") - 1, 0, CODE.size - 1)
  hi = np.where(CODE[lo] == v, lo, np.minimum(lo + 1, CODE.size - 1))
  return lo, hi


@pytest.mark.parametrize("scale", [1.0, 3e-3, 2.0**-70])
@pytest.mark.parametrize("uniform", [0.0, 0.5, 1 - 2.0**-24])
def test_rounds_to_one_of_the_two_codes_around_the_value(scale, uniform):
  v = _values()
  index = _stochastic(v * np.float32(scale), np.full(v.shape, uniform), scale)
  lo, hi = _bracket(v)
  assert np.all((index == lo) | (index == hi))
  on_code = np.isin(v, CODE)
  np.testing.assert_array_equal(index[on_code], np.searchsorted(CODE, v[on_code]))


def test_extremes_and_nan_keep_the_nearest_code():
  v = np.array([-1.0, -2.0, 1.0, np.nan], np.float32)  # -1 is below CODE[0]
  for uniform in (0.0, 0.3, 1 - 2.0**-24):
    np.testing.assert_array_equal(_stochastic(v, np.full(4, uniform)),
                                  [0, 0, 255, 0])


def test_is_unbiased_over_steps():
  """Averaged over 1024 steps of quasi-uniform noise the dequantized value
  is the value itself, to a small fraction of a code step."""
  v = _values(2048, seed=1)
  offsets = _noise.weyl_offset(jnp.arange(1024))
  counters = jnp.arange(v.size, dtype=jnp.uint32)
  noise = jax.vmap(lambda o: _noise.quasi_uniform(counters, o))(offsets)
  codes = np.stack([_stochastic(v, u) for u in np.asarray(noise)])
  mean = CODE[codes].astype(np.float64).mean(axis=0)
  lo, hi = _bracket(v)
  inside = v >= CODE[0]
  step = (CODE[hi] - CODE[lo])[inside]
  assert np.all(np.abs(mean - v)[inside] <= 0.01 * step)
  nearest = CODE[np.asarray(oracles.nearest_code_index(jnp.asarray(v), jnp.asarray(CODE)))]
  assert np.mean(np.abs(nearest - v)) > 10 * np.mean(np.abs(mean - v))


def test_blockwise_quantization_with_noise_stays_within_one_code():
  x = jax.random.normal(jax.random.key(0), (3000,))
  uniform = _noise.quasi_uniform(jnp.arange(3000, dtype=jnp.uint32), jnp.uint32(7))
  nearest, absmax = blockwise8.quantize_blockwise_reference(x, CODE, 256)
  codes, absmax_sr = blockwise8.quantize_blockwise_reference(x, CODE, 256, uniform)
  np.testing.assert_array_equal(absmax, absmax_sr)
  step = np.abs(np.asarray(codes, np.int32) - np.asarray(nearest, np.int32))
  assert step.max() == 1 and 0.1 < np.mean(step) < 0.6


def _slow_ema(stochastic, steps=300, b3=0.999):
  """AdEMAMix's m2 under a constant gradient, from a random start; returns
  (dequantized m2, exact EMA)."""
  rng = np.random.default_rng(0)
  shape, block_size = (1024,), 256
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  m2 = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  moments = tuple(blockwise8.quantize_blockwise_reference(
      m, codebooks.dynamic(s), block_size)
                  for m, s in ((jnp.zeros(shape), True), (m2, True),
                               (jnp.ones(shape), False)))
  moments = tuple((c.reshape(shape), a) for c, a in moments)
  start = blockwise8.dequantize_blockwise_reference(
      moments[1][0], jnp.asarray(CODE), moments[1][1], block_size, jnp.float32)
  hyper = jnp.asarray([0.9, 0.999, b3, 5.0, 1e-8, 1.0, 1.0], jnp.float32)

  @jax.jit
  def step(moments, count):
    return update8.update_8bit_reference(
        "ademamix", g, moments, hyper, block_size=block_size,
        stochastic=(False, stochastic, False), step=count)[1]

  for t in range(1, steps + 1):
    moments = step(moments, jnp.int32(t))
  got = blockwise8.dequantize_blockwise_reference(
      moments[1][0], jnp.asarray(CODE), moments[1][1], block_size, jnp.float32)
  exact = b3**steps * start + (1 - b3**steps) * g
  return np.asarray(got), np.asarray(exact)


def test_stochastic_rounding_tracks_a_slow_ema_that_nearest_rounding_freezes():
  got, exact = _slow_ema(stochastic=True)
  frozen, _ = _slow_ema(stochastic=False)
  error = np.mean(np.abs(got - exact))
  assert error < 0.1 * np.mean(np.abs(frozen - exact))  # 0.021 vs 0.34
  assert error < 0.05 * np.mean(np.abs(exact))  # about half a code step


def test_stochastic_rounding_needs_the_step_and_one_flag_per_moment():
  grad = jnp.ones((300,))
  moments = tuple(blockwise8.quantize_blockwise_reference(grad, codebooks.dynamic(s), 256)
                  for s in (True, True, False))
  hyper = jnp.ones((7,), jnp.float32)
  with pytest.raises(ValueError, match="needs the step number"):
    update8.update_8bit_reference("ademamix", grad, moments, hyper,
                                  block_size=256, stochastic=(False, True, False))
  with pytest.raises(ValueError, match="one bool per moment"):
    update8.update_8bit_reference("ademamix", grad, moments, hyper,
                                  block_size=256, stochastic=(True,), step=1)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_stochastic_rounding_flag_must_be_a_bool(value):
  with pytest.raises(TypeError, match="stochastic_rounding must be True or False"):
    lowbit.ademamix_8bit(1e-3, stochastic_rounding=value)
