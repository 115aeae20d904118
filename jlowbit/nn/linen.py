r"""Flax linen with 4-bit weights: ``Dense4bit``, and 4-bit params for ``nn.Dense``.

Two ways to run a linen model with NF4 / FP4 weights:

* write it with :class:`Dense4bit`, the 4-bit twin of ``flax.linen.Dense``:

  .. math::
    y = \mathrm{matmul\_4bit}(x, W) + b, \qquad
    W \in \mathbb{R}^{N \times K} \text{ (out, in), 4-bit}

  Its weight is a :class:`jlowbit.Quantized4bit` in the variable collection
  :data:`QUANTIZED` (``"quantized"``), not in ``"params"``: ``jax.grad``
  over ``variables["params"]`` and an optax optimizer on them see the float
  bias only;

* keep an unchanged model of ``nn.Dense`` layers, turn its params into 4-bit
  ones with :func:`quantize_params` and run it with :func:`apply_quantized`,
  which intercepts each ``nn.Dense`` whose kernel is a ``Quantized4bit``.

Storage is bitsandbytes' layout, ``W`` ``[out_features, in_features]``, as in
the NNX :class:`jlowbit.nn.Linear4bit`: :func:`jlowbit.to_bnb` /
:func:`jlowbit.from_bnb` read and write it byte for byte. ``nn.Dense`` keeps
its kernel ``[in_features, out_features]``, so quantizing one means
quantizing ``kernel.T``. All three (``Linear4bit``, ``Dense4bit``,
:func:`apply_quantized`) compute :func:`jlowbit.nn.linear4bit.linear_4bit`,
so the same weight and bias give the same outputs.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen
from flax.core import frozen_dict

from jlowbit import _formats
from jlowbit import _impl
from jlowbit import _tiling
from jlowbit import _validation as val
from jlowbit import quant4
from jlowbit.nn import convert
from jlowbit.nn import linear4bit

Initializer = Callable[..., jax.Array]
Path = tuple[str, ...]
# The variable collection of Dense4bit's 4-bit weight.
QUANTIZED = "quantized"


class Dense4bit(linen.Module):
  r"""``flax.linen.Dense`` with its kernel quantized to 4 bits (inference).

  .. math::
    y = \mathrm{matmul\_4bit}(x, W) + b \quad \text{computed in } \texttt{dtype}

  Example::

    >>> import jax, jax.numpy as jnp, jlowbit
    >>> layer = jlowbit.nn.Dense4bit(features=64)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 128)))
    >>> variables["quantized"]["kernel"].shape  # [out_features, in_features]
    (64, 128)
    >>> layer.apply(variables, jnp.ones((2, 128))).shape
    (2, 64)

  ``init`` draws the float kernel ``[in_features, features]`` exactly as
  ``nn.Dense`` does (same key, so the same values), quantizes its
  transpose and stores it as ``variables["quantized"]["kernel"]``; the bias
  is ``variables["params"]["bias"]``. To use an existing 4-bit weight (from
  :func:`quantize_params`, :func:`jlowbit.from_bnb`, an NNX layer), pass it
  in the variables: :meth:`from_quantized` builds both. The weight's own
  metadata (quant type, block size, original dtype) then rules; the fields
  ``quant_type``, ``block_size`` and ``compress_statistics`` only drive
  ``init``.

  Attributes:
    features: :math:`N`, the output's last dimension.
    use_bias: whether to add a float bias ``[features]`` (in ``"params"``).
    dtype: compute dtype (float32, bfloat16 or float16). ``None``: as
      ``nn.Dense``, the promotion of the input's dtype, the weight's original
      dtype and the bias's dtype.
    param_dtype: dtype of the float kernel before quantization (recorded in
      the weight, the default dequantization dtype) and of the bias.
    kernel_init: initializer of the float kernel ``[in_features, features]``.
    bias_init: initializer of the bias.
    quant_type: ``"nf4"`` or ``"fp4"``.
    block_size: elements per absmax block, a power of two in 32..4096.
    compress_statistics: quantize the absmax to 8 bits (nested statistics).
    impl: ``None`` | ``"triton"`` | ``"xla"`` | ``"interpret"``, for the
      quantization and every call (``None``: resolved per call).

  ``nn.Dense``'s ``precision``, ``promote_dtype`` and ``dot_general`` have
  no counterpart: the product accumulates in float32
  (:func:`jlowbit.matmul_4bit`).
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = linen.initializers.lecun_normal()
  bias_init: Initializer = linen.initializers.zeros_init()
  quant_type: str = "nf4"
  block_size: int = 64
  compress_statistics: bool = False
  impl: str | None = None

  def __post_init__(self):
    linear4bit.check_config(self.dtype, self.param_dtype, self.quant_type,
                            self.block_size, self.compress_statistics,
                            self.impl)
    super().__post_init__()

  @classmethod
  def from_quantized(cls, w4: quant4.Quantized4bit,
                     bias: jax.Array | None = None, *, dtype=None,
                     impl: str | None = None) -> tuple["Dense4bit", dict]:
    """A layer and its variables around an existing 4-bit weight.

    Args:
      w4: ``W`` ``[out_features, in_features]``, kept as is (same bytes).
      bias: float ``[out_features]`` or ``None`` (no bias); stored in
        ``w4.dtype``.
      dtype: compute dtype (see the class).
      impl: see the class.

    Returns:
      ``(layer, variables)`` for ``layer.apply(variables, x)``:
      ``{"quantized": {"kernel": w4}, "params": {"bias": bias}}`` (no
      ``"params"`` without a bias).
    """
    linear4bit.check_weight(w4)
    out_features = w4.shape[0]
    layer = cls(features=out_features, use_bias=bias is not None, dtype=dtype,
                param_dtype=w4.dtype, quant_type=w4.quant_type,
                block_size=w4.block_size, compress_statistics=w4.nested,
                impl=impl)
    variables = {QUANTIZED: {"kernel": w4}}
    if bias is not None:
      if tuple(jnp.shape(bias)) != (out_features,):
        raise ValueError(f"bias.shape={tuple(jnp.shape(bias))} must be "
                         f"({out_features},) for w4.shape={w4.shape}")
      variables["params"] = {"bias": jnp.asarray(bias, w4.dtype)}
    return layer, variables

  @linen.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """``[..., in_features]`` -> ``[..., features]`` in the compute dtype."""
    in_features = jnp.shape(inputs)[-1]

    def init_kernel():
      kernel = self.kernel_init(self.make_rng("params"),
                                (in_features, self.features), self.param_dtype)
      return quant4.quantize_4bit(
          kernel.T, block_size=int(self.block_size), quant_type=self.quant_type,
          compress_statistics=self.compress_statistics, impl=self.impl)

    w4 = self.variable(QUANTIZED, "kernel", init_kernel).value
    linear4bit.check_weight(w4, "kernel")
    if w4.shape[0] != self.features:
      raise ValueError(f"kernel.shape={w4.shape} does not match "
                       f"features={self.features}: it must be "
                       f"[{self.features}, in_features]")
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,),
                        self.param_dtype)
    return linear4bit.linear_4bit(inputs, w4, bias, dtype=self.dtype,
                                  impl=self.impl)


