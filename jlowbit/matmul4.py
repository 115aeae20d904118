r"""Products with a 4-bit weight: fused gemv and ``matmul_4bit``.

For a weight :math:`W \in \mathbb{R}^{N \times K}` (out, in) quantized by
:func:`jlowbit.quantize_4bit`, both ops compute

.. math::
  y = x W^\top, \qquad \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y} W

with float32 accumulation; ``y`` has ``x``'s dtype. The 4-bit weight is
frozen: it receives a zero cotangent.

Dispatch rule of :func:`matmul_4bit` (``M = prod(x.shape[:-1])`` rows):

* ``M == 1`` (batch-1 decoding): the fused gemv kernel, which reads the
  packed weight once and never materializes ``W``;
* ``2 <= M <= SMALL_BATCH_ROWS`` with bfloat16 / float16 ``x`` (batched
  decoding, speculative decoding): the fused small-batch kernel, which
  dequantizes tiles of ``W`` in registers and multiplies them on the tensor
  cores, again reading ``W`` once;
* otherwise (prefill, float32 ``x``): ``W`` is dequantized to ``x.dtype``
  (one kernel) and multiplied by ``jnp.dot`` (float32 products at
  ``Precision.HIGHEST``, i.e. no TF32 for float32 inputs).

A weight in the tiled layout (:func:`jlowbit.tile_4bit`,
``quantize_4bit(..., layout="tiled")``) takes instead, for ``1 <= M <=
TILED_ROWS`` bfloat16 / float16 rows (decoding, batched or not), the
tensor-core kernel of :mod:`jlowbit.triton_kernels.mma4`: 16-row tiles of
``W`` dequantized from a register table straight into ``mma.sync``
operands, 8 or 16 rows of ``x`` per pass over ``W``. On an H200
(``benchmarks/quant.py --sections batch``, ``benchmarks/RESULTS.md``
session 10) 4 or 8 rows cost about what one costs: 25.3 / 26.0 µs at 8192
x 8192 against 57.6 / 58.2 µs for the small-batch kernel on the
bitsandbytes layout and 36.3 / 36.5 µs for XLA's dense bfloat16 product;
16 rows 32.7 µs (dense 39.6); one row 24.4 µs, as fast as the gemv on the
bitsandbytes layout (23.8), which is faster at the smaller shapes of a
Llama-3-8B layer (batch-1 decode: 224 tok/s tiled against 252, session
12; each tiled product also adds XLA launches for its register table and
split-K sum), so the default layout stays ``"bnb"``. Float32
rows and more than ``TILED_ROWS`` rows dequantize a tiled weight (a kernel
that reads the tiled order, :func:`jlowbit.dequantize_4bit`) and use
``jnp.dot``.

With ``impl="xla"`` the single-row case is :func:`gemv_4bit_reference` and
the others dequantize with the jnp reference, for either layout.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jlowbit import _impl
from jlowbit import _validation as val
from jlowbit import quant4

TARGET_PROGRAMS = 512  # below this many row blocks, default configs split K
SMALL_BATCH_ROWS = 16  # the most rows the fused small-batch kernel takes
TILED_ROWS = 16  # the most rows the tensor-core kernel takes (tiled weights)
TILED_TARGET_PROGRAMS = 8192  # default configs split K up to this many programs


def _check_tiles(config, **least: int) -> None:
  """Each named field an int power of two >= its ``least``; ``num_stages``
  (where the config has it) >= 1."""
  if hasattr(config, "num_stages"):
    least = {**least, "num_stages": 1}
  for name, smallest in least.items():
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
      raise TypeError(f"{name}={value!r} must be an int")
    if name == "num_stages":
      if value < 1:
        raise ValueError(f"num_stages={value} must be >= 1")
    elif value < smallest or value & (value - 1):
      bound = f" >= {smallest}" if smallest > 1 else ""
      raise ValueError(f"{name}={value} must be a power of two{bound}")


@dataclasses.dataclass(frozen=True)
class GemvConfig:
  """Tile sizes of the fused 4-bit gemv kernel (importable without Triton).

  Attributes:
    block_n: output rows per program (power of two).
    block_k: input columns per loop step (power of two, >= 32; capped by
      ``in_features / split_k``).
    num_warps: warps per program.
    num_stages: software-pipelining depth of the K loop.
    split_k: independent ranges ``K`` is cut into (power of two); the
      launcher halves it until ``in_features`` is a multiple of
      ``split_k * block_size``. Not used by the general (``in_features %
      block_size != 0``) kernel.
  """
  block_n: int = 4
  block_k: int = 1024
  num_warps: int = 4
  num_stages: int = 1
  split_k: int = 1

  def __post_init__(self):
    _check_tiles(self, block_n=1, block_k=32, num_warps=1, split_k=1)

  @classmethod
  def get_default(cls, out_features: int | None = None,
                  in_features: int | None = None) -> "GemvConfig":
    """Defaults measured on an H200 (``benchmarks/RESULTS.md``, session 7).

    4 rows x 1024 columns per step and 4 warps: one 16-byte chunk (32
    weights) per thread per step; the fastest of the configs tried at
    8192 x 8192 and 28672 x 8192 and within 10% of the best at 4096 x 4096.
    Layers with fewer than ``TARGET_PROGRAMS`` row blocks split K (up to 4
    ways) to occupy every SM; narrow inputs shrink ``block_k``.
    """
    block_k, split_k = 1024, 1
    if out_features is not None and in_features is not None:
      while (split_k < 4 and -(-out_features // 4) * split_k < TARGET_PROGRAMS
             and in_features >= 2 * split_k * block_k):
        split_k *= 2
    if in_features is not None:
      next_power_of_2 = 1 << max(in_features - 1, 0).bit_length()
      block_k = max(32, min(block_k, next_power_of_2))
    return cls(block_k=block_k, split_k=split_k)


@dataclasses.dataclass(frozen=True)
class SmallBatchConfig:
  """Tile sizes of the fused small-batch (2-16 rows) 4-bit product.

  Attributes:
    block_m: rows of ``x`` per program (power of two, >= 16: ``tl.dot``).
    block_n: output features per program (power of two, >= 16).
    block_k: input columns per loop step (power of two, >= 32; capped by
      ``in_features / split_k``).
    num_warps: warps per program.
    num_stages: software-pipelining depth of the K loop.
    split_k: independent ranges ``K`` is cut into (power of two, float32
      partial products added after the kernel); the launcher halves it
      until ``in_features`` is a multiple of ``split_k * block_size``.
  """
  block_m: int = 16
  block_n: int = 64
  block_k: int = 128
  num_warps: int = 4
  num_stages: int = 1
  split_k: int = 1

  def __post_init__(self):
    _check_tiles(self, block_m=16, block_n=16, block_k=32, num_warps=1,
                 split_k=1)

  @classmethod
  def get_default(cls, out_features: int | None = None,
                  in_features: int | None = None) -> "SmallBatchConfig":
    """Defaults measured on an H200 (``benchmarks/RESULTS.md``, session 8).

    64 features x 128 columns per step, 4 warps, K split 4 ways: the
    fastest of 9 configs at 8192 x 8192 and 28672 x 8192 and within 6% of
    the best at 4096 x 4096 and 11008 x 4096, at 4 and 16 rows. Without
    the split a layer of a few thousand features runs a program per SM or
    fewer (``ncu``: 6% occupancy), 1.2-2.1x slower. Narrow inputs split
    less (each range keeps at least two steps).
    """
    split_k = 1
    if in_features is not None:
      while split_k < 4 and in_features >= 4 * split_k * cls.block_k:
        split_k *= 2
    return cls(split_k=split_k)


@dataclasses.dataclass(frozen=True)
class TiledConfig:
  """Launch parameters of the tensor-core kernel for tiled weights (1-16 rows).

  Attributes:
    block_m: rows of ``x`` per program when there are more than 8: 16 (two
      mma column groups sharing each tile's lookups: ``W`` is read once) or
      8 (two programs per tile; ``W`` read twice, the second time mostly
      from L2). Up to 8 rows always take 8.
    num_warps: warps per program, each owning a 16-row tile of ``W``
      (power of two; halved until it divides ``out_features / 16``).
    split_k: independent ranges ``K`` is cut into (power of two, float32
      partial products added after the kernel; halved until each range
      holds a whole number of ``unroll`` 64-column blocks).
    unroll: 64-column blocks per loop step, their loads issued together
      (power of two; halved until it divides ``in_features / 64``).
    num_stages: software-pipelining depth of the K loop (3, Triton's
      default, as measured).
  """
  block_m: int = 16
  num_warps: int = 1
  split_k: int = 8
  unroll: int = 2
  num_stages: int = 3

  def __post_init__(self):
    _check_tiles(self, block_m=8, num_warps=1, split_k=1, unroll=1)
    if self.block_m > 16:
      raise ValueError(f"block_m={self.block_m} must be 8 or 16")

  @classmethod
  def get_default(cls, out_features: int | None = None) -> "TiledConfig":
    """Defaults measured on an H200 (``benchmarks/RESULTS.md``, session 9).

    One warp per program and 2 blocks per step, the fastest for 4 and 8
    rows at 8192 x 8192 and 28672 x 8192; K is split (up to 16 ways) until
    there are ``TILED_TARGET_PROGRAMS`` programs per 8 rows: 16 ways at
    8192 x 8192 and 4096 x 4096, 8 at 28672 x 8192, the fastest measured.
    """
    split_k = cls.split_k
    if out_features is not None:
      split_k = 1
      while (split_k < 16
             and out_features // 16 * split_k < TILED_TARGET_PROGRAMS):
        split_k *= 2
    return cls(split_k=split_k)


def _dense(x2d: jax.Array, w: jax.Array) -> jax.Array:
  """``x2d @ w.T`` accumulated in float32, returned in ``x2d.dtype``."""
  y = jnp.dot(x2d, w.T, precision=jax.lax.Precision.HIGHEST,
              preferred_element_type=jnp.float32)
  return y.astype(x2d.dtype)


def gemv_4bit_reference(x: jax.Array, w4: quant4.Quantized4bit) -> jax.Array:
  """Dense reference: ``dequantize_4bit(w4)`` (float32) and ``jnp.dot``.

  Args:
    x: ``[..., K]``.
    w4: quantized ``[N, K]`` weight.

  Returns:
    ``[..., N]`` in ``x.dtype``.
  """
  w = quant4.dequantize_4bit(w4, jnp.float32, impl="xla")
  y = jnp.dot(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)


def _kernels():
  from jlowbit.triton_kernels import gemv4  # pylint: disable=g-import-not-at-top
  return gemv4


def _tiled_kernels():
  from jlowbit.triton_kernels import mma4  # pylint: disable=g-import-not-at-top
  return mma4


def _statistics(w4: quant4.Quantized4bit):
  """The kernels' absmax operand and nested statistics (or ``None``)."""
  if not w4.nested:
    return w4.absmax, None
  stats = w4.absmax
  return (stats.codes.reshape(-1),
          (stats.code, stats.absmax, w4.offset, stats.block_size))


def _uses_small_batch(x2d, w4) -> bool:
  m, k = x2d.shape
  return (2 <= m <= SMALL_BATCH_ROWS and k % w4.block_size == 0
          and x2d.dtype in (jnp.bfloat16, jnp.float16))


def _uses_tiled(x2d) -> bool:
  return (1 <= x2d.shape[0] <= TILED_ROWS
          and x2d.dtype in (jnp.bfloat16, jnp.float16))


def _forward(x2d, w4, impl, config):
  """``x2d`` ``[M, K]`` times ``w4`` ``[N, K]``^T: ``[M, N]`` in x's dtype."""
  (m, k), n = x2d.shape, w4.shape[0]
  if m == 0 or n == 0 or k == 0:
    return jnp.zeros((m, n), x2d.dtype)
  if m == 1 and impl == "xla":
    return gemv_4bit_reference(x2d, w4)
  absmax, nested = _statistics(w4)
  if w4.layout == "tiled" and impl != "xla" and _uses_tiled(x2d):
    if not isinstance(config, TiledConfig):
      config = TiledConfig.get_default(n)
    return _tiled_kernels().matmul_4bit_tiled(
        x2d, w4.packed, w4.quant_map, absmax, nested, n, w4.block_size, impl,
        block_m=config.block_m, num_warps=config.num_warps,
        num_stages=config.num_stages, split_k=config.split_k,
        unroll=config.unroll)
  if w4.layout == "tiled":  # float32 rows, more than TILED_ROWS rows, xla
    return _dense(x2d, quant4.dequantize_4bit(w4, x2d.dtype, impl=impl))
  if m == 1:
    if not isinstance(config, GemvConfig):
      config = GemvConfig.get_default(n, k)
    y = _kernels().gemv_4bit(
        x2d[0], w4.packed, w4.quant_map, absmax, nested, n, w4.block_size,
        impl, block_n=config.block_n, block_k=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
        split_k=config.split_k)
    return y[None, :]
  if impl != "xla" and _uses_small_batch(x2d, w4):
    if not isinstance(config, SmallBatchConfig):
      config = SmallBatchConfig.get_default(n, k)
    return _kernels().matmul_4bit_small(
        x2d, w4.packed, w4.quant_map, absmax, nested, n, w4.block_size, impl,
        block_m=config.block_m, block_n=config.block_n,
        block_k=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages, split_k=config.split_k)
  return _dense(x2d, quant4.dequantize_4bit(w4, x2d.dtype, impl=impl))


def _zero_cotangent(leaf):
  if jnp.issubdtype(leaf.dtype, jnp.floating):
    return jnp.zeros_like(leaf)
  return np.zeros(leaf.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x2d, w4, impl, config):
  return _forward(x2d, w4, impl, config)


def _matmul_fwd(x2d, w4, impl, config):
  return _forward(x2d, w4, impl, config), w4


def _matmul_bwd(impl, config, w4, grad_y):
  del config
  m, n = grad_y.shape
  k = w4.shape[1]
  if m == 0 or n == 0 or k == 0:
    grad_x = jnp.zeros((m, k), grad_y.dtype)
  else:
    w = quant4.dequantize_4bit(w4, grad_y.dtype, impl=impl)
    grad_x = _dense(grad_y, w.T)
  return grad_x, jax.tree.map(_zero_cotangent, w4)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _check_weight(w4) -> None:
  quant4.check_quantized(w4)
  if len(w4.shape) != 2:
    raise ValueError(f"w4.shape={w4.shape} must be 2-D [out_features, "
                     "in_features] (quantize the weight matrix, not a vector)")


def matmul_4bit(x: jax.Array, w4: quant4.Quantized4bit, *,
                impl: str | None = None,
                config: (GemvConfig | SmallBatchConfig | TiledConfig
                         | None) = None) -> jax.Array:
  """``x @ W^T`` with a 4-bit ``W``; differentiable with respect to ``x``.

  Args:
    x: ``[..., in_features]`` float32, bfloat16 or float16.
    w4: ``W`` ``[out_features, in_features]`` from :func:`jlowbit.quantize_4bit`
      or :func:`jlowbit.from_bnb`, in either layout (:func:`jlowbit.tile_4bit`).
    impl: ``None`` | ``"triton"`` | ``"xla"`` | ``"interpret"``.
    config: tile sizes: a :class:`GemvConfig` applies to one row (the
      gemv kernel), a :class:`SmallBatchConfig` to 2-16 bfloat16 / float16
      rows (the small-batch kernel), a :class:`TiledConfig` to 1-16
      bfloat16 / float16 rows with a tiled weight (the tensor-core kernel);
      the path taken uses its default if ``config`` is another kind.
      Default per shape.

  Returns:
    ``[..., out_features]`` in ``x.dtype``. With a bitsandbytes-layout
    weight one row runs the fused gemv kernel, 2-16 half-precision rows the
    fused small-batch kernel; with a tiled weight 1-16 half-precision rows
    run the tensor-core kernel; more rows dequantize + ``jnp.dot`` (see the
    module docstring).
  """
  x = val.as_float_array(x, "x")
  _check_weight(w4)
  if config is not None and not isinstance(
      config, (GemvConfig, SmallBatchConfig, TiledConfig)):
    raise TypeError(f"config must be a GemvConfig, a SmallBatchConfig, a "
                    f"TiledConfig or None, got {type(config).__name__}")
  if x.ndim == 0 or x.shape[-1] != w4.shape[1]:
    raise ValueError(f"x.shape={tuple(x.shape)} does not match "
                     f"w4.shape={w4.shape}: x must be [..., {w4.shape[1]}]")
  impl = _impl.resolve_impl(impl)
  rows = int(np.prod(x.shape[:-1], dtype=np.int64))
  y = _matmul(x.reshape(rows, w4.shape[1]), w4, impl, config)
  return y.reshape(*x.shape[:-1], w4.shape[0])


def gemv_4bit(x: jax.Array, w4: quant4.Quantized4bit, *,
              impl: str | None = None,
              config: GemvConfig | TiledConfig | None = None) -> jax.Array:
  """Batch-1 product ``x @ W^T`` by the fused 4-bit kernel.

  Args:
    x: ``[in_features]`` or ``[1, in_features]``, float32 / bfloat16 / float16.
    w4: ``W`` ``[out_features, in_features]`` (see :func:`matmul_4bit`); a
      tiled weight runs the tensor-core kernel for bfloat16 / float16 ``x``
      (as fast as the gemv) and dequantizes for float32 ``x``.
    impl: ``None`` | ``"triton"`` | ``"xla"`` | ``"interpret"``.
    config: :class:`GemvConfig` (or :class:`TiledConfig` for a tiled
      weight); default per shape.

  Returns:
    ``[out_features]`` or ``[1, out_features]`` (following ``x``), ``x.dtype``.
  """
  x = val.as_float_array(x, "x")
  _check_weight(w4)
  if x.shape not in ((w4.shape[1],), (1, w4.shape[1])):
    raise ValueError(f"x.shape={tuple(x.shape)} does not match "
                     f"w4.shape={w4.shape}: gemv_4bit takes x of shape "
                     f"({w4.shape[1]},) or (1, {w4.shape[1]}); use matmul_4bit "
                     "for batches")
  return matmul_4bit(x, w4, impl=impl, config=config)
