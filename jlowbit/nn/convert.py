r"""Whole-model helpers: swap ``nnx.Linear`` / ``nnx.LinearGeneral`` layers for 4-bit ones, count bytes."""

import logging
from collections.abc import Callable, MutableMapping, MutableSequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jlowbit.nn import linear4bit

Path = tuple[Any, ...]
# Last path entries of output layers, kept in float by default_filter.
HEAD_NAMES = ("head", "lm_head", "output", "classifier", "logits")


def default_filter(path: Path, module: nnx.Module) -> bool:
  """Every plain ``nnx.Linear`` and ``nnx.LinearGeneral`` except output heads.

  A layer is a head when the last entry of its path is one of
  :data:`HEAD_NAMES` (``"lm_head"``, ``"head"``, ...): language-model heads
  and classifiers are commonly kept in float (bitsandbytes / HF
  ``llm_int8_skip_modules``). Subclasses of ``nnx.Linear`` (``nnx.LoRALinear``)
  and of ``nnx.LinearGeneral`` are not selected. ``nnx.LinearGeneral``
  layers whose layout :class:`LinearGeneral4bit` does not support are
  selected here but skipped by :func:`quantize_model` (see there).
  """
  return (type(module) in (nnx.Linear, nnx.LinearGeneral)  # pylint: disable=unidiomatic-typecheck
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


def quantize_model(model: nnx.Module, *,
                   filter: Callable[[Path, nnx.Module], bool] | None = None,  # pylint: disable=redefined-builtin
                   quant_type: str = "nf4", block_size: int = 64,
                   compress_statistics: bool = False,
                   impl: str | None = None) -> nnx.Module:
  """Replaces, in place, the selected linear layers by 4-bit ones.

  Walks the module graph (attributes, ``nnx.List`` / ``nnx.Dict`` / list /
  dict items) and swaps each ``nnx.Linear`` or ``nnx.LinearGeneral``
  (subclasses included) for which ``filter(path, module)`` is true:
  an ``nnx.Linear`` for ``Linear4bit.from_linear(module, ...)``, an
  ``nnx.LinearGeneral`` for ``LinearGeneral4bit.from_linear_general(module,
  ...)``; ``path`` is the tuple of attribute names and indices from
  ``model`` (as ``nnx.iter_modules`` gives it). Other modules
  (``nnx.Embed``, norms, ``nnx.Einsum``) are never touched. A layer shared
  at several paths becomes one shared 4-bit layer wherever ``filter``
  selects it. The selected paths are logged at INFO level.

  ``LinearGeneral4bit`` supports only ``nnx.LinearGeneral`` layers without
  ``batch_axis`` that contract the input's trailing axes in order
  (``axis=-1``, ``(-2, -1)``, ...; see
  :func:`jlowbit.nn.linear4bit.linear_general_layout_error`). With the
  default filter, other ``nnx.LinearGeneral`` layers stay float (logged at
  INFO level); a user ``filter`` that selects one raises.

  Args:
    model: the root module; it cannot itself be the layer to replace.
    filter: ``(path, module) -> bool``, called on every ``nnx.Linear`` and
      ``nnx.LinearGeneral``; default :func:`default_filter` (all plain
      ones but output heads).
    quant_type, block_size, compress_statistics, impl: see
      :class:`Linear4bit`.

  Returns:
    ``model`` (mutated).

  Raises:
    TypeError: ``filter`` selected a subclass of ``nnx.Linear`` or
      ``nnx.LinearGeneral``, or a layer held in a tuple.
    ValueError: ``model`` itself is selected, or ``filter`` selected an
      ``nnx.LinearGeneral`` of an unsupported layout.
  """
  select = default_filter if filter is None else filter
  quant = dict(quant_type=quant_type, block_size=block_size,
               compress_statistics=compress_statistics, impl=impl)
  swapped: dict[int, nnx.Module] = {}
  skipped: dict[int, Path] = {}
  paths = []
  while True:
    found = [(path, module) for path, module in nnx.iter_modules(model)
             if isinstance(module, (nnx.Linear, nnx.LinearGeneral))
             and id(module) not in skipped and select(path, module)]
    if not found:
      break
    for path, module in found:  # check every layout before changing anything
      error = (linear4bit.linear_general_layout_error(module)
               if isinstance(module, nnx.LinearGeneral) else None)
      if error is not None and filter is not None:
        raise ValueError(f"quantize_model: the nnx.LinearGeneral at {path} "
                         f"was selected by filter but has an unsupported "
                         f"layout: {error}")
      if error is not None and id(module) not in skipped:
        logging.info("quantize_model: nnx.LinearGeneral at %s stays float: "
                     "%s", path, error)
        skipped[id(module)] = path
    for path, module in found:
      if id(module) in skipped:
        continue
      if not path:
        raise ValueError("model is itself a selected layer: use "
                         "Linear4bit.from_linear(model) or "
                         "LinearGeneral4bit.from_linear_general(model) "
                         "instead")
      if id(module) not in swapped:
        if isinstance(module, nnx.LinearGeneral):
          swapped[id(module)] = (
              linear4bit.LinearGeneral4bit.from_linear_general(module, **quant))
        else:
          swapped[id(module)] = linear4bit.Linear4bit.from_linear(module,
                                                                  **quant)
      _replace(model, path, swapped[id(module)])
      paths.append(path)
  logging.info("quantize_model: %d layers -> 4-bit: %s", len(paths), paths)
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
