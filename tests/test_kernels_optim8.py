"""Fused 8-bit optimizer kernels (``jlowbit.triton_kernels.optim8``),
launched through the functional op ``jlowbit.update8.update_8bit``.

Each kernel is checked against a pure-jnp implementation of the optimizer
contract written here (dequantize with ``dequantize_blockwise_reference``,
float32 math, requantize with ``quantize_blockwise_reference``, both applied
row by row: the blocks of 8-bit optimizer state run along the last axis,
``jlowbit._layout``) and against
the library twin ``update_8bit_reference``. The interpreter must agree bit
for bit (bfloat16 directions: one ulp, see ``assert_same_cast``); compiled
Triton may contract ``a * b + c`` into an FMA, so on the GPU directions agree
to a few ulp and rare moment codes sit one step away.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import oracles
from conftest import FLOAT_DTYPES, KERNEL_IMPLS, assert_same_cast

from jlowbit import _search
from jlowbit import codebooks
from jlowbit import update8
from jlowbit.blockwise8 import (dequantize_blockwise_reference,
                                quantize_blockwise_reference)


def quantize_rows(x, code, block_size):
  """The flat reference on every row of the last axis (0-d: one row)."""
  n = x.shape[-1] if x.ndim else 1
  rows = x.reshape(math.prod(x.shape[:-1]), n)
  codes, absmax = jax.vmap(
      lambda r: quantize_blockwise_reference(r, code, block_size))(rows)
  return codes.reshape(x.shape), absmax.reshape(x.shape[:-1] + (-(-n // block_size),))


def dequantize_rows(codes, code, absmax, block_size):
  n = codes.shape[-1] if codes.ndim else 1
  rows = math.prod(codes.shape[:-1])
  values = jax.vmap(lambda c, a: dequantize_blockwise_reference(
      c, code, a, block_size, jnp.float32))(codes.reshape(rows, n),
                                            absmax.reshape(rows, -(-n // block_size)))
  return values.reshape(codes.shape)

pytest.importorskip("triton")
from jlowbit.triton_kernels import optim8  # noqa: E402


def fused_leaves(algorithm, grads, moments, hyper, *, block_size, impl, **kwargs):
  return update8.update_8bit(algorithm, grads, moments, hyper,
                             block_size=block_size, impl=impl, **kwargs)


def fused(algorithm, grad, moments, hyper, *, block_size, impl, **kwargs):
  return fused_leaves(algorithm, [grad], [moments], hyper,
                      block_size=block_size, impl=impl, **kwargs)[0]

ALGORITHMS = ["adam", "ademamix", "lion", "momentum", "rmsprop", "adagrad"]
SIGNED = {"adam": (True, False), "ademamix": (True, True, False), "lion": (True,),
          "momentum": (True,), "rmsprop": (False,), "adagrad": (False,)}
T = 3  # the step whose bias corrections the hyperparameters use
HYPER = {
    "adam": [0.9, 0.999, 1e-8, 1 / (1 - 0.9**T), (1 - 0.999**T)**-0.5],
    "ademamix": [0.9, 0.999, 0.9999, 5.0, 1e-8, 1 / (1 - 0.9**T),
                 (1 - 0.999**T)**-0.5],
    "lion": [0.9, 0.99],
    "momentum": [0.9, 0.0],
    "rmsprop": [0.99, 1e-8],
    "adagrad": [1e-10],
}
# (shape, block_size): partial last blocks; sizes 16 divides and does not.
INTERPRET_CASES = [((1000,), 256), ((40, 7), 64), ((6, 50), 2048)]
GPU_CASES = [((1_000_037,), 256), ((1000, 1024), 64), ((1_000_037,), 2048)]


def _adam(g, s, h):
  b1, b2, eps, inv_bc1, inv_sqrt_bc2 = h
  m = b1 * s[0] + (1 - b1) * g
  v = b2 * s[1] + (1 - b2) * g * g
  return (m * inv_bc1) / (jnp.sqrt(v) * inv_sqrt_bc2 + eps), (m, v)


def _ademamix(g, s, h):
  b1, b2, b3, alpha, eps, inv_bc1, inv_sqrt_bc2 = h
  m1 = b1 * s[0] + (1 - b1) * g
  m2 = b3 * s[1] + (1 - b3) * g
  nu = b2 * s[2] + (1 - b2) * g * g
  return ((m1 * inv_bc1 + alpha * m2) / (jnp.sqrt(nu) * inv_sqrt_bc2 + eps),
          (m1, m2, nu))


def _lion(g, s, h):
  b1, b2 = h
  return jnp.sign(b1 * s[0] + (1 - b1) * g), (b2 * s[0] + (1 - b2) * g,)


def _momentum(g, s, h):
  momentum, first = h
  m = jnp.where(first != 0, g, momentum * s[0] + g)
  return m, (m,)


def _rmsprop(g, s, h):
  decay, eps = h
  v = decay * s[0] + (1 - decay) * g * g
  return g / (jnp.sqrt(v) + eps), (v,)


def _adagrad(g, s, h):
  (eps,) = h
  v = s[0] + g * g
  return g / (jnp.sqrt(v) + eps), (v,)


MATH = {"adam": _adam, "ademamix": _ademamix, "lion": _lion,
        "momentum": _momentum, "rmsprop": _rmsprop, "adagrad": _adagrad}


def contract_reference(algorithm, grad, moments, hyper, block_size):
  """The optimizer contract in plain jnp: dequantize, fp32 math, requantize."""
  codes = [jnp.asarray(codebooks.dynamic(s)) for s in SIGNED[algorithm]]
  old = [dequantize_rows(c, code, a, block_size)
         for (c, a), code in zip(moments, codes)]
  h = [hyper[i] for i in range(hyper.shape[0])]
  d, new = MATH[algorithm](grad.astype(jnp.float32), old, h)
  requantized = [quantize_rows(value, code, block_size)
                 for value, code in zip(new, codes)]
  return d.astype(grad.dtype), tuple(requantized)


def _inputs(algorithm, shape, dtype, block_size, seed=0):
  """A gradient and non-trivial 8-bit moments (quantized random values)."""
  keys = jax.random.split(jax.random.key(seed), 4)
  grad = (0.1 * jax.random.normal(keys[0], shape)).astype(dtype)
  moments = []
  for i, signed in enumerate(SIGNED[algorithm]):
    x = jax.random.normal(keys[i + 1], shape)
    x = 0.05 * x if signed else 1e-3 * x * x
    code = jnp.asarray(codebooks.dynamic(signed))
    moments.append(quantize_rows(x, code, block_size))
  return grad, tuple(moments), jnp.asarray(HYPER[algorithm], jnp.float32)


def _assert_direction(got, want, impl, algorithm):
  assert got.dtype == want.dtype and got.shape == want.shape
  if impl == "interpret" and update8.writes_direction(algorithm, got.dtype):
    assert_same_cast(got, want, impl)
    return
  # One ulp of the gradient's dtype: FMA contraction, XLA's GPU division and
  # the library reference's order of operations (directions computed from
  # the state) move float32 results by an ulp, which can round to the
  # neighbouring value.
  tol = {np.dtype(jnp.bfloat16): 2.0**-7, np.dtype(jnp.float16): 2.0**-10}.get(
      np.dtype(got.dtype), 1e-5)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if algorithm == "lion":  # an FMA may flip sign() of a value within an ulp of 0
    assert np.count_nonzero(got != want) <= 1e-3 * got.size
    return
  scale = np.abs(want[np.isfinite(want)]).max(initial=0.0)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def _assert_moments(got, want, impl):
  assert len(got) == len(want)
  for (codes, absmax), (want_codes, want_absmax) in zip(got, want):
    assert codes.dtype == jnp.uint8 and codes.shape == want_codes.shape
    assert absmax.dtype == jnp.float32 and absmax.shape == want_absmax.shape
    if impl == "interpret":
      np.testing.assert_array_equal(codes, want_codes)
      np.testing.assert_array_equal(absmax, want_absmax)
      continue
    step = np.abs(np.asarray(codes, np.int32) - np.asarray(want_codes, np.int32))
    assert step.max(initial=0) <= 1 and np.count_nonzero(step) <= 1e-3 * step.size
    np.testing.assert_allclose(absmax, want_absmax, rtol=1e-6)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_matches_contract_reference(impl, case, dtype, algorithm):
  shape, block_size = (INTERPRET_CASES if impl == "interpret" else GPU_CASES)[case]
  grad, moments, hyper = _inputs(algorithm, shape, dtype, block_size, seed=case)
  d, new = fused(algorithm, grad, moments, hyper,
                               block_size=block_size, impl=impl)
  want_d, want_new = contract_reference(algorithm, grad, moments, hyper, block_size)
  _assert_direction(d, want_d, impl, algorithm)
  _assert_moments(new, want_new, impl)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_matches_library_reference(impl, algorithm):
  shape, block_size = ((5, 300), 256) if impl == "interpret" else ((4099, 1001), 256)
  grad, moments, hyper = _inputs(algorithm, shape, "bfloat16", block_size, seed=7)
  d, new = fused(algorithm, grad, moments, hyper,
                               block_size=block_size, impl=impl)
  want_d, want_new = update8.update_8bit_reference(algorithm, grad, moments, hyper,
                                                   block_size=block_size)
  _assert_direction(d, want_d, impl, algorithm)
  _assert_moments(new, want_new, impl)


# Leaves of one launch: mixed dtypes, sizes 16 divides and does not, a
# scalar, an empty leaf, leaves smaller and larger than a program's tile.
INTERPRET_LEAVES = [((40, 7), "float32"), ((), "float32"), ((0,), "float32"),
                    ((2500,), "bfloat16"), ((64,), "float32"), ((33, 64), "bfloat16"),
                    ((2049,), "float16"), ((4096,), "float32")]
GPU_LEAVES = INTERPRET_LEAVES + [((768, 3072), "float32"), ((50257, 768), "float32"),
                                 ((1_000_037,), "bfloat16")]


def _leaves(algorithm, cases, block_size):
  inputs = [_inputs(algorithm, shape, dtype, block_size, seed=i)
            for i, (shape, dtype) in enumerate(cases)]
  return [g for g, _, _ in inputs], [m for _, m, _ in inputs], inputs[0][2]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("block_size", [64, 4096])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_many_leaves_match_contract_reference(impl, block_size, algorithm):
  cases = INTERPRET_LEAVES if impl == "interpret" else GPU_LEAVES
  if impl == "interpret" and block_size > 64:
    # Each row of a 2-D leaf is its own (partial) block: (40, 7) would be
    # 40 interpreted programs 4096 lanes wide. Block 64 covers 2-D leaves.
    cases = [(shape, dtype) for shape, dtype in cases if len(shape) < 2]
  grads, moments, hyper = _leaves(algorithm, cases, block_size)
  out = fused_leaves(algorithm, grads, moments, hyper,
                                   block_size=block_size, impl=impl)
  assert len(out) == len(grads)
  for grad, leaf_moments, (d, new) in zip(grads, moments, out):
    want_d, want_new = contract_reference(algorithm, grad, leaf_moments, hyper,
                                          block_size)
    _assert_direction(d, want_d, impl, algorithm)
    _assert_moments(new, want_new, impl)


@pytest.mark.parametrize("impl, block_size", [
    ("interpret", 64),  # 256 interpreted takes 40 s of CI for no new path
    pytest.param("triton", 64, marks=pytest.mark.gpu),
    pytest.param("triton", 256, marks=pytest.mark.gpu)])
def test_stochastic_rounding_matches_library_reference(impl, block_size):
  """AdEMAMix's slow EMA rounded stochastically: the kernel draws the
  reference's noise (counters running across the leaves of a launch)."""
  cases = INTERPRET_LEAVES if impl == "interpret" else GPU_LEAVES
  grads, moments, hyper = _leaves("ademamix", cases, block_size)
  stochastic, step = (False, True, False), jnp.int32(11)
  out = fused_leaves("ademamix", grads, moments, hyper, block_size=block_size,
                     impl=impl, stochastic=stochastic, step=step)
  offset, moved = 0, 0
  for grad, leaf_moments, (d, new) in zip(grads, moments, out):
    want_d, want_new = update8.update_8bit_reference(
        "ademamix", grad, leaf_moments, hyper, block_size=block_size,
        stochastic=stochastic, step=step, counter_offset=offset)
    offset += grad.size
    _assert_direction(d, want_d, impl, "ademamix")
    _assert_moments(new, want_new, impl)
    nearest = contract_reference("ademamix", grad, leaf_moments, hyper, block_size)[1]
    _assert_moments(new[:1], nearest[:1], impl)  # m1 rounds to nearest
    moved += np.count_nonzero(np.asarray(new[1][0]) != np.asarray(nearest[1][0]))
  assert moved > 0.01 * offset  # m2 did round away from the nearest code


