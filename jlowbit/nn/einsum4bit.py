r"""Flax NNX ``nnx.Einsum`` with a frozen 4-bit (NF4 / FP4) kernel.

:class:`Einsum4bit` covers the einsums that are a matrix product once the
axes are grouped: the kernel's axes are either contracted (in the input,
summed) or output axes (in the output), the contracted axes are the input's
trailing axes, the output axes are the output's trailing axes, and the
input's other (leading) axes pass through to the output unchanged:

.. math::
  y_{[..., N]} = x_{[..., K]} \, W^\top + b, \qquad
  K = \prod \text{contracted sizes}, \; N = \prod \text{output sizes}

(``"...d,dhk->...hk"``, ``"btd,dnh->btnh"``, ``"...hk,hkd->...d"``,
``"bsd,df->bsf"``). The kernel is permuted to ``[contracted axes in the
input's order, output axes in the output's order]``, flattened to
``[K, N]`` and stored transposed, ``W`` ``[N, K]``, in a
:class:`~jlowbit.nn.linear4bit.QuantizedWeight` (bitsandbytes' layout, as
:class:`~jlowbit.nn.Linear4bit`); the forward pass is
:func:`~jlowbit.nn.linear4bit.linear_4bit` on the input reshaped to
``[..., K]``. :func:`einsum_layout_error` says why another einsum is not
supported. :class:`LoRAEinsum4bit` adds QLoRA adapters.
"""

import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import lora as nnx_lora

from jlowbit import quant4
from jlowbit.nn import linear4bit
from jlowbit.nn.linear4bit import Initializer

ELLIPSIS = "..."
_LABELS = re.compile(r"\.\.\.|[A-Za-z]")


class EinsumLayout(NamedTuple):
  """How an einsum maps onto a 2-D product ``[..., K] @ [K, N]``.

  Attributes:
    lead: the input's leading labels (``"..."`` counts as one), which the
      output starts with in the same order.
    contracted: the contracted labels, in the input's order (its trailing
      labels).
    outputs: the kernel's output labels, in the output's order (its
      trailing labels).
    in_features: the sizes of ``contracted``; :math:`K` is their product.
    out_features: the sizes of ``outputs``; :math:`N` is their product.
    perm: the kernel's axes in the order ``[*contracted, *outputs]``
      (``jnp.transpose(kernel, perm)`` reshapes to ``[K, N]``).
  """
  lead: tuple[str, ...]
  contracted: tuple[str, ...]
  outputs: tuple[str, ...]
  in_features: tuple[int, ...]
  out_features: tuple[int, ...]
  perm: tuple[int, ...]


def _labels(operand: str, what: str, einsum_str: str) -> tuple[str, ...]:
  labels = tuple(_LABELS.findall(operand))
  if "".join(labels) != operand:
    raise ValueError(f"einsum_str={einsum_str!r}: the {what} {operand!r} may "
                     "hold only letters and one '...'")
  repeated = sorted({label for label in labels if labels.count(label) > 1})
  if repeated:
    raise ValueError(f"einsum_str={einsum_str!r}: the {what} {operand!r} "
                     f"repeats {', '.join(map(repr, repeated))} (traces and "
                     "diagonals are not supported)")
  return labels


