"""Running a per-leaf step shard by shard: ``jax.shard_map`` over a leaf's mesh.

:func:`leaf_sharding` says whose sharding is known when the step is traced
(a concrete array's ``NamedSharding``; a traced array's type on a mesh with
``AxisType.Explicit`` axes). :func:`shard_mapped_update` runs a step
function on every device's shards of such leaves, with their blocks
(:mod:`jlowbit._layout`) and rounding-noise counters those of the global
leaves, so the result is the unsharded step's, bit for bit.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jlowbit import _layout


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def leaf_sharding(x) -> NamedSharding | None:
  """``x``'s ``NamedSharding`` where it is known now and spans several
  devices, else ``None``.

  Known: a concrete ``jax.Array`` (or ``jax.ShapeDtypeStruct``) with a
  ``NamedSharding``; a traced array whose type carries its sharding (a mesh
  with ``AxisType.Explicit`` axes). Unknown: traced arrays on
  ``AxisType.Auto`` axes (GSPMD decides their sharding after tracing) and
  arrays inside a ``jax.shard_map`` (``Manual`` axes: already local).
  """
  if _is_tracer(x):
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding):
      return None
    types = tuple(sharding.mesh.axis_types)
    if AxisType.Manual in types or AxisType.Explicit not in types:
      return None
  else:
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
      return None
    if AxisType.Manual in tuple(sharding.mesh.axis_types):
      return None
  return sharding if sharding.mesh.size > 1 else None


def mesh_of(x):
  """The mesh of :func:`leaf_sharding`, or ``None``."""
  sharding = leaf_sharding(x)
  return None if sharding is None else sharding.mesh


def axis_sizes(mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def place(x: jax.Array, mesh, spec: PartitionSpec) -> jax.Array:
  """``x`` resharded to ``spec`` on ``mesh`` (traced: ``jax.sharding.reshard``)."""
  if _is_tracer(x):
    return jax.sharding.reshard(x, spec)
  return jax.device_put(x, NamedSharding(mesh, spec))


def shard_mapped_update(fn: Callable, mesh, grads: Sequence[jax.Array],
                        moments: Sequence[tuple], hyper: jax.Array, step,
                        offsets: Sequence[int], block_size: int,
                        noise_type: type | None,
                        shifts: jax.Array | None = None,
                        params: Sequence[jax.Array] | None = None) -> list:
  """``fn`` on every device's shards of ``grads`` and their 8-bit moments.

  Args:
    fn: ``fn(grads, moments, hyper, step=..., noise=...)`` (with ``params``
      also ``params=...``, the local shards of ``params``) returning per
      leaf ``(direction, ((codes, absmax), ...))`` for whole local leaves
      (with ``params``: the new parameter in place of the direction);
      ``noise`` is per leaf ``noise_type(row_counters, contiguous)`` or
      ``None`` (``noise_type`` is ``None``: no moment rounds stochastically).
      Hashable (the compiled step is cached on it, so an eager step
      compiles once).
    mesh: the leaves' mesh.
    grads: leaves with :func:`leaf_sharding` on ``mesh``.
    moments: per leaf its ``(codes, absmax)`` pairs.
    hyper: replicated hyperparameter vector.
    step: the step number (int scalar) or ``None``.
    offsets: per leaf the noise counter of its first (global) element.
    block_size: elements per block.
    noise_type: the per-leaf noise record, or ``None``.
    shifts: uint32 per leaf added to its noise counters, or ``None``.
    params: per leaf its parameter (the gradient's shape), sharded as
      ``fn`` needs it like the gradient, or ``None``.

  Returns:
    ``fn``'s results as global arrays: directions (new parameters) and
    codes sharded like their gradient, ``absmax`` by
    :func:`jlowbit._layout.block_spec`.
  """
  sizes = axis_sizes(mesh)
  specs = [PartitionSpec(*_layout.spec_entries(leaf_sharding(g).spec, g.ndim))
           for g in grads]
  blocks = [_layout.block_spec(g.shape, s, sizes, block_size)
            for g, s in zip(grads, specs)]
  shapes = [tuple(g.shape) for g in grads]
  # A leaf whose sharded last axis would split blocks is gathered along it.
  grads = [g if b == s else place(g, mesh, b)
           for g, s, b in zip(grads, specs, blocks)]
  moments = [tuple((c if b == s else place(c, mesh, b), place(a, mesh, b))
                   for c, a in m)
             for m, s, b in zip(moments, specs, blocks)]
  if params is not None:  # passed beside the gradients, sharded like them
    grads = [(g, place(p, mesh, b)) for g, p, b in zip(grads, params, blocks)]
  step = jnp.zeros((), jnp.int32) if step is None else step
  mapped = _mapped(fn, mesh, tuple(shapes), tuple(blocks),
                   tuple(len(m) for m in moments), tuple(offsets), noise_type,
                   shifts is not None, params is not None)
  outs = (mapped(grads, moments, hyper, step) if shifts is None
          else mapped(grads, moments, hyper, step, shifts))
  results = []
  for (d, new), s, b in zip(outs, specs, blocks):
    if b != s:
      d = place(d, mesh, s)
      new = tuple((place(c, mesh, s), a) for c, a in new)
    results.append((d, tuple(new)))
  return results


@functools.cache
def _mapped(fn: Callable, mesh, shapes: tuple, blocks: tuple, moments: tuple,
            offsets: tuple, noise_type, shifted: bool = False,
            with_params: bool = False) -> Callable:
  """The jitted ``jax.shard_map`` of :func:`shard_mapped_update` (cached).
  ``shifted``: it takes a fifth argument, uint32 per leaf, added to the
  leaves' noise counters (traced counter offsets). ``with_params``: each
  gradient comes as a ``(gradient, parameter)`` pair."""
  sizes = axis_sizes(mesh)

  def local(grads, moments, hyper, step, shifts=None):
    extra = {}
    if with_params:
      grads, extra["params"] = map(list, zip(*grads))
    noise = [None] * len(grads)
    if noise_type is not None:
      noise = []
      for i, (shape, spec, grad, offset) in enumerate(
          zip(shapes, blocks, grads, offsets)):
        starts = _layout.shard_starts(shape, spec, sizes)
        counters = _layout.row_counters(shape, grad.shape, starts, offset)
        if shifts is not None:
          counters = counters + shifts[i]
        noise.append(noise_type(counters, _layout.contiguous(shape, spec, sizes)))
    return fn(list(grads), list(moments), hyper, step=step, noise=noise,
              **extra)

  leaf_specs = [(b, tuple((b, b) for _ in range(k))) for b, k in zip(blocks, moments)]
  grad_specs = [(b, b) if with_params else b for b in blocks]
  return jax.jit(jax.shard_map(
      local, mesh=mesh,
      in_specs=(grad_specs, [spec for _, spec in leaf_specs], PartitionSpec(),
                PartitionSpec()) + ((PartitionSpec(),) if shifted else ()),
      out_specs=leaf_specs, check_vma=False))


def named(mesh, spec: PartitionSpec, like: Any = None) -> NamedSharding:
  """``NamedSharding(mesh, spec)`` with ``like``'s memory kind."""
  kind = getattr(like, "memory_kind", None)
  return NamedSharding(mesh, spec, memory_kind=kind)