# 2-D with partial blocks, 0-d, empty, 16-bit; fewer than INTERPRET_LEAVES:
# the interpreter's time grows with the lanes.
APPLY_LEAVES = [((40, 7), "float32"), ((), "float32"), ((0,), "float32"),
                ((300,), "bfloat16"), ((129,), "float16")]


def _params(grads):
  """Parameters of the gradients' dtypes, but float32 for float16 gradients
  (mixed precision: the kernel reads and writes each in its own dtype)."""
  return [(0.5 * jax.random.normal(jax.random.key(100 + i), g.shape)).astype(
      jnp.float32 if g.dtype == jnp.float16 else g.dtype)
          for i, g in enumerate(grads)]


def _assert_params(got, want, impl):
  if impl == "interpret":
    assert_same_cast(got, want, impl)
    return
  assert got.dtype == want.dtype and got.shape == want.shape
  # FMA contraction and the GPU's approximate division move the direction
  # by an ulp or so, then one rounding to the parameter's dtype; where a
  # moment code sits one step away (rare, _assert_moments) the direction
  # moves more, the parameter by lr * that (lr = 0.01 here).
  tol = {np.dtype(jnp.bfloat16): 2.0**-7, np.dtype(jnp.float16): 2.0**-10}.get(
      np.dtype(got.dtype), 1e-6)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  off = np.abs(got - want) > tol * np.abs(want) + 1e-6
  assert np.count_nonzero(off) <= 1e-5 * got.size
  np.testing.assert_allclose(got[off], want[off], rtol=0, atol=1e-4)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("algorithm, coupled, stochastic", [
    ("adam", False, None), ("ademamix", False, (False, True, False)),
    ("lion", False, None), ("momentum", True, None)])
