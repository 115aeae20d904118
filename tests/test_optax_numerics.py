"""8-bit optimizers: numerics against 32-bit state and the SPEC formulas.

The shared tables here (``ALGOS``, ``dequantize``, ``inner_state``) are also
imported by the other optimizer test files.
"""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlowbit as lowbit
from jlowbit import blockwise8
from jlowbit import codebooks
from jlowbit import update8
from jlowbit.algorithms import ALGORITHMS

# name -> (algorithm, 8-bit alias, 32-bit alias, kwargs of the 50-step tests).
ALGOS = {
    "adamw": ("adam", lowbit.adamw_8bit, lowbit.adamw_32bit,
              dict(learning_rate=1e-3)),
    "ademamix": ("ademamix", lowbit.ademamix_8bit, lowbit.ademamix_32bit,
                 dict(learning_rate=1e-3)),
    "lion": ("lion", lowbit.lion_8bit, lowbit.lion_32bit,
             dict(learning_rate=1e-4)),
    "sgd": ("momentum", lowbit.sgd_8bit, lowbit.sgd_32bit,
            dict(learning_rate=1e-2, weight_decay=1e-2)),
    "rmsprop": ("rmsprop", lowbit.rmsprop_8bit, lowbit.rmsprop_32bit,
                dict(learning_rate=1e-3, weight_decay=1e-2)),
    "adagrad": ("adagrad", lowbit.adagrad_8bit, lowbit.adagrad_32bit,
                dict(learning_rate=1e-2, weight_decay=1e-2)),
}
DTYPES = ["float32", "bfloat16", "float16"]
SHAPE = (64, 256)
STEPS = 50


def dequantize(moment, signed, block_size=256):
  """float32 value of a moment tree (8-bit leaves dequantized)."""
  def leaf(codes, absmax):
    if absmax is None:
      return codes
    return update8.dequantize_rows_reference(
        codes, update8.codebook(signed), absmax, block_size)
  return jax.tree.map(leaf, moment.codes, moment.absmax)


def inner_state(chain_state):
  """The ``ScaleBy*8bitState`` inside an alias' chain state."""
  (found,) = [s for s in chain_state
              if type(s).__name__.startswith("ScaleBy")
              and type(s).__name__.endswith("8bitState")]
  return found


def dequantized_moments(chain_state, algorithm):
  """``{field: float32 moment tree}`` of an alias' state."""
  inner = inner_state(chain_state)
  return {f: dequantize(getattr(inner, f), s)
          for f, s in zip(inner._fields[1:], ALGORITHMS[algorithm].signed)}


def _grads(dtype, steps=STEPS, shape=SHAPE):
  key = jax.random.PRNGKey(1)
  return (jax.random.normal(key, (steps,) + shape) * 0.01).astype(dtype)


def _params(dtype, shape=SHAPE):
  return (jax.random.normal(jax.random.PRNGKey(0), shape) * 0.1).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ALGOS)
def test_8bit_vs_resynced_32bit(name, dtype):
  """bitsandbytes' test: each step from the same (dequantized) state."""
  algorithm, alias8, alias32, kwargs = ALGOS[name]
  tx8, tx32 = alias8(**kwargs, impl="xla"), alias32(**kwargs)

  @jax.jit
  def run(p, grads):
    def step(carry, g):
      p, s8, s32 = carry
      u8, s8 = tx8.update(g, s8, p)
      u32, s32 = tx32.update(g, s32, p)
      p8, p32 = optax.apply_updates(p, u8), optax.apply_updates(p, u32)
      err = jnp.mean(jnp.abs(p8.astype(jnp.float32) - p32.astype(jnp.float32)))
      deq = dequantized_moments(s8, algorithm)
      ref = inner_state(s32)
      far = sum(jnp.sum(~jnp.isclose(deq[f], getattr(ref, f).codes, atol=3e-3,
                                     rtol=1e-3)) for f in deq)
      synced = {f: getattr(ref, f)._replace(codes=deq[f]) for f in deq}
      s32 = tuple(s._replace(**synced) if s is ref else s for s in s32)
      return (p8, s8, s32), (err, far)
    _, (errs, far) = jax.lax.scan(step, (p, tx8.init(p), tx32.init(p)), grads)
    return errs, far

  errs, far = run(_params(dtype), _grads(dtype))
  assert int(far.max()) < 20
  assert float(errs.mean()) < (1.7e-4 if dtype == "bfloat16" else 6e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ALGOS)
