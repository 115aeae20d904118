r"""Quantization codebooks (exact float32 values of bitsandbytes 0.50.2).

* :func:`dynamic` -- the 256-entry dynamic-tree map of Dettmers (2016),
  ``create_dynamic_map``: per decade :math:`10^{-6} \dots 10^0`, the midpoints
  of a float32 ``linspace(0.1, 1, k)`` with ``k`` growing with the decade, plus
  0 and 1 (and the negatives when ``signed``), sorted. Used for first moments,
  momentum and general tensors (signed) and second moments (unsigned).
* :func:`nf4` -- the 16 NormalFloat4 levels of QLoRA (Dettmers et al., 2023),
  sorted.
* :func:`fp4` -- the 16 bitsandbytes FP4 (E2M1) levels in bit-pattern order:
  index ``sign << 3 | magnitude_bits``, normalised so the maximum is 1.

The values ship with the package (``codebooks.json``) so that every backend
and every machine uses bit-identical codes; :func:`create_dynamic_map` shows
how the dynamic map is built (it agrees with the shipped values to a few ulp,
the difference being float32 rounding inside ``torch.linspace``).

References:
  Dettmers, `8-Bit Approximations for Parallelism in Deep Learning
  <https://arxiv.org/abs/1511.04561>`_, 2016.
  Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
  <https://arxiv.org/abs/2305.14314>`_, 2023.
"""

import functools
import json
import pathlib

import numpy as np

_DATA = pathlib.Path(__file__).with_name("codebooks.json")


@functools.cache
def _table(name: str) -> np.ndarray:
  values = np.asarray(json.loads(_DATA.read_text())[name], dtype=np.float32)
  values.setflags(write=False)
  return values


def dynamic(signed: bool = True) -> np.ndarray:
  """The 256-entry dynamic map, sorted; ``signed`` covers [-1, 1], else [0, 1].

  Returns:
    A read-only ``float32[256]`` numpy array.
  """
  return _table("dynamic_signed" if signed else "dynamic_unsigned")


def nf4() -> np.ndarray:
  """The 16 NF4 levels, sorted, in [-1, 1]. Returns a read-only ``float32[16]``."""
  return _table("nf4")


def fp4() -> np.ndarray:
  """The 16 FP4 levels in bit-pattern order. Returns a read-only ``float32[16]``."""
  return _table("fp4")


def fp4_magnitudes() -> tuple[np.ndarray, np.ndarray]:
  """The 8 non-negative FP4 levels sorted, and their 3-bit patterns.

  Returns:
    ``(values float32[8], bits int32[8])`` with ``fp4()[bits[i]] == values[i]``.
  """
  bits = np.argsort(fp4()[:8], kind="stable").astype(np.int32)
  return fp4()[:8][bits], bits


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> np.ndarray:
  """Builds a dynamic map the way bitsandbytes' ``create_dynamic_map`` does.

  Kept to document the construction; :func:`dynamic` returns the exact shipped
  values, which this reproduces to within a few float32 ulp.
  """
  non_sign_bits = total_bits - 1
  data = []
  for i in range(max_exponent_bits):
    exponent = i + non_sign_bits - max_exponent_bits
    items = 2 ** exponent + 1 if signed else 2 ** (exponent + 1) + 1
    bounds = np.linspace(0.1, 1.0, items, dtype=np.float32)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
    data.extend(scale * means)
    if signed:
      data.extend(-scale * means)
  data.extend([0.0, 1.0])
  data.extend([0.0] * (2 ** total_bits - len(data)))
  return np.sort(np.asarray(data, dtype=np.float32))