def test_parameter_step_matches_library_reference(impl, algorithm, coupled,
                                                  stochastic):
  """``apply_8bit``: the kernel reads the parameters and writes ``p - lr *
  (d + wd * p)`` (coupled: the moments see ``g + wd * p``) for the leaves
  that decay, ``p - lr * d`` for the others; moments as the reference's."""
  cases = APPLY_LEAVES if impl == "interpret" else GPU_LEAVES
  grads, moments, hyper = _leaves(algorithm, cases, 64)
  params = _params(grads)
  decays = [i % 2 == 0 for i in range(len(grads))]
  step = jnp.int32(5)
  out = update8.apply_8bit(algorithm, params, grads, moments, hyper,
                           learning_rate=0.01, weight_decay=0.1, decays=decays,
                           coupled_decay=coupled, block_size=64,
                           stochastic=stochastic, step=step, impl=impl)
  offset = 0
  for p, g, m, decay, (new_p, new_m) in zip(params, grads, moments, decays, out):
    want_p, want_m = update8.apply_8bit_reference(
        algorithm, p, g, m, hyper, learning_rate=0.01, weight_decay=0.1,
        decays=decay, coupled_decay=coupled, block_size=64,
        stochastic=stochastic, step=step, counter_offset=offset)
    offset += g.size
    _assert_params(new_p, want_p, impl)
    _assert_moments(new_m, want_m, impl)


