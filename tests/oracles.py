"""Test-only oracles: slow, obviously correct searches the library's
search tables must agree with."""

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


def tree_code_index(v: jax.Array, tree: jax.Array) -> jax.Array:
  """:func:`nearest_code_index` through a :func:`jlowbit._search.decision_tree` (same result).

  Branch-free descent: ``node = 2 node + (tree[node] <= v)`` for ``k``
  levels from the root ``1``; ``node - 2**k`` is the number of thresholds
  ``<= v``, i.e. the nearest code's index. NaN maps to 0.

  Args:
    v: float32 values, any shape.
    tree: float32 ``[2**k]`` from :func:`jlowbit._search.decision_tree`.

  Returns:
    int32 indices, the shape of ``v``.
  """
  size = tree.shape[0]
  node = jnp.ones(v.shape, jnp.int32)
  for _ in range(size.bit_length() - 1):
    node = 2 * node + (tree[node] <= v).astype(jnp.int32)
  return node - size