def test_8bit_and_32bit_runs_stay_close(name, dtype):
  """Independent 50-step runs: params deviate < 5% of how far they moved.

  Measured (CPU, these shapes): mean |p8 - p32| / mean |p32 - p0| <= 0.032
  and moment relative L2 error <= 0.056 over all algorithms and dtypes.
  """
  algorithm, alias8, alias32, kwargs = ALGOS[name]

  def run(tx, p, grads):
    def step(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(step, (p, tx.init(p)), grads)[0]

  p0, grads = _params(dtype), _grads(dtype)
  p8, s8 = jax.jit(run, static_argnums=0)(alias8(**kwargs, impl="xla"), p0,
                                          grads)
  p32, s32 = jax.jit(run, static_argnums=0)(alias32(**kwargs), p0, grads)
  f32 = lambda x: np.asarray(x, np.float32)
  moved = np.abs(f32(p32) - f32(p0)).mean()
  assert np.abs(f32(p8) - f32(p32)).mean() < 0.05 * moved
  deq, ref = dequantized_moments(s8, algorithm), inner_state(s32)
  for field, value in deq.items():
    exact = f32(getattr(ref, field).codes)
    assert np.linalg.norm(f32(value) - exact) < 0.08 * np.linalg.norm(exact)


# ---------------------------------------------------------------------------
# The SPEC formulas, in numpy.

def _np_step(algorithm, g, moments, h):
  """float32 numpy transcription of SPEC section 6 (direction, moments)."""
  f = np.float32
  if algorithm == "adam":
    (m, v), (b1, b2, eps, bc1, bc2) = moments, h
    m = b1 * m + (f(1) - b1) * g
    v = b2 * v + (f(1) - b2) * g * g
    return (m / bc1) / (np.sqrt(v) / np.sqrt(bc2) + eps), (m, v)
  if algorithm == "ademamix":
    (m1, m2, nu), (b1, b2, b3, alpha, eps, bc1, bc2) = moments, h
    m1 = b1 * m1 + (f(1) - b1) * g
    m2 = b3 * m2 + (f(1) - b3) * g
    nu = b2 * nu + (f(1) - b2) * g * g
    d = (m1 / bc1 + alpha * m2) / (np.sqrt(nu) / np.sqrt(bc2) + eps)
    return d, (m1, m2, nu)
  if algorithm == "lion":
    (m,), (b1, b2) = moments, h
    return np.sign(b1 * m + (f(1) - b1) * g), (b2 * m + (f(1) - b2) * g,)
  if algorithm == "momentum":
    (m,), (mu, first) = moments, h
    m = g if first else mu * m + g
    return m, (m,)
  if algorithm == "rmsprop":
    (v,), (decay, eps) = moments, h
    v = decay * v + (f(1) - decay) * g * g
    return g / (np.sqrt(v) + eps), (v,)
  (v,), (eps,) = moments, h
  v = v + g * g
  return g / (np.sqrt(v) + eps), (v,)


def _np_blocks(x, block_size):
  """``[blocks, block_size]``: each row of the last axis cut into blocks
  (the 8-bit state's layout, ``jlowbit._layout``), zero-padded."""
  rows = x.reshape(-1, x.shape[-1])
  return np.pad(rows, ((0, 0), (0, -x.shape[-1] % block_size))).reshape(
      -1, block_size)


def _np_unblock(values, shape):
  """Inverse of :func:`_np_blocks` (drops the padding)."""
  return values.reshape(int(np.prod(shape[:-1])), -1)[:, :shape[-1]].reshape(shape)


def _np_quantize(x, code, block_size):
  """Nearest-code quantization of SPEC section 4 (ties to the lower index),
  blocks along the last axis."""
  blocks = _np_blocks(x, block_size)
  absmax = np.abs(blocks).max(axis=1)
  scale = np.float32(1) / np.where(absmax > 0, absmax, np.float32(1))
  v = blocks * scale[:, None]
  codes = np.abs(v[..., None] - code).argmin(axis=-1)
  return _np_unblock(codes, x.shape), absmax.reshape(x.shape[:-1] + (-1,))


def _np_bracket(x, code, block_size):
  """Indices of the codes just below and above ``x / absmax`` (equal on a code)."""
  blocks = _np_blocks(x, block_size)
  absmax = np.abs(blocks).max(axis=1)
  v = _np_unblock(blocks / np.where(absmax > 0, absmax, 1)[:, None], x.shape)
  lo = np.clip(np.searchsorted(code, v, side="right") - 1, 0, code.size - 1)
  hi = np.where(code[lo] == v, lo, np.minimum(lo + 1, code.size - 1))
  return lo.reshape(x.shape), hi.reshape(x.shape)


# Moments the building blocks round stochastically by default.
STOCHASTIC = {"ademamix": (False, True, False)}


# algorithm -> (building block, its kwargs, hyper the kwargs give at step t).
def _hyper(algorithm, t):
  f = np.float32
  bc = lambda b: f(1) - f(b) ** f(t)
  return {
      "adam": (f(.9), f(.99), f(1e-6), bc(.9), bc(.99)),
      "ademamix": (f(.9), f(.99), f(.999), f(3), f(1e-6), bc(.9), bc(.99)),
      "lion": (f(.8), f(.95)),
      "momentum": (f(.7), t == 1),
      "rmsprop": (f(.9), f(1e-6)),
      "adagrad": (f(1e-6),),
  }[algorithm]


BLOCKS = {
    "adam": (lowbit.scale_by_adam_8bit, dict(b1=.9, b2=.99, eps=1e-6)),
    "ademamix": (lowbit.scale_by_ademamix_8bit,
                 dict(b1=.9, b2=.99, b3=.999, alpha=3., eps=1e-6)),
    "lion": (lowbit.scale_by_lion_8bit, dict(b1=.8, b2=.95)),
    "momentum": (lowbit.scale_by_momentum_8bit, dict(momentum=.7)),
    "rmsprop": (lowbit.scale_by_rms_8bit, dict(decay=.9, eps=1e-6)),
    "adagrad": (lowbit.scale_by_rss_8bit, dict(eps=1e-6)),
}


def _known_state(algorithm, shape, rng):
  """Random moments (first moments signed, second non-negative) as numpy."""
  return tuple(
      (rng.standard_normal(shape) if s else rng.random(shape) ** 4 * 1e-3)
      .astype(np.float32) for s in ALGORITHMS[algorithm].signed)


@pytest.mark.parametrize("t", [1, 7])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_one_step_matches_spec_formula(algorithm, t):
  block, kwargs = BLOCKS[algorithm]
  signed = ALGORITHMS[algorithm].signed
  rng = np.random.default_rng(0)
  shape, block_size = (5, 300), 128
  g = (rng.standard_normal(shape) * 0.1).astype(np.float32)
  moments = _known_state(algorithm, shape, rng)
  quantized = [_np_quantize(m, codebooks.dynamic(s), block_size)
               for m, s in zip(moments, signed)]
  old = [codebooks.dynamic(s)[c] * np.repeat(a, block_size, axis=-1)[..., :shape[-1]]
         for (c, a), s in zip(quantized, signed)]
  d_ref, new_ref = _np_step(algorithm, g, old, _hyper(algorithm, t))

  tx = block(**kwargs, block_size=block_size, min_8bit_size=1, impl="xla")
  state = tx.init(g)
  state = state._replace(count=jnp.int32(t - 1), **{
      f: lowbit.Quantized8bitMoment(jnp.asarray(c, jnp.uint8), jnp.asarray(a))
      for f, (c, a) in zip(state._fields[1:], quantized)})
  d, new_state = jax.jit(tx.update)(jnp.asarray(g), state)
  # Up to float rounding (XLA may fuse a*b + c); AdEMAMix's sum can cancel.
  atol = 1e-6 * np.abs(d_ref).max()
  np.testing.assert_allclose(d, d_ref, rtol=2e-6, atol=atol)
  stochastic = STOCHASTIC.get(algorithm, (False,) * len(signed))
  for f, exact, s, sr in zip(new_state._fields[1:], new_ref, signed, stochastic):
    codes_ref, absmax_ref = _np_quantize(exact, codebooks.dynamic(s), block_size)
    np.testing.assert_allclose(getattr(new_state, f).absmax, absmax_ref,
                               rtol=1e-6)
    codes = np.asarray(getattr(new_state, f).codes, np.int32)
    if sr:  # one of the two codes around the exact value, not only the nearest
      lo, hi = _np_bracket(exact, codebooks.dynamic(s), block_size)
      assert np.all((codes == lo) | (codes == hi))
      assert np.count_nonzero(codes != codes_ref) > 0
    else:
      diff = np.abs(codes - codes_ref)
      assert diff.max() <= 1 and np.count_nonzero(diff) <= 3

  # The float32 state path runs the same formula on the unquantized state.
  tx32 = block(**kwargs, min_8bit_size=lowbit.FLOAT32_STATE)
  state32 = tx32.init(g)._replace(count=jnp.int32(t - 1), **{
      f: lowbit.Quantized8bitMoment(jnp.asarray(m), None)
      for f, m in zip(state._fields[1:], old)})
  d32, new32 = jax.jit(tx32.update)(jnp.asarray(g), state32)
  np.testing.assert_allclose(d32, d_ref, rtol=2e-6, atol=atol)
  for f, exact in zip(new32._fields[1:], new_ref):
    assert getattr(new32, f).absmax is None
    np.testing.assert_allclose(getattr(new32, f).codes, exact, rtol=2e-6,
                               atol=1e-6 * np.abs(exact).max())


def _bnb_schedules(t, alpha, b1, b3, t_alpha, t_beta3):
  """bitsandbytes' AdEMAMix warm-up, float64 Python."""
  if t_alpha is not None:
    alpha = min(t * alpha / t_alpha, alpha)
  if t_beta3 is not None:
    ln1, ln3, s = math.log(b1), math.log(b3), t / t_beta3
    b3 = min(math.exp(ln1 * ln3 / ((1 - s) * ln3 + s * ln1)), b3)
  return b3, alpha


@pytest.mark.parametrize("t_alpha,t_beta3", [(None, None), (100, None),
                                             (None, 100), (50, 200)])
def test_ademamix_schedules(t_alpha, t_beta3):
  for t in [1, 2, 10, 49, 50, 51, 100, 150, 200, 1000]:
    b3, alpha = lowbit.optax_transforms.ademamix_schedules(
        0.9, 0.9999, 5.0, jnp.float32(t), t_alpha, t_beta3)
    b3_ref, alpha_ref = _bnb_schedules(t, 5.0, 0.9, 0.9999, t_alpha, t_beta3)
    np.testing.assert_allclose(alpha, alpha_ref, rtol=1e-6)
    np.testing.assert_allclose(1 - b3, 1 - b3_ref, rtol=2e-3)


def test_ademamix_schedules_reach_the_update():
  """One step at t = 31 with warm-ups: the direction uses alpha_t and b3_t."""
  g = jnp.asarray(np.random.default_rng(0).standard_normal((7, 11)),
                  jnp.float32)
  tx = lowbit.scale_by_ademamix_8bit(t_alpha=100, t_beta3=300,
                                     min_8bit_size=lowbit.FLOAT32_STATE)
  rng = np.random.default_rng(1)
  m1, m2, nu = _known_state("ademamix", g.shape, rng)
  fp32 = lambda m: lowbit.Quantized8bitMoment(jnp.asarray(m), None)
  state = tx.init(g)._replace(count=jnp.int32(30), m1=fp32(m1), m2=fp32(m2),
                              nu=fp32(nu))
  d, _ = tx.update(g, state)
  b3, alpha = _bnb_schedules(31, 5.0, 0.9, 0.9999, 100, 300)
  f = np.float32
  h = (f(.9), f(.999), f(b3), f(alpha), f(1e-8), f(1) - f(.9) ** f(31),
       f(1) - f(.999) ** f(31))
  d_ref, _ = _np_step("ademamix", np.asarray(g), (m1, m2, nu), h)
  np.testing.assert_allclose(d, d_ref, rtol=1e-4)


# The 32-bit twins are optax's own optimizers (up to float rounding).
OPTAX_TWINS = [
    (lambda: lowbit.adamw_32bit(1e-2, weight_decay=1e-3),
     lambda: optax.adamw(1e-2, weight_decay=1e-3)),
    (lambda: lowbit.ademamix_32bit(
        1e-2, b3=optax.linear_schedule(0.9, 0.999, 10),
        alpha=optax.linear_schedule(0., 5., 10), weight_decay=1e-3),
     lambda: optax.contrib.ademamix(
         1e-2, b3=optax.linear_schedule(0.9, 0.999, 10),
         alpha=optax.linear_schedule(0., 5., 10), weight_decay=1e-3)),
    (lambda: lowbit.lion_32bit(1e-3, weight_decay=1e-2),
     lambda: optax.lion(1e-3, weight_decay=1e-2)),
    (lambda: lowbit.sgd_32bit(1e-2, momentum=0.9),
     lambda: optax.sgd(1e-2, momentum=0.9)),
    (lambda: lowbit.rmsprop_32bit(1e-3, decay=0.9),
     lambda: optax.rmsprop(1e-3, decay=0.9, eps_in_sqrt=False)),
    (lambda: lowbit.adagrad_32bit(1e-2, eps=1e-10),
     lambda: optax.adagrad(1e-2, initial_accumulator_value=0., eps=1e-20)),
    (lambda: lowbit.lamb_32bit(1e-2, weight_decay=1e-3),
     lambda: optax.lamb(1e-2, weight_decay=1e-3)),
    (lambda: lowbit.lars_32bit(1e-1, weight_decay=1e-3),
     lambda: optax.lars(1e-1, weight_decay=1e-3)),
]


@pytest.mark.parametrize("ours,theirs", OPTAX_TWINS)
def test_32bit_twins_match_optax(ours, theirs):
  p0 = {"w": _params("float32", (16, 32)), "b": jnp.linspace(-1, 1, 5)}
  grads = jax.random.normal(jax.random.PRNGKey(3), (20, 16 * 32 + 5))

  def run(tx):
    def step(carry, g):
      p, s = carry
      g = {"w": g[:512].reshape(16, 32) * 0.1, "b": g[512:] * 0.1}
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(step, (p0, tx.init(p0)), grads)[0][0]

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               jax.jit(lambda: run(ours()))(), jax.jit(lambda: run(theirs()))())


