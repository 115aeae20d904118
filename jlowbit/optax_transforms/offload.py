r"""Host-offloaded ("paged") optimizer state: :func:`offload_state`.

bitsandbytes' paged optimizers (``PagedAdamW8bit``, ...) put their state in
CUDA unified memory and let the driver page it in and out. JAX names memory
explicitly instead: :func:`offload_state` keeps the state arrays of any
transformation in the device's ``pinned_host`` memory between steps.

**Whole** (``chunks=None``, the default): each update copies the state to
device memory, runs the wrapped transformation there and copies the new
state back:

.. math::
  s_{\text{dev}} = \mathrm{put}(s_{\text{host}}, \text{device}), \quad
  (u', s'_{\text{dev}}) = \text{inner.update}(u, s_{\text{dev}}, p), \quad
  s'_{\text{host}} = \mathrm{put}(s'_{\text{dev}}, \text{host})

The copies are ``jax.device_put(..., jax.memory.Space.Device / Host)``: a
change of memory space, not of layout, so every array keeps its sharding
(offloaded sharded state stays sharded, each device's shard in its own
host's memory). The state's values, and so the updates, are bit-identical
to the wrapped transformation's. What it costs: every step moves the state
across the host link twice (in, then out), ``2 * state_bytes /
link_bandwidth`` when nothing overlaps it — for an 8-bit optimizer about 2
bytes per parameter per moment (on an H200, ~56 GB/s each way, not
overlapped with the step's compute: 1.5x the step time of an
11B-parameter model, see ``benchmarks/RESULTS.md``). What it saves: the
state's device memory *between* steps only. During the update the whole
state is on the device (XLA moves every leaf in before the update's
kernels run, whatever order the code asks for), so the step's peak device
memory is the same as without offload.

**Streamed** (``chunks=N``): jlowbit's 8-bit moments stay in host memory
through the update too. Each 8-bit transformation inside ``inner``
(``scale_by_adam_8bit`` of ``adamw_8bit``, ...) updates its leaves of rank
>= 2 whose leading axis is not sharded in ``N`` slices of that axis (the
largest divisor of its length that is at most ``N``: stacked layers, rows of
an embedding; blocks run along the last axis, so a slice holds whole
blocks), in a ``lax.scan`` over the slice index: the body moves slice ``j``
of every such leaf's codes and absmax to the device (``lax.dynamic_slice``
of the host array, ``device_put``), runs the kernel on them with slice ``j``
of the gradients, moves the new slice back and
``lax.dynamic_update_slice``-s it into the carried host array, and writes
the direction over the gradient's slice. A loop body's transfers cannot be
hoisted out of the loop as the whole mode's are, so only about ``1 / N``
of the streamed state is on the device at a time, and the direction needs
no buffer of its own. The other state (float moments of small leaves, 1-D
8-bit leaves, leaves sharded along their leading axis, other
transformations' state, step counts) is moved whole, as above.

The transfers are the same bytes as the whole mode's, one after the other:
slice ``j + 1`` is read after slice ``j`` is written back. Reading it
earlier (to overlap the two directions of the link) makes XLA copy the
whole host array in every iteration to keep the value the read needs
(38.7 s a step instead of 2.5 s on an H200), and carrying the new slice in
host memory to the next iteration crashes XLA's GPU compiler (jax 0.11).

Measured on an H200 (jax 0.11; ``benchmarks/offload.py``,
``benchmarks/RESULTS.md`` section 4), a GPT-style model of 11.4B float32
parameters, AdamW 8-bit, 23.2 GB of state: the step's device peak falls
from 137.3 GB (8-bit state on the device) to 102.7 GB with ``chunks=8``,
and the step takes 2.49 s against 1.60 s: the state crosses the host link
twice, at its rate (about 52 GB/s each way). The largest model that trains
grows from 11.4B parameters to 14.6B, 1.79x the 8.2B that optax's float32
AdamW fits on the same GPU. On the CPU backend the planned
temporaries of a small model's step fall with ``N``. Values: the 8-bit
state is what the kernels compute for each element, bit for bit (every
slice keeps its elements' rounding-noise counters); where XLA computes float
math (the direction of float32 Adam, which ``update_8bit`` derives from the
old state; everything with ``impl="xla"``), it may round an ulp or a few
differently in the loop body than fused into the whole step, so updates may
differ from the non-offloaded optimizer's by a few ulps (and the codes
after that, as the parameters do).

Scalar leaves (step counts) stay on the device: they are tiny, and keeping
them there spares one transfer each per step.

Known issue (CPU backend of jax 0.10, with or without ``chunks``): a jitted
update that donates the offloaded state aborts when a float moment (a leaf
below ``min_8bit_size``) has the shape and dtype of an update: the donated
host buffer is aliased to the device output ("PjRtBuffer's memory kind does
not match sharding's memory kind").
"""

