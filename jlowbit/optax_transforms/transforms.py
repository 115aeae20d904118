r"""Optax building blocks whose state is 8-bit blockwise (or float32).

Each ``scale_by_*_8bit`` turns gradients into a *direction* (no learning rate,
no weight decay) like its optax counterpart, keeping one or more moments per
parameter leaf. A leaf's moments are 8-bit (uint8 codes in the leaf's shape +
float32 absmax per ``block_size`` elements) when the leaf's global size is at
least ``min_8bit_size``, float32 otherwise (float64 for float64 parameters);
``min_8bit_size=jlowbit.FLOAT32_STATE`` keeps every leaf unquantized (the
``*_32bit`` optimizers). See :mod:`jlowbit.optax_transforms.state`.

Hyperparameters may be Python floats, arrays, tracers (``optax.inject_hyperparams``)
and, where noted, schedules; they reach the update as one float32 device
vector, so a moving schedule never recompiles the step. The 8-bit leaves are
updated by :func:`jlowbit.update8.update_8bit` (the fused Triton kernel: one
launch per gradient dtype; or its ``jax.numpy`` twin); float leaves use plain
jnp (fused by XLA). float64 parameters keep 8-bit state with float32 math.

``block_size`` and ``min_8bit_size`` fix the state's shapes, so they are
static: their defaults (``None``) work under ``optax.inject_hyperparams`` as
they are; explicitly passed integers need
``static_args=jlowbit.STATIC_ARGS`` there (a clear error says so).

Non-finite values: finite gradients never give NaN (:mod:`jlowbit.algorithms`,
"Overflow"): where an algorithm squares the gradient it clamps it to
``+-2**63`` first (optax instead keeps ``v = inf`` and freezes the
parameter), and stored 8-bit moments saturate at ``2**126``. Non-finite
gradients are not filtered (as in optax): a NaN gradient element makes its
direction NaN and its block's 8-bit moments NaN; an infinite one makes its
direction NaN or infinite. Wrap the optimizer in ``optax.apply_if_finite``
to skip such steps instead.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlowbit import algorithms
from jlowbit import update8
from jlowbit.optax_transforms import checks
from jlowbit.optax_transforms import offload
from jlowbit.optax_transforms import state as state_lib

# (count before the step, int32; t = step number, float) -> hyper vector.
# The vector is in t's dtype: float32, or float64 for float64 float-state leaves.
HyperFn = Callable[[jax.Array, jax.Array], jax.Array]


def _hyper(t: jax.Array, *values: Any) -> jax.Array:
  """Stacks scalars (floats, arrays or tracers) into a vector of ``t``'s dtype."""
  return jnp.stack([jnp.asarray(v, t.dtype).reshape(()) for v in values])


def _scheduled(value: Any, count: jax.Array) -> Any:
  """``value(count)`` for a schedule, else ``value``."""
  return value(count) if callable(value) else value


def _update_leaves(algorithm: str, grads: list, codes: list, absmax: list,
                   hyper: Callable[[Any], jax.Array], block_size: int,
                   impl: str | None,
                   stochastic: tuple[bool, ...] | None,
                   step: jax.Array,
                   apply: update8.ParameterStep | None = None) -> list:
  """Per leaf ``(direction, ((codes, absmax) per moment))``; with ``apply``
  (its parameters and decays per leaf) the new parameter instead of the
  direction.

  ``hyper(dtype)``: the hyper vector in ``dtype`` (float32; float64 for
  float64 moments). ``codes[i]``/``absmax[i]``: leaf i's per-moment codes
  and absmax;
  ``absmax[i][0] is None`` for a float-state leaf, whose codes are the
  float moments (absmax stays ``None``). The 8-bit leaves go to
  :func:`jlowbit.update8.update_8bit` (:func:`jlowbit.update8.apply_8bit`)
  together (few kernel launches; their rounding noise counts their elements
  in tree order); the other leaves take the parameter step in ``jax.numpy``.
  """
  out = [None] * len(grads)
  eightbit = [i for i in range(len(grads)) if absmax[i][0] is not None]
  floats = [i for i in range(len(grads)) if absmax[i][0] is None]

  def float_step(leaf_grads, leaves=floats):
    results = []
    for i, g in zip(leaves, leaf_grads):
      moments = tuple(offload.to_device(m) for m in codes[i])
      direction, new = update8.update_float(
          algorithm, g, moments, hyper(moments[0].dtype))
      results.append((direction, tuple((m.astype(old.dtype), None)
                                       for m, old in zip(new, codes[i]))))
    return results

  leaf_grads = [grads[i] for i in floats]
  results = (float_step(leaf_grads) if apply is None
             else apply.take(floats).unfused(float_step, leaf_grads))
  for i, result in zip(floats, results):
    out[i] = result
  if any(offload.in_host_memory(codes[i][0]) for i in eightbit):
    _update_streamed(out, algorithm, grads, codes, absmax, eightbit, hyper,
                     block_size, impl, stochastic, step, apply)
  elif eightbit and apply is not None:
    part = apply.take(eightbit)
    results = update8.apply_8bit(
        algorithm, part.params, [grads[i] for i in eightbit],
        [tuple(zip(codes[i], absmax[i])) for i in eightbit],
        hyper(jnp.float32), learning_rate=part.learning_rate,
        weight_decay=part.weight_decay, decays=part.decays,
        coupled_decay=part.coupled, block_size=block_size,
        stochastic=stochastic, step=step, impl=impl)
    for i, result in zip(eightbit, results):
      out[i] = result
  elif eightbit:
    results = update8.update_8bit(
        algorithm, [grads[i] for i in eightbit],
        [tuple(zip(codes[i], absmax[i])) for i in eightbit],
        hyper(jnp.float32),
        block_size=block_size, stochastic=stochastic, step=step, impl=impl)
    for i, result in zip(eightbit, results):
      out[i] = result
  return out


