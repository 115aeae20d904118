"""Flax layers with 4-bit weights.

NNX: ``Linear4bit``, ``LinearGeneral4bit``, ``Einsum4bit``, their QLoRA
forms, model conversion (``quantize_model``, ``merge_lora``), an
``Optimizer`` whose 8-bit kernel writes the parameters. linen:
``Dense4bit``, 4-bit params for unchanged ``nn.Dense`` models.

``from jlowbit import nn``; see :mod:`jlowbit.nn.linear4bit` and
:mod:`jlowbit.nn.einsum4bit` (NNX layers), :mod:`jlowbit.nn.convert` (whole
models) and :mod:`jlowbit.nn.linen` (linen).
"""

from jlowbit.nn.convert import (
    HEAD_NAMES,
    default_filter,
    memory_report,
    merge_lora,
    quantize_model,
)
from jlowbit.nn.einsum4bit import (
    Einsum4bit,
    LoRAEinsum4bit,
)
from jlowbit.nn.linear4bit import (
    Linear4bit,
    LinearGeneral4bit,
    LoRALinear4bit,
    LoRALinearGeneral4bit,
    QuantizedWeight,
)
from jlowbit.nn.optimizer import Optimizer
from jlowbit.nn.linen import (
    QUANTIZED,
    Dense4bit,
    apply_quantized,
    default_params_filter,
    dequantize_params,
    quantize_params,
)
