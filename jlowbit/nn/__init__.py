"""Flax NNX layers with 4-bit weights: ``Linear4bit``, QLoRA, model conversion.

``from jlowbit import nn``; see :mod:`jlowbit.nn.linear4bit`.
"""

from jlowbit.nn.convert import (
    HEAD_NAMES,
    default_filter,
    memory_report,
    quantize_model,
)
from jlowbit.nn.linear4bit import (
    Linear4bit,
    LoRALinear4bit,
    QuantizedWeight,
)
