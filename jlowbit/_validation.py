"""Argument checks that name the argument and the allowed values."""

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
FLOAT_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def check_array(x: Any, name: str) -> None:
  """Raises TypeError unless ``x`` is a JAX array, tracer or numpy array."""
  if not isinstance(x, (jax.Array, np.ndarray)):
    raise TypeError(f"{name} must be a jax.Array or numpy.ndarray, got "
                    f"{type(x).__name__}")


def check_float_dtype(dtype: Any, name: str) -> jnp.dtype:
  """Returns ``jnp.dtype(dtype)`` if it is float32/bfloat16/float16."""
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"{name}={dtype!r} is not a dtype; allowed: "
                    f"{', '.join(FLOAT_DTYPE_NAMES)}") from e
  if dtype not in FLOAT_DTYPES:
    raise TypeError(f"{name}={dtype.name} is not supported; allowed: "
                    f"{', '.join(FLOAT_DTYPE_NAMES)}")
  return dtype


def as_float_array(x: Any, name: str, float64: bool = False) -> jax.Array:
  """``jnp.asarray(x)``, which must be float32, bfloat16 or float16 (or
  float64 if ``float64``).

  numpy arrays are converted as JAX converts them: float64 becomes float32
  unless ``jax_enable_x64`` is set.
  """
  check_array(x, name)
  x = jnp.asarray(x)
  allowed = FLOAT_DTYPES + ((jnp.float64,) if float64 else ())
  if jnp.dtype(x.dtype) not in allowed:
    names = FLOAT_DTYPE_NAMES + (("float64",) if float64 else ())
    raise TypeError(f"{name}.dtype={jnp.dtype(x.dtype).name} is not supported; "
                    f"allowed: {', '.join(names)}")
  return x


def check_choice(value: Any, name: str, allowed: Iterable[Any]) -> None:
  """Raises ValueError unless ``value`` is one of ``allowed``."""
  allowed = tuple(allowed)
  if isinstance(value, bool) or value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; allowed values: "
                     f"{', '.join(repr(a) for a in allowed)}")


def check_block_size(value: Any, name: str, allowed: Iterable[int]) -> None:
  """Raises unless ``value`` is a Python (or numpy) int among ``allowed``."""
  allowed = tuple(allowed)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name}={value!r} must be an int; allowed values: "
                    f"{', '.join(str(a) for a in allowed)}")
  check_choice(int(value), name, allowed)


def check_codebook(code: Any, name: str, size: int):
  """A float32 ``[size]`` codebook, strictly increasing.

  Returns a float32 numpy array for concrete input (so it stays a host
  constant under ``jax.jit``), the tracer itself otherwise.
  """
  check_array(code, name)
  if code.shape != (size,):
    raise ValueError(f"{name}.shape={tuple(code.shape)} is not supported; "
                     f"a codebook must have shape ({size},)")
  if not jnp.issubdtype(code.dtype, jnp.floating):
    raise TypeError(f"{name}.dtype={jnp.dtype(code.dtype).name} must be floating")
  if isinstance(code, jax.core.Tracer):
    return code
  values = np.asarray(code, dtype=np.float32)
  if not np.all(np.diff(values) > 0):
    raise ValueError(f"{name} must be sorted in strictly increasing order")
  return values