def _update_streamed(out: list, algorithm: str, grads: list, codes: list,
                     absmax: list, eightbit: list, hyper, block_size: int,
                     impl: str | None, stochastic, step,
                     apply: update8.ParameterStep | None) -> None:
  """The 8-bit leaves when their moments are in host memory
  (:func:`jlowbit.offload_state` with ``chunks``): leaves of rank >= 2
  streamed through the device in slices of their leading axis
  (:func:`jlowbit.optax_transforms.offload.stream_update`, one loop per
  chunk count), the others moved in whole. Every leaf keeps the noise
  counters of the one-call update, so the results are bit-identical. With
  ``apply`` the parameter step follows in ``jax.numpy``."""
  sizes = [grads[i].size for i in eightbit]
  offsets = dict(zip(eightbit, np.cumsum([0] + sizes[:-1]).tolist()))
  host = [i for i in eightbit if offload.in_host_memory(codes[i][0])]
  plan, whole = offload.stream_plan([grads[i] for i in host])
  whole = [host[k] for k in whole]
  whole += [i for i in eightbit if i not in host]
  groups: dict[int, list[int]] = {}
  for k, chunks in plan.items():
    groups.setdefault(chunks, []).append(host[k])
  def stepped(run, leaves):
    leaf_grads = [grads[i] for i in leaves]
    results = (run(leaf_grads) if apply is None
               else apply.take(leaves).unfused(run, leaf_grads))
    for i, result in zip(leaves, results):
      out[i] = result

  for chunks, leaves in sorted(groups.items()):
    stepped(lambda g, leaves=leaves, chunks=chunks: offload.stream_update(
        algorithm, g, [tuple(zip(codes[i], absmax[i])) for i in leaves],
        hyper(jnp.float32), chunks=chunks, block_size=block_size,
        stochastic=stochastic, step=step, impl=impl,
        counter_offsets=[offsets[i] for i in leaves]), leaves)
  if whole:
    whole = sorted(whole)
    stepped(lambda g: update8.update_8bit(
        algorithm, g,
        [tuple((offload.to_device(c), offload.to_device(a))
               for c, a in zip(codes[i], absmax[i])) for i in whole],
        hyper(jnp.float32), block_size=block_size, stochastic=stochastic,
        step=step, impl=impl, counter_offsets=[offsets[i] for i in whole]),
            whole)


