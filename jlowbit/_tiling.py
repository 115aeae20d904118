r"""The tiled order of a 4-bit weight: bitsandbytes' bytes, permuted.

A 4-bit weight :math:`W \in \mathbb{R}^{N \times K}` is stored by
bitsandbytes row-major: row :math:`r` is ``K / 8`` int32 words (8 codes
each), one absmax per ``block_size`` elements. The tensor-core kernel of
:mod:`jlowbit.triton_kernels.mma4` lets one warp multiply a 16-row tile of
``W`` by ``mma.m16n8k16``; lane :math:`l = 4 g + t` (:math:`g < 8`,
:math:`t < 4`) of the warp needs, per 64-column block :math:`b`, the words
:math:`t` and :math:`4 + t` of the block (columns :math:`8 t .. 8 t + 7`
and :math:`32 + 8 t ..`) of rows :math:`g` and :math:`g + 8` of its tile.
The tiled order stores exactly those 16 bytes together, lane after lane, so
that a warp reads 512 contiguous bytes per block:

.. math::
  \text{word}(r, 8 b + 4 j + t) \text{ of row-major } W
  \;\mapsto\; \text{word } \big((\lfloor r/16 \rfloor \cdot K/64 + b) \cdot 8
  + g\big) \cdot 16 + 4 t + 2 h + j,
  \qquad r = 16 \lfloor r/16 \rfloor + 8 h + g.

Per-block statistics (float32 absmax, or the uint8 codes of nested
statistics) are tiled ``[N / 16, K / block_size, 16]``: the 16 rows of a
tile next to each other for every block. Nothing else moves: the nested
statistics' second level (one float32 per 256 absmax codes) stays in the
bitsandbytes order of the codes, and the kernel reads it by the block's
row-major index. Both permutations are pure reshapes and transposes, so
the round trip is byte-exact.

Tiling needs a 2-D ``[N, K]`` weight with ``N % 16 == 0``, ``K % 64 == 0``,
``block_size % 64 == 0`` and ``K % block_size == 0`` (a 64-column block
never spans two absmax blocks).
"""

import jax

LAYOUTS = ("bnb", "tiled")
TILE_ROWS = 16  # rows of W per warp (the mma's M)
TILE_COLUMNS = 64  # columns of W per lane step: 4 mma K-steps of 16


def tiling_error(shape: tuple[int, ...], block_size: int) -> str | None:
  """Why a weight of ``shape`` and ``block_size`` cannot be tiled (or None)."""
  if len(shape) != 2:
    return f"shape={tuple(shape)} must be 2-D [out_features, in_features]"
  n, k = shape
  if n % TILE_ROWS or k % TILE_COLUMNS or n == 0 or k == 0:
    return (f"shape={tuple(shape)} must have out_features a positive multiple "
            f"of {TILE_ROWS} and in_features a positive multiple of "
            f"{TILE_COLUMNS}")
  if block_size % TILE_COLUMNS or k % block_size:
    return (f"block_size={block_size} must be a multiple of {TILE_COLUMNS} "
            f"that divides in_features={k}")
  return None


def tile_packed(packed: jax.Array, n: int, k: int) -> jax.Array:
  """uint8 ``[N K / 2]`` row-major bytes -> the tiled order (same shape)."""
  # Axes: tile, h, g, b, j, t, byte -> tile, b, g, t, h, j, byte.
  bytes_ = packed.reshape(n // 16, 2, 8, k // 64, 2, 4, 4)
  return bytes_.transpose(0, 3, 2, 5, 1, 4, 6).reshape(-1)


def untile_packed(packed: jax.Array, n: int, k: int) -> jax.Array:
  """The inverse of :func:`tile_packed`."""
  # Axes: tile, b, g, t, h, j, byte -> tile, h, g, b, j, t, byte.
  bytes_ = packed.reshape(n // 16, k // 64, 8, 4, 2, 2, 4)
  return bytes_.transpose(0, 4, 2, 1, 5, 3, 6).reshape(-1)


def tile_blocks(values: jax.Array, n: int, k: int,
                block_size: int) -> jax.Array:
  """Per-block values ``[N K / block_size]``, row-major -> flat ``[N / 16,
  K / block_size, 16]``."""
  blocks = values.reshape(n // 16, 16, k // block_size)
  return blocks.transpose(0, 2, 1).reshape(-1)


def untile_blocks(values: jax.Array, n: int, k: int,
                  block_size: int) -> jax.Array:
  """The inverse of :func:`tile_blocks`."""
  blocks = values.reshape(n // 16, k // block_size, 16)
  return blocks.transpose(0, 2, 1).reshape(-1)