import contextlib
import contextvars
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlowbit import _layout
from jlowbit import _sharding
from jlowbit import update8
from jlowbit.optax_transforms import state as state_lib

OFFLOAD_MEMORY_KIND = "pinned_host"


# Set while offload_state(..., chunks=...) traces its inner update (to the
# chunk count): the 8-bit transformations then stream their host-resident
# moments in chunks.
_STREAMING: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "jlowbit_offload_streaming", default=None)


@contextlib.contextmanager
def _streaming(chunks: int):
  token = _STREAMING.set(chunks)
  try:
    yield
  finally:
    _STREAMING.reset(token)


def _check_memory_kind() -> None:
  """Raises when the default device has no ``pinned_host`` memory."""
  device = jax.devices()[0]
  kinds = sorted(memory.kind for memory in device.addressable_memories())
  if OFFLOAD_MEMORY_KIND not in kinds:
    raise ValueError(
        f"offload_state needs a {OFFLOAD_MEMORY_KIND!r} memory on "
        f"{device.platform} device {device.id}, which has {kinds}")


def _offloaded(leaf: Any) -> bool:
  """Whether a state leaf lives in host memory: arrays of rank >= 1."""
  return isinstance(leaf, jax.Array) and leaf.ndim >= 1


def _to_space(tree: Any, space) -> Any:
  return jax.tree.map(
      lambda leaf: jax.device_put(leaf, space) if _offloaded(leaf) else leaf,
      tree)


def in_host_memory(x: Any) -> bool:
  """Whether ``x`` (concrete or traced) is in host memory."""
  return getattr(jax.typeof(x), "memory_space", None) == jax.memory.Space.Host


def to_device(x: jax.Array) -> jax.Array:
  return jax.device_put(x, jax.memory.Space.Device) if in_host_memory(x) else x


def _to_device_but_8bit(state: Any) -> Any:
  """``state`` moved to the device, except the 8-bit leaves (uint8 codes and
  their absmax) of every :class:`Quantized8bitMoment`: those stay in host
  memory for the 8-bit transformation to stream."""
  def move(node):
    if not isinstance(node, state_lib.Quantized8bitMoment):
      return _to_space(node, jax.memory.Space.Device)
    codes, treedef = jax.tree.flatten(node.codes)
    absmax = treedef.flatten_up_to(node.absmax)
    codes = [c if a is not None else _to_space(c, jax.memory.Space.Device)
             for c, a in zip(codes, absmax)]
    return state_lib.Quantized8bitMoment(treedef.unflatten(codes), node.absmax)
  return jax.tree.map(
      move, state,
      is_leaf=lambda x: isinstance(x, state_lib.Quantized8bitMoment))


def _chunk_count(rows: int, chunks: int) -> int:
  """The largest divisor of ``rows`` that is at most ``chunks``."""
  return max(c for c in range(1, min(rows, chunks) + 1) if rows % c == 0)


def _streamable(grad: jax.Array) -> bool:
  """Whether a leaf can be streamed in chunks of its leading axis: rank >= 2
  (blocks run along the last axis, so a leading-axis slice holds whole
  blocks) and the leading axis not sharded."""
  if grad.ndim < 2:
    return False
  sharding = _sharding.leaf_sharding(grad)
  if sharding is None:
    return True
  return _layout.spec_entries(sharding.spec, grad.ndim)[0] is None


def stream_plan(grads: Sequence[jax.Array]) -> tuple[dict[int, int], list[int]]:
  """For the 8-bit leaves of an update whose moments are in host memory:
  ``({leaf: chunks}, [leaves moved in whole])`` under the current
  :func:`offload_state` setting (one chunk per leaf outside it)."""
  chunks = _STREAMING.get() or 1
  plan, whole = {}, []
  for i, g in enumerate(grads):
    if _streamable(g):
      plan[i] = _chunk_count(g.shape[0], chunks)
    else:
      whole.append(i)
  return plan, whole


