"""Model definitions built on jlowbit's layers: a Hugging Face-compatible Llama.

``from jlowbit.models import Llama, generate``; see :mod:`jlowbit.models.llama`.
"""

from jlowbit.models.llama import (
    KVCache,
    Llama,
    Llama3RopeScaling,
    LlamaConfig,
    fuse_projections,
    generate,
)