def test_parameter_step_of_float64_params_runs_in_float64():
  """The kernels write 16/32-bit parameters; a float64 one takes its step
  in jax.numpy after the kernel's update (same moments)."""
  with jax.enable_x64(True):
    grads, moments, hyper = _leaves("adam", [((300,), "float32")] * 2, 64)
    params = [jnp.full((300,), 1 + 2.0**-40, jnp.float64),
              jnp.ones((300,), jnp.float32)]
    out = update8.apply_8bit("adam", params, grads, moments, hyper,
                             learning_rate=2.0**-30, weight_decay=0.0,
                             block_size=64, impl="interpret")
    for p, g, m, (new_p, new_m) in zip(params, grads, moments, out):
      want_p, want_m = update8.apply_8bit_reference(
          "adam", p, g, m, hyper, learning_rate=2.0**-30, block_size=64)
      assert new_p.dtype == p.dtype
      np.testing.assert_array_equal(new_p, want_p)
      _assert_moments(new_m, want_m, "interpret")
    assert np.any(np.asarray(out[0][0]) != np.asarray(out[0][0], np.float32))


@pytest.mark.parametrize("max_pointers, launches", [(384, 5), (10, 7)])
def test_launches_group_leaves_by_dtype_and_pointer_budget(monkeypatch,
                                                           max_pointers, launches):
  """Adam takes 10 pointers per leaf. Groups: float32 leaves whose size 16
  divides (2) or not (2), bfloat16 ones (1 + 1), float16 (1); the empty
  leaf launches nothing."""
  monkeypatch.setattr(optim8, "MAX_KERNEL_POINTERS", max_pointers)
  grads, moments, hyper = _leaves("adam", INTERPRET_LEAVES, 64)
  groups = optim8._launches("adam", grads)
  assert len(groups) == launches
  assert sorted(i for g in groups for i in g) == [0, 1, 3, 4, 5, 6, 7]
  for group in groups:
    assert len({grads[i].dtype for i in group}) == 1
    assert len({grads[i].size % 16 == 0 for i in group}) == 1
    assert 10 * len(group) <= max_pointers