def stream_update(algorithm: str, grads: Sequence[jax.Array],
                  moments: Sequence[tuple], hyper: jax.Array, *,
                  chunks: int, block_size: int, stochastic, step,
                  impl: str | None, counter_offsets: Sequence[int]) -> list:
  """:func:`jlowbit.update8.update_8bit` of leaves whose moments are in host
  memory, streamed through the device ``chunks`` slices of their leading
  axis at a time.

  A ``lax.scan`` over the chunk index ``j``: its body moves slice ``j`` of
  every leaf's codes and absmax to the device (``lax.dynamic_slice``, then
  ``jax.device_put``), runs the update on them with slice ``j`` of the
  gradients (one kernel launch for all the leaves' slices), moves the new
  codes and absmax back and ``lax.dynamic_update_slice``-s them into the
  carried host arrays, and writes the slice's direction over the gradient's
  slice (so no second parameter-sized buffer appears). Each slice
  rounds as in the whole update (noise counters offset by the slice's
  position), so with the kernels the new 8-bit state is bit-identical to
  :func:`update_8bit`'s of the whole leaves; float math that XLA compiles
  (directions derived from the old state, ``impl="xla"``) may round an ulp
  or a few differently in the loop body.

  Args:
    moments: per leaf, one ``(codes, absmax)`` pair per moment, in host
      memory; every leaf's leading axis divisible by ``chunks``.
    counter_offsets: per leaf, the noise counter of its first element in
      the whole update.

  Returns:
    Per leaf ``(direction, ((codes, absmax), ...))``: the direction on the
    device, the new moments in host memory.
  """
  device, host = jax.memory.Space.Device, jax.memory.Space.Host
  rows = [g.shape[0] // chunks for g in grads]
  sizes = [g.size // chunks for g in grads]

  def take(x, j, r):
    return jax.lax.dynamic_slice_in_dim(x, j * r, r, 0)

  def put(x, y, j, r):
    return jax.lax.dynamic_update_slice_in_dim(x, y, j * r, 0)

  def fetch(moments, j):
    return [tuple((jax.device_put(take(c, j, r), device),
                   jax.device_put(take(a, j, r), device)) for c, a in m)
            for m, r in zip(moments, rows)]

  def update(grads, here, j):
    """Slice ``j``'s step: gradients with its direction written in, and its
    new moments moved to the host."""
    offsets = [jnp.uint32(o % (1 << 32)) + j.astype(jnp.uint32)
               * jnp.uint32(s % (1 << 32))
               for o, s in zip(counter_offsets, sizes)]
    outs = update8.update_8bit(
        algorithm, [take(g, j, r) for g, r in zip(grads, rows)], here, hyper,
        block_size=block_size, stochastic=stochastic, step=step, impl=impl,
        counter_offsets=offsets)
    grads = [put(g, d, j, r) for g, (d, _), r in zip(grads, outs, rows)]
    new = [tuple((jax.device_put(c, host), jax.device_put(a, host))
                 for c, a in leaf_new) for _, leaf_new in outs]
    return grads, new

  def write(moments, new, j):
    return [tuple((put(c, nc, j, r), put(a, na, j, r))
                  for (c, a), (nc, na) in zip(m, leaf_new))
            for m, leaf_new, r in zip(moments, new, rows)]

  def body(carry, j):
    grads, moments = carry
    grads, new = update(grads, fetch(moments, j), j)
    return (grads, write(moments, new, j)), None

  grads, moments = list(grads), [tuple(tuple(p) for p in m) for m in moments]
  (grads, moments), _ = jax.lax.scan(
      body, (grads, moments), jnp.arange(chunks, dtype=jnp.int32))
  return [(g, m) for g, m in zip(grads, moments)]


def offload_state(inner: optax.GradientTransformation, *,
                  chunks: int | None = None
                  ) -> optax.GradientTransformationExtraArgs:
  """Keeps ``inner``'s state in host memory between steps.

  Args:
    inner: any optax transformation (a jlowbit 8-bit optimizer, an
      ``optax.chain``, ...); extra keyword arguments of ``update`` are
      passed through to it.
    chunks: ``None``: the whole state is moved to the device for the
      update, and back. An int: jlowbit's 8-bit moments are *streamed*
      instead: each 8-bit transformation of ``inner`` updates its leaves of
      rank >= 2 (leading axis not sharded) ``chunks`` slices of their
      leading axis at a time (the largest divisor of the axis that is at
      most ``chunks``), moving one slice in and out per iteration of a
      loop; the rest of the state (float moments, 1-D 8-bit leaves, other
      transformations' state) is moved whole, as with ``None``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    ``inner``'s state with every array of rank >= 1 in ``pinned_host``
    memory; its updates are ``inner``'s, bit for bit.

  Raises:
    ValueError: at ``init``, when the backend's devices have no
      ``pinned_host`` memory; at once for ``chunks < 1``.

  Example:
    >>> import optax, jlowbit as lowbit
    >>> tx = lowbit.offload_state(lowbit.adamw_8bit(1e-3))
    >>> tx = lowbit.offload_state(lowbit.adamw_8bit(1e-3), chunks=8)
  """
  if chunks is not None and (not isinstance(chunks, int) or chunks < 1):
    raise ValueError(f"chunks={chunks!r} must be None or a positive int")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    _check_memory_kind()
    return _to_space(inner.init(params), jax.memory.Space.Host)

  def update_fn(updates, state, params=None, **extra_args):
    if chunks is None:
      on_device = _to_space(state, jax.memory.Space.Device)
      updates, new = inner.update(updates, on_device, params, **extra_args)
    else:
      with _streaming(chunks):
        updates, new = inner.update(updates, _to_device_but_8bit(state),
                                    params, **extra_args)
    return updates, _to_space(new, jax.memory.Space.Host)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
