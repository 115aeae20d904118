"""The kernels' bucketed code search finds the decision tree's index.

``emulated_bucket_index`` does in numpy float32 exactly what the kernels'
search does (``jlowbit.triton_kernels.common.bucket_operands``, then
``scaled_bucket_bracket`` and ``counted_codes``); it must equal
``tree_index``, the result of ``jlowbit._twins.scaled_tree_index`` (the
reference's search), for every input, including values one ulp around each scaled threshold, every float
class, and a ``1 / scale`` a few ulps off (the kernels may divide
approximately).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jlowbit import _search
from jlowbit import _twins
from jlowbit import codebooks

CODES = {
    "signed": codebooks.dynamic(True),
    "unsigned": codebooks.dynamic(False),
    "linear": np.linspace(-1, 1, 256, dtype=np.float32),
}


def emulated_bucket_index(x, scale, thresholds, buckets, steps, inv_ulps=0):
  """The kernels' bucketed search; ``1 / scale`` off by ``inv_ulps`` ulps."""
  x, scale = (np.asarray(a, np.float32) for a in (x, scale))
  with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
    infinite = np.isinf(scale)  # bucket_operands
    factor = np.where(scale < np.float32(2.0 ** -64), np.float32(2.0 ** 64), np.float32(1))
    factor = np.where(infinite, np.float32(2.0 ** -126), factor)
    x, scale = x * factor, scale * factor
    inv_scale = np.where(infinite, np.float32(2.0 ** -126), np.float32(1) / scale)
    for _ in range(abs(inv_ulps) if np.isfinite(scale) else 0):
      inv_scale = np.nextafter(inv_scale, np.float32(np.sign(inv_ulps) * np.inf))
    r = x * inv_scale
    index = buckets[r.view(np.uint32) >> _search.BUCKET_KEY_SHIFT].astype(np.int32)
    for _ in range(steps):
      index += (thresholds[index] * scale <= x).astype(np.int32)
  return index


SEARCHES = {"nearest": _search.decision_thresholds, "floor": _search.floor_thresholds}


def tree_index(x, scale, thresholds):
  """What ``scaled_tree_index`` computes, in numpy (no flushing of subnormals,
  as on a GPU; XLA on CPU flushes them): ``count(t * scale <= x)`` after
  :func:`jlowbit._twins.exact_comparison_operands`."""
  x, scale = np.float32(x), np.float32(scale)
  if scale < _twins.TINY_SCALE:
    x, scale = x * np.float32(2.0 ** 64), scale * np.float32(2.0 ** 64)
  with np.errstate(invalid="ignore", over="ignore"):
    return np.sum(thresholds[None, :] * scale <= x[:, None], axis=1)


def test_tree_index_oracle_is_the_reference():
  code = CODES["signed"]
  x = np.random.default_rng(1).uniform(-1, 1, 4096).astype(np.float32)
  for scale in (np.float32(0.5), np.float32(3e-20)):
    want = _twins.scaled_tree_index(jnp.asarray(x * scale), jnp.float32(scale),
                                 jnp.asarray(_search.decision_tree(code)))
    np.testing.assert_array_equal(
        tree_index(x * scale, scale, _search.decision_thresholds(code)), want)
    floor = _twins.scaled_tree_index(jnp.asarray(x * scale), jnp.float32(scale),
                                  jnp.asarray(_search.code_tree(code, floor=True)))
    np.testing.assert_array_equal(
        tree_index(x * scale, scale, _search.floor_thresholds(code)), floor)


def _probes(code, scale):
  thresholds = _search.decision_thresholds(code).astype(np.float32)
  rng = np.random.default_rng(0)
  with np.errstate(over="ignore", invalid="ignore"):
    probes = [np.concatenate([thresholds, code]) * scale]
    for direction in (-np.inf, np.inf):
      for _ in range(2):
        probes.append(np.nextafter(probes[-1], np.float32(direction)))
  magnitude = scale * 10.0 ** rng.uniform(-9, 0.01, 50_000)
  probes += [rng.uniform(-1.01, 1.01, 50_000) * scale,
             magnitude * rng.choice([-1, 1], magnitude.shape),
             np.float32(scale) * np.float32([1, -1, 0.5, 1 - 2**-24, 1 + 2**-23]),
             np.float32([0.0, -0.0, 1e-45, -1e-45, 1e-38, np.inf, -np.inf, np.nan])]
  if np.isinf(scale):  # any finite x: every exponent, a few mantissas, both signs
    bits = ((np.arange(255, dtype=np.uint32)[:, None] << 23)
            | np.uint32([0, 1, 0x400000, 0x7FFFFF, 0x123457])).ravel()
    probes += [bits.view(np.float32), (bits | 0x80000000).view(np.float32)]
  with np.errstate(over="ignore", invalid="ignore"):
    return np.concatenate([np.asarray(p, np.float32).ravel() for p in probes])


