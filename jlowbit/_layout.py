r"""Where the blocks of 8-bit optimizer state lie: over a leaf, over its shards.

**Blocks run along the last axis.** A leaf of shape ``(..., n)`` is a stack
of rows of ``n`` elements (a 0-d leaf is one row of one element); each row
is cut into :math:`\lceil n / B \rceil` blocks of ``B = block_size``
elements, the last one partial when ``B`` does not divide ``n``. The block
scales (``absmax``) have the shape

.. math::
  \mathrm{shape}[:-1] + (\lceil n / B \rceil,)

and block ``(r, k)`` holds the elements ``k B .. min((k+1) B, n) - 1`` of
row ``r``. Where ``B`` divides ``n`` (and for every 1-D leaf) these are
exactly bitsandbytes' blocks of the row-major flattened leaf, byte for byte
(``absmax.reshape(-1)`` is its absmax vector).

**Shards.** A block never straddles two shards when the leaf's leading axes
are sharded in any way and its last axis is either unsharded or cut into
shards of a multiple of ``B`` elements each (``n`` divisible by
``shards * B``). Then ``absmax`` takes the leaf's own
``PartitionSpec`` and every shard updates its blocks alone. A leaf whose
sharded last axis splits blocks (say ``n = 1000`` over 8 devices) is
computed with its last axis gathered (its ``absmax`` is stored replicated
along the mesh axes of the last axis): correct, but with communication for
that leaf; :func:`splits_blocks` tells which leaves do.

**Rounding noise** (stochastic rounding) is keyed by each element's
counter: its row-major position in the (global) leaf plus the leaf's offset
among the step's 8-bit leaves, whatever the sharding
(:func:`row_counters`), so a sharded step rounds exactly as an unsharded
one.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


def absmax_shape(shape: Sequence[int], block_size: int) -> tuple[int, ...]:
  """``shape[:-1] + (ceil(shape[-1] / block_size),)``; ``(1,)`` for 0-d."""
  shape = tuple(int(d) for d in shape) or (1,)
  return shape[:-1] + (-(-shape[-1] // block_size),)


def row_length(shape: Sequence[int]) -> int:
  """Elements per row: the last axis (1 for a 0-d leaf)."""
  return int(shape[-1]) if len(shape) else 1


def spec_entries(spec: PartitionSpec | None, ndim: int) -> tuple:
  """``spec`` as one entry per axis (``None`` for unsharded axes)."""
  entries = tuple(spec or ())
  if len(entries) > ndim:
    raise ValueError(f"PartitionSpec {spec} has more entries than the leaf "
                     f"has axes ({ndim})")
  return entries + (None,) * (ndim - len(entries))


def entry_axes(entry) -> tuple[str, ...]:
  """Mesh axis names of one ``PartitionSpec`` entry (major first)."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def shards(entry, axis_sizes: dict[str, int]) -> int:
  """How many shards a ``PartitionSpec`` entry cuts its axis into."""
  return math.prod(axis_sizes[a] for a in entry_axes(entry))


def splits_blocks(shape: Sequence[int], spec: PartitionSpec | None,
                  axis_sizes: dict[str, int], block_size: int) -> bool:
  """Whether sharding ``shape`` by ``spec`` puts parts of a block on two
  devices: the last axis is sharded and its shards are not whole blocks."""
  if not shape:
    return False
  entry = spec_entries(spec, len(shape))[-1]
  count = shards(entry, axis_sizes)
  return count > 1 and shape[-1] % (count * block_size) != 0


def block_spec(shape: Sequence[int], spec: PartitionSpec | None,
               axis_sizes: dict[str, int], block_size: int) -> PartitionSpec:
  """The spec a leaf's blocks are updated in (and its ``absmax`` stored
  with): ``spec`` itself, but with the last axis unsharded where the
  sharding would split blocks (:func:`splits_blocks`). For a 0-d leaf (whose
  ``absmax`` is ``[1]``), ``P()``."""
  if not shape:
    return PartitionSpec()
  entries = spec_entries(spec, len(shape))
  if splits_blocks(shape, spec, axis_sizes, block_size):
    entries = entries[:-1] + (None,)
  return PartitionSpec(*entries)


def shard_starts(shape: Sequence[int], spec: PartitionSpec | None,
                 axis_sizes: dict[str, int]) -> list[jax.Array]:
  """Inside ``jax.shard_map``: the global index of this shard's first
  element along each axis (int32 scalars; ``spec`` as the shard_map's)."""
  starts = []
  for size, entry in zip(shape, spec_entries(spec, len(shape))):
    index = jnp.int32(0)
    for name in entry_axes(entry):
      index = index * axis_sizes[name] + jax.lax.axis_index(name)
    starts.append(index * (size // shards(entry, axis_sizes)))
  return starts


def row_counters(global_shape: Sequence[int], local_shape: Sequence[int],
                 starts: Sequence[jax.Array] | None, offset: int) -> jax.Array:
  """uint32 ``local_shape[:-1]`` (``[1]`` for 0-d): the noise counter of the
  first element of each local row, ``offset`` plus its row-major position in
  the global leaf (modulo ``2**32``). ``starts``: :func:`shard_starts`, or
  ``None`` for an unsharded leaf (local = global)."""
  global_shape = tuple(global_shape) or (1,)
  local_shape = tuple(local_shape) or (1,)
  strides = [math.prod(global_shape[d + 1:]) % (1 << 32)
             for d in range(len(global_shape))]
  counters = jnp.full(local_shape[:-1], offset % (1 << 32), jnp.uint32)
  for d in range(len(local_shape)):
    start = (jnp.uint32(0) if starts is None or not len(starts)
             else starts[d].astype(jnp.uint32))
    if d == len(local_shape) - 1:
      counters = counters + start
      continue
    index = jax.lax.broadcasted_iota(jnp.uint32, local_shape[:-1], d) + start
    counters = counters + index * jnp.uint32(strides[d])
  return counters


def contiguous(global_shape: Sequence[int], spec: PartitionSpec | None,
               axis_sizes: dict[str, int]) -> bool:
  """Whether every shard of ``global_shape`` under ``spec`` is one run of
  consecutive row-major elements (only the first sharded axis is cut and
  no axis after it is), so that its noise counters are its first counter
  plus the local position."""
  entries = spec_entries(spec, len(global_shape))
  sharded = [d for d, e in enumerate(entries) if shards(e, axis_sizes) > 1]
  if not sharded:
    return True
  first = sharded[0]
  return len(sharded) == 1 and all(d == 1 for d in global_shape[:first])