def scale_by_8bit(algorithm: str, state_cls: type, hyper_fn: HyperFn, *,
                  block_size: int | None, min_8bit_size: int | None,
                  impl: str | None, stochastic: tuple[bool, ...] | None = None
                  ) -> optax.GradientTransformationExtraArgs:
  """The generic transformation behind every ``scale_by_*_8bit``.

  Args:
    algorithm: a key of :data:`jlowbit.algorithms.ALGORITHMS`.
    state_cls: NamedTuple ``(count, *moments)`` holding the state.
    hyper_fn: builds the ``hyper`` vector from ``(count, t)`` in ``t``'s dtype.
    block_size: elements per quantization block, 64..4096 (powers of two);
      ``None``: :data:`~jlowbit.optax_transforms.state.DEFAULT_BLOCK_SIZE`.
    min_8bit_size: smallest leaf size with 8-bit state; ``None``:
      :data:`~jlowbit.optax_transforms.state.DEFAULT_MIN_8BIT_SIZE`.
    impl: ``None`` | ``"auto"`` | ``"triton"`` | ``"xla"`` | ``"interpret"``.
    stochastic: per moment, whether its 8-bit codes round stochastically
      (noise keyed by the step count: reproducible, and a resumed run
      continues exactly); ``None``: all round to nearest.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  block_size, min_8bit_size = checks.check_config(block_size, min_8bit_size,
                                                  impl)
  alg = algorithms.ALGORITHMS[algorithm]
  storage = state_lib.Storage(block_size, min_8bit_size)

  def init_fn(params):
    checks.check_float_leaves(params, "params")
    return state_cls(jnp.zeros([], jnp.int32), *(
        state_lib.init_moment(params, signed=s, storage=storage)
        for s in alg.signed))

  def step(updates, state, params, apply_to=None):
    """``(directions or, with apply_to(treedef) -> ParameterStep, new
    params, new state)``."""
    updates = checks.as_float_leaves(updates, "updates")
    checks.check_state(state, state_cls, alg, updates, params, storage)
    moments = state[1:]
    count = optax.safe_increment(state.count)
    grads, treedef = jax.tree.flatten(updates)
    hyper = functools.cache(
        lambda dtype: hyper_fn(state.count, count.astype(dtype)))
    per_leaf = lambda trees: list(zip(*(treedef.flatten_up_to(t) for t in trees)))
    out = _update_leaves(algorithm, grads, per_leaf([m.codes for m in moments]),
                         per_leaf([m.absmax for m in moments]), hyper,
                         block_size, impl, stochastic, count,
                         apply_to and apply_to(treedef))
    pick = lambda f: treedef.unflatten([f(o) for o in out])
    new_moments = [
        state_lib.Quantized8bitMoment(pick(lambda o, i=i: o[1][i][0]),
                                      pick(lambda o, i=i: o[1][i][1]))
        for i in range(len(alg.moments))]
    return pick(lambda o: o[0]), state_cls(count, *new_moments)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return step(updates, state, params)

  def parameter_step(updates, state, params, *, learning_rate, weight_decay,
                     decays, coupled):
    """(new params, new state): the update with the parameter step fused
    (:func:`jlowbit.update8.apply_8bit`; ``decays`` a tree of bools like
    ``params``)."""
    checks.check_float_leaves(params, "params")
    return step(updates, state, params, lambda treedef: update8.ParameterStep(
        treedef.flatten_up_to(params), learning_rate, weight_decay,
        tuple(treedef.flatten_up_to(decays)), coupled))

  update_fn.parameter_step = parameter_step
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _inverse_bias_corrections(b1: Any, b2: Any, t: jax.Array) -> tuple[jax.Array, ...]:
  """``(1 / (1 - b1**t), 1 / sqrt(1 - b2**t))`` in ``t``'s dtype."""
  return (1 / (1 - jnp.asarray(b1, t.dtype) ** t),
          1 / jnp.sqrt(1 - jnp.asarray(b2, t.dtype) ** t))


_CONFIG_DOC = """
    block_size: elements per quantization block of the 8-bit state (keyword
      only; 64, 128, ..., 4096); ``None``: 256.
    min_8bit_size: leaves with fewer elements keep float32 state (keyword
      only); ``None``: 4096; :data:`jlowbit.FLOAT32_STATE`: every leaf.
    impl: ``None`` | ``"triton"`` | ``"xla"`` | ``"interpret"`` (keyword only;
      see :mod:`jlowbit._impl`)."""


def _config_doc(fn):
  fn.__doc__ = fn.__doc__.replace("    {config}", _CONFIG_DOC.strip("\n"))
  return fn


