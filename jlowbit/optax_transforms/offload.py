r"""Host-offloaded ("paged") optimizer state: :func:`offload_state`.

bitsandbytes' paged optimizers (``PagedAdamW8bit``, ...) put their state in
CUDA unified memory and let the driver page it in and out. JAX names memory
explicitly instead: :func:`offload_state` keeps the state arrays of any
transformation in the device's ``pinned_host`` memory between steps. Each
update copies them to device memory, runs the wrapped transformation there
and copies the new state back:

.. math::
  s_{\text{dev}} = \mathrm{put}(s_{\text{host}}, \text{device}), \quad
  (u', s'_{\text{dev}}) = \text{inner.update}(u, s_{\text{dev}}, p), \quad
  s'_{\text{host}} = \mathrm{put}(s'_{\text{dev}}, \text{host})

The copies are ``jax.device_put(..., jax.memory.Space.Device / Host)``: a
change of memory space, not of layout, so every array keeps its sharding
(offloaded sharded state stays sharded, each device's shard in its own
host's memory). Inside ``jax.jit`` XLA issues them as one asynchronous
copy per leaf and may overlap them with other work of the step. The
state's values, and so the updates, are bit-identical to the wrapped
transformation's.

What it costs: every step moves the offloaded state across the host link
twice (in, then out), ``2 * state_bytes / link_bandwidth`` when nothing
overlaps it — for an 8-bit optimizer about 2 bytes per parameter per
moment (on an H200, ~56 GB/s each way, not overlapped with the step's
compute: 1.5x the step time of an 11B-parameter model, see
``benchmarks/RESULTS.md``). What it saves: the state's device memory
between steps. During the update the whole state is on the device (XLA
moves every leaf in before the update's kernels run), so the step's peak
device memory is the same as without offload.

Scalar leaves (step counts) stay on the device: they are tiny, and keeping
them there spares one transfer each per step.
"""

from typing import Any

import jax
import optax

OFFLOAD_MEMORY_KIND = "pinned_host"


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


def offload_state(inner: optax.GradientTransformation
                  ) -> optax.GradientTransformationExtraArgs:
  """Keeps ``inner``'s state in host memory between steps.

  Args:
    inner: any optax transformation (a jlowbit 8-bit optimizer, an
      ``optax.chain``, ...); extra keyword arguments of ``update`` are
      passed through to it.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    ``inner``'s state with every array of rank >= 1 in ``pinned_host``
    memory; its updates are ``inner``'s, bit for bit.

  Raises:
    ValueError: at ``init``, when the backend's devices have no
      ``pinned_host`` memory.

  Example:
    >>> import optax, jlowbit as lowbit
    >>> tx = lowbit.offload_state(lowbit.adamw_8bit(1e-3))
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    _check_memory_kind()
    return _to_space(inner.init(params), jax.memory.Space.Host)

  def update_fn(updates, state, params=None, **extra_args):
    on_device = _to_space(state, jax.memory.Space.Device)
    updates, on_device = inner.update(updates, on_device, params, **extra_args)
    return updates, _to_space(on_device, jax.memory.Space.Host)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