def einsum_layout(einsum_str: str, kernel_shape) -> EinsumLayout:
  """Parses ``"input,kernel->output"`` into an :class:`EinsumLayout`.

  Spaces are ignored, as in ``nnx.Einsum``. The einsum must be explicit
  (``->``) with two operands, ``...`` only in the input and output.

  Args:
    einsum_str: the equation, e.g. ``"btd,dnh->btnh"``.
    kernel_shape: the kernel's shape, one size per kernel label.

  Raises:
    ValueError: the einsum is malformed, or is not a product
      ``[..., K] @ [K, N]`` (see the module docstring); the message says
      which axis is at fault.
  """
  if not isinstance(einsum_str, str):
    raise TypeError(f"einsum_str={einsum_str!r} must be a str")
  einsum_str = einsum_str.replace(" ", "")
  if einsum_str.count("->") != 1 or einsum_str.count(",") != 1:
    raise ValueError(f"einsum_str={einsum_str!r} must be explicit with two "
                     "operands: 'input,kernel->output'")
  operands, out = einsum_str.split("->")
  x, k = operands.split(",")
  x = _labels(x, "input", einsum_str)
  k = _labels(k, "kernel", einsum_str)
  out = _labels(out, "output", einsum_str)
  kernel_shape = tuple(int(d) for d in kernel_shape)
  if ELLIPSIS in k:
    raise ValueError(f"einsum_str={einsum_str!r}: the kernel may not hold "
                     "'...' (its shape is fixed)")
  if len(k) != len(kernel_shape):
    raise ValueError(f"einsum_str={einsum_str!r} names {len(k)} kernel axes "
                     f"but kernel_shape={kernel_shape} has {len(kernel_shape)}")
  for label in k:
    if label in x and label in out:
      raise ValueError(f"einsum_str={einsum_str!r}: kernel axis {label!r} is "
                       "in the input and the output (a batch axis of the "
                       "kernel); only contracted and output axes are "
                       "supported")
    if label not in x and label not in out:
      raise ValueError(f"einsum_str={einsum_str!r}: kernel axis {label!r} is "
                       "in neither the input nor the output (summed on its "
                       "own); only contracted and output axes are supported")
  n_in = sum(label in k for label in x)
  n_out = sum(label in k for label in out)
  lead, contracted = x[:len(x) - n_in], x[len(x) - n_in:]
  if any(label in k for label in lead):
    raise ValueError(f"einsum_str={einsum_str!r}: the contracted axes "
                     f"{''.join(label for label in x if label in k)!r} must be "
                     "the input's trailing axes")
  if out[:len(out) - n_out] != lead or out[len(out) - n_out:] != tuple(
      label for label in out if label in k):
    raise ValueError(f"einsum_str={einsum_str!r}: the output must be the "
                     f"input's other axes {''.join(lead)!r} in the same order "
                     "followed by the kernel's output axes")
  outputs = out[len(out) - n_out:]
  perm = tuple(k.index(label) for label in contracted + outputs)
  return EinsumLayout(
      lead=lead, contracted=contracted, outputs=outputs,
      in_features=tuple(kernel_shape[k.index(c)] for c in contracted),
      out_features=tuple(kernel_shape[k.index(o)] for o in outputs),
      perm=perm)


def einsum_layout_error(layer: Any) -> str | None:
  """Why ``layer`` (an ``nnx.Einsum``) has no :class:`Einsum4bit` form.

  ``None`` when it is supported (see :func:`einsum_layout`): its kernel's
  axes are contracted or output axes only, the contracted ones the input's
  trailing axes, the output ones the output's trailing axes, after the
  input's other axes in order. Unsupported: batch axes in the kernel, a
  kernel axis in neither input nor output, contracted axes before an
  uncontracted input axis, output axes before the passed-through ones, an
  input axis summed away or reordered, ``...`` in the kernel.
  """
  try:
    einsum_layout(layer.einsum_str, jnp.shape(layer.kernel[...]))
  except ValueError as e:
    return str(e)
  return None