def test_bitsandbytes_defaults():
  defaults = lambda f: {k: p.default for k, p in
                        inspect.signature(f).parameters.items()
                        if p.default is not inspect.Parameter.empty}
  # None: bitsandbytes' 256 and 4096 (test_min_8bit_size_decides_storage),
  # spelled None so that optax.inject_hyperparams leaves them static.
  common = dict(block_size=None, min_8bit_size=None, impl=None)
  assert defaults(lowbit.adamw_8bit) == dict(
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, mask=None, **common)
  assert defaults(lowbit.ademamix_8bit) == dict(
      b1=0.9, b2=0.999, b3=0.9999, alpha=5.0, eps=1e-8, weight_decay=1e-2,
      mask=None, t_alpha=None, t_beta3=None, stochastic_rounding=True, **common)
  assert defaults(lowbit.lion_8bit) == dict(b1=0.9, b2=0.99, weight_decay=1e-3,
                                            mask=None, **common)
  assert defaults(lowbit.adam_8bit) == dict(b1=0.9, b2=0.999, eps=1e-8,
                                            **common)
  assert defaults(lowbit.sgd_8bit) == dict(momentum=0.9, weight_decay=0.0,
                                           **common)
  assert defaults(lowbit.rmsprop_8bit) == dict(decay=0.99, eps=1e-8,
                                               weight_decay=0.0, **common)
  assert defaults(lowbit.adagrad_8bit) == dict(eps=1e-10, weight_decay=0.0,
                                               **common)
  for name in ["adam", "adamw", "ademamix", "lion", "sgd", "rmsprop",
               "adagrad", "lamb", "lars"]:
    eight, twin = (getattr(lowbit, f"{name}_{b}bit") for b in (8, 32))
    expected = {k: v for k, v in defaults(eight).items()
                if k not in common and k != "stochastic_rounding"}
    assert defaults(twin) == expected


