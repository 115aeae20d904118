r"""The shardings of an optimizer's state, from the parameters' shardings.

:func:`state_shardings` answers "how is ``optimizer.init(params)`` laid out
over the mesh" without running it: for ``jax.jit(..., out_shardings=...)``
of an init or a train step, for ``flax.nnx`` sharded optimizers and for
restoring a checkpoint with ``orbax`` onto a mesh (any mesh: the 8-bit
layout depends on the shapes alone, :mod:`jlowbit._layout`).
"""

from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jlowbit.optax_transforms.offload import OFFLOAD_MEMORY_KIND


def _sharding(leaf, name: str) -> NamedSharding:
  sharding = getattr(leaf, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    raise TypeError(
        f"{name} must be arrays or jax.ShapeDtypeStructs with a "
        f"jax.sharding.NamedSharding, got {type(leaf).__name__} with sharding "
        f"{sharding!r}")
  return sharding


def state_shardings(optimizer: Any, params: Any) -> Any:
  r"""The ``NamedSharding`` of every leaf of ``optimizer.init(params)``.

  8-bit moments of :mod:`jlowbit` optimizers: codes sharded like their
  parameter, ``absmax`` with the parameter's ``PartitionSpec`` (its last
  axis unsharded where the parameter's sharding would split blocks,
  :func:`jlowbit._layout.block_spec`); float moments like their parameter;
  what other optax transformations in the chain keep, as their ``init``
  places it under ``AxisType.Explicit`` axes (moments like the parameters,
  counters replicated); state that ``init`` puts in host memory
  (:func:`jlowbit.offload_state`) in ``pinned_host``. Computed by tracing
  ``init`` abstractly on the parameters' mesh with explicit axes, so it is
  ``init``'s own decision, whatever the mesh's axis types are.

  Args:
    optimizer: an ``optax.GradientTransformation`` (any chain).
    params: the parameters, as arrays or ``jax.ShapeDtypeStruct``\ s whose
      ``.sharding`` is a ``NamedSharding`` (one mesh).

  Returns:
    A pytree like the state with a ``NamedSharding`` (on the parameters'
    mesh) per array leaf.

  Example:
    >>> import jax, jax.numpy as jnp, jlowbit as lowbit
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> spec = jax.NamedSharding(mesh, jax.P("fsdp"))
    >>> params = {"w": jax.ShapeDtypeStruct((4096, 256), jnp.float32, sharding=spec)}
    >>> tx = lowbit.adamw_8bit(1e-3)
    >>> shardings = lowbit.state_shardings(tx, params)
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
  """
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("params has no leaves")
  shardings = [_sharding(leaf, "params") for leaf in leaves]
  mesh = shardings[0].mesh
  if any(s.mesh != mesh for s in shardings):
    raise ValueError("params must all be sharded over one mesh")
  explicit = mesh.abstract_mesh.update_axis_types(
      {name: AxisType.Explicit for name in mesh.axis_names})
  abstract = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(
          p.shape, p.dtype,
          sharding=NamedSharding(explicit, _sharding(p, "params").spec)),
      params)
  with jax.sharding.use_abstract_mesh(explicit):
    traced, state = jax.make_jaxpr(optimizer.init, return_shape=True)(abstract)
  kind = shardings[0].memory_kind

  def concrete(aval):
    spec = getattr(aval.sharding, "spec", None) or PartitionSpec()
    host = getattr(aval, "memory_space", None) == jax.memory.Space.Host
    return NamedSharding(mesh, spec,
                         memory_kind=OFFLOAD_MEMORY_KIND if host else kind)

  return jax.tree.structure(state).unflatten(
      [concrete(v.aval) for v in traced.jaxpr.outvars])