class Einsum4bit(nnx.Module):
  r"""``nnx.Einsum`` that is a matrix product, its kernel quantized to 4 bits.

  .. math::
    y = \mathrm{reshape}\big(\mathrm{matmul\_4bit}(x_{[..., K]}, W) + b\big)
    \quad \text{computed in } \texttt{dtype}

  For the einsums :func:`einsum_layout` accepts (see the module docstring),
  e.g. ``"btd,dnh->btnh"`` or ``"...hk,hkd->...d"``. The constructor draws
  the float kernel exactly as ``nnx.Einsum`` does (``kernel_init`` with
  ``kernel_shape``, then ``bias_init`` with ``bias_shape``, the same keys),
  then quantizes it as ``W`` ``[N, K]``. Build one from a float layer with
  :meth:`from_einsum`.

  Example::

    >>> from flax import nnx
    >>> import jax.numpy as jnp, jlowbit
    >>> layer = jlowbit.nn.Einsum4bit("btd,dnh->btnh", (64, 4, 16), (4, 16),
    ...                               rngs=nnx.Rngs(0))
    >>> layer.kernel.get_value().shape  # [N, K] = [4 * 16, 64]
    (64, 64)
    >>> layer(jnp.ones((2, 3, 64))).shape
    (2, 3, 4, 16)

  Args:
    einsum_str: ``"input,kernel->output"``; spaces are ignored.
    kernel_shape: the float kernel's shape, one size per kernel label.
    bias_shape: the bias's shape, ``N`` elements in the output's order (as
      ``nnx.Einsum`` reshapes it), or ``None`` for no bias.
    dtype, param_dtype, quant_type, block_size, compress_statistics, impl,
    rngs: see :class:`~jlowbit.nn.Linear4bit`.
    kernel_init: initializer of the float kernel ``kernel_shape``.
    bias_init: initializer of the bias ``bias_shape``.

  ``nnx.Einsum``'s ``precision``, ``promote_dtype``, ``einsum_op`` and
  ``preferred_element_type`` have no counterpart: the product accumulates in
  float32 and returns the compute dtype (``dtype``, or the promotion of
  input, weight and bias as ``nnx.Einsum``'s default ``promote_dtype``).

  Attributes:
    kernel: :class:`~jlowbit.nn.QuantizedWeight` of ``W`` ``[N, K]``.
    bias: ``nnx.Param`` of ``bias_shape`` in ``param_dtype``, or ``None``.
    layout: the :class:`EinsumLayout`; ``in_features`` and
      ``out_features``: its sizes.
  """

  def __init__(self, einsum_str: str, kernel_shape, bias_shape=None, *,
               dtype=None, param_dtype=jnp.float32,
               kernel_init: Initializer = linear4bit.default_kernel_init,
               bias_init: Initializer = linear4bit.default_bias_init,
               quant_type: str = "nf4", block_size: int = 64,
               compress_statistics: bool = False, impl: str | None = None,
               rngs: nnx.Rngs):
    linear4bit.check_config(dtype, param_dtype, quant_type, block_size,
                            compress_statistics, impl)
    layout = einsum_layout(einsum_str, kernel_shape)
    kernel_shape = tuple(int(d) for d in kernel_shape)
    k, n = math.prod(layout.in_features), math.prod(layout.out_features)
    if bias_shape is not None:
      bias_shape = tuple(int(d) for d in bias_shape)
      if math.prod(bias_shape) != n:
        raise ValueError(f"bias_shape={bias_shape} must have {n} elements, "
                         f"the output axes' sizes {layout.out_features}")
    kernel_key = rngs.params()
    if isinstance(kernel_init, linear4bit.PresetWeight):
      w4 = kernel_init.w4
      if tuple(w4.shape) != (n, k):
        raise ValueError(f"w4.shape={w4.shape} must be ({n}, {k}) for "
                         f"einsum_str={einsum_str!r}, "
                         f"kernel_shape={kernel_shape}")
    else:
      kernel = kernel_init(kernel_key, kernel_shape, param_dtype)
      if tuple(kernel.shape) != kernel_shape:
        raise ValueError(f"kernel_init returned shape {tuple(kernel.shape)}; "
                         f"the kernel must have kernel_shape={kernel_shape}")
      flat = jnp.reshape(jnp.transpose(kernel, layout.perm), (k, n))
      w4 = quant4.quantize_4bit(flat.T, block_size=int(block_size),
                                quant_type=quant_type,
                                compress_statistics=compress_statistics,
                                impl=impl)
    bias = (None if bias_shape is None
            else bias_init(rngs.params(), bias_shape, param_dtype))
    linear4bit.store_weight(self, w4, bias, dtype=dtype,
                            param_dtype=param_dtype, impl=impl)
    self.einsum_str = einsum_str.replace(" ", "")
    self.kernel_shape = kernel_shape
    self.bias_shape = bias_shape
    self.layout = layout
    self.in_features = layout.in_features
    self.out_features = layout.out_features

  @classmethod
  def from_quantized(cls, w4: quant4.Quantized4bit, einsum_str: str,
                     kernel_shape, bias: jax.Array | None = None, *,
                     dtype=None, impl: str | None = None,
                     rngs: nnx.Rngs | None = None, **kwargs):
    """A layer around an existing 4-bit weight ``W`` ``[N, K]``.

    Args:
      w4: ``W`` (kernel permuted and flattened as the class says,
        transposed), kept as is (same bytes).
      einsum_str, kernel_shape: see the class.
      bias: float array of ``N`` elements (its shape becomes ``bias_shape``)
        or ``None`` (no bias); stored in ``w4.dtype``.
      dtype, impl: see the class.
      rngs: keys of a subclass's own parameters (e.g. LoRA); default unused.
      **kwargs: a subclass's other constructor arguments.
    """
    linear4bit.check_weight(w4)
    bias_shape = None if bias is None else tuple(jnp.shape(bias))
    return cls(einsum_str, kernel_shape, bias_shape, dtype=dtype,
               param_dtype=w4.dtype,
               kernel_init=linear4bit.PresetWeight(w4),
               bias_init=None if bias is None else linear4bit.constant_init(bias),
               quant_type=w4.quant_type, block_size=w4.block_size,
               compress_statistics=w4.nested, impl=impl,
               rngs=nnx.Rngs(0) if rngs is None else rngs, **kwargs)

  @classmethod
  def from_einsum(cls, einsum: nnx.Einsum, *, quant_type: str = "nf4",
                  block_size: int = 64, compress_statistics: bool = False,
                  layout: str = "bnb", impl: str | None = None, **kwargs):
    """Quantizes ``einsum``'s kernel (permuted, flattened ``[K, N]``, transposed); the bias stays float.

    Keeps ``einsum``'s ``einsum_str`` and ``dtype``; ``param_dtype`` is the
    kernel's dtype. ``precision``, ``promote_dtype``, ``einsum_op`` and
    ``preferred_element_type`` are not carried over (see the class).
    ``layout``: the weight's byte order (see
    :meth:`~jlowbit.nn.Linear4bit.from_linear`). ``**kwargs`` go to
    :meth:`from_quantized` (``rngs`` and a subclass's arguments).

    Raises:
      TypeError: ``einsum`` is not a plain ``nnx.Einsum``.
      ValueError: unsupported einsum (see :func:`einsum_layout_error`).
    """
    if type(einsum) is not nnx.Einsum:  # pylint: disable=unidiomatic-typecheck
      raise TypeError(f"einsum must be an nnx.Einsum, got "
                      f"{type(einsum).__name__}")
    error = einsum_layout_error(einsum)
    if error is not None:
      raise ValueError(f"{cls.__name__}.from_einsum: {error}")
    kernel = einsum.kernel[...]
    linear4bit.check_config(einsum.dtype, kernel.dtype, quant_type, block_size,
                            compress_statistics, impl, layout)
    axes = einsum_layout(einsum.einsum_str, kernel.shape)
    flat = jnp.reshape(jnp.transpose(kernel, axes.perm),
                       (math.prod(axes.in_features), -1))
    w4 = quant4.quantize_4bit(flat.T, block_size=block_size,
                              quant_type=quant_type,
                              compress_statistics=compress_statistics,
                              impl=impl)
    w4 = quant4.prefer_layout(w4, layout)
    bias = einsum.bias[...] if einsum.bias is not None else None
    return cls.from_quantized(w4, einsum.einsum_str, kernel.shape, bias,
                              dtype=einsum.dtype, impl=impl, **kwargs)

  def __call__(self, inputs: jax.Array, einsum_str: str | None = None,
               out_sharding=None) -> jax.Array:
    """``[*lead, *in_features]`` -> ``[*lead, *out_features]`` in the compute dtype.

    Args:
      inputs: the einsum's input; its leading axes (``lead``: the input's
        uncontracted labels, ``...`` any number of axes) pass through.
      einsum_str: ``nnx.Einsum``'s call-time equation: ``None`` or the
        layer's own (the 4-bit weight's layout is fixed).
      out_sharding: if given, applied to the output with
        ``jax.lax.with_sharding_constraint``.
    """
    if einsum_str is not None and einsum_str.replace(" ", "") != self.einsum_str:
      raise ValueError(f"einsum_str={einsum_str!r} differs from the layer's "
                       f"{self.einsum_str!r}: the 4-bit weight's layout is "
                       "fixed at construction")
    shape = tuple(jnp.shape(inputs))
    n = len(self.in_features)
    lead = shape[:len(shape) - n]
    labels = self.layout.lead
    rank_ok = (len(lead) >= len(labels) - 1 if ELLIPSIS in labels
               else len(lead) == len(labels))
    if len(shape) < n or shape[len(shape) - n:] != self.in_features or not rank_ok:
      raise ValueError(f"inputs.shape={shape} does not fit einsum_str="
                       f"{self.einsum_str!r}: its leading axes "
                       f"{''.join(labels)!r} must be followed by the "
                       f"contracted axes of sizes {self.in_features}")
    bias = None if self.bias is None else jnp.reshape(self.bias[...], (-1,))
    y = linear4bit.linear_4bit(
        jnp.reshape(inputs, (*lead, math.prod(self.in_features))),
        self.kernel.get_value(), bias, dtype=self.dtype, impl=self.impl)
    y = jnp.reshape(y, (*lead, *self.out_features))
    if out_sharding is not None:
      y = jax.lax.with_sharding_constraint(y, out_sharding)
    return y

  def dequantize(self, dtype=None) -> jax.Array:
    """The float kernel in ``nnx.Einsum``'s layout, ``kernel_shape``.

    ``dtype``: default ``param_dtype``.
    """
    dtype = self.param_dtype if dtype is None else dtype
    w = quant4.dequantize_4bit(self.kernel.get_value(), dtype, impl=self.impl)
    grouped = jnp.reshape(w.T, (*self.in_features, *self.out_features))
    inverse = sorted(range(len(self.layout.perm)),
                     key=self.layout.perm.__getitem__)
    return jnp.transpose(grouped, inverse)

  def to_einsum(self) -> nnx.Einsum:
    """An ``nnx.Einsum`` holding the dequantized kernel and a copy of the bias."""
    bias = self.bias[...] if self.bias is not None else None
    return nnx.Einsum(
        self.einsum_str, self.kernel_shape, self.bias_shape, dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=linear4bit.constant_init(self.dequantize()),
        bias_init=None if bias is None else linear4bit.constant_init(bias),
        rngs=nnx.Rngs(0))