def test_generated_kernel_dispatches_by_binary_search():
  # Leaves of 3 tiles; aligned leaves 0, 2, 4 have 3, 1 and 0 full tiles.
  layout = tuple(optim8.Leaf(first=3 * i, tiles=3, full_tiles=(3, 0, 1, 0, 0)[i],
                             rows=2, row_chunks=100 + i, row_blocks=1, key_at=i,
                             aligned=i % 2 == 0, row_noise=i == 3)
                 for i in range(5))
  source = optim8._kernel_source("lion", layout, (False,), True)
  assert len(re.findall(r"_update_tile\(g_\d", source)) == 6
  assert source.count("if tile <") == 5  # 4 between leaves, 1 within leaf 2
  assert "tile - 12, 2, 104, 1, 208, 2, 4, BLOCK_SIZE" in source
  calls = dict(re.findall(r"_update_tile\(g_(\d).*CODE_BITS, (\w+, \w+, \w+)\)", source))
  assert calls == {"0": "True, False, True", "1": "False, False, False",
                   "2": "True, False, False", "3": "False, True, False",
                   "4": "True, False, False"}
  leaf_2 = source[source.index("if tile < 7:"):]
  assert leaf_2.index("g_2") < leaf_2.index("CODE_BITS, True, False, True)") < leaf_2.index(
      "else:") < leaf_2.index("CODE_BITS, True, False, False)")
  assert "uniform" not in source.split("def lion_update_kernel")[0].split("):", 1)[1]
  kernel = optim8.update_kernel("lion", layout, (False,), True)
  assert optim8.update_kernel("lion", layout, (False,), True) is kernel
  assert "_tile_noise(" in optim8._kernel_source("lion", layout, (True,), True)


