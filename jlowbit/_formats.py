"""The supported formats: block sizes, 4-bit types and storage dtypes."""

# Elements per absmax block of 8-bit blockwise quantization (and of the
# 8-bit optimizer state).
BLOCK_SIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)
# Elements per absmax block of 4-bit (NF4 / FP4) quantization.
BLOCK_SIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
# Block size of the 8-bit quantized absmax of 4-bit weights (bitsandbytes'
# nested statistics, ``compress_statistics=True``).
NESTED_BLOCK_SIZE = 256
# Dtypes bitsandbytes may view the packed 4-bit bytes as (``quant_storage``).
QUANT_STORAGES = ("uint8", "int8", "bfloat16", "float16", "float32")