class LoRAEinsum4bit(linear4bit.LoRAMixin, Einsum4bit):
  r"""QLoRA for ``nnx.Einsum``: an :class:`Einsum4bit` plus a trainable low-rank update.

  .. math::
    y = \mathrm{reshape}\big(\mathrm{matmul\_4bit}(x_{[..., K]}, W) + b
        + s \, (x_{[..., K]} A) B\big), \qquad
    A \in \mathbb{R}^{K \times r}, \; B \in \mathbb{R}^{r \times N}

  on the input flattened as :class:`Einsum4bit` does. ``A``, ``B``, their
  training and ``B = 0`` at the start: as
  :class:`~jlowbit.nn.LoRALinear4bit`.

  Args:
    einsum_str, kernel_shape, bias_shape: see :class:`Einsum4bit`.
    lora_rank, lora_scale, lora_dtype, lora_param_dtype, a_initializer,
    b_initializer, lora_param_type, rngs: see
      :class:`~jlowbit.nn.LoRALinear4bit`.
    **kwargs: :class:`Einsum4bit`'s other arguments.

  Build one around a float layer with
  ``LoRAEinsum4bit.from_einsum(einsum, lora_rank=8, rngs=nnx.Rngs(0))``;
  :meth:`merge` gives a plain :class:`Einsum4bit`.
  """

  def __init__(self, einsum_str: str, kernel_shape, bias_shape=None, *,
               lora_rank: int, lora_scale: float = 1.0, lora_dtype=None,
               lora_param_dtype=jnp.float32,
               a_initializer: Initializer = nnx_lora.default_a_initializer,
               b_initializer: Initializer = nnx_lora.default_b_initializer,
               lora_param_type: type[nnx.Variable] = nnx.LoRAParam,
               rngs: nnx.Rngs, **kwargs):
    super().__init__(einsum_str, kernel_shape, bias_shape, rngs=rngs, **kwargs)
    self._add_lora(lora_rank, lora_scale, lora_dtype, lora_param_dtype,
                   a_initializer, b_initializer, lora_param_type, rngs)

  def merge(self) -> Einsum4bit:
    """An :class:`Einsum4bit` of :meth:`merged_weight` (requantized: see
    there) and a copy of the bias, with the same ``dtype`` and ``impl``."""
    bias = self.bias[...] if self.bias is not None else None
    return Einsum4bit.from_quantized(self.merged_weight(), self.einsum_str,
                                     self.kernel_shape, bias,
                                     dtype=self.dtype, impl=self.impl)
