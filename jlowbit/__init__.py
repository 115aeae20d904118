"""jlowbit: low-bit (8-bit / 4-bit) training and inference for JAX.

``import jlowbit as lowbit``. Every kernel-backed op takes
``impl=None | "triton" | "xla" | "interpret"`` (see :mod:`jlowbit._impl`).
"""

from jlowbit import algorithms
from jlowbit import codebooks
from jlowbit._impl import IMPLS, resolve_impl
from jlowbit.blockwise8 import (
    Quantized8bit,
    dequantize_blockwise,
    quantize_blockwise,
)
from jlowbit.bnb_format import from_bnb, to_bnb
from jlowbit.checkpoints import (
    bnb_quantization_config,
    load_bnb_checkpoint,
    save_bnb_checkpoint,
)
from jlowbit.matmul4 import (
    GemvConfig,
    SmallBatchConfig,
    TiledConfig,
    gemv_4bit,
    gemv_4bit_reference,
    matmul_4bit,
)
from jlowbit.quant4 import (
    Quantized4bit,
    concatenate_4bit,
    dequantize_4bit,
    quantize_4bit,
    tile_4bit,
    untile_4bit,
)
from jlowbit.update8 import apply_8bit, update_8bit
from jlowbit import nn
from jlowbit.optax_transforms import (
    FLOAT32_STATE,
    STATIC_ARGS,
    PercentileClippingState,
    Quantized8bitMoment,
    ScaleByAdam8bitState,
    ScaleByAdemamix8bitState,
    ScaleByLion8bitState,
    ScaleByMomentum8bitState,
    ScaleByRms8bitState,
    ScaleByRss8bitState,
    adagrad_8bit,
    adagrad_32bit,
    adam_8bit,
    adam_32bit,
    adamw_8bit,
    adamw_32bit,
    ademamix_8bit,
    ademamix_32bit,
    chain,
    lamb_8bit,
    lamb_32bit,
    lars_8bit,
    lars_32bit,
    lion_8bit,
    lion_32bit,
    offload_state,
    percentile_clipping,
    rmsprop_8bit,
    rmsprop_32bit,
    scale_by_adam_8bit,
    scale_by_ademamix_8bit,
    scale_by_lion_8bit,
    scale_by_momentum_8bit,
    scale_by_rms_8bit,
    scale_by_rss_8bit,
    sgd_8bit,
    sgd_32bit,
    state_shardings,
    update_and_apply,
)

__version__ = "0.1.0"