# ---------------------------------------------------------------------------
# State layout.

@pytest.mark.parametrize("shape,eight_bit", [
    ((), False), ((0,), False), ((4095,), False), ((4096,), True),
    ((64, 65), True), ((2, 3, 1000), True)])
def test_min_8bit_size_decides_storage(shape, eight_bit):
  tx = lowbit.adam_8bit(1e-3, block_size=512, impl="xla")
  state = inner_state(tx.init({"p": jnp.zeros(shape, jnp.bfloat16)}))
  for moment in (state.mu, state.nu):
    codes, absmax = moment.codes["p"], moment.absmax["p"]
    assert codes.shape == shape
    if eight_bit:
      assert codes.dtype == jnp.uint8
      # Blocks along the last axis (jlowbit._layout).
      assert absmax.shape == shape[:-1] + (-(-shape[-1] // 512),)
      assert absmax.dtype == jnp.float32
    else:
      assert codes.dtype == jnp.float32 and absmax is None
  assert state.count.dtype == jnp.int32 and state.count.shape == ()


def test_32bit_twin_state_is_float32_everywhere():
  state = inner_state(lowbit.adamw_32bit(1e-3).init({"w": jnp.zeros((128, 64))}))
  assert state.mu.codes["w"].dtype == jnp.float32
  assert state.mu.codes["w"].shape == (128, 64) and state.mu.absmax["w"] is None


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_initial_8bit_state_is_quantized_zeros(algorithm):
  block, _ = BLOCKS[algorithm]
  state = block(min_8bit_size=1).init(jnp.zeros((300,)))
  for f, s in zip(state._fields[1:], ALGORITHMS[algorithm].signed):
    codes, absmax = blockwise8.quantize_blockwise_reference(
        jnp.zeros((300,)), codebooks.dynamic(s), 256)
    np.testing.assert_array_equal(getattr(state, f).codes, codes)
    np.testing.assert_array_equal(getattr(state, f).absmax, absmax)


@pytest.mark.parametrize("shape", [(1,), (255,), (257,), (3, 7, 11)])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_update_8bit_reference_shapes(algorithm, shape):
  block_size = 64
  blocks = shape[:-1] + (-(-shape[-1] // block_size),)  # along the last axis
  moments = tuple((jnp.full(shape, 7, jnp.uint8), jnp.ones(blocks))
                  for _ in ALGORITHMS[algorithm].signed)
  hyper = jnp.full((len(ALGORITHMS[algorithm].hyper),), 0.5)
  d, new = update8.update_8bit_reference(
      algorithm, jnp.ones(shape, jnp.bfloat16), moments, hyper,
      block_size=block_size)
  assert d.shape == shape and d.dtype == jnp.bfloat16
  for (codes, absmax), (c0, a0) in zip(new, moments):
    assert codes.shape == c0.shape and codes.dtype == jnp.uint8
    assert absmax.shape == a0.shape and absmax.dtype == jnp.float32


# ---------------------------------------------------------------------------
# Percentile clipping.

def _np_percentile_clipping(norms_sq, percentile, history):
  scales, hist = [], []
  for n in norms_sq:
    hist = (hist + [n])[-history:]
    clip = sorted(hist)[min(int(percentile * len(hist) // 100), len(hist) - 1)]
    scales.append(min(1.0, math.sqrt(clip) / math.sqrt(n)) if n > clip else 1.0)
  return scales


@pytest.mark.parametrize("percentile,history", [(5, 100), (30, 10), (50, 7),
                                                (100, 5), (0, 4)])
def test_percentile_clipping_matches_numpy(percentile, history):
  rng = np.random.default_rng(0)
  sizes = np.exp(rng.normal(0, 1, 40)).astype(np.float32)
  grads = [{"a": jnp.asarray(rng.standard_normal((3, 4)) * s, jnp.bfloat16),
            "b": jnp.asarray(rng.standard_normal(5) * s, jnp.float32)}
           for s in sizes]
  tx = lowbit.percentile_clipping(percentile, history=history)
  state = tx.init(grads[0])
  step = jax.jit(tx.update)
  norms_sq = [float(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree.leaves(g))) for g in grads]
  expected = _np_percentile_clipping(norms_sq, percentile, history)
  for g, scale in zip(grads, expected):
    out, state = step(g, state)
    assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32
    np.testing.assert_allclose(out["b"], np.asarray(g["b"]) * scale, rtol=1e-5)
    if scale == 1.0:
      np.testing.assert_array_equal(out["a"], g["a"])
  assert state.gnorm_sq_history.shape == (history,)


def test_percentile_clipping_clips_a_spike_after_warmup():
  tx = lowbit.percentile_clipping(5)
  state = tx.init(jnp.zeros(3))
  step = jax.jit(tx.update)
  for i in range(100):
    _, state = step(jnp.full((3,), 1.0 + i / 100), state)
  out, state = step(jnp.full((3,), 1000.0), state)
  # History now holds norms for 1.01 .. 1.99 and 1000: the 6th smallest, 1.06.
  np.testing.assert_allclose(out, np.full(3, 1.06), rtol=1e-5)


def test_percentile_clipping_runs_on_device_without_host_sync():
  tx = optax.chain(lowbit.percentile_clipping(10, history=8),
                   lowbit.adamw_8bit(1e-3, impl="xla"))
  params = {"w": jnp.ones((64, 128)), "b": jnp.zeros(4)}
  step = jax.jit(tx.update)
  updates, state = step(params, tx.init(params), params)
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      updates, state = step(params, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize("kwargs", [dict(percentile=101), dict(percentile=-1),
                                    dict(percentile=5, history=0),
                                    dict(percentile=5, history=2.5)])
def test_percentile_clipping_bad_arguments(kwargs):
  with pytest.raises(ValueError, match="percentile|history"):
    lowbit.percentile_clipping(**kwargs)


# ---------------------------------------------------------------------------
# Bad input and non-finite gradients.

def test_integer_or_complex_leaves_are_rejected():
  tx = lowbit.adamw_8bit(1e-3, impl="xla")
  with pytest.raises(TypeError, match=r"params\['n'\] has dtype int32; "
                     r"allowed: float32, bfloat16, float16"):
    tx.init({"w": jnp.zeros(3), "n": jnp.zeros(3, jnp.int32)})
  params = {"w": jnp.zeros(3)}
  with pytest.raises(TypeError, match=r"updates\['w'\] has dtype complex64"):
    tx.update({"w": jnp.zeros(3, jnp.complex64)}, tx.init(params), params)


def test_tree_mismatches_are_rejected():
  tx = lowbit.adam_8bit(1e-3, impl="xla")
  params = {"w": jnp.zeros((64, 64)), "b": jnp.zeros(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match="structure of the parameters"):
    tx.update({"w": jnp.zeros((64, 64))}, state)
  with pytest.raises(ValueError, match="updates and params have different"):
    tx.update(params, state, {"w": params["w"]})
  with pytest.raises(ValueError, match=r"updates\['w'\].shape=\(64, 65\)"):
    tx.update({"w": jnp.zeros((64, 65)), "b": jnp.zeros(3)}, state)


@pytest.mark.parametrize("block_size", [32, 100, 8192, 256.0, True])
def test_unsupported_block_size(block_size):
  with pytest.raises((ValueError, TypeError), match="block_size"):
    lowbit.adamw_8bit(1e-3, block_size=block_size)


@pytest.mark.parametrize("kwargs,match", [
    (dict(min_8bit_size=-1), "min_8bit_size=-1"),
    (dict(min_8bit_size=4096.0), "min_8bit_size"),
    (dict(impl="cuda"), "impl='cuda'"),
])
def test_bad_configuration(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    lowbit.lion_8bit(1e-4, **kwargs)


@pytest.mark.parametrize("name", ALGOS)
def test_non_finite_gradients_propagate(name):
  """Policy: like optax, nothing is filtered; in 8-bit state a NaN poisons
  its block's absmax (256 moment values) and nothing else."""
  _, alias8, _, kwargs = ALGOS[name]
  tx = alias8(**kwargs, impl="xla")
  params = {"w": jnp.ones((16, 256))}
  grads = {"w": jnp.full((16, 256), 0.01).at[3, 7].set(jnp.nan)}
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert np.isnan(updates["w"][3, 7])
  assert np.isfinite(np.delete(np.asarray(updates["w"]).ravel(), 3 * 256 + 7)).all()
  for moment in inner_state(state)[1:]:
    absmax = np.asarray(moment.absmax["w"])
    assert np.isnan(absmax[3]) and np.isfinite(np.delete(absmax, 3)).all()


def test_apply_if_finite_skips_non_finite_steps():
  tx = optax.apply_if_finite(lowbit.adamw_8bit(1e-3, impl="xla"), 3)
  params = {"w": jnp.ones((16, 256))}
  state = tx.init(params)
  bad = {"w": jnp.full((16, 256), jnp.inf)}
  updates, new_state = jax.jit(tx.update)(bad, state, params)
  assert not np.asarray(updates["w"]).any()
  jax.tree.map(np.testing.assert_array_equal, new_state.inner_state,
               state.inner_state)
  assert int(new_state.notfinite_count) == 1