def default_params_filter(path: Path, array: jax.Array) -> bool:
  """Every 2-D leaf named ``"kernel"`` except those of output heads.

  A kernel belongs to a head when its module's name (``path[-2]``) is one of
  :data:`jlowbit.nn.HEAD_NAMES` (``"lm_head"``, ``"head"``, ...), as
  :func:`jlowbit.nn.default_filter` decides for NNX. Embedding tables
  (``"embedding"``), biases and norm scales are not named ``"kernel"``.
  """
  return (bool(path) and path[-1] == "kernel" and jnp.ndim(array) == 2
          and not (len(path) > 1 and str(path[-2]) in convert.HEAD_NAMES))


def _is_array(leaf: Any) -> bool:
  return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def _map_mapping(tree: Any, fn: Callable[[Path, Any], Any],
                 path: Path = ()) -> Any:
  """``fn(path, leaf)`` on each leaf of nested mappings; keeps ``FrozenDict``."""
  if not isinstance(tree, Mapping):
    return fn(path, tree)
  out = {key: _map_mapping(value, fn, (*path, key))
         for key, value in tree.items()}
  return frozen_dict.freeze(out) if isinstance(tree, frozen_dict.FrozenDict) else out


def quantize_params(params: Mapping[str, Any], *,
                    filter: Callable[[Path, jax.Array], bool] | None = None,  # pylint: disable=redefined-builtin
                    quant_type: str = "nf4", block_size: int = 64,
                    compress_statistics: bool = False, layout: str = "bnb",
                    impl: str | None = None) -> Mapping[str, Any]:
  """Replaces the selected ``nn.Dense`` kernels of a linen params tree by 4-bit ones.

  Each selected kernel :math:`K` ``[in, out]`` becomes
  ``quantize_4bit(K.T, ...)``, a :class:`jlowbit.Quantized4bit` of ``W``
  ``[out, in]`` (bitsandbytes' layout, same bytes as
  :func:`jlowbit.quantize_4bit` of the transpose); every other leaf is kept
  (the same object). Run the model on the result with
  :func:`apply_quantized`.

  Args:
    params: nested mappings (dicts or ``FrozenDict`` s) of arrays, e.g.
      ``variables["params"]`` or the whole ``variables``; leaves that are
      already ``Quantized4bit`` are kept.
    filter: ``(path, array) -> bool``, called on every array leaf with its
      tuple of keys from ``params`` (``("Dense_0", "kernel")``); default
      :func:`default_params_filter`. Select only ``nn.Dense`` kernels:
      :func:`apply_quantized` intercepts ``nn.Dense`` only.
    quant_type, block_size, compress_statistics, impl: see
      :func:`jlowbit.quantize_4bit`.
    layout: ``"bnb"``, or ``"tiled"`` for the order of
      :func:`jlowbit.tile_4bit` where a weight fits it (see
      :func:`jlowbit.nn.quantize_model`).

  Returns:
    A tree of the same structure (and mapping types).

  Raises:
    ValueError: ``filter`` selected a leaf that is not 2-D.
  """
  val.check_choice(quant_type, "quant_type", _formats.QUANT_TYPES)
  val.check_block_size(block_size, "block_size", _formats.BLOCK_SIZES_4BIT)
  if not isinstance(compress_statistics, bool):
    raise TypeError(f"compress_statistics={compress_statistics!r} must be a "
                    "bool (True or False)")
  val.check_choice(impl, "impl", (None,) + _impl.IMPLS)
  val.check_choice(layout, "layout", _tiling.LAYOUTS)
  select = default_params_filter if filter is None else filter

  def quantize(path: Path, leaf: Any) -> Any:
    if isinstance(leaf, quant4.Quantized4bit) or not _is_array(leaf):
      return leaf
    if not select(path, leaf):
      return leaf
    if jnp.ndim(leaf) != 2:
      raise ValueError(f"{'/'.join(map(str, path))} of shape "
                       f"{tuple(jnp.shape(leaf))} was selected, but only a "
                       "2-D kernel [in_features, out_features] can be "
                       "quantized")
    w4 = quant4.quantize_4bit(jnp.asarray(leaf).T, block_size=block_size,
                              quant_type=quant_type,
                              compress_statistics=compress_statistics,
                              impl=impl)
    return quant4.prefer_layout(w4, layout)

  return _map_mapping(params, quantize)


