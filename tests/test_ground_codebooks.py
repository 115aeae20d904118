"""Codebooks are bit-identical to bitsandbytes 0.50.2.

``tests/data/bnb_codebooks.json`` holds bitsandbytes' own values
(``create_dynamic_map(signed=True/False)``, ``get_4bit_type("nf4"/"fp4")``
of bitsandbytes 0.50.2, as float32), kept with the tests so that every
clone runs this comparison.
"""

import json
import pathlib

import numpy as np
import pytest

from jlowbit import codebooks

REFERENCE = pathlib.Path(__file__).parent / "data" / "bnb_codebooks.json"


def _expected():
  return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("name, values", [
    ("dynamic_signed", lambda: codebooks.dynamic(True)),
    ("dynamic_unsigned", lambda: codebooks.dynamic(False)),
    ("nf4", codebooks.nf4),
    ("fp4", codebooks.fp4),
])
def test_identical_to_bitsandbytes(name, values):
  got = values()
  want = np.asarray(_expected()[name], np.float32)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_construction(signed):
  built = codebooks.create_dynamic_map(signed)
  shipped = codebooks.dynamic(signed)
  assert np.all(np.diff(shipped) > 0)
  assert shipped[0] == (-shipped[-2] if signed else 0.0) or signed
  assert shipped[-1] == 1.0 and 0.0 in shipped
  ulps = np.abs(built.view(np.int32).astype(np.int64) - shipped.view(np.int32))
  assert ulps.max() <= 4


def test_properties():
  assert codebooks.dynamic(True).shape == (256,)
  assert codebooks.nf4().shape == (16,) and np.all(np.diff(codebooks.nf4()) > 0)
  assert codebooks.nf4()[7] == 0.0 and codebooks.nf4()[[0, -1]].tolist() == [-1, 1]
  fp4 = codebooks.fp4()
  np.testing.assert_array_equal(fp4[8:], -fp4[:8])
  values, bits = codebooks.fp4_magnitudes()
  assert np.all(np.diff(values) > 0) and np.all(fp4[bits] == values)
  with pytest.raises(ValueError):
    codebooks.dynamic(True)[0] = 1.0
