r"""One optimizer step with 8-bit blockwise moments: the functional op.

:func:`update_8bit` runs one step of an algorithm of
:mod:`jlowbit.algorithms` for many parameter leaves at once: it dequantizes
each leaf's 8-bit moments (``code[codes] * absmax``), does the algorithm's
float32 math with the gradient, and requantizes the new moments blockwise
(``absmax`` = max |moment| per block, nearest code, ties to the lower index;
or stochastic rounding for the moments flagged so), after saturating them at
``+-MOMENT_LIMIT`` where they can grow past it (:mod:`jlowbit.algorithms`,
"Overflow"). It returns the
update *direction* (no learning rate, no weight decay) and the new moments.

* ``impl="xla"``: :func:`update_8bit_reference`, leaf by leaf, in
  ``jax.numpy``;
* ``impl="triton"`` / ``"interpret"``: the fused kernel
  (:mod:`jlowbit.triton_kernels.optim8`), one launch for all the leaves of a
  gradient dtype, moments updated in place when donated.

The kernel writes the direction only where that moves fewer bytes than
recomputing it (:func:`writes_direction`); otherwise this op computes it
from the step's old state with :func:`direction_8bit_reference`, which XLA
fuses into the update's consumer (``optax.apply_updates``).

:func:`apply_8bit` is the step that also writes the parameters (``p - lr *
(d + wd * p)``, or with coupled decay the moments of ``g + wd * p``): the
kernel reads each parameter beside its gradient and writes it in place, so
no direction is written or recomputed (:func:`apply_8bit_reference` is its
twin; :func:`jlowbit.update_and_apply` the front end).

:func:`update_float` is the same math with unquantized moments (the state of
small leaves and of the ``*_32bit`` optimizers).
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlowbit import _formats
from jlowbit import _impl
from jlowbit import _layout
from jlowbit import _search
from jlowbit import _twins
from jlowbit import _noise as _noise_lib
from jlowbit import _sharding
from jlowbit import _validation as val
from jlowbit import algorithms
from jlowbit import codebooks

Moment = tuple[jax.Array, jax.Array]  # (uint8 codes, float32 absmax)

# Gradient dtypes whose direction the kernel does not write (see
# writes_direction): the faster choice with normally distributed gradients
# on an H200 (benchmarks/RESULTS.md, optimizer run 10; RMSprop and Adagrad,
# one unsigned moment, follow SGD-momentum).
_DIRECTION_FROM_STATE = {
    "adam": ("float32",), "ademamix": (), "lion": (),
    "momentum": ("float32",), "rmsprop": ("float32",), "adagrad": ("float32",),
}


def writes_direction(algorithm: str, grad_dtype) -> bool:
  """Whether the kernel writes the update direction of ``grad_dtype``
  gradients, or leaves it to :func:`direction_8bit_reference` on the step's
  old state, an expression XLA fuses into the update's consumer
  (``optax.apply_updates``).

  A written direction is written and read back (twice its size); one from
  the state reads the old codes (a byte per moment) and the gradient again
  in a fusion that gathers from the codebooks. Chosen per algorithm and
  gradient dtype by what was faster on an H200 with normally distributed
  gradients (``benchmarks/experiments/direction_choice.py``): from the
  state for float32 SGD-momentum, RMSprop and Adagrad (one moment: 5 vs 8
  bytes) and float32 Adam (6 vs 8); written for AdEMAMix (7 vs 8 in
  float32, but its three-codebook fusion is no faster), Lion (float32:
  bfloat16 signs, 4 vs 5) and every 16-bit gradient (4 vs 4 for Adam, 3 vs
  4 for one moment: the recomputing fusion's gathers cost more than the
  bytes they save).
  """
  return jnp.dtype(grad_dtype).name not in _DIRECTION_FROM_STATE[algorithm]


def codebook(signed: bool) -> jax.Array:
  """The moment codebook as a float32 ``[256]`` device constant (never state).

  Quantization takes the numpy :func:`jlowbit.codebooks.dynamic` itself: its
  decision thresholds are computed on the host.
  """
  return jnp.asarray(codebooks.dynamic(signed))


def _algorithm(name: str) -> algorithms.Algorithm:
  val.check_choice(name, "algorithm", algorithms.ALGORITHMS)
  return algorithms.ALGORITHMS[name]


def _check_hyper(alg: algorithms.Algorithm, hyper) -> None:
  val.check_array(hyper, "hyper")
  if tuple(hyper.shape) != (len(alg.hyper),):
    raise ValueError(f"hyper.shape={tuple(hyper.shape)} does not match "
                     f"algorithm={alg.name!r}: expected ({len(alg.hyper)},) = "
                     f"[{', '.join(alg.hyper)}]")


def _check_moments(alg: algorithms.Algorithm, grad, moments, block_size: int,
                   where: str = "") -> None:
  """ValueError unless ``moments`` are ``alg``'s 8-bit moments of ``grad``."""
  if not isinstance(moments, (tuple, list)) or len(moments) != len(alg.moments):
    raise ValueError(f"moments{where} must be {len(alg.moments)} (codes, absmax) "
                     f"pairs {alg.moments} for algorithm={alg.name!r}")
  absmax_shape = _layout.absmax_shape(grad.shape, block_size)
  for name, moment in zip(alg.moments, moments):
    if not isinstance(moment, (tuple, list)) or len(moment) != 2:
      raise ValueError(f"moment {name!r}{where} must be a (codes, absmax) pair")
    codes, absmax = moment
    val.check_array(codes, f"{name}{where} codes")
    val.check_array(absmax, f"{name}{where} absmax")
    if codes.dtype != jnp.uint8 or codes.shape != grad.shape:
      raise ValueError(f"{name}{where} codes must be uint8 of the gradient's "
                       f"shape {grad.shape}, got "
                       f"{jnp.dtype(codes.dtype).name}{tuple(codes.shape)}")
    if absmax.dtype != jnp.float32 or absmax.shape != absmax_shape:
      raise ValueError(
          f"{name}{where} absmax is {jnp.dtype(absmax.dtype).name}"
          f"{tuple(absmax.shape)}, but block_size={block_size} needs "
          f"float32{absmax_shape} (blocks along the last axis of "
          f"{tuple(grad.shape)}): was the state made with another block_size?")