def dequantize_params(tree: Mapping[str, Any], dtype=None, *,
                      impl: str | None = None) -> Mapping[str, Any]:
  """The inverse of :func:`quantize_params`: float kernels ``[in, out]`` again.

  Args:
    tree: nested mappings whose ``Quantized4bit`` leaves hold ``W``
      ``[out, in]``.
    dtype: dtype of the kernels; default each weight's original dtype.
    impl: see :func:`jlowbit.dequantize_4bit`.

  Returns:
    The same tree with each ``Quantized4bit`` replaced by
    ``dequantize_4bit(w4, dtype).T`` ``[in, out]``.
  """
  def dequantize(path: Path, leaf: Any) -> Any:
    del path
    if not isinstance(leaf, quant4.Quantized4bit):
      return leaf
    linear4bit.check_weight(leaf, "kernel")
    return quant4.dequantize_4bit(leaf, dtype, impl=impl).T

  return _map_mapping(tree, dequantize)


def _dense_interceptor(impl: str | None):
  """Runs a plain ``nn.Dense`` holding a 4-bit kernel as :func:`linear_4bit`."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (type(module) is not linen.Dense  # pylint: disable=unidiomatic-typecheck
        or context.method_name != "__call__"
        or not module.has_variable("params", "kernel")):
      return next_fun(*args, **kwargs)
    w4 = module.get_variable("params", "kernel")
    if not isinstance(w4, quant4.Quantized4bit):
      return next_fun(*args, **kwargs)
    (inputs,) = args
    linear4bit.check_weight(w4, "/".join(module.scope.path) + "/kernel")
    if w4.shape[0] != module.features:
      raise ValueError(f"{'/'.join(module.scope.path)}: the 4-bit kernel of "
                       f"shape {w4.shape} does not match "
                       f"features={module.features}")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    return linear4bit.linear_4bit(inputs, w4, bias, dtype=module.dtype,
                                  impl=impl)
  return interceptor


def apply_quantized(module: linen.Module, variables: Mapping[str, Any],
                    *args, impl: str | None = None, **kwargs) -> Any:
  r"""``module.apply(variables, *args, **kwargs)`` with 4-bit ``nn.Dense`` kernels.

  The model is not changed: every plain ``flax.linen.Dense`` (not a
  subclass) whose ``params`` kernel is a :class:`jlowbit.Quantized4bit`
  (from :func:`quantize_params`) computes

  .. math::
    y = \mathrm{matmul\_4bit}(x, W) + b

  in the compute dtype of ``nn.Dense`` (its ``dtype``, else the promotion of
  the input, the weight's original dtype and the bias), through
  ``flax.linen.intercept_methods``; its ``precision`` and ``dot_general``
  are ignored. Other modules, and ``nn.Dense`` with float kernels, run as
  usual. Works under ``jax.jit`` (the weights are pytrees).

  Example::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, jlowbit
    >>> model = nn.Sequential([nn.Dense(128), nn.relu, nn.Dense(64)])
    >>> x = jnp.ones((2, 64))
    >>> variables = model.init(jax.random.key(0), x)
    >>> q = jlowbit.nn.quantize_params(variables)
    >>> jlowbit.nn.apply_quantized(model, q, x).shape
    (2, 64)

  Args:
    module: a linen module.
    variables: as ``module.apply`` takes them, with 4-bit kernels in
      ``"params"``.
    *args: the call's positional arguments.
    impl: ``None`` | ``"triton"`` | ``"xla"`` | ``"interpret"`` for the
      4-bit products.
    **kwargs: ``module.apply``'s keyword arguments (``method``, ``mutable``,
      ``rngs``, the call's own keywords).

  Returns:
    What ``module.apply`` returns.
  """
  val.check_choice(impl, "impl", (None,) + _impl.IMPLS)
  with linen.intercept_methods(_dense_interceptor(impl)):
    return module.apply(variables, *args, **kwargs)
