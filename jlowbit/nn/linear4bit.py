r"""Flax NNX linear layers with a frozen 4-bit (NF4 / FP4) weight.

:class:`Linear4bit` is the inference drop-in for ``nnx.Linear``:

.. math::
  y = x W^\top + b, \qquad W \in \mathbb{R}^{N \times K} \text{ (out, in), 4-bit}

Storage is bitsandbytes' layout, ``W`` ``[out_features, in_features]``
row-major, so :func:`jlowbit.to_bnb` / :func:`jlowbit.from_bnb` read and
write the weight byte for byte and :func:`jlowbit.matmul_4bit` applies it
as is. The conversions (``from_linear``, ``from_linear_general``,
:func:`jlowbit.nn.quantize_model`) take ``layout="tiled"`` to store the
weights that fit in the tiled order of :func:`jlowbit.tile_4bit` instead
(the tensor-core kernel for 1-16 bfloat16 / float16 rows: fast decoding on
a GPU); ``to_bnb`` still writes bitsandbytes' bytes. ``nnx.Linear`` keeps
its kernel ``[in_features, out_features]``: :meth:`Linear4bit.from_linear`
transposes it before quantizing.

The 4-bit weight lives in a :class:`QuantizedWeight` variable, which is not
an ``nnx.Param``: ``nnx.state(model, nnx.Param)``, ``nnx.grad`` and
``nnx.Optimizer(..., wrt=nnx.Param)`` skip it. The bias stays a float
``nnx.Param``. :class:`LoRALinear4bit` adds trainable low-rank
``nnx.LoRAParam`` adapters (QLoRA).

:class:`LinearGeneral4bit` does the same for ``nnx.LinearGeneral`` layers
without batch axes that contract the input's trailing axes (attention's
projections): the kernel is flattened to 2-D ``[K, N]`` and stored as
``[N, K]``; :class:`LoRALinearGeneral4bit` is its QLoRA form.
:mod:`jlowbit.nn.einsum4bit` does it for ``nnx.Einsum``.

The LoRA layers' :meth:`~LoRALinear4bit.merge` folds the adapters into the
4-bit weight (requantizing it) and returns the plain 4-bit layer.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.nnx.nn import lora as nnx_lora

from jlowbit import _formats
from jlowbit import _impl
from jlowbit import _tiling
from jlowbit import _validation as val
from jlowbit import matmul4
from jlowbit import quant4

Initializer = Callable[..., jax.Array]
default_kernel_init = initializers.lecun_normal()  # nnx.Linear's defaults
default_bias_init = initializers.zeros_init()


class QuantizedWeight(nnx.Variable[quant4.Quantized4bit]):
  """A variable holding a frozen :class:`jlowbit.Quantized4bit` weight.

  Not an ``nnx.Param``, so parameter filters (``nnx.Param``,
  ``nnx.LoRAParam``) leave it out of gradients and optimizer state. Read it
  with ``variable.get_value()``, replace it with ``variable.set_value(w4)``.
  """


class PresetWeight:
  """A ``kernel_init`` stand-in: the 4-bit layer takes this quantized weight
  as is instead of drawing and quantizing a float kernel (the
  ``from_quantized`` constructors pass one)."""

  def __init__(self, w4: quant4.Quantized4bit):
    self.w4 = w4


def constant_init(value: jax.Array) -> Initializer:
  """An initializer returning ``value`` (checked against the requested shape)."""
  def init(key, shape, dtype):
    del key
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f"initial value of shape {tuple(value.shape)} does not "
                       f"match the requested shape {tuple(shape)}")
    return jnp.asarray(value, dtype)
  return init


def _prod(shape) -> int:
  return int(math.prod(shape))


def _as_shape(features) -> tuple[int, ...]:
  if isinstance(features, int):
    return (int(features),)
  return tuple(int(d) for d in features)


def check_weight(w4: Any, name: str = "w4") -> None:
  """Raises unless ``w4`` is a 2-D ``[out, in]`` :class:`jlowbit.Quantized4bit`."""
  quant4.check_quantized(w4, name)
  if len(w4.shape) != 2:
    raise ValueError(f"{name}.shape={w4.shape} must be 2-D [out_features, "
                     "in_features]")


def check_config(dtype, param_dtype, quant_type, block_size,
                 compress_statistics, impl, layout="bnb") -> None:
  """Raises on a bad layer configuration (shared by the NNX and linen layers)."""
  if dtype is not None:
    val.check_float_dtype(dtype, "dtype")
  val.check_float_dtype(param_dtype, "param_dtype")
  val.check_choice(quant_type, "quant_type", _formats.QUANT_TYPES)
  val.check_block_size(block_size, "block_size", _formats.BLOCK_SIZES_4BIT)
  if not isinstance(compress_statistics, bool):
    raise TypeError(f"compress_statistics={compress_statistics!r} must be a "
                    "bool (True or False)")
  val.check_choice(impl, "impl", (None,) + _impl.IMPLS)
  val.check_choice(layout, "layout", _tiling.LAYOUTS)


def _check_linear(linear: Any) -> None:
  if type(linear) is not nnx.Linear:  # pylint: disable=unidiomatic-typecheck
    if isinstance(linear, nnx.Linear):
      raise TypeError(f"linear must be an nnx.Linear, got its subclass "
                      f"{type(linear).__name__}, whose extra state would be "
                      "lost (merge it into a plain nnx.Linear first)")
    raise TypeError(f"linear must be an nnx.Linear, got "
                    f"{type(linear).__name__}")
  kernel = linear.kernel[...]
  if kernel.ndim != 2:
    raise ValueError(f"linear.kernel.shape={tuple(kernel.shape)} must be 2-D "
                     "[in_features, out_features]")


def compute_dtype(dtype, inputs: jax.Array, weight_dtype,
                  bias: jax.Array | None) -> jnp.dtype:
  """The compute dtype of a 4-bit linear layer.

  ``dtype`` if given, else the promotion of the input's dtype, the weight's
  original dtype and the bias's dtype (an integer result becomes float32),
  as ``nnx.Linear`` and ``flax.linen.Dense`` promote theirs.
  """
  if dtype is not None:
    return jnp.dtype(dtype)
  bias = () if bias is None else (bias,)
  result = jnp.result_type(inputs, weight_dtype, *bias)
  if not jnp.issubdtype(result, jnp.inexact):
    result = jnp.promote_types(jnp.float32, result)
  return jnp.dtype(result)


def linear_4bit(inputs: jax.Array, w4: quant4.Quantized4bit,
                bias: jax.Array | None = None, *, dtype=None,
                impl: str | None = None) -> jax.Array:
  r"""The forward pass of the 4-bit layers (NNX and linen).

  .. math::
    y = \mathrm{matmul\_4bit}(x, W) + b \quad \text{in } d =
    \texttt{compute\_dtype}(\texttt{dtype}, x, W, b)

  Args:
    inputs: :math:`x` ``[..., in_features]``.
    w4: :math:`W` ``[out_features, in_features]``; its original dtype
      (``w4.dtype``) takes part in the promotion.
    bias: :math:`b` float ``[out_features]`` or ``None``.
    dtype: compute dtype, or ``None`` to promote (see :func:`compute_dtype`).
    impl: see :func:`jlowbit.matmul_4bit`.

  Returns:
    ``[..., out_features]`` in the compute dtype.
  """
  dtype = compute_dtype(dtype, inputs, w4.dtype, bias)
  y = matmul4.matmul_4bit(jnp.asarray(inputs, dtype), w4, impl=impl)
  if bias is not None:
    y = y + jnp.asarray(bias).astype(dtype)
  return y


def store_weight(layer: nnx.Module, w4: quant4.Quantized4bit,
                 bias: jax.Array | None, *, dtype, param_dtype,
                 impl: str | None) -> None:
  """Sets what every 4-bit layer holds: the weight (a
  :class:`QuantizedWeight`), the float bias (an ``nnx.Param``, or ``None``)
  and the configuration read back from the weight."""
  layer.kernel = QuantizedWeight(w4)
  layer.bias = nnx.data(None) if bias is None else nnx.Param(bias)
  layer.use_bias = bias is not None
  layer.dtype = None if dtype is None else jnp.dtype(dtype)
  layer.param_dtype = jnp.dtype(param_dtype)
  layer.quant_type = w4.quant_type
  layer.block_size = w4.block_size
  layer.compress_statistics = w4.nested
  layer.impl = impl


class Linear4bit(nnx.Module):
  r"""``nnx.Linear`` with its kernel quantized to 4 bits (inference, QLoRA base).

  .. math::
    y = \mathrm{matmul\_4bit}(x, W) + b \quad \text{computed in } \texttt{dtype}

  Example::

    >>> from flax import nnx
    >>> import jax.numpy as jnp, jlowbit
    >>> layer = jlowbit.nn.Linear4bit(128, 64, rngs=nnx.Rngs(0))
    >>> layer.kernel.get_value().shape  # [out_features, in_features]
    (64, 128)
    >>> layer(jnp.ones((2, 128))).shape
    (2, 64)

  The constructor initializes a float kernel ``[in_features, out_features]``
  exactly as ``nnx.Linear`` does (same keys from ``rngs``, so the same
  values), then quantizes its transpose.

  Args:
    in_features: :math:`K`, the input's last dimension.
    out_features: :math:`N`, the output's last dimension.
    use_bias: whether to add a float bias ``[out_features]`` (an ``nnx.Param``).
    dtype: compute dtype (float32, bfloat16 or float16). ``None``: as
      ``nnx.Linear``, the promotion of the input's dtype, ``param_dtype``
      (the weight's original dtype) and the bias's dtype.
    param_dtype: dtype of the float kernel before quantization (recorded in
      the weight, the default dequantization dtype) and of the bias.
    kernel_init: initializer of the float kernel ``[in_features, out_features]``.
    bias_init: initializer of the bias.
    quant_type: ``"nf4"`` or ``"fp4"``.
    block_size: elements per absmax block, a power of two in 32..4096.
    compress_statistics: quantize the absmax to 8 bits (nested statistics).
    impl: ``None`` | ``"triton"`` | ``"xla"`` | ``"interpret"``, for the
      quantization and every call (``None``: resolved per call).
    rngs: the keys of ``kernel_init`` and ``bias_init``.

  ``nnx.Linear``'s ``precision``, ``dot_general``, ``promote_dtype`` and
  ``preferred_element_type`` have no counterpart: the product always
  accumulates in float32 (:func:`jlowbit.matmul_4bit`); a single input row
  runs the fused 4-bit gemv.

  Attributes:
    kernel: :class:`QuantizedWeight` of ``W`` ``[out_features, in_features]``.
    bias: ``nnx.Param`` ``[out_features]`` in ``param_dtype``, or ``None``.
  """

  def __init__(self, in_features: int, out_features: int, *,
               use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
               kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = default_bias_init,
               quant_type: str = "nf4", block_size: int = 64,
               compress_statistics: bool = False, impl: str | None = None,
               rngs: nnx.Rngs):
    check_config(dtype, param_dtype, quant_type, block_size,
                  compress_statistics, impl)
    kernel_key = rngs.params()
    if isinstance(kernel_init, PresetWeight):
      w4 = kernel_init.w4
    else:
      kernel = kernel_init(kernel_key, (in_features, out_features), param_dtype)
      if kernel.ndim != 2:
        raise ValueError(f"kernel_init returned shape {tuple(kernel.shape)}; "
                         "the kernel must be 2-D [in_features, out_features]")
      w4 = quant4.quantize_4bit(kernel.T, block_size=int(block_size),
                                quant_type=quant_type,
                                compress_statistics=compress_statistics,
                                impl=impl)
    bias = (bias_init(rngs.params(), (out_features,), param_dtype)
            if use_bias else None)
    store_weight(self, w4, bias, dtype=dtype, param_dtype=param_dtype,
                 impl=impl)
    self.in_features = in_features
    self.out_features = out_features

  @classmethod
  def from_quantized(cls, w4: quant4.Quantized4bit, bias: jax.Array | None = None,
                     *, dtype=None, impl: str | None = None,
                     rngs: nnx.Rngs | None = None, **kwargs):
    """A layer around an existing 4-bit weight (e.g. :func:`jlowbit.from_bnb`).

    Args:
      w4: ``W`` ``[out_features, in_features]``, kept as is (same bytes).
      bias: float ``[out_features]`` or ``None`` (no bias); stored in
        ``w4.dtype``.
      dtype: compute dtype (see the class).
      impl: see the class.
      rngs: keys of a subclass's own parameters (e.g. LoRA); default unused.
      **kwargs: a subclass's other constructor arguments.
    """
    check_weight(w4)
    out_features, in_features = w4.shape
    if bias is not None and tuple(jnp.shape(bias)) != (out_features,):
      raise ValueError(f"bias.shape={tuple(jnp.shape(bias))} must be "
                       f"({out_features},) for w4.shape={w4.shape}")
    return cls(in_features, out_features, use_bias=bias is not None,
               dtype=dtype, param_dtype=w4.dtype, kernel_init=PresetWeight(w4),
               bias_init=None if bias is None else constant_init(bias),
               quant_type=w4.quant_type, block_size=w4.block_size,
               compress_statistics=w4.nested, impl=impl,
               rngs=nnx.Rngs(0) if rngs is None else rngs, **kwargs)

  @classmethod
  def from_linear(cls, linear: nnx.Linear, *, quant_type: str = "nf4",
                  block_size: int = 64, compress_statistics: bool = False,
                  layout: str = "bnb", impl: str | None = None, **kwargs):
    """Quantizes ``linear.kernel.T`` (``[out, in]``); the bias stays float.

    The layer keeps ``linear``'s ``dtype``; its ``param_dtype`` is the
    kernel's dtype. ``layout``: ``"bnb"``, or ``"tiled"`` for the order of
    :func:`jlowbit.tile_4bit` where the weight fits it (``out % 16 == 0``,
    ``in % 64 == 0``, ``block_size`` a multiple of 64 dividing ``in``; else
    ``"bnb"``). ``**kwargs`` go to :meth:`from_quantized` (``rngs`` and a
    subclass's arguments).

    Raises:
      TypeError: ``linear`` is not an ``nnx.Linear`` (subclasses such as
        ``nnx.LoRALinear`` included: their extra state would be lost).
      ValueError: its kernel is not 2-D.
    """
    _check_linear(linear)
    check_config(linear.dtype, linear.kernel[...].dtype, quant_type,
                  block_size, compress_statistics, impl, layout)
    w4 = quant4.quantize_4bit(linear.kernel[...].T, block_size=block_size,
                              quant_type=quant_type,
                              compress_statistics=compress_statistics,
                              impl=impl)
    w4 = quant4.prefer_layout(w4, layout)
    bias = linear.bias[...] if linear.bias is not None else None
    return cls.from_quantized(w4, bias, dtype=linear.dtype, impl=impl, **kwargs)

  def compute_dtype(self, inputs: jax.Array) -> jnp.dtype:
    """``dtype``, or ``nnx.Linear``'s promotion of input, weight and bias."""
    bias = None if self.bias is None else self.bias[...]
    return compute_dtype(self.dtype, inputs, self.kernel.get_value().dtype,
                         bias)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """``[..., in_features]`` -> ``[..., out_features]`` in :meth:`compute_dtype`."""
    bias = None if self.bias is None else self.bias[...]
    return linear_4bit(inputs, self.kernel.get_value(), bias, dtype=self.dtype,
                       impl=self.impl)

  def dequantize(self, dtype=None) -> jax.Array:
    """The float kernel in ``nnx.Linear``'s layout ``[in_features, out_features]``.

    ``dtype``: default ``param_dtype``.
    """
    dtype = self.param_dtype if dtype is None else dtype
    return quant4.dequantize_4bit(self.kernel.get_value(), dtype,
                                  impl=self.impl).T

  def to_linear(self) -> nnx.Linear:
    """An ``nnx.Linear`` holding the dequantized kernel and a copy of the bias."""
    bias = self.bias[...] if self.bias is not None else None
    return nnx.Linear(
        self.in_features, self.out_features, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=constant_init(self.dequantize()),
        bias_init=None if bias is None else constant_init(bias),
        rngs=nnx.Rngs(0))


def check_lora_rank(lora_rank: Any) -> None:
  """Raises unless ``lora_rank`` is a positive int."""
  if (isinstance(lora_rank, bool) or not isinstance(lora_rank, int)
      or lora_rank < 1):
    raise ValueError(f"lora_rank={lora_rank!r} must be a positive int")


class LoRAMixin:
  r"""The adapters of a QLoRA layer, mixed in before its 4-bit layer.

  The 4-bit layer applies ``W`` ``[N, K]`` to its input flattened to
  ``[..., K]`` (``in_features`` and ``out_features`` give the unflattened
  trailing shapes); the adapters act on the same flattened input:

  .. math::
    y = \mathrm{layer}(x) + s \, (x A) B, \qquad
    A \in \mathbb{R}^{K \times r}, \; B \in \mathbb{R}^{r \times N}
  """

  def _add_lora(self, lora_rank, lora_scale, lora_dtype, lora_param_dtype,
                a_initializer, b_initializer, lora_param_type, rngs) -> None:
    check_lora_rank(lora_rank)
    self.lora_scale = lora_scale
    self.lora = nnx.LoRA(_prod(_as_shape(self.in_features)), lora_rank,
                         _prod(_as_shape(self.out_features)), dtype=lora_dtype,
                         param_dtype=lora_param_dtype,
                         a_initializer=a_initializer,
                         b_initializer=b_initializer,
                         lora_param_type=lora_param_type, rngs=rngs)

  def __call__(self, inputs: jax.Array, *args, **kwargs) -> jax.Array:
    """The 4-bit layer's output (``*args``, ``**kwargs`` go to it) plus the
    LoRA term, cast to the layer's compute dtype."""
    y = super().__call__(inputs, *args, **kwargs)
    lead = y.shape[:y.ndim - len(_as_shape(self.out_features))]
    delta = self.lora(jnp.reshape(inputs, (*lead, self.lora.in_features)))
    return y + jnp.reshape(delta * self.lora_scale, y.shape).astype(y.dtype)

  def merged_weight(self) -> quant4.Quantized4bit:
    r"""The 4-bit weight with the adapters folded in.

    .. math::
      W' = \mathrm{quantize}\big(\mathrm{dequantize}(W) + s \, (A B)^\top\big)

    computed in float32, cast to ``W``'s original dtype and requantized with
    ``W``'s quant type, block size, nested statistics, storage dtype and
    layout.
    Requantizing loses precision: ``W'`` is within one 4-bit rounding of the
    merged float weight, so the merged layer's output differs from the
    adapted layer's by about the 4-bit quantization error of the sum (as
    PEFT's ``merge_and_unload`` of a bitsandbytes 4-bit model, which
    dequantizes, adds and requantizes the same way). Keep the adapters
    (``nnx.state(model, nnx.LoRAParam)``) to reproduce the trained model
    exactly.

    Returns:
      :class:`jlowbit.Quantized4bit` ``[N, K]``.
    """
    w4 = self.kernel.get_value()
    a = jnp.asarray(self.lora.lora_a[...], jnp.float32)
    b = jnp.asarray(self.lora.lora_b[...], jnp.float32)
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST).T
    w = quant4.dequantize_4bit(w4, jnp.float32, impl=self.impl)
    w = w + jnp.float32(self.lora_scale) * delta
    return quant4.quantize_4bit(w.astype(w4.dtype), block_size=w4.block_size,
                                quant_type=w4.quant_type,
                                compress_statistics=w4.nested,
                                quant_storage=w4.quant_storage,
                                layout=w4.layout, impl=self.impl)


class LoRALinear4bit(LoRAMixin, Linear4bit):
  r"""QLoRA: a :class:`Linear4bit` plus a trainable low-rank update.

  .. math::
    y = \mathrm{matmul\_4bit}(x, W) + b + s \, (x A) B, \qquad
    A \in \mathbb{R}^{K \times r}, \; B \in \mathbb{R}^{r \times N}

  mirroring ``nnx.LoRALinear`` (which has :math:`s = 1`): ``A`` and ``B`` are
  ``nnx.LoRAParam`` s in ``self.lora`` (an ``nnx.LoRA``), ``B`` starts at
  zero so the layer starts equal to its base. Train only them with
  ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and
  ``nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))``; the 4-bit
  weight is a :class:`QuantizedWeight` and gets no gradient, and the float
  bias (an ``nnx.Param``) is left out by that filter. The LoRA term is
  cast to the layer's compute dtype.

  Args:
    in_features, out_features: see :class:`Linear4bit`.
    lora_rank: :math:`r`.
    lora_scale: :math:`s` (PEFT's ``lora_alpha / r``); default 1.
    lora_dtype, lora_param_dtype: ``nnx.LoRA``'s ``dtype`` / ``param_dtype``.
    a_initializer, b_initializer: initializers of ``A`` and ``B``.
    lora_param_type: the variable type of ``A`` and ``B``.
    rngs: keys of the base layer, then of ``A`` and ``B``.
    **kwargs: :class:`Linear4bit`'s other arguments.

  Build one around a float layer with
  ``LoRALinear4bit.from_linear(linear, lora_rank=8, rngs=nnx.Rngs(0))``, or
  every layer of a model with
  ``quantize_model(model, lora_rank=8, rngs=nnx.Rngs(0))``; after training,
  :meth:`merge` gives a plain :class:`Linear4bit`.
  """

  def __init__(self, in_features: int, out_features: int, *, lora_rank: int,
               lora_scale: float = 1.0, lora_dtype=None,
               lora_param_dtype=jnp.float32,
               a_initializer: Initializer = nnx_lora.default_a_initializer,
               b_initializer: Initializer = nnx_lora.default_b_initializer,
               lora_param_type: type[nnx.Variable] = nnx.LoRAParam,
               rngs: nnx.Rngs, **kwargs):
    super().__init__(in_features, out_features, rngs=rngs, **kwargs)
    self._add_lora(lora_rank, lora_scale, lora_dtype, lora_param_dtype,
                   a_initializer, b_initializer, lora_param_type, rngs)

  def merge(self) -> Linear4bit:
    """A :class:`Linear4bit` of :meth:`merged_weight` (requantized: see there)
    and a copy of the bias, with the same ``dtype`` and ``impl``."""
    bias = self.bias[...] if self.bias is not None else None
    return Linear4bit.from_quantized(self.merged_weight(), bias,
                                     dtype=self.dtype, impl=self.impl)


def linear_general_layout_error(layer: Any) -> str | None:
  """Why ``layer`` (an ``nnx.LinearGeneral``) has no :class:`LinearGeneral4bit` form.

  ``None`` when it is supported: no ``batch_axis`` and contracted axes
  that are the input's last ``len(in_features)`` axes in order, given as
  negative indices (``axis=-1``, ``(-2, -1)``, ...). Positive axes are
  refused: whether they are trailing depends on the input's rank.
  """
  if layer.batch_axis:
    return (f"batch_axis={dict(layer.batch_axis)} is not supported (only "
            "layers without batch axes)")
  n = len(layer.in_features)
  axis = tuple(int(a) for a in layer.axis)
  if axis != tuple(range(-n, 0)):
    return (f"axis={axis} is not supported: the contracted axes must be the "
            f"input's last {n} axes in order, as negative indices "
            f"{tuple(range(-n, 0))}")
  return None


class LinearGeneral4bit(nnx.Module):
  r"""``nnx.LinearGeneral`` over trailing axes, its kernel quantized to 4 bits.

  For layers without ``batch_axis`` whose contracted axes are the input's
  last ones (``axis=-1``: attention's query / key / value projections
  ``[..., D] -> [..., heads, head_dim]``; ``axis=(-2, -1)``: the output
  projection ``[..., heads, head_dim] -> [..., D]``). The kernel
  ``[*in_features, *out_features]`` is flattened to ``[K, N]``,
  :math:`K = \prod` ``in_features``, :math:`N = \prod` ``out_features``,
  and stored transposed, ``W`` ``[N, K]`` (bitsandbytes' layout, as
  :class:`Linear4bit`). The forward pass reshapes the input
  ``[..., *in_features]`` to ``[..., K]``, applies :func:`linear_4bit`
  (the fused gemv for one row) and reshapes ``[..., N]`` to
  ``[..., *out_features]``.

  The constructor draws the float kernel exactly as ``nnx.LinearGeneral``
  does (``kernel_init`` called with the flat shape ``(K, N)``, the bias
  with ``(N,)``), then quantizes it. Build one from a float layer with
  :meth:`from_linear_general`.

  Args:
    in_features: int or tuple, the contracted (trailing) input dimensions.
    out_features: int or tuple, the output's trailing dimensions.
    axis: the contracted axes; must be ``-1`` or ``(-n, ..., -1)``
      (``n = len(in_features)``); default ``-1``, or the last
      ``len(in_features)`` axes when ``in_features`` is a tuple and
      ``axis`` is not given.
    use_bias, dtype, param_dtype, kernel_init, bias_init, quant_type,
    block_size, compress_statistics, impl, rngs: see :class:`Linear4bit`.

  Attributes:
    kernel: :class:`QuantizedWeight` of ``W`` ``[N, K]``.
    bias: ``nnx.Param`` of shape ``out_features`` (not flattened, as in
      ``nnx.LinearGeneral``), or ``None``.
  """

  def __init__(self, in_features, out_features, *, axis=None,
               use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
               kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = default_bias_init,
               quant_type: str = "nf4", block_size: int = 64,
               compress_statistics: bool = False, impl: str | None = None,
               rngs: nnx.Rngs):
    check_config(dtype, param_dtype, quant_type, block_size,
                  compress_statistics, impl)
    in_features, out_features = _as_shape(in_features), _as_shape(out_features)
    n = len(in_features)
    if axis is None:
      axis = tuple(range(-n, 0))
    axis = (int(axis),) if isinstance(axis, int) else tuple(int(a) for a in axis)
    if axis != tuple(range(-n, 0)):
      raise ValueError(f"axis={axis} is not supported: the contracted axes "
                       f"must be the input's last {n} axes in order, as "
                       f"negative indices {tuple(range(-n, 0))}")
    k, n_out = _prod(in_features), _prod(out_features)
    kernel_key = rngs.params()
    if isinstance(kernel_init, PresetWeight):
      w4 = kernel_init.w4
      if tuple(w4.shape) != (n_out, k):
        raise ValueError(f"w4.shape={w4.shape} must be ({n_out}, {k}) for "
                         f"in_features={in_features}, "
                         f"out_features={out_features}")
    else:
      kernel = kernel_init(kernel_key, (k, n_out), param_dtype)
      kernel = jnp.reshape(kernel, (k, n_out))
      w4 = quant4.quantize_4bit(kernel.T, block_size=int(block_size),
                                quant_type=quant_type,
                                compress_statistics=compress_statistics,
                                impl=impl)
    bias = (jnp.reshape(bias_init(rngs.params(), (n_out,), param_dtype),
                        out_features) if use_bias else None)
    store_weight(self, w4, bias, dtype=dtype, param_dtype=param_dtype,
                 impl=impl)
    self.in_features = in_features
    self.out_features = out_features
    self.axis = axis

  @classmethod
  def from_quantized(cls, w4: quant4.Quantized4bit, in_features, out_features,
                     bias: jax.Array | None = None, *, dtype=None,
                     impl: str | None = None, rngs: nnx.Rngs | None = None,
                     **kwargs):
    """A layer around an existing 4-bit weight ``W`` ``[N, K]``.

    Args:
      w4: ``W``, kept as is (same bytes); ``N`` = prod(``out_features``),
        ``K`` = prod(``in_features``).
      in_features, out_features: int or tuple (see the class).
      bias: float, ``N`` elements (shape ``out_features`` or ``(N,)``), or
        ``None`` (no bias); stored in ``w4.dtype``, shaped ``out_features``.
      dtype, impl: see the class.
      rngs: keys of a subclass's own parameters (e.g. LoRA); default unused.
      **kwargs: a subclass's other constructor arguments.
    """
    check_weight(w4)
    n = _prod(_as_shape(out_features))
    if bias is not None and _prod(jnp.shape(bias)) != n:
      raise ValueError(f"bias.shape={tuple(jnp.shape(bias))} must have {n} "
                       f"elements for out_features={out_features}")
    return cls(in_features, out_features, use_bias=bias is not None,
               dtype=dtype, param_dtype=w4.dtype, kernel_init=PresetWeight(w4),
               bias_init=(None if bias is None
                          else constant_init(jnp.reshape(bias, (n,)))),
               quant_type=w4.quant_type, block_size=w4.block_size,
               compress_statistics=w4.nested, impl=impl,
               rngs=nnx.Rngs(0) if rngs is None else rngs, **kwargs)

  @classmethod
  def from_linear_general(cls, layer: nnx.LinearGeneral, *,
                          quant_type: str = "nf4", block_size: int = 64,
                          compress_statistics: bool = False,
                          layout: str = "bnb", impl: str | None = None,
                          **kwargs):
    """Quantizes ``layer``'s kernel (flattened ``[K, N]``, transposed); the bias stays float.

    Keeps ``layer``'s ``dtype``; ``param_dtype`` is the kernel's dtype.
    ``precision``, ``dot_general`` and ``preferred_element_type`` are not
    carried over (the product accumulates in float32). ``layout``: see
    :meth:`Linear4bit.from_linear`. ``**kwargs`` go to
    :meth:`from_quantized` (``rngs`` and a subclass's arguments).

    Raises:
      TypeError: ``layer`` is not a plain ``nnx.LinearGeneral``.
      ValueError: unsupported layout (``batch_axis``, contracted axes that
        are not the trailing ones in order; see
        :func:`linear_general_layout_error`).
    """
    if type(layer) is not nnx.LinearGeneral:  # pylint: disable=unidiomatic-typecheck
      raise TypeError(f"layer must be an nnx.LinearGeneral, got "
                      f"{type(layer).__name__}")
    error = linear_general_layout_error(layer)
    if error is not None:
      raise ValueError(f"{cls.__name__}.from_linear_general: {error}")
    kernel = layer.kernel[...]
    check_config(layer.dtype, kernel.dtype, quant_type, block_size,
                  compress_statistics, impl, layout)
    in_features, out_features = tuple(layer.in_features), tuple(layer.out_features)
    flat = jnp.reshape(kernel, (_prod(in_features), _prod(out_features)))
    w4 = quant4.quantize_4bit(flat.T, block_size=block_size,
                              quant_type=quant_type,
                              compress_statistics=compress_statistics,
                              impl=impl)
    w4 = quant4.prefer_layout(w4, layout)
    bias = layer.bias[...] if layer.bias is not None else None
    return cls.from_quantized(w4, in_features, out_features, bias,
                              dtype=layer.dtype, impl=impl, **kwargs)

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    """``[..., *in_features]`` -> ``[..., *out_features]`` in the compute dtype.

    ``out_sharding`` (``nnx.LinearGeneral``'s argument, which
    ``nnx.MultiHeadAttention`` passes): if given, applied to the output with
    ``jax.lax.with_sharding_constraint``.
    """
    n = len(self.in_features)
    shape = tuple(jnp.shape(inputs))
    if len(shape) < n or shape[len(shape) - n:] != self.in_features:
      raise ValueError(f"inputs.shape={shape} must end with in_features="
                       f"{self.in_features}")
    lead = shape[:len(shape) - n]
    bias = None if self.bias is None else jnp.reshape(self.bias[...], (-1,))
    y = linear_4bit(jnp.reshape(inputs, (*lead, _prod(self.in_features))),
                    self.kernel.get_value(), bias, dtype=self.dtype,
                    impl=self.impl)
    y = jnp.reshape(y, (*lead, *self.out_features))
    if out_sharding is not None:
      y = jax.lax.with_sharding_constraint(y, out_sharding)
    return y

  def dequantize(self, dtype=None) -> jax.Array:
    """The float kernel in ``nnx.LinearGeneral``'s shape ``[*in_features, *out_features]``."""
    dtype = self.param_dtype if dtype is None else dtype
    w = quant4.dequantize_4bit(self.kernel.get_value(), dtype, impl=self.impl)
    return jnp.reshape(w.T, (*self.in_features, *self.out_features))

  def to_linear_general(self) -> nnx.LinearGeneral:
    """An ``nnx.LinearGeneral`` holding the dequantized kernel and a copy of the bias."""
    k, n = _prod(self.in_features), _prod(self.out_features)
    bias = self.bias[...] if self.bias is not None else None
    return nnx.LinearGeneral(
        self.in_features, self.out_features, axis=self.axis,
        use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=constant_init(jnp.reshape(self.dequantize(), (k, n))),
        bias_init=None if bias is None else constant_init(jnp.reshape(bias, (n,))),
        rngs=nnx.Rngs(0))


class LoRALinearGeneral4bit(LoRAMixin, LinearGeneral4bit):
  r"""QLoRA for ``nnx.LinearGeneral``: a :class:`LinearGeneral4bit` plus a trainable low-rank update.

  .. math::
    y = \mathrm{reshape}\big(\mathrm{matmul\_4bit}(x_{[..., K]}, W) + b
        + s \, (x_{[..., K]} A) B\big), \qquad
    A \in \mathbb{R}^{K \times r}, \; B \in \mathbb{R}^{r \times N}

  on the input flattened to ``[..., K]`` as :class:`LinearGeneral4bit` does
  (:math:`K = \prod` ``in_features``, :math:`N = \prod` ``out_features``),
  so that attention's projections get adapters like PEFT's LoRA on
  ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``. ``A``, ``B``, their
  training and ``B = 0`` at the start: as :class:`LoRALinear4bit`.

  Args:
    in_features, out_features: see :class:`LinearGeneral4bit`.
    lora_rank, lora_scale, lora_dtype, lora_param_dtype, a_initializer,
    b_initializer, lora_param_type, rngs: see :class:`LoRALinear4bit`.
    **kwargs: :class:`LinearGeneral4bit`'s other arguments.

  Build one around a float layer with
  ``LoRALinearGeneral4bit.from_linear_general(layer, lora_rank=8,
  rngs=nnx.Rngs(0))``; :meth:`merge` gives a plain :class:`LinearGeneral4bit`.
  """

  def __init__(self, in_features, out_features, *, lora_rank: int,
               lora_scale: float = 1.0, lora_dtype=None,
               lora_param_dtype=jnp.float32,
               a_initializer: Initializer = nnx_lora.default_a_initializer,
               b_initializer: Initializer = nnx_lora.default_b_initializer,
               lora_param_type: type[nnx.Variable] = nnx.LoRAParam,
               rngs: nnx.Rngs, **kwargs):
    super().__init__(in_features, out_features, rngs=rngs, **kwargs)
    self._add_lora(lora_rank, lora_scale, lora_dtype, lora_param_dtype,
                   a_initializer, b_initializer, lora_param_type, rngs)

  def merge(self) -> LinearGeneral4bit:
    """A :class:`LinearGeneral4bit` of :meth:`merged_weight` (requantized:
    see there) and a copy of the bias, with the same ``dtype`` and ``impl``."""
    bias = self.bias[...] if self.bias is not None else None
    return LinearGeneral4bit.from_quantized(
        self.merged_weight(), self.in_features, self.out_features, bias,
        dtype=self.dtype, impl=self.impl)