def _check_stochastic(alg: algorithms.Algorithm, stochastic,
                      step) -> tuple[bool, ...]:
  """``stochastic`` as one bool per moment of ``alg``."""
  if stochastic is None:
    return (False,) * len(alg.moments)
  flags = tuple(stochastic)
  if len(flags) != len(alg.moments) or not all(isinstance(s, bool) for s in flags):
    raise ValueError(f"stochastic={stochastic!r} must hold one bool per moment "
                     f"of algorithm={alg.name!r} {alg.moments}")
  if any(flags) and step is None:
    raise ValueError("stochastic rounding needs the step number (step=...)")
  return flags


def _compute_dtype(dtype) -> jnp.dtype:
  """float64 for float64 values, else float32."""
  return jnp.promote_types(jnp.float32, dtype)


def update_float(algorithm: str, grad: jax.Array, moments: Sequence[jax.Array],
                 hyper: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """One step of ``algorithm`` with unquantized moments.

  The math runs in float32, or in float64 for a float64 gradient (like
  optax's optimizers with float64 parameters).

  Args:
    algorithm: a key of :data:`jlowbit.algorithms.ALGORITHMS`.
    grad: floating gradient, any shape.
    moments: the algorithm's moments (float32, float64 for a float64
      gradient) of ``grad.shape``, in state order.
    hyper: float vector in the algorithm's ``hyper`` layout.

  Returns:
    ``(direction, new_moments)``: direction in ``grad``'s dtype and shape,
    new moments in the compute dtype.
  """
  alg = _algorithm(algorithm)
  _check_hyper(alg, hyper)
  if len(moments) != len(alg.moments):
    raise ValueError(f"algorithm={algorithm!r} takes {len(alg.moments)} "
                     f"moments {alg.moments}, got {len(moments)}")
  dtype = _compute_dtype(grad.dtype)
  hyper = hyper.astype(dtype)
  d, new = alg.math(grad.astype(dtype), tuple(m.astype(dtype) for m in moments),
                    tuple(hyper[i] for i in range(hyper.shape[0])))
  return d.astype(grad.dtype), new


def _as_rows(x: jax.Array) -> jax.Array:
  """``x`` with at least one axis (a 0-d leaf is one row of one element)."""
  return x.reshape(x.shape or (1,))


def _row_blocks(x: jax.Array, block_size: int) -> jax.Array:
  """float32 ``(..., n)`` -> ``(..., ceil(n / B), B)``, rows zero-padded.

  Only the last axis is split, so a leaf sharded along its leading axes (or
  along whole blocks of its last axis) stays shard-local under GSPMD."""
  x = _as_rows(x).astype(jnp.float32)
  n = x.shape[-1]
  pad = (-n) % block_size
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(x.shape[:-1] + ((n + pad) // block_size, block_size))


def _unblock(blocks: jax.Array, n: int) -> jax.Array:
  """Inverse of :func:`_row_blocks`: ``(..., k, B)`` -> ``(..., n)``."""
  return blocks.reshape(blocks.shape[:-2] + (-1,))[..., :n]


def dequantize_rows_reference(codes: jax.Array, code: jax.Array,
                              absmax: jax.Array, block_size: int) -> jax.Array:
  """float32 ``code[codes] * absmax`` of a moment whose blocks run along
  the last axis (:mod:`jlowbit._layout`): ``codes`` uint8 of the leaf's
  shape, ``absmax`` float32 ``shape[:-1] + (ceil(n / block_size),)``."""
  n = _layout.row_length(codes.shape)
  blocks = _row_blocks(codes, block_size)  # exact: codes < 256
  values = code[blocks.astype(jnp.int32)] * absmax[..., None]
  return _unblock(values, n).reshape(codes.shape)


def quantize_rows_reference(
    x: jax.Array, code, block_size: int,
    uniform: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Blockwise 8-bit quantization along the last axis (:mod:`jlowbit._layout`).

  The rules of :func:`jlowbit.blockwise8.quantize_blockwise_reference` (its
  decision-tree search, stochastic rounding with ``uniform``), block by
  block, with the blocks of :mod:`jlowbit._layout`.

  Args:
    x: float values, any shape.
    code: the sorted float32 ``[256]`` codebook (numpy: its search tables
      are built on the host).
    block_size: elements per block.
    uniform: float32 noise in ``[0, 1)`` of ``x``'s shape, or ``None`` for
      round to nearest.

  Returns:
    ``(codes uint8 x.shape, absmax float32 shape[:-1] + (ceil(n / B),))``.
  """
  n = _layout.row_length(x.shape)
  blocks = _row_blocks(x, block_size)
  absmax = _twins.block_absmax(blocks)
  scale = _twins.block_scale(absmax)[..., None]
  stochastic = uniform is not None
  tree = jnp.asarray(_search.code_tree(code, floor=stochastic))
  codes = _twins.scaled_tree_index(blocks, scale, tree)
  if stochastic:
    codes = _twins.stochastic_index(
        blocks, scale, codes, jnp.asarray(code),
        jnp.asarray(_search.code_gaps(code)), _row_blocks(uniform, block_size))
  return (_unblock(codes, n).astype(jnp.uint8).reshape(x.shape),
          absmax.reshape(_layout.absmax_shape(x.shape, block_size)))


def _dequantized(alg: algorithms.Algorithm, moments,
                 block_size: int) -> tuple[jax.Array, ...]:
  """float32 values of 8-bit ``moments`` (the codebooks of ``alg``)."""
  return tuple(dequantize_rows_reference(codes, codebook(s), absmax, block_size)
               for (codes, absmax), s in zip(moments, alg.signed))


def _math_8bit(alg, grad, moments, hyper, block_size):
  """Direction (``grad``'s dtype and shape) and new float32 moments."""
  d, new = update_float(alg.name, grad.astype(jnp.float32),
                        _dequantized(alg, moments, block_size),
                        hyper.astype(jnp.float32))
  return d.astype(grad.dtype), new


def _noise(shape, row_counters: jax.Array, step) -> jax.Array:
  """float32 noise of a leaf of ``shape`` whose rows start at the counters
  ``row_counters`` (uint32 ``shape[:-1]``; ``[1]`` for 0-d)."""
  n = _layout.row_length(shape)
  counters = (row_counters[..., None]
              + jax.lax.broadcasted_iota(jnp.uint32, row_counters.shape + (n,),
                                         row_counters.ndim))
  return _noise_lib.quasi_uniform(counters, _noise_lib.weyl_offset(step)).reshape(shape)


def update_8bit_reference(
    algorithm: str, grad: jax.Array, moments: Sequence[Moment],
    hyper: jax.Array, *, block_size: int,
    stochastic: tuple[bool, ...] | None = None, step: jax.Array | None = None,
    counter_offset: int = 0, row_counters: jax.Array | None = None
) -> tuple[jax.Array, tuple[Moment, ...]]:
  """One step of ``algorithm`` for one leaf with 8-bit moments (``jax.numpy``).

  The twin of the fused kernel; :func:`update_8bit` with ``impl="xla"``.
  It computes in the leaf's shape (blocks along the last axis), so under
  ``jax.jit`` a leaf sharded along whole blocks stays shard-local.

  Args:
    algorithm: a key of :data:`jlowbit.algorithms.ALGORITHMS`.
    grad: floating gradient, any shape (math in float32).
    moments: per moment (state order) a pair ``(codes uint8 grad.shape,
      absmax float32 grad.shape[:-1] + (ceil(grad.shape[-1] / block_size),))``
      (:mod:`jlowbit._layout`).
    hyper: float32 vector in the algorithm's ``hyper`` layout.
    block_size: elements per quantization block.
    stochastic: per moment, whether it is requantized by stochastic rounding
      instead of to the nearest code; ``None``: none is.
    step: the step number (int scalar, may be traced), keying the rounding
      noise (:func:`jlowbit._noise_lib.weyl_offset`); needed when a moment rounds
      stochastically.
    counter_offset: the noise counter of the leaf's first element; the
      elements of one step must not share one. Element ``i`` (row-major)
      has the counter ``counter_offset + i``.
    row_counters: instead of ``counter_offset``, uint32 ``grad.shape[:-1]``:
      the counter of each row's first element (a shard of a larger leaf:
      :func:`jlowbit._layout.row_counters`).

  Returns:
    ``(direction, new_moments)``: direction in ``grad``'s dtype and shape, new
    moments as ``(codes, absmax)`` pairs of the same shapes and dtypes.
  """
  alg = _algorithm(algorithm)
  _check_hyper(alg, hyper)
  _check_moments(alg, grad, moments, block_size)
  stochastic = _check_stochastic(alg, stochastic, step)
  d, new = _math_8bit(alg, grad, moments, hyper, block_size)
  if any(stochastic) and row_counters is None:
    row_counters = _layout.row_counters(grad.shape, grad.shape, None,
                                        counter_offset)
  requantized = []
  for value, signed, rounds in zip(new, alg.signed, stochastic):
    if alg.saturates:
      value = jnp.clip(value, -algorithms.MOMENT_LIMIT, algorithms.MOMENT_LIMIT)
    uniform = _noise(grad.shape, row_counters, step) if rounds else None
    requantized.append(quantize_rows_reference(
        value, codebooks.dynamic(signed), block_size, uniform))
  return d, tuple(requantized)


def direction_8bit_reference(algorithm: str, grad: jax.Array,
                             moments: Sequence[Moment], hyper: jax.Array, *,
                             block_size: int) -> jax.Array:
  """The direction of :func:`update_8bit_reference` alone: the math on the
  dequantized old state, without requantizing (``grad``'s dtype and shape)."""
  alg = _algorithm(algorithm)
  _check_hyper(alg, hyper)
  _check_moments(alg, grad, moments, block_size)
  return _math_8bit(alg, grad, moments, hyper, block_size)[0]


def apply_direction(param: jax.Array, direction: jax.Array,
                    learning_rate: jax.Array, weight_decay: jax.Array,
                    decays: bool) -> jax.Array:
  r"""The parameter step of an optimizer that chains decoupled weight decay
  and the learning rate (``optax.add_decayed_weights`` then
  ``optax.scale_by_learning_rate`` then ``optax.apply_updates``), in one
  rounding:

  .. math::
    p \leftarrow p - \eta (d + \lambda p) \quad\text{(decays)}, \qquad
    p \leftarrow p - \eta d \quad\text{(otherwise)},

  computed in float32 (float64 for float64 ``param``), cast to ``param``'s
  dtype."""
  dtype = _compute_dtype(param.dtype)
  p, d = param.astype(dtype), direction.astype(dtype)
  if decays:
    d = d + jnp.asarray(weight_decay, dtype) * p
  return (p - jnp.asarray(learning_rate, dtype) * d).astype(param.dtype)


def coupled_gradient(grad: jax.Array, param: jax.Array,
                     weight_decay: jax.Array) -> jax.Array:
  """``g + wd * p`` in float32 (float64 for float64 values): the gradient
  a coupled (L2) weight decay hands to the moments."""
  dtype = _compute_dtype(jnp.promote_types(grad.dtype, param.dtype))
  return (grad.astype(dtype)
          + jnp.asarray(weight_decay, dtype) * param.astype(dtype))


def apply_8bit_reference(
    algorithm: str, param: jax.Array, grad: jax.Array,
    moments: Sequence[Moment], hyper: jax.Array, *, learning_rate: jax.Array,
    weight_decay: jax.Array = 0.0, decays: bool = True,
    coupled_decay: bool = False, block_size: int,
    stochastic: tuple[bool, ...] | None = None, step: jax.Array | None = None,
    counter_offset: int = 0, row_counters: jax.Array | None = None
) -> tuple[jax.Array, tuple[Moment, ...]]:
  r"""One step of ``algorithm`` for one leaf that also writes the parameter
  (``jax.numpy``): the twin of the fused kernel of :func:`apply_8bit`.

  The moments are those of :func:`update_8bit_reference` with the float32
  gradient (``g + wd * p`` first where ``coupled_decay`` and ``decays``);
  the parameter is :func:`apply_direction` of the float32 direction (decay
  added there where ``decays`` and not ``coupled_decay``).

  Returns:
    ``(new_param, new_moments)``: ``param``'s dtype and shape, moments as
    :func:`update_8bit_reference`'s.
  """
  grad = grad.astype(jnp.float32)
  if coupled_decay and decays:
    grad = coupled_gradient(grad, param.astype(jnp.float32), weight_decay)
  d, new = update_8bit_reference(
      algorithm, grad, moments, hyper, block_size=block_size,
      stochastic=stochastic, step=step, counter_offset=counter_offset,
      row_counters=row_counters)
  return (apply_direction(param, d, learning_rate, weight_decay,
                          decays and not coupled_decay), new)


class LeafNoise(NamedTuple):
  """Where a (local) leaf's rounding noise starts.

  Attributes:
    row_counters: uint32 ``shape[:-1]`` (``[1]`` for 0-d): the noise
      counter of each row's first element.
    contiguous: whether the counters of the whole leaf are its first one
      plus the row-major local position (an unsharded leaf, or a shard that
      is one run of the global leaf), which the kernel exploits.
  """
  row_counters: jax.Array
  contiguous: bool


class ParameterStep(NamedTuple):
  """The parameter step :func:`apply_8bit` adds to the update of its leaves."""
  params: Sequence[jax.Array]
  learning_rate: jax.Array  # float32 scalar
  weight_decay: jax.Array  # float32 scalar
  decays: tuple[bool, ...]  # per leaf
  coupled: bool  # decay added to the gradient (L2), else to the direction

  def hyper(self, hyper: jax.Array) -> jax.Array:
    """The algorithm's ``hyper`` with ``lr`` and ``wd`` after it, as the
    kernel (and :class:`_LocalStep`) reads them."""
    return jnp.concatenate([hyper, jnp.stack(
        [self.learning_rate, self.weight_decay]).astype(jnp.float32)])

  def take(self, leaves: Sequence[int]) -> "ParameterStep":
    return self._replace(params=[self.params[i] for i in leaves],
                         decays=tuple(self.decays[i] for i in leaves))

  def unfused(self, run, grads) -> list:
    """``run(grads)`` (per leaf ``(direction, new_moments)``) with the
    parameter step done after it in ``jax.numpy`` (the coupled decay added
    to ``grads`` before)."""
    if self.coupled:
      grads = [coupled_gradient(g, p, self.weight_decay) if decays else g
               for g, p, decays in zip(grads, self.params, self.decays)]
    return [(apply_direction(p, d, self.learning_rate, self.weight_decay,
                             decays and not self.coupled), new)
            for p, decays, (d, new) in zip(self.params, self.decays, run(grads))]


def _update_local(alg: algorithms.Algorithm, grads, moments, hyper,
                  block_size: int, stochastic: tuple[bool, ...], step,
                  noise: Sequence[LeafNoise | None], impl: str,
                  apply: ParameterStep | None = None):
  """The step of leaves that are whole on this device (or one shard each,
  inside ``jax.shard_map``), already validated; with ``apply`` per leaf the
  new parameter instead of the direction."""
  if impl == "xla":
    if apply is not None:
      return [apply_8bit_reference(
          alg.name, p, g, m, hyper, learning_rate=apply.learning_rate,
          weight_decay=apply.weight_decay, decays=decays,
          coupled_decay=apply.coupled, block_size=block_size,
          stochastic=stochastic, step=step,
          row_counters=None if n is None else n.row_counters)
              for p, g, m, n, decays in zip(apply.params, grads, moments, noise,
                                            apply.decays)]
    return [update_8bit_reference(
        alg.name, g, m, hyper, block_size=block_size, stochastic=stochastic,
        step=step, row_counters=None if n is None else n.row_counters)
            for g, m, n in zip(grads, moments, noise)]
  if apply is not None and any(p.dtype == jnp.float64 for p in apply.params):
    # The kernels write float32/bfloat16/float16 parameters; float64 ones
    # take the parameter step in jax.numpy.
    results = [None] * len(grads)
    for wide in (False, True):
      leaves = [i for i, p in enumerate(apply.params)
                if (p.dtype == jnp.float64) == wide]
      if not leaves:
        continue
      part, leaf_grads = apply.take(leaves), [grads[i] for i in leaves]
      local = lambda g, fused=None, leaves=leaves: _update_local(
          alg, g, [moments[i] for i in leaves], hyper, block_size, stochastic,
          step, [noise[i] for i in leaves], impl, fused)
      outs = (part.unfused(local, leaf_grads) if wide
              else local(leaf_grads, part))
      for i, out in zip(leaves, outs):
        results[i] = out
    return results
  from jlowbit.triton_kernels import optim8  # pylint: disable=g-import-not-at-top
  # Per leaf the noise offsets the kernel adds: the step's Weyl offset plus
  # counter * PHASE_MULTIPLIER of its first element (contiguous) or of each
  # of its rows; one uint32 vector for all leaves.
  keys, key_at = [], []
  if any(stochastic):
    weyl = _noise_lib.weyl_offset(step)
    start = 0
    for leaf_noise in noise:
      counters = leaf_noise.row_counters.reshape(-1)
      if leaf_noise.contiguous:
        counters = counters[:1]
      keys.append(weyl + counters * jnp.uint32(_noise_lib.PHASE_MULTIPLIER))
      key_at.append((start, not leaf_noise.contiguous))
      start += counters.shape[0]
  else:
    key_at = [(0, False)] * len(grads)
  keys = jnp.concatenate(keys) if keys else jnp.zeros((1,), jnp.uint32)
  if apply is not None:
    hyper = apply.hyper(hyper)
  # Kernels take float32/bfloat16/float16; float64 gradients run in float32.
  kernel_grads = [_as_rows(g.astype(jnp.float32) if g.dtype == jnp.float64 else g)
                  for g in grads]
  kernel_moments = [tuple((_as_rows(c), a) for c, a in m) for m in moments]
  results = [None] * len(grads)
  for dtype in {jnp.dtype(g.dtype) for g in kernel_grads}:
    leaves = [i for i, g in enumerate(kernel_grads) if g.dtype == dtype]
    write = writes_direction(alg.name, dtype)
    outs = optim8.fused_update(
        alg.name, [kernel_grads[i] for i in leaves],
        [kernel_moments[i] for i in leaves], hyper, keys,
        [key_at[i] for i in leaves], block_size=block_size, impl=impl,
        stochastic=stochastic, write_direction=write,
        apply=apply and optim8.ParameterStep(
            [_as_rows(apply.params[i]) for i in leaves],
            [apply.decays[i] for i in leaves],
            "coupled" if apply.coupled else "decoupled"))
    for i, (d, new) in zip(leaves, outs):
      if apply is not None:
        new = tuple((c.reshape(grads[i].shape), a) for c, a in new)
        results[i] = (d.reshape(grads[i].shape), new)
        continue
      if d is None:  # not written, or an empty gradient
        d = direction_8bit_reference(alg.name, grads[i], moments[i], hyper,
                                     block_size=block_size)
      new = tuple((c.reshape(grads[i].shape), a) for c, a in new)
      results[i] = (d.astype(grads[i].dtype).reshape(grads[i].shape), new)
  return results


class _LocalStep(NamedTuple):
  """:func:`_update_local` of one configuration, hashable (for the cache of
  compiled sharded steps). With ``decays`` (per leaf) it is
  :func:`apply_8bit`'s step: ``hyper`` ends with ``lr`` and ``wd``."""
  algorithm: str
  block_size: int
  stochastic: tuple[bool, ...]
  impl: str
  decays: tuple[bool, ...] | None = None
  coupled: bool = False

  def __call__(self, grads, moments, hyper, *, step, noise, params=None):
    apply = None
    if self.decays is not None:
      hyper, (lr, wd) = hyper[:-2], hyper[-2:]
      apply = ParameterStep(params, lr, wd, self.decays, self.coupled)
    return _update_local(_algorithm(self.algorithm), grads, moments, hyper,
                         self.block_size, self.stochastic, step, noise,
                         self.impl, apply)


def update_8bit(
    algorithm: str, grads: Sequence[jax.Array],
    moments: Sequence[Sequence[Moment]], hyper: jax.Array, *, block_size: int,
    stochastic: tuple[bool, ...] | None = None, step: jax.Array | None = None,
    impl: str | None = None,
    counter_offsets: Sequence[int | jax.Array] | None = None
) -> list[tuple[jax.Array, tuple[Moment, ...]]]:
  r"""One optimizer step of many leaves with 8-bit blockwise moments.

  **Sharded leaves** run shard-locally: the leaves whose sharding is known
  (a concrete array's ``NamedSharding``, or the type of a traced one on a
  mesh with ``AxisType.Explicit`` axes) are updated inside one
  ``jax.shard_map`` over their mesh, every device running the kernel (or the
  reference) on its own shards, with no communication when the blocks lie
  within shards (:mod:`jlowbit._layout`; a leaf whose sharded last axis
  splits blocks is gathered along that axis, and its results sliced back).
  Traced leaves on ``AxisType.Auto`` axes (whose shardings JAX decides
  later) are computed in their own shape: with ``impl="xla"`` GSPMD keeps
  them shard-local; a kernel (a custom call GSPMD cannot split) would
  gather them, so give such meshes explicit axes or call this inside
  ``jax.shard_map``. Inside a ``jax.shard_map`` of your own the arrays are
  taken as they come (each device's shards as leaves).
  The result is the same however the leaves are sharded (bit for bit with
  the kernels; ``xla`` on a CPU within an ulp, as XLA compiles each shard
  shape on its own): blocks and rounding noise are keyed by global
  positions. ``impl="interpret"`` on a mesh of CPU devices: leave CPU device
  0 out of the mesh (``jax.pure_callback`` stages its arguments there, and
  waits forever when that device is running the same program).

  Args:
    algorithm: a key of :data:`jlowbit.algorithms.ALGORITHMS`: ``"adam"``,
      ``"ademamix"``, ``"lion"``, ``"momentum"``, ``"rmsprop"`` or
      ``"adagrad"``.
    grads: floating gradients (float32, bfloat16, float16; float64 is
      computed in float32), any shapes.
    moments: per gradient, one ``(codes, absmax)`` pair per moment of the
      algorithm (state order): ``codes`` uint8 of the gradient's shape,
      ``absmax`` float32 ``shape[:-1] + (ceil(shape[-1] / block_size),)``
      (blocks along the last axis, :mod:`jlowbit._layout`).
    hyper: float32 vector in the algorithm's ``hyper`` layout (may be
      traced: new values never recompile).
    block_size: elements per quantization block, one of 64, 128, ..., 4096.
    stochastic: per moment, whether it rounds stochastically; ``None``: none.
    step: the step number (int scalar, may be traced) keying the rounding
      noise; needed when a moment rounds stochastically. Each element's noise
      counter is its row-major position among ``grads`` taken one after the
      other.
    impl: ``None`` | ``"triton"`` | ``"xla"`` | ``"interpret"`` (see
      :mod:`jlowbit._impl`).

  Returns:
    Per gradient ``(direction, new_moments)``: direction of the gradient's
    shape, dtype and sharding, new moments like ``moments``. The kernels
    update the moments in place when the caller donates them.
  """
  return _step(algorithm, grads, moments, hyper, block_size, stochastic, step,
               impl, counter_offsets, None)


def apply_8bit(
    algorithm: str, params: Sequence[jax.Array], grads: Sequence[jax.Array],
    moments: Sequence[Sequence[Moment]], hyper: jax.Array, *,
    learning_rate: jax.Array | float, weight_decay: jax.Array | float = 0.0,
    decays: Sequence[bool] | None = None, coupled_decay: bool = False,
    block_size: int, stochastic: tuple[bool, ...] | None = None,
    step: jax.Array | None = None, impl: str | None = None,
    counter_offsets: Sequence[int | jax.Array] | None = None
) -> list[tuple[jax.Array, tuple[Moment, ...]]]:
  r"""One optimizer step of many leaves that writes the parameters.

  :func:`update_8bit` followed by the parameter step of an optimizer that
  chains weight decay and the learning rate, in one pass over memory: the
  kernel reads ``p`` beside the gradient and moments and writes

  .. math::
    p \leftarrow p - \eta\,(d + \lambda p) \quad\text{(decoupled decay)},
    \qquad p \leftarrow p - \eta\, d(g + \lambda p) \quad\text{(coupled)},

  in float32, instead of writing the direction ``d`` for XLA to decay,
  scale and add (for float32 AdamW: 16 bytes a parameter instead of 22).
  The moments are those of :func:`update_8bit` on the float32 gradient
  (with ``coupled_decay`` on ``g + wd * p``); the parameters equal
  :func:`apply_8bit_reference`'s (bit for bit in Triton's interpreter;
  within a few ulp compiled, as :func:`update_8bit`'s directions). Leaves
  on a mesh run shard-locally as in :func:`update_8bit`, each device
  writing its parameter shards. float64 parameters take the parameter step
  in ``jax.numpy`` after the kernel's update.

  Args:
    algorithm, grads, moments, hyper, block_size, stochastic, step, impl,
      counter_offsets: as in :func:`update_8bit`.
    params: per gradient its parameter (floating, the gradient's shape).
    learning_rate: :math:`\eta`, a scalar (may be traced).
    weight_decay: :math:`\lambda`, a scalar (may be traced).
    decays: per gradient whether its parameter decays; ``None``: all.
    coupled_decay: add :math:`\lambda p` to the gradient before the
      moments see it (L2, torch's SGD/RMSprop/Adagrad) instead of to the
      direction (AdamW's decoupled decay).

  Returns:
    Per gradient ``(new_param, new_moments)``: ``new_param`` of the
    parameter's shape, dtype and sharding. The kernels update parameters
    and moments in place when the caller donates them.
  """
  if len(params) != len(grads):
    raise ValueError(f"got {len(params)} params but {len(grads)} grads")
  params = [val.as_float_array(p, f"params[{i}]", float64=True)
            for i, p in enumerate(params)]
  for i, (p, g) in enumerate(zip(params, grads)):
    if tuple(p.shape) != tuple(jnp.shape(g)):
      raise ValueError(f"params[{i}] has shape {tuple(p.shape)} but grads[{i}] "
                       f"has shape {tuple(jnp.shape(g))}")
  decays = (True,) * len(params) if decays is None else tuple(decays)
  if len(decays) != len(params) or not all(
      isinstance(d, (bool, np.bool_)) for d in decays):
    raise ValueError(f"decays={decays!r} must hold one bool per parameter")
  apply = ParameterStep(
      params, _scalar(learning_rate, "learning_rate"),
      _scalar(weight_decay, "weight_decay"),
      tuple(bool(d) for d in decays), bool(coupled_decay))
  return _step(algorithm, grads, moments, hyper, block_size, stochastic, step,
               impl, counter_offsets, apply)


def _scalar(value, name: str) -> jax.Array:
  """``value`` as a float32 scalar (a number or a 0-d/1-element array)."""
  value = jnp.asarray(value, jnp.float32)
  if value.size != 1:
    raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
  return value.reshape(())


def _step(algorithm, grads, moments, hyper, block_size, stochastic, step, impl,
          counter_offsets, apply: ParameterStep | None) -> list:
  """:func:`update_8bit` (``apply`` ``None``) or :func:`apply_8bit`."""
  alg = _algorithm(algorithm)
  val.check_block_size(block_size, "block_size", _formats.BLOCK_SIZES_8BIT)
  block_size = int(block_size)
  _check_hyper(alg, hyper)
  stochastic = _check_stochastic(alg, stochastic, step)
  if len(grads) != len(moments):
    raise ValueError(f"got {len(grads)} grads but {len(moments)} moment tuples")
  grads = [val.as_float_array(g, f"grads[{i}]", float64=True)
           for i, g in enumerate(grads)]
  moments = [tuple(tuple(pair) for pair in m) for m in moments]
  for i, (grad, leaf_moments) in enumerate(zip(grads, moments)):
    _check_moments(alg, grad, leaf_moments, block_size, where=f" of grads[{i}]")
  hyper = jnp.asarray(hyper, jnp.float32)
  offsets = np.cumsum([0] + [g.size for g in grads[:-1]]).tolist()
  # Traced offsets are added to the counters of offset 0 (uint32 wraps).
  shifts = None
  if counter_offsets is not None:
    if len(counter_offsets) != len(grads):
      raise ValueError(f"got {len(counter_offsets)} counter_offsets for "
                       f"{len(grads)} grads")
    offsets = [o if isinstance(o, (int, np.integer)) else 0
               for o in counter_offsets]
    if not all(isinstance(o, (int, np.integer)) for o in counter_offsets):
      shifts = [jnp.asarray(o).astype(jnp.uint32)
                if not isinstance(o, (int, np.integer)) else jnp.uint32(0)
                for o in counter_offsets]
  impl = _impl.resolve_impl(impl)
  if any(stochastic):
    step = jnp.asarray(step)
  results = [None] * len(grads)
  groups: dict[Any, list[int]] = {}
  for i, grad in enumerate(grads):
    groups.setdefault(_sharding.mesh_of(grad), []).append(i)
  for mesh, leaves in groups.items():
    if mesh is None:
      noise = [LeafNoise(_layout.row_counters(grads[i].shape, grads[i].shape,
                                              None, offsets[i])
                         + (0 if shifts is None else shifts[i]), True)
               if any(stochastic) else None for i in leaves]
      outs = _update_local(alg, [grads[i] for i in leaves],
                           [moments[i] for i in leaves], hyper, block_size,
                           stochastic, step, noise, impl,
                           apply and apply.take(leaves))
    else:
      part = apply and apply.take(leaves)
      outs = _sharding.shard_mapped_update(
          _LocalStep(algorithm, block_size, stochastic, impl,
                     part and part.decays, bool(part and part.coupled)),
          mesh, [grads[i] for i in leaves], [moments[i] for i in leaves],
          hyper if part is None else part.hyper(hyper),
          step, [offsets[i] for i in leaves], block_size,
          noise_type=LeafNoise if any(stochastic) else None,
          shifts=None if shifts is None else jnp.stack(
              [shifts[i] for i in leaves]),
          params=part and part.params)
    for i, out in zip(leaves, outs):
      results[i] = out
  return results
