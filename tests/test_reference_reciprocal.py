"""``_twins.reciprocal`` is the correctly rounded float32 ``1 / x`` on every
backend (XLA's own GPU division is not: about 13% of quotients are off by an
ulp on an H200, ``benchmarks/experiments/gpu_reciprocal.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlowbit import _twins

BACKENDS = [pytest.param("default", id="default"),
            pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]


def _expected(a):
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    inverse = np.float32(1) / a
  inverse = np.where(a < np.float32(2.0 ** -126), np.float32(np.inf), inverse)
  return np.where(a > np.float32(2.0 ** 126), np.float32(0), inverse).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reciprocal_is_correctly_rounded(backend):
  del backend  # "gpu" runs the same test where XLA divides on the GPU
  rng = np.random.default_rng(0)
  n = 1 << 20
  a = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-126, 127, n)).astype(np.float32)
  special = np.float32([1, 2, 0.5, 3, 1.5, 2.0 ** -126, 2.0 ** 126, 0, np.inf,
                        1e-40, 2.0 ** 126 * 1.5, np.nextafter(np.float32(1), 2),
                        np.nextafter(np.float32(2), 0), np.finfo(np.float32).max])
  a = np.concatenate([a, special])
  got = np.asarray(jax.jit(_twins.reciprocal)(jnp.asarray(a)))
  np.testing.assert_array_equal(got, _expected(a))
  assert np.isnan(_twins.reciprocal(jnp.float32(np.nan)))


@pytest.mark.parametrize("error", [-3, -1, 1, 3])
def test_mantissa_correction_fixes_a_bad_estimate(monkeypatch, error):
  """The integer correction turns an estimate a few units off into the
  correctly rounded quotient (as XLA's approximate GPU division needs)."""
  exact = _twins._quotient_estimate  # pylint: disable=protected-access
  monkeypatch.setattr(_twins, "_quotient_estimate",
                      lambda target, mantissa: exact(target, mantissa) + error)
  rng = np.random.default_rng(1)
  a = (rng.uniform(1, 2, 4096) * 2.0 ** rng.integers(-20, 20, 4096)).astype(np.float32)
  a = np.concatenate([a, np.float32([1, 2, 1.5, 3])])
  np.testing.assert_array_equal(_twins.reciprocal(jnp.asarray(a)), _expected(a))
