"""jlowbit: low-bit (8-bit / 4-bit) training and inference for JAX.

``import jlowbit as lowbit``. Every kernel-backed op takes
``impl=None | "triton" | "xla" | "interpret"`` (see :mod:`jlowbit._impl`).
"""

from jlowbit import codebooks
from jlowbit._impl import IMPLS, resolve_impl
from jlowbit.blockwise8 import (
    Quantized8bit,
    dequantize_blockwise,
    quantize_blockwise,
)

__version__ = "0.1.0"