@pytest.mark.parametrize("shapes, block_size, warps", [
    ([(3, 512), (2048,)], 256, 2048 // (32 * optim8.ELEMENTS_PER_THREAD)),
    ([(3, 512), (400,)], 256, 2048 // (32 * optim8.ELEMENTS_PER_THREAD)),
    ([(4096,)], 4096, 4096 // (32 * optim8.ELEMENTS_PER_THREAD)),
])
def test_warps_of_a_launch(monkeypatch, shapes, block_size, warps):
  """A program's warps cover its tile at ELEMENTS_PER_THREAD each, padded
  rows or not; a block larger than TILE_ELEMENTS makes the tile larger."""
  seen = []

  class Launched(Exception):
    pass

  def record(*args, num_warps, **kwargs):
    seen.append(num_warps)
    raise Launched  # before the outputs are needed

  monkeypatch.setattr(optim8, "launch", record)
  grads, moments = [], []
  for i, shape in enumerate(shapes):
    g, m, hyper = _inputs("lion", shape, "float32", block_size, seed=i)
    grads.append(g)
    moments.append(m)
  with pytest.raises(Launched):
    optim8.fused_update("lion", grads, moments, hyper, jnp.zeros((1,), jnp.uint32),
                        [(0, False)] * len(shapes), block_size=block_size,
                        impl="interpret", stochastic=(False,), write_direction=True)
  assert seen == [warps]


def test_kernel_writes_the_direction_or_leaves_it_to_xla():
  written = {(a, d) for a in ALGORITHMS for d in ("float32", "bfloat16", "float16")
             if update8.writes_direction(a, jnp.dtype(d))}
  assert written == {*(("lion", d) for d in ("float32", "bfloat16", "float16")),
                     *(("ademamix", d) for d in ("float32", "bfloat16", "float16")),
                     *((a, d) for a in ("adam", "momentum", "rmsprop", "adagrad")
                       for d in ("bfloat16", "float16"))}
  layout = (optim8.Leaf(0, 4, 0, 1, 100, 7, 0, True, False),
            optim8.Leaf(4, 2, 0, 1, 50, 4, 1, True, False))
  adam = optim8._kernel_source("adam", layout, (False, False), False)
  assert "_store_direction" not in adam and "d_0" not in adam
  assert "_store_direction(d_ptr" in optim8._kernel_source("lion", layout, (False,), True)
  for algorithm, dtype in (("momentum", "float32"), ("adam", "float32")):
    grad, moments, hyper = _inputs(algorithm, (3, 300), dtype, 128, seed=4)
    direction = fused(algorithm, grad, moments, hyper,
                                    block_size=128, impl="interpret")[0]
    want = update8.direction_8bit_reference(algorithm, grad, moments, hyper,
                                            block_size=128)
    np.testing.assert_array_equal(direction, want)
    assert direction.dtype == dtype and direction.shape == (3, 300)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_momentum_first_step_takes_the_gradient(impl):
  grad, moments, _ = _inputs("momentum", (777,), "float32", 64, seed=3)
  hyper = jnp.asarray([0.9, 1.0], jnp.float32)
  d, new = fused("momentum", grad, moments, hyper, block_size=64,
                               impl=impl)
  np.testing.assert_array_equal(d, grad)
  want = contract_reference("momentum", grad, moments, hyper, 64)[1]
  _assert_moments(new, want, impl)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_lion_sign_of_zero_and_nan(impl):
  """Lion's direction is ``jnp.sign``: 0 for 0 and NaN for NaN."""
  grad = jnp.tile(jnp.asarray([0.0, -0.0, jnp.nan, 3.0, -2.0, 1e-30], jnp.float32), 50)
  zero = jnp.zeros((300,), jnp.float32)
  moments = (quantize_rows(zero, jnp.asarray(codebooks.dynamic(True)), 64),)
  hyper = jnp.asarray(HYPER["lion"], jnp.float32)
  d, _ = fused("lion", grad, moments, hyper, block_size=64, impl=impl)
  want = np.tile(np.float32([0, 0, np.nan, 1, -1, 1]), 50)
  np.testing.assert_array_equal(np.asarray(d, np.float32), want)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_scalar_leaf(impl):
  grad, moments, hyper = _inputs("adam", (), "float16", 64, seed=5)
  d, new = fused("adam", grad, moments, hyper, block_size=64,
                               impl=impl)
  want_d, want_new = contract_reference("adam", grad, moments, hyper, 64)
  _assert_direction(d, want_d, impl, "adam")
  _assert_moments(new, want_new, impl)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_chained_jitted_steps_with_donated_state(impl):
  n = 3000 if impl == "interpret" else 1 << 20
  _, moments, hyper = _inputs("adam", (n,), "float32", 256)
  step = jax.jit(
      lambda g, state, h: fused("adam", g, state, h, block_size=256,
                                              impl=impl),
      donate_argnums=1)
  for t in range(1, 4):
    grad = jax.random.normal(jax.random.key(t), (n,), jnp.bfloat16)
    h = jnp.asarray([0.9, 0.999, 1e-8, 1 / (1 - 0.9**t), (1 - 0.999**t)**-0.5],
                    jnp.float32)
    want_d, want_new = jax.block_until_ready(
        contract_reference("adam", grad, moments, h, 256))
    d, moments = step(grad, moments, h)
    _assert_direction(d, want_d, impl, "adam")
    _assert_moments(moments, want_new, impl)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_new_hyperparameters_do_not_retrace(impl):
  grad, moments, hyper = _inputs("ademamix", (2000,), "float32", 256)
  traces = []

  @jax.jit
  def step(grad, moments, hyper):
    traces.append(None)
    return fused("ademamix", grad, moments, hyper, block_size=256,
                               impl=impl)

  d1, _ = step(grad, moments, hyper)
  d2, _ = step(grad, moments, hyper.at[3].set(8.0))
  assert len(traces) == 1
  assert not np.array_equal(d1, d2)
  _assert_direction(d2, contract_reference("ademamix", grad, moments,
                                           hyper.at[3].set(8.0), 256)[0],
                    impl, "ademamix")


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_nan_gradient_poisons_only_its_block(impl):
  grad, moments, hyper = _inputs("adam", (1000,), "float32", 256)
  grad = grad.at[300].set(jnp.nan)
  d, new = fused("adam", grad, moments, hyper, block_size=256,
                               impl=impl)
  want_d, want_new = contract_reference("adam", grad, moments, hyper, 256)
  _assert_direction(d, want_d, impl, "adam")
  _assert_moments(new, want_new, impl)
  for _, absmax in new:
    assert np.isnan(absmax[1]) and np.isfinite(np.delete(np.asarray(absmax), 1)).all()


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_empty_leaf_does_not_launch(monkeypatch, shape, algorithm):
  def no_launch(*args, **kwargs):
    raise AssertionError("an empty leaf must not launch a kernel")

  monkeypatch.setattr(optim8, "launch", no_launch)
  grad, moments, hyper = _inputs(algorithm, shape, "bfloat16", 64)
  d, new = fused(algorithm, grad, moments, hyper, block_size=64,
                               impl="interpret")
  assert d.shape == shape and d.dtype == jnp.bfloat16
  assert all(c is old_c and a is old_a for (c, a), (old_c, old_a) in zip(new, moments))


def _call(algorithm="adam", grad=None, moments=None, hyper=None, block_size=256,
          impl="interpret"):
  g, m, h = _inputs("adam", (300,), "float32", 256)
  return fused(
      algorithm, g if grad is None else grad, m if moments is None else moments,
      h if hyper is None else hyper, block_size=block_size, impl=impl)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(algorithm="adamw"), ValueError, r"algorithm='adamw' .*'adam', 'ademamix'"),
    (dict(impl="cuda"), ValueError, r"impl='cuda' .*'triton', 'xla', 'interpret'"),
    (dict(block_size=100), ValueError, r"block_size=100 .*64, 128"),
    (dict(block_size=256.0), TypeError, r"block_size=256.0 must be an int"),
    (dict(grad=jnp.ones(300, jnp.int32)), TypeError, r"grads\[0\].dtype=int32"),
    (dict(moments=()), ValueError, r"moments of grads\[0\] must be 2 .*\('mu', 'nu'\)"),
    (dict(moments=((jnp.zeros(300, jnp.uint8),), (jnp.zeros(300, jnp.uint8),))),
     ValueError, r"moment 'mu' of grads\[0\] must be a \(codes, absmax\) pair"),
    (dict(moments=((jnp.zeros(300, jnp.int8), jnp.ones(2)),) * 2), ValueError,
     r"mu of grads\[0\] codes must be uint8 of the gradient's shape \(300,\), "
     r"got int8\(300,\)"),
    (dict(moments=((jnp.zeros(300, jnp.uint8), jnp.ones(3)),) * 2), ValueError,
     r"mu of grads\[0\] absmax is float32\(3,\), but block_size=256 needs "
     r"float32\(2,\)"),
    (dict(hyper=jnp.ones(4)), ValueError, r"hyper.shape=\(4,\) does not match "
     r"algorithm='adam': expected \(5,\) = \[b1, b2, eps, inv_bc1, inv_sqrt_bc2\]"),
])
def test_errors_name_the_argument(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    _call(**kwargs)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(params=[]), ValueError, r"got 0 params but 1 grads"),
    (dict(params=[jnp.ones(299)]), ValueError,
     r"params\[0\] has shape \(299,\) but grads\[0\] has shape \(300,\)"),
    (dict(params=[jnp.ones(300, jnp.int32)]), TypeError, r"params\[0\].dtype=int32"),
    (dict(decays=[1]), ValueError, r"decays=\(1,\) must hold one bool per parameter"),
    (dict(learning_rate=jnp.ones(2)), ValueError,
     r"learning_rate must be a scalar, got shape \(2,\)"),
])
def test_parameter_step_errors_name_the_argument(kwargs, exc, match):
  grad, moments, hyper = _inputs("adam", (300,), "float32", 256)
  args = dict(params=[jnp.ones(300)], learning_rate=0.1) | kwargs
  with pytest.raises(exc, match=match):
    update8.apply_8bit("adam", args.pop("params"), [grad], [moments], hyper,
                       block_size=256, impl="xla", **args)


