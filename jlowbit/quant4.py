r"""4-bit (NF4 / FP4) blockwise quantization in the bitsandbytes format.

The row-major flattened tensor is cut into blocks of ``block_size`` elements
(the last may be partial). For block :math:`b`:

.. math::
  a_b = \max_{i \in b} |x_i|, \qquad
  r_i = x_i \cdot \mathrm{fl}(1 / a_b), \qquad
  \hat x_i = \mathrm{quant\_map}_{c_i} \, a_b

exactly as bitsandbytes computes it (so the codes are bitsandbytes' own),
with :math:`\mathrm{fl}(1 / a_b)` the correctly rounded float32 reciprocal
and :math:`r_i` a correctly rounded float32 product. The 4-bit code
:math:`c_i` counts bitsandbytes' decision thresholds :math:`t_k` (the float
literals of its ``dQuantizeNF4`` / ``dQuantizeFP4``, about the midpoints
between neighbouring levels) with :math:`r_i > t_k`:

* NF4: the count over the 15 thresholds is the index into the 16 sorted
  levels;
* FP4 (sign-magnitude E2M1): bit 3 set when :math:`r_i < 0` (so a tiny
  negative value encodes as ``0b1000``, "-0"), bits 0-2 the pattern of the
  level picked by the count over the 7 magnitude thresholds of :math:`|r_i|`.

An all-zero block has :math:`1 / a_b = \infty` and :math:`r_i` NaN: code 0
(NF4's -1.0, FP4's +0), which dequantizes to zeros, as in bitsandbytes.
bitsandbytes' CUDA kernels take the reciprocal with the GPU's approximate
``rcp`` (``--use_fast_math``), which is a float32 ulp off the correctly
rounded one for some absmax values; where that ulp moves :math:`r_i` across a
threshold the codes differ (2 of 20,000 elements in
``tests/test_parity_bnb_4bit.py``, block size 64).

Two codes share a byte: element ``2i`` in the high nibble, ``2i + 1`` in the
low nibble; for odd sizes the last low nibble is 0. This is bitsandbytes'
layout, so :mod:`jlowbit.bnb_format` reads and writes HF checkpoints as is.

``compress_statistics=True`` (bitsandbytes "nested" / double quantization)
stores the float32 absmax 8-bit: ``offset = mean(absmax)``, and
``absmax - offset`` is quantized with :func:`jlowbit.quantize_blockwise`
(block size 256, signed dynamic map) into a :class:`jlowbit.Quantized8bit`
held as the weight's ``absmax``; dequantization restores
``absmax = dequantize_blockwise(absmax) + offset``.

``layout="tiled"`` (:func:`tile_4bit`) permutes the packed bytes and the
per-block statistics of a 2-D weight into the order of the tensor-core
small-batch kernel (:mod:`jlowbit._tiling`); :func:`untile_4bit` restores
bitsandbytes' bytes exactly, and :func:`jlowbit.to_bnb` always writes them.

Non-finite input: a block holding NaN gets ``absmax = NaN`` and dequantizes
to NaN; ``±inf`` gives ``absmax = inf`` and non-finite values. Blocks whose
absmax lies outside ``[2**-126, 2**126]`` take bitsandbytes' flushed
reciprocal (:func:`jlowbit._twins.reciprocal`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jlowbit import _formats
from jlowbit import _impl
from jlowbit import _search
from jlowbit import _tiling
from jlowbit import _twins
from jlowbit import _validation as val
from jlowbit import blockwise8
from jlowbit import codebooks


@struct.dataclass
class Quantized4bit:
  """A 4-bit blockwise-quantized array (a pytree; metadata is static).

  Attributes:
    packed: uint8 ``[ceil(size / 2)]``: two codes per byte, element ``2i`` in
      the high nibble.
    absmax: the per-block scales, ``[ceil(size / block_size)]``: a float32
      array, or with compressed statistics their 8-bit quantization (a
      :class:`jlowbit.Quantized8bit` of ``absmax - offset``).
    quant_map: float32 ``[16]``: the value of each 4-bit code (NF4 sorted,
      FP4 in bit-pattern order).
    shape: the original array's shape (static).
    dtype: name of the original dtype, the default for dequantization (static).
    block_size: elements per block (static).
    quant_type: ``"nf4"`` or ``"fp4"`` (static).
    offset: float32 ``[]``, the mean absmax that compressed statistics add
      back; ``None`` for float32 statistics.
    quant_storage: dtype name the packed bytes are viewed as when serialized
      (bitsandbytes' ``quant_storage``; static). The bytes are the same for
      every storage dtype: ``packed`` is always uint8 here.
    layout: ``"bnb"`` (bitsandbytes' row-major order) or ``"tiled"`` (static):
      ``packed`` and the per-block ``absmax`` (float32, or the nested
      statistics' uint8 codes) permuted into the tensor-core kernel's order
      (:mod:`jlowbit._tiling`; shapes unchanged; the nested statistics'
      second level stays in bitsandbytes order). See :func:`tile_4bit`.
  """
  packed: jax.Array
  absmax: jax.Array | blockwise8.Quantized8bit
  quant_map: jax.Array
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  dtype: str = struct.field(pytree_node=False)
  block_size: int = struct.field(pytree_node=False)
  quant_type: str = struct.field(pytree_node=False)
  offset: jax.Array | None = None
  quant_storage: str = struct.field(pytree_node=False, default="uint8")
  layout: str = struct.field(pytree_node=False, default="bnb")

  def __post_init__(self):
    val.check_choice(self.layout, "layout", _tiling.LAYOUTS)
    if self.layout == "tiled":
      error = _tiling.tiling_error(self.shape, self.block_size)
      if error is not None:
        raise ValueError(f"layout='tiled' does not fit this weight: {error}")

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nested(self) -> bool:
    """Whether the statistics are compressed (8-bit ``absmax``)."""
    return isinstance(self.absmax, blockwise8.Quantized8bit)

  @property
  def num_blocks(self) -> int:
    return -(-self.size // self.block_size)


def search_tables(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
  """The threshold tree the quantizer descends and the code of each leaf.

  Returns:
    NF4: (:func:`jlowbit._search.bnb_4bit_tree` float32[16], identity
    int32[16]); FP4: the tree of the 7 magnitude thresholds (float32[8]) and
    the 3-bit pattern of each magnitude (int32[8]).
  """
  tree = _search.bnb_4bit_tree(quant_type)
  if quant_type == "fp4":
    return tree, codebooks.fp4_magnitudes()[1]
  return tree, np.arange(16, dtype=np.int32)


def default_quant_map(quant_type: str) -> np.ndarray:
  """float32 ``[16]`` value of each code: NF4 sorted, FP4 in bit order."""
  return codebooks.fp4() if quant_type == "fp4" else codebooks.nf4()


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """uint8 ``[ceil(n / 2)]`` from int ``[n]`` codes in 0..15 (odd n: low 0)."""
  codes = jnp.pad(codes.astype(jnp.uint8), (0, codes.shape[0] % 2))
  pairs = codes.reshape(-1, 2)
  return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_4bit_reference(x: jax.Array, tree: jax.Array, bits: jax.Array,
                            block_size: int,
                            sign_magnitude: bool) -> tuple[jax.Array, jax.Array]:
  """Pure-jnp quantization of flat ``x``: (packed uint8, absmax float32).

  ``tree`` / ``bits``: see :func:`search_tables`; ``sign_magnitude`` for FP4.
  """
  blocks = _twins.blocked(x, block_size)
  absmax = _twins.block_absmax(blocks)
  inv_scale = _twins.reciprocal(absmax)[:, None]
  codes = _twins.bnb_4bit_index(blocks, inv_scale, tree, bits, sign_magnitude)
  return pack_nibbles(codes.reshape(-1)[:x.size]), absmax


def dequantize_4bit_reference(packed: jax.Array, table: jax.Array,
                              absmax: jax.Array, n: int, block_size: int,
                              dtype) -> jax.Array:
  """Pure-jnp dequantization: ``dtype[n]`` of ``table[code] * absmax``.

  ``table``: float32 ``[16]`` quant map; ``absmax``: float32 ``[blocks]``.
  """
  high, low = _twins.unpack_nibbles(packed)
  codes = jnp.stack([high, low], axis=1).reshape(-1)
  codes = jnp.pad(codes, (0, absmax.shape[0] * block_size - codes.shape[0]))
  values = table[codes.reshape(-1, block_size)] * absmax[:, None]
  return values.reshape(-1)[:n].astype(dtype)


def _kernels():
  from jlowbit.triton_kernels import quant4  # pylint: disable=g-import-not-at-top
  return quant4


@functools.partial(jax.jit, static_argnames=("block_size", "quant_type", "impl"))
def _quantize(x, block_size, quant_type, impl):
  flat = x.reshape(-1)
  if flat.size == 0:
    return jnp.zeros((0,), jnp.uint8), jnp.zeros((0,), jnp.float32)
  tree, bits = (jnp.asarray(t) for t in search_tables(quant_type))
  fp4 = quant_type == "fp4"
  if impl == "xla":
    return quantize_4bit_reference(flat, tree, bits, block_size, fp4)
  return _kernels().quantize_4bit(flat, tree, bits, block_size, fp4, impl)


@jax.jit
def _mean(absmax):
  return jnp.mean(absmax) if absmax.size else jnp.float32(0)


def _nest(absmax: jax.Array, impl: str) -> tuple[blockwise8.Quantized8bit, jax.Array]:
  """Compressed statistics: (the 8-bit ``absmax - offset``, ``offset``).

  The offset comes out of its own jitted step, so that ``absmax - offset``
  is a plain subtraction: fused with the mean, XLA may contract it into a
  fused multiply-add (1 ulp off) in some fusions and not in others. Under an
  enclosing ``jax.jit`` that fusion can happen again; the statistics may
  then differ from the eager ones by an ulp.
  """
  offset = _mean(absmax)
  nested = blockwise8.quantize_blockwise(
      absmax - offset, codebooks.dynamic(True),
      block_size=_formats.NESTED_BLOCK_SIZE, impl=impl)
  return nested, offset


def quantize_4bit(x: jax.Array, *, block_size: int = 64, quant_type: str = "nf4",
                  compress_statistics: bool = False, quant_storage=jnp.uint8,
                  layout: str = "bnb",
                  impl: str | None = None) -> Quantized4bit:
  """Quantizes ``x`` to 4 bits per element (NF4 or FP4), blockwise.

  Args:
    x: float32, bfloat16 or float16 array of any shape (0-d and empty too).
    block_size: elements per block, a power of two in 32..4096.
    quant_type: ``"nf4"`` (NormalFloat4) or ``"fp4"``.
    compress_statistics: quantize the absmax to 8 bits (nested statistics).
    quant_storage: uint8, int8, bfloat16, float16 or float32: the dtype
      :func:`jlowbit.to_bnb` views the packed bytes as (bitsandbytes'
      ``quant_storage``); ``packed`` itself is always uint8.
    layout: ``"bnb"`` (bitsandbytes' byte order) or ``"tiled"`` (the order
      of the tensor-core small-batch kernel, :func:`tile_4bit`; 2-D ``x``
      with ``shape[0] % 16 == 0``, ``shape[1] % 64 == 0`` and a
      ``block_size`` multiple of 64 dividing ``shape[1]``).
    impl: ``None`` | ``"triton"`` | ``"xla"`` | ``"interpret"`` (see
      :mod:`jlowbit._impl`).

  Returns:
    A :class:`Quantized4bit` with ``packed`` uint8 ``[ceil(x.size / 2)]``.

  Example:
    >>> import jax.numpy as jnp, jlowbit
    >>> w4 = jlowbit.quantize_4bit(jnp.ones((4, 64)), block_size=64)
    >>> w4.packed.shape, w4.absmax.shape
    ((128,), (4,))
  """
  x = val.as_float_array(x, "x")
  val.check_block_size(block_size, "block_size", _formats.BLOCK_SIZES_4BIT)
  block_size = int(block_size)
  val.check_choice(quant_type, "quant_type", _formats.QUANT_TYPES)
  if not isinstance(compress_statistics, bool):
    raise TypeError(f"compress_statistics={compress_statistics!r} must be a "
                    "bool (True or False)")
  storage = check_quant_storage(quant_storage)
  val.check_choice(layout, "layout", _tiling.LAYOUTS)
  if layout == "tiled":
    error = _tiling.tiling_error(tuple(x.shape), block_size)
    if error is not None:
      raise ValueError(f"layout='tiled' does not fit x: {error}")
  impl = _impl.resolve_impl(impl)
  packed, absmax = _quantize(x, block_size, quant_type, impl)
  offset = None
  if compress_statistics:
    absmax, offset = _nest(absmax, impl)
  w4 = Quantized4bit(
      packed=packed, absmax=absmax,
      quant_map=jnp.asarray(default_quant_map(quant_type)),
      shape=tuple(x.shape), dtype=jnp.dtype(x.dtype).name,
      block_size=block_size, quant_type=quant_type, offset=offset,
      quant_storage=storage)
  return tile_4bit(w4) if layout == "tiled" else w4


def _permute_blocks(w4: Quantized4bit,
                    permute) -> jax.Array | blockwise8.Quantized8bit:
  """``w4.absmax`` with ``permute`` applied to its per-block entries (the
  float32 absmax, or the uint8 codes of nested statistics)."""
  n, k = w4.shape
  if w4.nested:
    return w4.absmax.replace(
        codes=permute(w4.absmax.codes, n, k, w4.block_size))
  return permute(w4.absmax, n, k, w4.block_size)


def tile_4bit(w4: Quantized4bit) -> Quantized4bit:
  r"""``w4`` in the tiled layout of the tensor-core small-batch kernel.

  The packed bytes and per-block statistics are permuted so that a warp of
  the kernel reads each 16-row x 64-column tile of ``W`` as 512 contiguous
  bytes (:mod:`jlowbit._tiling` gives the map); nothing is requantized and
  the shapes do not change. :func:`jlowbit.matmul_4bit` then multiplies 1-16
  bfloat16 / float16 rows on the tensor cores; every other op accepts the
  layout too. :func:`untile_4bit` is the exact inverse.

  Args:
    w4: a 2-D ``[N, K]`` :class:`Quantized4bit` with ``N % 16 == 0``, ``K %
      64 == 0``, ``block_size % 64 == 0`` and ``K % block_size == 0``; one
      already tiled is returned as it is.

  Returns:
    The same weight with ``layout="tiled"``.

  Raises:
    ValueError: the weight's shape or block size does not tile.
  """
  check_quantized(w4)
  if w4.layout == "tiled":
    return w4
  error = _tiling.tiling_error(w4.shape, w4.block_size)
  if error is not None:
    raise ValueError(f"tile_4bit: w4 cannot be tiled: {error}")
  n, k = w4.shape
  return w4.replace(packed=_tiling.tile_packed(w4.packed, n, k),
                    absmax=_permute_blocks(w4, _tiling.tile_blocks),
                    layout="tiled")


def prefer_layout(w4: Quantized4bit, layout: str) -> Quantized4bit:
  """``w4`` in ``layout`` where the weight allows it (the front-ends' policy).

  ``"tiled"`` tiles a weight that :func:`tile_4bit` accepts and leaves any
  other (not 2-D, ``N % 16``, ``K % 64``, a block size that is not a
  multiple of 64 dividing ``K``) in bitsandbytes' layout; ``"bnb"`` untiles.
  """
  val.check_choice(layout, "layout", _tiling.LAYOUTS)
  if layout == "bnb":
    return untile_4bit(w4)
  if _tiling.tiling_error(w4.shape, w4.block_size) is not None:
    return w4
  return tile_4bit(w4)


def untile_4bit(w4: Quantized4bit) -> Quantized4bit:
  """``w4`` in bitsandbytes' layout: the inverse of :func:`tile_4bit`, byte
  for byte (a weight already in that layout is returned as it is)."""
  check_quantized(w4)
  if w4.layout == "bnb":
    return w4
  n, k = w4.shape
  return w4.replace(packed=_tiling.untile_packed(w4.packed, n, k),
                    absmax=_permute_blocks(w4, _tiling.untile_blocks),
                    layout="bnb")


def concatenate_4bit(weights, *, impl: str | None = None) -> Quantized4bit:
  r"""Stacks 2-D 4-bit weights along their rows (output features).

  .. math::
    W = \begin{bmatrix} W_1 \\ W_2 \\ \vdots \end{bmatrix}
    \in \mathbb{R}^{(N_1 + N_2 + \dots) \times K}

  One product with ``W`` then does the work of the separate products with a
  shared input (a transformer layer's query, key and value projections),
  in one kernel launch. The codes and blocks are not touched: every
  ``K`` is a multiple of ``block_size``, so no block spans two rows, and in
  the tiled layout every ``N_i`` is a multiple of 16, so no tile spans two
  weights; the packed bytes and float32 absmax are concatenated, byte for
  byte what :func:`quantize_4bit` of the stacked float weight gives.
  Nested statistics cannot be concatenated (each weight has its own offset
  and second level); they are expanded to float32 (:func:`absmax_float32`,
  the values the kernels decode them to), so the product per output
  feature is unchanged and the result's statistics take 4 bytes per block.

  Args:
    weights: a non-empty sequence of :class:`Quantized4bit` of shapes
      ``[N_i, K]``, all with the same ``K``, ``quant_type``, ``block_size``,
      ``layout``, ``dtype`` and ``quant_storage``, and ``K % block_size ==
      0``.
    impl: for decoding nested statistics.

  Returns:
    The stacked weight ``[sum N_i, K]``, not nested, in the weights' layout.

  Raises:
    ValueError: no weights, or they do not stack (the message says which
      field differs).
  """
  weights = list(weights)
  if not weights:
    raise ValueError("weights must hold at least one Quantized4bit")
  for i, w4 in enumerate(weights):
    check_quantized(w4, f"weights[{i}]")
    if len(w4.shape) != 2:
      raise ValueError(f"weights[{i}].shape={w4.shape} must be 2-D "
                       "[out_features, in_features]")
  first = weights[0]
  for i, w4 in enumerate(weights[1:], 1):
    for field in ("quant_type", "block_size", "layout", "dtype",
                  "quant_storage"):
      if getattr(w4, field) != getattr(first, field):
        raise ValueError(f"weights[{i}].{field}={getattr(w4, field)!r} "
                         f"differs from weights[0].{field}="
                         f"{getattr(first, field)!r}")
    if w4.shape[1] != first.shape[1]:
      raise ValueError(f"weights[{i}].shape={w4.shape} has in_features "
                       f"{w4.shape[1]}, weights[0] {first.shape[1]}")
    if not (isinstance(w4.quant_map, jax.core.Tracer)
            or isinstance(first.quant_map, jax.core.Tracer)
            or np.array_equal(np.asarray(w4.quant_map),
                              np.asarray(first.quant_map))):
      raise ValueError(f"weights[{i}].quant_map differs from weights[0]'s")
  k = first.shape[1]
  if k % first.block_size:
    raise ValueError(f"in_features={k} must be a multiple of block_size="
                     f"{first.block_size}: a block would span two rows")
  absmax = jnp.concatenate([absmax_float32(w4, impl=impl) for w4 in weights])
  return Quantized4bit(
      packed=jnp.concatenate([w4.packed for w4 in weights]), absmax=absmax,
      quant_map=first.quant_map,
      shape=(sum(w4.shape[0] for w4 in weights), k), dtype=first.dtype,
      block_size=first.block_size, quant_type=first.quant_type,
      quant_storage=first.quant_storage, layout=first.layout)


def check_quant_storage(quant_storage) -> str:
  """The dtype name of ``quant_storage`` if it is an allowed storage dtype."""
  try:
    name = jnp.dtype(quant_storage).name
  except TypeError as e:
    raise TypeError(f"quant_storage={quant_storage!r} is not a dtype; allowed: "
                    f"{', '.join(_formats.QUANT_STORAGES)}") from e
  if name not in _formats.QUANT_STORAGES:
    raise TypeError(f"quant_storage={name} is not supported; allowed: "
                    f"{', '.join(_formats.QUANT_STORAGES)}")
  return name


def check_quantized(w4, name: str = "w4") -> None:
  """Raises unless ``w4`` is a consistent :class:`Quantized4bit`."""
  if not isinstance(w4, Quantized4bit):
    raise TypeError(f"{name} must be a Quantized4bit (from quantize_4bit or "
                    f"from_bnb), got {type(w4).__name__}")
  if w4.nested:
    absmax = w4.absmax
    blocks = -(-w4.num_blocks // absmax.block_size)
    expected = {"packed": (-(-w4.size // 2),), "absmax.codes": (w4.num_blocks,),
                "absmax.absmax": (blocks,), "absmax.code": (256,),
                "quant_map": (16,), "offset": ()}
    fields = {"packed": w4.packed, "absmax.codes": absmax.codes,
              "absmax.absmax": absmax.absmax, "absmax.code": absmax.code,
              "quant_map": w4.quant_map, "offset": w4.offset}
  else:
    expected = {"packed": (-(-w4.size // 2),), "absmax": (w4.num_blocks,),
                "quant_map": (16,)}
    fields = {"packed": w4.packed, "absmax": w4.absmax,
              "quant_map": w4.quant_map}
  for field, shape in expected.items():
    got = fields[field]
    if got is None or tuple(got.shape) != shape:
      got_shape = None if got is None else tuple(got.shape)
      raise ValueError(f"{name}.{field}.shape={got_shape} does not match "
                       f"{name}.shape={w4.shape}, block_size={w4.block_size}: "
                       f"expected {shape}")


def absmax_float32(w4: Quantized4bit, *, impl: str | None = None) -> jax.Array:
  """float32 ``[blocks]`` absmax of ``w4`` in its layout's block order,
  dequantizing compressed statistics.

  Compressed: ``dequantize_blockwise(w4.absmax) + w4.offset`` (float32 add,
  as bitsandbytes does), on the bitsandbytes order of the codes.
  """
  if not w4.nested:
    return w4.absmax
  if w4.layout == "tiled":
    n, k = w4.shape
    return _tiling.tile_blocks(absmax_float32(untile_4bit(w4), impl=impl), n,
                               k, w4.block_size)
  return blockwise8.dequantize_blockwise(w4.absmax, jnp.float32,
                                         impl=impl) + w4.offset


@functools.partial(jax.jit, static_argnames=("shape", "block_size", "dtype",
                                             "layout", "impl"))
def _dequantize(packed, table, absmax, shape, block_size, dtype, layout, impl):
  n = int(np.prod(shape, dtype=np.int64))
  if n == 0:
    return jnp.zeros((0,), dtype)
  if layout == "tiled" and impl != "xla":
    return _kernels().dequantize_4bit_tiled(packed, table, absmax, shape,
                                            block_size, dtype, impl)
  if layout == "tiled":  # XLA fuses the permutation into the reference
    packed = _tiling.untile_packed(packed, *shape)
    absmax = _tiling.untile_blocks(absmax, *shape, block_size)
  if impl == "xla":
    return dequantize_4bit_reference(packed, table, absmax, n, block_size, dtype)
  return _kernels().dequantize_4bit(packed, table, absmax, n, block_size, dtype,
                                    impl)


def dequantize_4bit(w4: Quantized4bit, dtype=None, *,
                    impl: str | None = None) -> jax.Array:
  """Reconstructs ``quant_map[code] * absmax`` in ``dtype`` (default ``w4.dtype``).

  Args:
    w4: the result of :func:`quantize_4bit` or :func:`jlowbit.from_bnb`,
      in either layout (a tiled weight is read by a kernel of its own, no
      untiled copy; under ``impl="xla"`` the permutation is fused into the
      reference).
    dtype: float32, bfloat16 or float16; default the quantized array's dtype.
    impl: see :func:`quantize_4bit`.

  Returns:
    An array of ``w4.shape`` and ``dtype``.
  """
  check_quantized(w4)
  dtype = val.check_float_dtype(w4.dtype if dtype is None else dtype, "dtype")
  impl = _impl.resolve_impl(impl)
  absmax = absmax_float32(w4, impl=impl)
  flat = _dequantize(w4.packed, w4.quant_map, absmax, w4.shape, w4.block_size,
                     dtype, w4.layout, impl)
  return flat.reshape(w4.shape)
