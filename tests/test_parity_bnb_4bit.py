"""4-bit quantization against bitsandbytes' own output (bit for bit).

``tests/data/bnb_4bit.npz`` holds inputs and what bitsandbytes 0.50.2's
CUDA ``quantize_4bit`` made of them on an H200
(``tests/fixtures/make_bnb_4bit.py``): normal samples, blocks whose values
land exactly on bitsandbytes' decision thresholds (bfloat16 inputs hit
them often), an all-zero block, tiny and large blocks; NF4 and FP4, float32 /
bfloat16 / float16 inputs, block sizes 64 and 128.

bitsandbytes takes ``1 / absmax`` with the GPU's approximate reciprocal
(``--use_fast_math``); jlowbit with the correctly rounded one. Elements
where that one-ulp difference moves ``x / absmax`` across a threshold are
the only ones allowed to differ, and each must be explained so.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ALL_IMPLS

import jlowbit
from jlowbit import _search

DATA = np.load(pathlib.Path(__file__).parent / "data" / "bnb_4bit.npz")
CASES = sorted({"_".join(k.split("_")[:3]) for k in DATA.files if k != "versions"})


def _codes(packed, n):
  return np.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]


def _bnb_code(r, quant_type):
  """bitsandbytes' dQuantizeNF4 / dQuantizeFP4 of a float32 ``r``."""
  literal = lambda texts: np.float32([_search.float32_literal(t) for t in texts])
  if quant_type == "nf4":
    return int(np.sum(r > literal(_search.BNB_NF4_THRESHOLDS)))
  bits = jlowbit.codebooks.fp4_magnitudes()[1]
  magnitude = bits[np.sum(abs(r) > literal(_search.BNB_FP4_THRESHOLDS))]
  return int(magnitude | (8 if r < 0 else 0))


def _explained_by_the_reciprocal(x, block_size, index, want, quant_type):
  """Whether a reciprocal one ulp off the correctly rounded one gives
  bitsandbytes' code for element ``index``."""
  start = index // block_size * block_size
  absmax = np.abs(x[start:start + block_size]).max()
  inverse = np.float32(1) / absmax
  return any(_bnb_code(np.float32(x[index]) * np.nextafter(inverse, towards),
                       quant_type) == want
             for towards in (np.float32(0), np.float32(np.inf)))


def test_fixture_is_from_bitsandbytes_0_50_2():
  assert DATA["versions"][0] == "0.50.2"
  assert len(CASES) == 12


def test_float32_literals_round_like_a_c_compiler():
  # Four NF4 thresholds sit next to a float32 midpoint: rounding through
  # float64 picks the other neighbour.
  text = "0.8614784181118011"
  assert _search.float32_literal(text) != np.float32(float(text))
  assert _search.float32_literal(text) == np.nextafter(
      np.float32(float(text)), np.float32(0))
  assert _search.float32_literal("0.5") == np.float32(0.5)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_codes_are_bitsandbytes_codes(impl, case):
  quant_type, dtype, block_size = case.split("_")
  block_size = int(block_size)
  x = DATA[f"{case}_x"]
  w4 = jlowbit.quantize_4bit(jnp.asarray(x).astype(dtype), block_size=block_size,
                             quant_type=quant_type, impl=impl)
  np.testing.assert_array_equal(w4.absmax, DATA[f"{case}_absmax"])
  got = _codes(np.asarray(w4.packed), x.size)
  want = _codes(DATA[f"{case}_packed"], x.size)
  differ = np.flatnonzero(got != want)
  assert differ.size <= max(2, 1e-4 * x.size), differ
  for i in differ:
    assert _explained_by_the_reciprocal(x, block_size, i, want[i], quant_type), i


@pytest.mark.parametrize("case", CASES)
def test_compressed_statistics_are_bitsandbytes_statistics(case):
  quant_type, dtype, block_size = case.split("_")
  w4 = jlowbit.quantize_4bit(jnp.asarray(DATA[f"{case}_x"]).astype(dtype),
                             block_size=int(block_size), quant_type=quant_type,
                             compress_statistics=True, impl="xla")
  # The offset is a mean: its summation order may move it by an ulp.
  np.testing.assert_allclose(w4.offset, DATA[f"{case}_nested_offset"], rtol=1e-6)
  np.testing.assert_array_equal(w4.absmax.codes, DATA[f"{case}_nested_codes"])
  np.testing.assert_allclose(w4.absmax.absmax, DATA[f"{case}_nested_absmax"],
                             rtol=1e-6)


def test_all_zero_block_takes_code_zero_like_bitsandbytes():
  for quant_type in ("nf4", "fp4"):
    w4 = jlowbit.quantize_4bit(jnp.zeros((64,), jnp.bfloat16),
                               quant_type=quant_type, impl="xla")
    assert not np.asarray(w4.packed).any()
    np.testing.assert_array_equal(jlowbit.dequantize_4bit(w4), np.zeros(64))
