r"""Whole-model helpers: swap float linear layers for 4-bit (or QLoRA) ones.

:func:`quantize_model` swaps ``nnx.Linear`` / ``nnx.LinearGeneral`` /
``nnx.Einsum`` layers, :func:`merge_lora` folds QLoRA adapters back into the
4-bit weights, :func:`memory_report` counts the bytes.
"""

import logging
from collections.abc import Callable, MutableMapping, MutableSequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jlowbit.nn import einsum4bit
from jlowbit.nn import linear4bit

Path = tuple[Any, ...]
# Last path entries of output layers, kept in float by default_filter.
HEAD_NAMES = ("head", "lm_head", "output", "classifier", "logits")
# The float layers quantize_model swaps.
FLOAT_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def default_filter(path: Path, module: nnx.Module) -> bool:
  """Every plain ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` except output heads.

  A layer is a head when the last entry of its path is one of
  :data:`HEAD_NAMES` (``"lm_head"``, ``"head"``, ...): language-model heads
  and classifiers are commonly kept in float (bitsandbytes / HF
  ``llm_int8_skip_modules``). Subclasses (``nnx.LoRALinear``, ...) are not
  selected. ``nnx.LinearGeneral`` and ``nnx.Einsum`` layers whose layout
  the 4-bit layers do not support are selected here but skipped by
  :func:`quantize_model` (see there).
  """
  return (type(module) in FLOAT_LAYERS  # pylint: disable=unidiomatic-typecheck
          and not (path and str(path[-1]) in HEAD_NAMES))


def _child(node: Any, key: Any) -> Any:
  if isinstance(node, (MutableSequence, MutableMapping, list, dict)):
    return node[key]
  return getattr(node, key)


def _replace(model: nnx.Module, path: Path, new: nnx.Module) -> None:
  """Sets ``model``'s child at ``path`` (a module attribute, list or dict item)."""
  parent = model
  for key in path[:-1]:
    parent = _child(parent, key)
  key = path[-1]
  if isinstance(parent, (MutableSequence, MutableMapping, list, dict)):
    parent[key] = new
  elif isinstance(parent, nnx.Module):
    setattr(parent, key, new)
  else:
    raise TypeError(f"cannot replace the layer at {path}: its container "
                    f"{type(parent).__name__} is immutable (use a list, dict, "
                    "nnx.List or nnx.Dict)")


def _layout_error(module: nnx.Module) -> str | None:
  """Why the 4-bit layers cannot hold ``module`` (``None``: they can)."""
  if isinstance(module, nnx.LinearGeneral):
    return linear4bit.linear_general_layout_error(module)
  if isinstance(module, nnx.Einsum):
    return einsum4bit.einsum_layout_error(module)
  return None


def _kind(module: nnx.Module) -> str:
  return f"nnx.{type(module).__name__}"


def _to_4bit(module: nnx.Module, quant: dict[str, Any],
             lora: dict[str, Any]) -> nnx.Module:
  """The 4-bit form of a float layer; its QLoRA form when ``lora`` is set."""
  if isinstance(module, nnx.LinearGeneral):
    cls = (linear4bit.LoRALinearGeneral4bit if lora
           else linear4bit.LinearGeneral4bit)
    return cls.from_linear_general(module, **quant, **lora)
  if isinstance(module, nnx.Einsum):
    cls = einsum4bit.LoRAEinsum4bit if lora else einsum4bit.Einsum4bit
    return cls.from_einsum(module, **quant, **lora)
  cls = linear4bit.LoRALinear4bit if lora else linear4bit.Linear4bit
  return cls.from_linear(module, **quant, **lora)


