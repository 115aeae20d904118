"""Pure ``jax.numpy`` building blocks shared by the reference (``xla``) ops.

Each mirrors a ``@triton.jit`` helper of :mod:`jlowbit.triton_kernels.common`
operation for operation, so the two backends round to identical codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nearest_code_index(v: jax.Array, code: jax.Array) -> jax.Array:
  """Index of the nearest entry of sorted ``code`` to each ``v`` (ties: lower).

  A branch-free binary search (``log2(len(code))`` steps) finds the number of
  codes ``<= v``; the nearer of the two neighbours wins. NaN maps to index 0.

  Args:
    v: float32 values, any shape.
    code: float32 ``[2**k]``, strictly increasing.

  Returns:
    int32 indices, the shape of ``v``.
  """
  size = code.shape[0]
  bits = size.bit_length() - 1
  pos = jnp.zeros(v.shape, jnp.int32)
  for i in range(bits):
    candidate = pos + (1 << (bits - 1 - i))
    pos = jnp.where(code[candidate - 1] <= v, candidate, pos)
  lo = jnp.clip(pos - 1, 0, size - 2)
  hi = lo + 1
  return jnp.where(code[hi] - v < v - code[lo], hi, lo)


def inverse_scale(absmax: jax.Array) -> jax.Array:
  """``1 / absmax`` per block, with 0 treated as 1 (all-zero blocks stay zero).

  Values are normalized as ``x * inverse_scale`` (as bitsandbytes does), one
  division per block; XLA would rewrite ``x / broadcast(absmax)`` into this
  form anyway, so the kernels do exactly the same.
  """
  return jnp.float32(1) / jnp.where(absmax > 0, absmax, jnp.float32(1))


def blocked(x: jax.Array, blocksize: int) -> jax.Array:
  """Flattens ``x`` to float32 ``[blocks, blocksize]``, zero-padding the tail."""
  flat = x.reshape(-1).astype(jnp.float32)
  pad = (-flat.size) % blocksize
  return jnp.pad(flat, (0, pad)).reshape(-1, blocksize)


def block_absmax(blocks: jax.Array) -> jax.Array:
  """``max |x|`` of each row of ``blocks``; NaN anywhere in a row gives NaN."""
  return jnp.max(jnp.abs(blocks), axis=1)