@_config_doc
def scale_by_adam_8bit(b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8, *,
                       block_size: int | None = None, min_8bit_size: int | None = None,
                       impl: str | None = None
                       ) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Adam's moments, stored 8-bit blockwise.

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    d_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t} / \sqrt{1-\beta_2^t} + \epsilon}

  with :math:`m` quantized with the signed and :math:`v` with the unsigned
  dynamic codebook after every step.

  Args:
    b1: decay of the first moment (float, array or tracer).
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    {config}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`~jlowbit.optax_transforms.state.ScaleByAdam8bitState`.

  References:
    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2014.
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2021.
  """
  def hyper(count, t):
    del count
    return _hyper(t, b1, b2, eps, *_inverse_bias_corrections(b1, b2, t))
  return scale_by_8bit("adam", state_lib.ScaleByAdam8bitState, hyper,
                       block_size=block_size, min_8bit_size=min_8bit_size,
                       impl=impl)


def ademamix_schedules(b1: Any, b3: Any, alpha: Any, t: jax.Array,
                       t_alpha: Any, t_beta3: Any) -> tuple[jax.Array, jax.Array]:
  r"""AdEMAMix's warm-up schedules of bitsandbytes, at step ``t`` (1-based).

  .. math::
    \alpha_t = \min(t \alpha / T_\alpha, \alpha), \qquad
    \beta_{3,t} = \min\Big(\exp\frac{\ln\beta_1 \ln\beta_3}
        {(1-s)\ln\beta_3 + s\ln\beta_1}, \beta_3\Big), \quad s = t / T_{\beta_3}

  each applied only when its horizon (``t_alpha``, ``t_beta3``) is not None.

  Returns:
    ``(b3_t, alpha_t)`` as scalars of ``t``'s dtype.
  """
  b3 = jnp.asarray(b3, t.dtype)
  alpha = jnp.asarray(alpha, t.dtype)
  if t_alpha is not None:
    alpha = jnp.minimum(t * alpha / jnp.asarray(t_alpha, t.dtype), alpha)
  if t_beta3 is not None:
    ln_b1 = jnp.log(jnp.asarray(b1, t.dtype))
    ln_b3 = jnp.log(b3)
    s = t / jnp.asarray(t_beta3, t.dtype)
    b3 = jnp.minimum(jnp.exp(ln_b1 * ln_b3 / ((1 - s) * ln_b3 + s * ln_b1)), b3)
  return b3, alpha


@_config_doc
def scale_by_ademamix_8bit(b1: Any = 0.9, b2: Any = 0.999, b3: Any = 0.9999,
                           alpha: Any = 5.0, eps: Any = 1e-8, *,
                           t_alpha: Any = None, t_beta3: Any = None,
                           stochastic_rounding: bool = True,
                           block_size: int | None = None,
                           min_8bit_size: int | None = None,
                           impl: str | None = None
                           ) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by AdEMAMix's fast and slow EMAs, stored 8-bit.

  .. math::
    m_1 &= \beta_1 m_1 + (1-\beta_1) g, \quad
    m_2 = \beta_{3,t} m_2 + (1-\beta_{3,t}) g, \quad
    \nu = \beta_2 \nu + (1-\beta_2) g^2 \\
    d &= \frac{m_1 / (1-\beta_1^t) + \alpha_t m_2}
              {\sqrt{\nu} / \sqrt{1-\beta_2^t} + \epsilon}

  :math:`m_1, m_2` use the signed, :math:`\nu` the unsigned codebook.
  The slow EMA :math:`m_2` moves by :math:`(1-\beta_3)(g - m_2)` per step,
  with :math:`1-\beta_3` down to ``1e-4``: far less than one code step of
  its block, so rounding it to the nearest code would freeze it. With
  ``stochastic_rounding`` (the default) it rounds up or down to its two
  neighbouring codes with the probabilities that keep its expected value
  exact, from a low-discrepancy sequence of the step count and the element's
  position (reproducible: the same run gives the same codes on every
  backend, and a resumed run continues exactly).
  :math:`\beta_{3,t}, \alpha_t` are ``b3``/``alpha`` evaluated at the step
  count when they are schedules (as in ``optax.contrib.ademamix``), then
  warmed up by :func:`ademamix_schedules` when ``t_beta3``/``t_alpha`` are set
  (as in bitsandbytes).

  Args:
    b1: decay of the fast EMA.
    b2: decay of the second moment.
    b3: decay of the slow EMA (float, array or schedule of the step count).
    alpha: weight of the slow EMA (float, array or schedule).
    eps: added to the denominator outside the square root.
    t_alpha: steps over which ``alpha`` warms up linearly; ``None``: no warm-up.
    t_beta3: steps over which ``b3`` warms up from ``b1``; ``None``: no warm-up.
    stochastic_rounding: round :math:`m_2` stochastically (keyword only);
      ``False`` rounds it to the nearest code as bitsandbytes does.
    {config}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`~jlowbit.optax_transforms.state.ScaleByAdemamix8bitState`.

  References:
    Pagliardini et al., `The AdEMAMix Optimizer: Better, Faster, Older
    <https://arxiv.org/abs/2409.03137>`_, 2024.
  """
  if not isinstance(stochastic_rounding, bool):
    raise TypeError(f"stochastic_rounding must be True or False, got "
                    f"{stochastic_rounding!r}")

  def hyper(count, t):
    b3_t, alpha_t = ademamix_schedules(
        b1, _scheduled(b3, count), _scheduled(alpha, count), t, t_alpha,
        t_beta3)
    return _hyper(t, b1, b2, b3_t, alpha_t, eps,
                  *_inverse_bias_corrections(b1, b2, t))
  return scale_by_8bit("ademamix", state_lib.ScaleByAdemamix8bitState, hyper,
                       block_size=block_size, min_8bit_size=min_8bit_size,
                       impl=impl, stochastic=(False, stochastic_rounding, False))