@pytest.mark.parametrize("code", [
    codebooks.dynamic(True), codebooks.dynamic(False), codebooks.nf4(),
    np.linspace(-1, 1, 256, dtype=np.float32),
], ids=["signed", "unsigned", "nf4", "linear"])
def test_decision_tree_equals_nearest_code_index(code):
  thresholds = _search.decision_thresholds(code)
  assert np.all(np.diff(thresholds) > 0)
  assert np.all((thresholds > code[:-1]) & (thresholds <= code[1:]))
  near = np.concatenate([code, thresholds])
  v = np.concatenate([
      near, np.nextafter(near, np.float32(-2)), np.nextafter(near, np.float32(2)),
      np.random.default_rng(0).uniform(-1.1, 1.1, 20_000),
      [0.0, -0.0, 1e-30, -1e-30, np.inf, -np.inf, np.nan]]).astype(np.float32)
  got = oracles.tree_code_index(jnp.asarray(v), jnp.asarray(_search.decision_tree(code)))
  want = oracles.nearest_code_index(jnp.asarray(v), jnp.asarray(code))
  np.testing.assert_array_equal(got, want)


def test_qmaps_layout():
  maps, buckets = optim8.qmaps(), optim8.bucket_entries()
  assert maps.shape == (2, optim8.QMAP_ROWS, 256) and maps.dtype == np.float32
  assert buckets.shape == (2, 2, _search.BUCKET_KEYS) and buckets.dtype == np.uint8
  for i, signed in enumerate((True, False)):
    code = codebooks.dynamic(signed)
    np.testing.assert_array_equal(maps[i, 0], code)
    pairs = maps[i, 1:3].reshape(256, 2)
    np.testing.assert_array_equal(pairs[:, 0], code)
    np.testing.assert_array_equal(  # in the kernels' noise units, 2**-24
        pairs[:, 1], _search.code_gaps(code) * 2.0**-24)
    for search, floor in enumerate((False, True)):
      thresholds, code_buckets, _ = _search.code_search(code, floor)
      np.testing.assert_array_equal(maps[i, 3 + search], thresholds)
      np.testing.assert_array_equal(buckets[i, search], code_buckets)