"""Argument checks of the optax transformations (errors name what is wrong)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jlowbit import _impl
from jlowbit import _validation as val
from jlowbit import blockwise8

# Factory arguments that fix array shapes: pass them as ``static_args`` to
# ``optax.inject_hyperparams`` (it would otherwise turn the ints into arrays).
STATIC_ARGS = ("block_size", "min_8bit_size")


def _static_int(value: Any, name: str) -> None:
  if isinstance(value, jax.Array):
    raise TypeError(
        f"{name} must be a Python int, got an array; with "
        f"optax.inject_hyperparams pass static_args=jlowbit.STATIC_ARGS "
        f"({', '.join(STATIC_ARGS)})")
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"{name}={value!r} must be a Python int")


def check_config(block_size: Any, min_8bit_size: Any, impl: Any) -> None:
  """Validates the keyword-only configuration shared by all transformations."""
  _static_int(block_size, "block_size")
  val.check_choice(block_size, "block_size", blockwise8.BLOCKSIZES)
  if min_8bit_size is not None:
    _static_int(min_8bit_size, "min_8bit_size")
    if min_8bit_size < 0:
      raise ValueError(f"min_8bit_size={min_8bit_size} must be >= 0 or None")
  val.check_choice(impl, "impl", (None, "auto") + _impl.IMPLS)


def check_float_leaves(tree: Any, name: str) -> None:
  """TypeError naming the first leaf that is not float32/bfloat16/float16."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or jnp.dtype(dtype) not in val.FLOAT_DTYPES:
      got = jnp.dtype(dtype).name if dtype is not None else type(leaf).__name__
      raise TypeError(
          f"{name}{jax.tree_util.keystr(path)} has dtype {got}; allowed: "
          f"{', '.join(val.FLOAT_DTYPE_NAMES)}")


def check_matches_state(updates: Any, codes: Any, params: Any) -> None:
  """ValueError unless updates, a moment's ``codes`` tree and params line up."""
  updates_def = jax.tree.structure(updates)
  if jax.tree.structure(codes) != updates_def:
    raise ValueError(
        "updates do not have the structure of the parameters the optimizer "
        f"state was initialized with:\n  updates: {updates_def}\n  state:   "
        f"{jax.tree.structure(codes)}")
  if params is not None and jax.tree.structure(params) != updates_def:
    raise ValueError(
        "updates and params have different tree structures:\n  updates: "
        f"{updates_def}\n  params:  {jax.tree.structure(params)}")
  for (path, g), c in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                          jax.tree.leaves(codes)):
    if g.shape != c.shape:
      raise ValueError(
          f"updates{jax.tree_util.keystr(path)}.shape={g.shape} does not "
          f"match the optimizer state's {c.shape}")
