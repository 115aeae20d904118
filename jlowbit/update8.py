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

:func:`update_float` is the same math with unquantized moments (the state of
small leaves and of the ``*_32bit`` optimizers).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlowbit import _formats
from jlowbit import _impl
from jlowbit import _noise
from jlowbit import _validation as val
from jlowbit import algorithms
from jlowbit import blockwise8
from jlowbit import codebooks

Moment = tuple[jax.Array, jax.Array]  # (uint8 codes, float32 absmax)

_16BIT = ("bfloat16", "float16")
_ALL = ("float32", *_16BIT)
# Gradient dtypes whose direction the kernel does not write (see
# writes_direction): measured on an H100, benchmarks/RESULTS.md runs 5-6.
_DIRECTION_FROM_STATE = {
    "adam": ("float32",), "ademamix": (), "lion": _16BIT,
    "momentum": _ALL, "rmsprop": _ALL, "adagrad": _ALL,
}


def writes_direction(algorithm: str, grad_dtype) -> bool:
  """Whether the kernel writes the update direction of ``grad_dtype``
  gradients, or leaves it to :func:`direction_8bit_reference` on the step's
  old state, an expression XLA fuses into the update's consumer
  (``optax.apply_updates``).

  A written direction is written and read back (twice its size); one from
  the state reads the old codes (a byte per moment) and the gradient again
  in a fusion that gathers from the codebooks. Chosen per algorithm and
  gradient dtype by what was faster on an H100 (``benchmarks/RESULTS.md``,
  optimizer runs 5-6): from the state for SGD-momentum, RMSprop and Adagrad
  (one moment: 5 vs 8 bytes in float32), float32 Adam (6 vs 8) and 16-bit
  Lion (3 vs 4); written for AdEMAMix (7 vs 8 in float32, but its
  three-codebook fusion ran 2% slower), 16-bit Adam (4 vs 4) and float32
  Lion (bfloat16 signs: 4 vs 5).
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
  absmax_shape = (-(-grad.size // block_size),)
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
          f"float32{absmax_shape} (ceil({grad.size} / {block_size})): was "
          "the state made with another block_size?")


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


def _dequantized(alg: algorithms.Algorithm, moments,
                 block_size: int) -> tuple[jax.Array, ...]:
  """Flat float32 values of 8-bit ``moments`` (the codebooks of ``alg``)."""
  return tuple(
      blockwise8.dequantize_blockwise_reference(
          codes.reshape(-1), codebook(s), absmax, block_size, jnp.float32)
      for (codes, absmax), s in zip(moments, alg.signed))


def _math_8bit(alg, grad, moments, hyper, block_size):
  """Direction (``grad``'s dtype, flat) and new float32 moments (flat)."""
  d, new = update_float(alg.name, grad.reshape(-1).astype(jnp.float32),
                        _dequantized(alg, moments, block_size),
                        hyper.astype(jnp.float32))
  return d.astype(grad.dtype), new


def update_8bit_reference(
    algorithm: str, grad: jax.Array, moments: Sequence[Moment],
    hyper: jax.Array, *, block_size: int,
    stochastic: tuple[bool, ...] | None = None, step: jax.Array | None = None,
    counter_offset: int = 0) -> tuple[jax.Array, tuple[Moment, ...]]:
  """One step of ``algorithm`` for one leaf with 8-bit moments (``jax.numpy``).

  The twin of the fused kernel; :func:`update_8bit` with ``impl="xla"``.

  Args:
    algorithm: a key of :data:`jlowbit.algorithms.ALGORITHMS`.
    grad: floating gradient, any shape (math in float32).
    moments: per moment (state order) a pair ``(codes uint8 grad.shape,
      absmax float32 [ceil(grad.size / block_size)])``.
    hyper: float32 vector in the algorithm's ``hyper`` layout.
    block_size: elements per quantization block.
    stochastic: per moment, whether it is requantized by stochastic rounding
      instead of to the nearest code; ``None``: none is.
    step: the step number (int scalar, may be traced), keying the rounding
      noise (:func:`jlowbit._noise.weyl_offset`); needed when a moment rounds
      stochastically.
    counter_offset: the noise counter of the leaf's first element; the
      elements of one step must not share one.

  Returns:
    ``(direction, new_moments)``: direction in ``grad``'s dtype and shape, new
    moments as ``(codes, absmax)`` pairs of the same shapes and dtypes.
  """
  alg = _algorithm(algorithm)
  _check_hyper(alg, hyper)
  _check_moments(alg, grad, moments, block_size)
  stochastic = _check_stochastic(alg, stochastic, step)
  d, new = _math_8bit(alg, grad, moments, hyper, block_size)
  requantized = []
  for value, signed, rounds in zip(new, alg.signed, stochastic):
    if alg.saturates:
      value = jnp.clip(value, -algorithms.MOMENT_LIMIT, algorithms.MOMENT_LIMIT)
    uniform = (_noise.element_uniform(value.size, _noise.weyl_offset(step),
                                      counter_offset) if rounds else None)
    codes, absmax = blockwise8.quantize_blockwise_reference(
        value, codebooks.dynamic(signed), block_size, uniform)
    requantized.append((codes.reshape(grad.shape), absmax))
  return d.reshape(grad.shape), tuple(requantized)


def direction_8bit_reference(algorithm: str, grad: jax.Array,
                             moments: Sequence[Moment], hyper: jax.Array, *,
                             block_size: int) -> jax.Array:
  """The direction of :func:`update_8bit_reference` alone: the math on the
  dequantized old state, without requantizing (``grad``'s dtype and shape)."""
  alg = _algorithm(algorithm)
  _check_hyper(alg, hyper)
  _check_moments(alg, grad, moments, block_size)
  return _math_8bit(alg, grad, moments, hyper, block_size)[0].reshape(grad.shape)


def update_8bit(
    algorithm: str, grads: Sequence[jax.Array],
    moments: Sequence[Sequence[Moment]], hyper: jax.Array, *, block_size: int,
    stochastic: tuple[bool, ...] | None = None, step: jax.Array | None = None,
    impl: str | None = None) -> list[tuple[jax.Array, tuple[Moment, ...]]]:
  r"""One optimizer step of many leaves with 8-bit blockwise moments.

  Args:
    algorithm: a key of :data:`jlowbit.algorithms.ALGORITHMS`: ``"adam"``,
      ``"ademamix"``, ``"lion"``, ``"momentum"``, ``"rmsprop"`` or
      ``"adagrad"``.
    grads: floating gradients (float32, bfloat16, float16; float64 is
      computed in float32), any shapes.
    moments: per gradient, one ``(codes, absmax)`` pair per moment of the
      algorithm (state order): ``codes`` uint8 of the gradient's shape,
      ``absmax`` float32 ``[ceil(size / block_size)]``.
    hyper: float32 vector in the algorithm's ``hyper`` layout (may be
      traced: new values never recompile).
    block_size: elements per quantization block, one of 64, 128, ..., 4096.
    stochastic: per moment, whether it rounds stochastically; ``None``: none.
    step: the step number (int scalar, may be traced) keying the rounding
      noise; needed when a moment rounds stochastically. Each element's noise
      counter is its position among ``grads`` taken one after the other.
    impl: ``None`` | ``"triton"`` | ``"xla"`` | ``"interpret"`` (see
      :mod:`jlowbit._impl`).

  Returns:
    Per gradient ``(direction, new_moments)``: direction of the gradient's
    shape and dtype, new moments like ``moments``. The kernels update the
    moments in place when the caller donates them.
  """
  alg = _algorithm(algorithm)
  val.check_block_size(block_size, "block_size", _formats.BLOCK_SIZES_8BIT)
  block_size = int(block_size)
  _check_hyper(alg, hyper)
  stochastic = _check_stochastic(alg, stochastic, step)
  if len(grads) != len(moments):
    raise ValueError(f"got {len(grads)} grads but {len(moments)} moment tuples")
  grads = [val.as_float_array(g, f"grads[{i}]", float64=True)
           for i, g in enumerate(grads)]
  for i, (grad, leaf_moments) in enumerate(zip(grads, moments)):
    _check_moments(alg, grad, leaf_moments, block_size, where=f" of grads[{i}]")
  hyper = jnp.asarray(hyper, jnp.float32)
  counters = np.cumsum([0] + [g.size for g in grads[:-1]]).tolist()
  impl = _impl.resolve_impl(impl)
  if impl == "xla":
    return [update_8bit_reference(algorithm, g, m, hyper, block_size=block_size,
                                  stochastic=stochastic, step=step,
                                  counter_offset=c)
            for g, m, c in zip(grads, moments, counters)]
  from jlowbit.triton_kernels import optim8  # pylint: disable=g-import-not-at-top
  key = (jnp.zeros((1,), jnp.uint32) if step is None
         else _noise.weyl_offset(step).reshape(1))
  # Kernels take float32/bfloat16/float16; float64 gradients run in float32.
  kernel_grads = [g.astype(jnp.float32) if g.dtype == jnp.float64 else g
                  for g in grads]
  results = [None] * len(grads)
  for dtype in {jnp.dtype(g.dtype) for g in kernel_grads}:
    leaves = [i for i, g in enumerate(kernel_grads) if g.dtype == dtype]
    write = writes_direction(algorithm, dtype)
    outs = optim8.fused_update(
        algorithm, [kernel_grads[i] for i in leaves],
        [tuple(moments[i]) for i in leaves], hyper, key,
        [counters[i] for i in leaves], block_size=block_size, impl=impl,
        stochastic=stochastic, write_direction=write)
    for i, (d, new) in zip(leaves, outs):
      if d is None:  # not written, or an empty gradient
        d = direction_8bit_reference(algorithm, grads[i], moments[i], hyper,
                                     block_size=block_size)
      results[i] = (d.astype(grads[i].dtype), new)
  return results