def quantize_model(model: nnx.Module, *,
                   filter: Callable[[Path, nnx.Module], bool] | None = None,  # pylint: disable=redefined-builtin
                   quant_type: str = "nf4", block_size: int = 64,
                   compress_statistics: bool = False, layout: str = "bnb",
                   impl: str | None = None, lora_rank: int | None = None,
                   lora_scale: float = 1.0,
                   rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Replaces, in place, the selected linear layers by 4-bit (or QLoRA) ones.

  Walks the module graph (attributes, ``nnx.List`` / ``nnx.Dict`` / list /
  dict items) and swaps each ``nnx.Linear``, ``nnx.LinearGeneral`` or
  ``nnx.Einsum`` (subclasses included) for which ``filter(path, module)``
  is true: an ``nnx.Linear`` for ``Linear4bit.from_linear(module, ...)``,
  an ``nnx.LinearGeneral`` for ``LinearGeneral4bit.from_linear_general(
  module, ...)``, an ``nnx.Einsum`` for ``Einsum4bit.from_einsum(module,
  ...)``; ``path`` is the tuple of attribute names and indices from
  ``model`` (as ``nnx.iter_modules`` gives it). Other modules
  (``nnx.Embed``, norms, ...) are never touched. A layer shared at several
  paths becomes one shared 4-bit layer wherever ``filter`` selects it. The
  selected paths are logged at INFO level.

  ``LinearGeneral4bit`` supports only ``nnx.LinearGeneral`` layers without
  ``batch_axis`` that contract the input's trailing axes in order
  (``axis=-1``, ``(-2, -1)``, ...; see
  :func:`jlowbit.nn.linear4bit.linear_general_layout_error`), and
  ``Einsum4bit`` only einsums that are a matrix product over trailing axes
  (``"...d,dhk->...hk"``, ``"btd,dnh->btnh"``, ...; see
  :func:`jlowbit.nn.einsum4bit.einsum_layout_error`). With the default
  filter, other such layers stay float (logged at INFO level); a user
  ``filter`` that selects one raises.

  QLoRA on a whole model: with ``lora_rank`` set, every selected layer gets
  trainable ``nnx.LoRAParam`` adapters on its 4-bit weight, as PEFT's
  ``target_modules="all-linear"`` does on a bitsandbytes 4-bit model:
  ``nnx.Linear`` becomes :class:`~jlowbit.nn.LoRALinear4bit`,
  ``nnx.LinearGeneral`` :class:`~jlowbit.nn.LoRALinearGeneral4bit` (the
  adapters act on the flattened ``[..., K] -> [..., N]`` product, so
  attention's projections get them too), ``nnx.Einsum``
  :class:`~jlowbit.nn.LoRAEinsum4bit`. ``B`` starts at zero, so the model
  starts equal to its plain 4-bit version. Train only the adapters with
  ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``; fold them in afterwards
  with :func:`merge_lora` (which requantizes: see there).

  Args:
    model: the root module; it cannot itself be the layer to replace.
    filter: ``(path, module) -> bool``, called on every ``nnx.Linear``,
      ``nnx.LinearGeneral`` and ``nnx.Einsum``; default
      :func:`default_filter` (all plain ones but output heads).
    quant_type, block_size, compress_statistics, impl: see
      :class:`~jlowbit.nn.Linear4bit`.
    layout: ``"bnb"`` (bitsandbytes' byte order), or ``"tiled"``: every
      weight that fits (``out % 16 == 0``, ``in % 64 == 0``, ``block_size``
      a multiple of 64 dividing ``in``) in the order of
      :func:`jlowbit.tile_4bit`, the others in bitsandbytes' order. Tiled
      weights make 1-16 bfloat16 / float16 rows (decoding) run the
      tensor-core kernel on a GPU; :func:`jlowbit.to_bnb` writes the same
      bytes either way. The default stays ``"bnb"``: on a tiled weight
      float32 rows have no fused kernel (one row dequantizes ``W`` instead
      of running the gemv).
    lora_rank: ``None`` (plain 4-bit layers) or the adapters' rank, a
      positive int.
    lora_scale: the adapters' scale :math:`s` (PEFT's ``lora_alpha / r``);
      only with ``lora_rank``.
    rngs: the keys of the adapters' ``A`` (drawn layer after layer);
      required with ``lora_rank``, refused without.

  Returns:
    ``model`` (mutated).

  Raises:
    TypeError: ``filter`` selected a subclass of ``nnx.Linear``,
      ``nnx.LinearGeneral`` or ``nnx.Einsum``, or a layer held in a tuple;
      ``lora_rank`` is set but ``rngs`` is not.
    ValueError: ``model`` itself is selected, ``filter`` selected a layer
      of an unsupported layout, ``lora_rank`` is not a positive int, or
      ``lora_scale`` / ``rngs`` are given without ``lora_rank``.
  """
  select = default_filter if filter is None else filter
  quant = dict(quant_type=quant_type, block_size=block_size,
               compress_statistics=compress_statistics, layout=layout,
               impl=impl)
  lora = {}
  if lora_rank is None:
    if rngs is not None or lora_scale != 1.0:
      raise ValueError(f"rngs={rngs!r} and lora_scale={lora_scale!r} are "
                       "the adapters' settings: give them with lora_rank")
  else:
    linear4bit.check_lora_rank(lora_rank)
    if rngs is None:
      raise TypeError(f"lora_rank={lora_rank} needs rngs, the keys of the "
                      "adapters (e.g. rngs=nnx.Rngs(0))")
    lora = dict(lora_rank=lora_rank, lora_scale=lora_scale, rngs=rngs)
  swapped: dict[int, nnx.Module] = {}
  skipped: dict[int, Path] = {}
  paths = []
  while True:
    found = [(path, module) for path, module in nnx.iter_modules(model)
             if isinstance(module, FLOAT_LAYERS)
             and id(module) not in skipped and select(path, module)]
    if not found:
      break
    for path, module in found:  # check every layout before changing anything
      error = _layout_error(module)
      if error is not None and filter is not None:
        raise ValueError(f"quantize_model: the {_kind(module)} at {path} was "
                         f"selected by filter but has an unsupported layout: "
                         f"{error}")
      if error is not None and id(module) not in skipped:
        logging.info("quantize_model: %s at %s stays float: %s",
                     _kind(module), path, error)
        skipped[id(module)] = path
    for path, module in found:
      if id(module) in skipped:
        continue
      if not path:
        raise ValueError("model is itself a selected layer: use "
                         "Linear4bit.from_linear(model), "
                         "LinearGeneral4bit.from_linear_general(model) or "
                         "Einsum4bit.from_einsum(model) instead")
      if id(module) not in swapped:
        swapped[id(module)] = _to_4bit(module, quant, lora)
      _replace(model, path, swapped[id(module)])
      paths.append(path)
  logging.info("quantize_model: %d layers -> 4-bit%s: %s", len(paths),
               " + LoRA" if lora else "", paths)
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  r"""Replaces, in place, each QLoRA layer by its plain 4-bit merge.

  Every :class:`~jlowbit.nn.LoRALinear4bit`,
  :class:`~jlowbit.nn.LoRALinearGeneral4bit` and
  :class:`~jlowbit.nn.LoRAEinsum4bit` in ``model`` (as :func:`quantize_model`
  with ``lora_rank`` makes them) becomes its ``merge()``: the plain 4-bit
  layer whose weight is

  .. math::
    W' = \mathrm{quantize}\big(\mathrm{dequantize}(W) + s \, (A B)^\top\big)

  with the same quant type, block size and statistics. Requantizing loses
  precision, as PEFT's ``merge_and_unload`` on a bitsandbytes 4-bit model:
  the merged model's outputs differ from the adapted model's by about one
  4-bit quantization error (see
  :meth:`~jlowbit.nn.LoRALinear4bit.merged_weight`); keep the adapters to
  reproduce the adapted model exactly. A layer shared at several paths
  becomes one shared merged layer. Flax's own float ``nnx.LoRALinear`` is
  not touched.

  Args:
    model: the root module; it cannot itself be a QLoRA layer (call its
      ``merge()``).

  Returns:
    ``model`` (mutated).
  """
  merged: dict[int, nnx.Module] = {}
  paths = []
  while True:
    found = [(path, module) for path, module in nnx.iter_modules(model)
             if isinstance(module, linear4bit.LoRAMixin)]
    if not found:
      break
    for path, module in found:
      if not path:
        raise ValueError("model is itself a QLoRA layer: use model.merge() "
                         "instead")
      if id(module) not in merged:
        merged[id(module)] = module.merge()
      _replace(model, path, merged[id(module)])
      paths.append(path)
  logging.info("merge_lora: %d layers merged: %s", len(paths), paths)
  return model


def _nbytes(tree: Any) -> int:
  total = 0
  for leaf in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    total += int(np.prod(leaf.shape, dtype=np.int64)) * leaf.dtype.itemsize
  return total


def memory_report(model: nnx.Module) -> dict[str, int]:
  """Bytes held by ``model``'s variables, by kind.

  Returns:
    ``{"4bit_weights", "4bit_statistics", "float_params", "other", "total"}``:

    * ``4bit_weights``: packed codes of every :class:`QuantizedWeight`
      (``ceil(n / 2)`` bytes for ``n`` weights);
    * ``4bit_statistics``: the rest of those weights: float32 absmax (or
      the 8-bit nested absmax, its float32 scales and codebook, and the
      offset) and the 16-entry quant map;
    * ``float_params``: every ``nnx.Param`` (``nnx.LoRAParam`` included);
    * ``other``: other variables (batch statistics, RNG state, ...);
    * ``total``: their sum.

    A variable shared at several paths counts once.
  """
  report = dict.fromkeys(("4bit_weights", "4bit_statistics", "float_params",
                          "other"), 0)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, linear4bit.QuantizedWeight):
      w4 = node.get_value()
      packed = _nbytes(w4.packed)
      report["4bit_weights"] += packed
      report["4bit_statistics"] += _nbytes(w4) - packed
    elif isinstance(node, nnx.Param):
      report["float_params"] += _nbytes(node.get_value())
    elif isinstance(node, nnx.Variable):
      report["other"] += _nbytes(node.get_value())
  report["total"] = sum(report.values())
  return report
