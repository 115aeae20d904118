"""Argument and state checks of the optax transformations.

Every error names the argument (or the state leaf) and what does not match.
"""

from typing import Any

import jax
import jax.numpy as jnp

from jlowbit import _formats
from jlowbit import _impl
from jlowbit import _layout
from jlowbit import _validation as val
from jlowbit import algorithms
from jlowbit.optax_transforms import state as state_lib

# Factory arguments that fix array shapes. Their defaults (None) work with
# ``optax.inject_hyperparams`` as they are; explicitly passed integers must
# be named in its ``static_args`` (it would otherwise turn them into arrays).
STATIC_ARGS = ("block_size", "min_8bit_size")

_FLOAT_STATE_DTYPES = val.FLOAT_DTYPES + (jnp.float64,)
_FLOAT_STATE_NAMES = val.FLOAT_DTYPE_NAMES + ("float64",)


def _static_int(value: Any, name: str) -> None:
  if isinstance(value, jax.Array):
    raise TypeError(
        f"{name} must be a Python int, got an array; with "
        f"optax.inject_hyperparams pass static_args=jlowbit.STATIC_ARGS "
        f"({', '.join(STATIC_ARGS)}) or leave {name} at its default")
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"{name}={value!r} must be a Python int or None")


def check_config(block_size: Any, min_8bit_size: Any,
                 impl: Any) -> tuple[int, int]:
  """Validates the keyword-only configuration shared by all transformations.

  Returns:
    ``(block_size, min_8bit_size)`` with ``None`` replaced by the defaults.
  """
  if block_size is None:
    block_size = state_lib.DEFAULT_BLOCK_SIZE
  _static_int(block_size, "block_size")
  val.check_choice(block_size, "block_size", _formats.BLOCK_SIZES_8BIT)
  if min_8bit_size is None:
    min_8bit_size = state_lib.DEFAULT_MIN_8BIT_SIZE
  _static_int(min_8bit_size, "min_8bit_size")
  if min_8bit_size < 0:
    raise ValueError(f"min_8bit_size={min_8bit_size} must be >= 0")
  val.check_choice(impl, "impl", (None, "auto") + _impl.IMPLS)
  return block_size, min_8bit_size


def check_float_leaves(tree: Any, name: str) -> None:
  """TypeError naming the first leaf whose dtype is not floating (float32,
  bfloat16, float16, float64)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or jnp.dtype(dtype) not in _FLOAT_STATE_DTYPES:
      got = jnp.dtype(dtype).name if dtype is not None else type(leaf).__name__
      raise TypeError(
          f"{name}{jax.tree_util.keystr(path)} has dtype {got}; allowed: "
          f"{', '.join(_FLOAT_STATE_NAMES)}")


def as_float_leaves(tree: Any, name: str) -> Any:
  """``tree`` with every leaf a JAX array (numpy arrays converted as JAX
  converts them: float64 to float32 unless x64 is enabled), all floating."""
  tree = jax.tree.map(jnp.asarray, tree)
  check_float_leaves(tree, name)
  return tree


def _expected_state(state_cls: type) -> str:
  return (f"a {state_cls.__name__} (made by the init of the same "
          "transformation)")


def check_state(state: Any, state_cls: type, alg: algorithms.Algorithm,
                updates: Any, params: Any,
                storage: state_lib.Storage) -> None:
  """Raises unless ``state`` is what this transformation's ``init`` makes for
  parameters shaped like ``updates``: the state type (so another
  optimizer's state is refused), the tree structure, and per leaf and moment
  the storage (8-bit or float), the codes' shape and dtype and the absmax's
  block count (so state made with another ``block_size`` or
  ``min_8bit_size`` is refused, not silently reshaped)."""
  if not isinstance(state, state_cls):
    raise TypeError(f"state is a {type(state).__name__}, expected "
                    f"{_expected_state(state_cls)}: was it made by another "
                    "optimizer?")
  updates_def = jax.tree.structure(updates)
  if params is not None and jax.tree.structure(params) != updates_def:
    raise ValueError(
        "updates and params have different tree structures:\n  updates: "
        f"{updates_def}\n  params:  {jax.tree.structure(params)}")
  paths_and_grads = jax.tree_util.tree_flatten_with_path(updates)[0]
  for name, moment in zip(alg.moments, state[1:]):
    if jax.tree.structure(moment.codes) != updates_def:
      raise ValueError(
          f"updates do not have the structure of the parameters the optimizer "
          f"state was initialized with:\n  updates: {updates_def}\n  "
          f"state.{name}: {jax.tree.structure(moment.codes)}")
    absmax = updates_def.flatten_up_to(moment.absmax)
    for (path, grad), codes, scales in zip(paths_and_grads,
                                           jax.tree.leaves(moment.codes), absmax):
      _check_leaf(name, jax.tree_util.keystr(path), grad, codes, scales,
                  storage)


def in_shard_map() -> bool:
  """Whether we are tracing inside a ``jax.shard_map`` (manual mesh axes):
  the arrays are then each device's shards of the global leaves."""
  mesh = jax.sharding.get_abstract_mesh()
  return bool(getattr(mesh, "manual_axes", ()))


def _check_leaf(name: str, key: str, grad, codes, absmax,
                storage: state_lib.Storage) -> None:
  where = f"state.{name}{key}"
  if tuple(codes.shape) != tuple(grad.shape):
    raise ValueError(f"updates{key}.shape={tuple(grad.shape)} does not match "
                     f"the optimizer state's {where}.shape={tuple(codes.shape)}")
  if in_shard_map():
    # Local shards of leaves whose storage init chose from the global size.
    eightbit = absmax is not None
  else:
    eightbit = storage.uses_8bit(tuple(grad.shape))
  if eightbit and absmax is None:
    raise ValueError(
        f"{where} is unquantized but this optimizer keeps a leaf of "
        f"{grad.size} elements 8-bit (min_8bit_size={storage.min_8bit_size}): "
        "was the state made with another min_8bit_size or by a *_32bit "
        "optimizer?")
  if not eightbit and absmax is not None:
    raise ValueError(
        f"{where} is 8-bit but this optimizer keeps a leaf of {grad.size} "
        f"elements unquantized (min_8bit_size={storage.min_8bit_size}): was "
        "the state made with another min_8bit_size?")
  if eightbit:
    blocks = _layout.absmax_shape(grad.shape, storage.block_size)
    if codes.dtype != jnp.uint8:
      raise ValueError(f"{where} codes are {jnp.dtype(codes.dtype).name}, "
                       "expected uint8")
    if tuple(absmax.shape) != blocks or absmax.dtype != jnp.float32:
      raise ValueError(
          f"{where} absmax is {jnp.dtype(absmax.dtype).name}"
          f"{tuple(absmax.shape)}, but block_size={storage.block_size} needs "
          f"float32{blocks} for shape {tuple(grad.shape)} (blocks along the "
          "last axis): was the state made with another block_size?")
  elif jnp.dtype(codes.dtype) not in _FLOAT_STATE_DTYPES:
    raise ValueError(f"{where} is {jnp.dtype(codes.dtype).name}, expected a "
                     "float32 (or float64) moment")