@pytest.mark.parametrize("name", sorted(CODES))
@pytest.mark.parametrize("search", sorted(SEARCHES))
def test_one_or_two_comparisons_suffice(name, search):
  *_, steps = _search.bucket_search_table(SEARCHES[search](CODES[name]))
  assert steps == (2 if (name, search) == ("unsigned", "floor") else 1)


@pytest.mark.parametrize("name", sorted(CODES))
@pytest.mark.parametrize("scale", [1.0, 0.37, 3e-3, 2.5e5, 1e-19, 5e-20, 1e-30, 1e-38,
                                   1e-44, 3e38, np.inf])
@pytest.mark.parametrize("inv_ulps", [0, -2, 2])
@pytest.mark.parametrize("search", sorted(SEARCHES))
def test_bucket_index_equals_tree_index(name, scale, inv_ulps, search):
  code = CODES[name]
  thresholds, buckets, steps = _search.bucket_search_table(SEARCHES[search](code))
  scale = np.float32(scale)
  x = _probes(code, scale)
  if np.isfinite(scale):  # +-inf lie in blocks of scale inf only
    x = x[np.isfinite(x) | np.isnan(x)]
  got = emulated_bucket_index(x, scale, thresholds, buckets, steps, inv_ulps)
  np.testing.assert_array_equal(got, tree_index(x, scale, SEARCHES[search](code)))


def test_table_layout():
  thresholds, buckets, _ = _search.bucket_search_table(
      _search.decision_thresholds(CODES["signed"]))
  assert thresholds.dtype == np.float32 and thresholds.shape == (256,)
  assert np.isnan(thresholds[-1])
  np.testing.assert_array_equal(thresholds[:-1], _search.decision_thresholds(CODES["signed"]))
  assert buckets.dtype == np.uint8 and buckets.shape == (_search.BUCKET_KEYS,)
  key = lambda v: int(np.float32(v).view(np.uint32) >> _search.BUCKET_KEY_SHIFT)
  zero = int(np.flatnonzero(CODES["signed"] == 0)[0])
  assert buckets[key(0.0)] == buckets[key(-0.0)] == buckets[key(-np.inf)] == zero
  assert thresholds[zero] > 0  # -inf's comparisons fail
  # +inf: one comparison (steps) below its count, 255
  assert buckets[key(1.0)] >= 254 and buckets[key(np.inf)] == 254
  assert buckets[key(np.nan)] == buckets[key(-np.nan)] == buckets[key(-1.0)] == 0


@pytest.mark.parametrize("thresholds, steps", [
    ([-0.5, 0.0, 0.25, 0.25 * (1 + 2**-20), 0.75], 2),
    ([-0.5, -0.25 * (1 + 2**-20), -0.25, 0.0], 2),
    ([-0.5, 0.0, 0.5, 0.5 * (1 + 2**-20)], 0),
], ids=["zero-inside", "zero-last", "zero-below-inf"])
def test_infinities_with_a_zero_threshold(thresholds, steps):
  """+-inf (blocks of scale inf) with an exact-zero threshold and several
  comparisons per search: +inf passes all but the zero threshold."""
  thresholds = np.float32(thresholds)
  padded, buckets, got_steps = _search.bucket_search_table(thresholds)
  assert got_steps == steps
  if steps:
    near = np.concatenate([thresholds, np.nextafter(thresholds, np.float32(-2)),
                           np.float32([0.0, -0.0, 1.0, -1.0, np.nan])])
    for scale, extra in ((1, []), (np.inf, [3e38, -3e38, np.inf, -np.inf])):
      x, scale = np.concatenate([near, np.float32(extra)]), np.float32(scale)
      np.testing.assert_array_equal(
          emulated_bucket_index(x, scale, padded, buckets, steps),
          tree_index(x, scale, thresholds))


def test_bucket_table_refuses_more_than_8_bit_codes():
  """A start is one byte: 256 thresholds (a 9-bit codebook) would wrap."""
  with pytest.raises(ValueError, match="at most 255"):
    _search.bucket_search_table(np.linspace(-1, 1, 256, dtype=np.float32))