@_config_doc
def scale_by_lion_8bit(b1: Any = 0.9, b2: Any = 0.99, *,
                       block_size: int | None = None,
                       min_8bit_size: int | None = None,
                       impl: str | None = None
                       ) -> optax.GradientTransformationExtraArgs:
  r"""Lion's sign direction with an 8-bit momentum.

  .. math::
    d_t = \mathrm{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t), \qquad
    m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

  Args:
    b1: interpolation between momentum and gradient for the direction.
    b2: decay of the momentum.
    {config}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`~jlowbit.optax_transforms.state.ScaleByLion8bitState`.

  References:
    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, 2023.
  """
  def hyper(count, t):
    del count
    return _hyper(t, b1, b2)
  return scale_by_8bit("lion", state_lib.ScaleByLion8bitState, hyper,
                       block_size=block_size, min_8bit_size=min_8bit_size,
                       impl=impl)


@_config_doc
def scale_by_momentum_8bit(momentum: Any = 0.9, *,
                           block_size: int | None = None,
                           min_8bit_size: int | None = None,
                           impl: str | None = None
                           ) -> optax.GradientTransformationExtraArgs:
  r"""Heavy-ball momentum (torch/bitsandbytes SGD) with an 8-bit buffer.

  .. math::
    m_1 = g_1, \qquad m_t = \mu m_{t-1} + g_t, \qquad d_t = m_t

  Args:
    momentum: decay :math:`\mu` of the buffer.
    {config}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`~jlowbit.optax_transforms.state.ScaleByMomentum8bitState`.
  """
  def hyper(count, t):
    del count
    return _hyper(t, momentum, (t == 1).astype(jnp.float32))
  return scale_by_8bit("momentum", state_lib.ScaleByMomentum8bitState, hyper,
                       block_size=block_size, min_8bit_size=min_8bit_size,
                       impl=impl)


@_config_doc
def scale_by_rms_8bit(decay: Any = 0.99, eps: Any = 1e-8, *,
                      block_size: int | None = None, min_8bit_size: int | None = None,
                      impl: str | None = None
                      ) -> optax.GradientTransformationExtraArgs:
  r"""RMSprop scaling (torch semantics) with an 8-bit second moment.

  .. math::
    v_t = \rho v_{t-1} + (1-\rho) g_t^2, \qquad
    d_t = g_t / (\sqrt{v_t} + \epsilon)

  Args:
    decay: decay :math:`\rho` of the squared-gradient EMA.
    eps: added to the denominator outside the square root.
    {config}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`~jlowbit.optax_transforms.state.ScaleByRms8bitState`.
  """
  def hyper(count, t):
    del count
    return _hyper(t, decay, eps)
  return scale_by_8bit("rmsprop", state_lib.ScaleByRms8bitState, hyper,
                       block_size=block_size, min_8bit_size=min_8bit_size,
                       impl=impl)


@_config_doc
def scale_by_rss_8bit(eps: Any = 1e-10, *, block_size: int | None = None,
                      min_8bit_size: int | None = None,
                      impl: str | None = None
                      ) -> optax.GradientTransformationExtraArgs:
  r"""Adagrad scaling by the root of the sum of squares, stored 8-bit.

  .. math::
    v_t = v_{t-1} + g_t^2, \qquad d_t = g_t / (\sqrt{v_t} + \epsilon)

  Args:
    eps: added to the denominator outside the square root.
    {config}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`~jlowbit.optax_transforms.state.ScaleByRss8bitState`.
  """
  def hyper(count, t):
    del count
    return _hyper(t, eps)
  return scale_by_8bit("adagrad", state_lib.ScaleByRss8bitState, hyper,
                       block_size=block_size, min_8bit_size=min_8bit_size,
                       impl=impl)
