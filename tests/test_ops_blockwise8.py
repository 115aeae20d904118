"""8-bit blockwise quantization: reference math, kernels vs reference, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ALL_IMPLS, FLOAT_DTYPES, KERNEL_IMPLS, assert_same_cast

import jlowbit
import jlowbit._search
from jlowbit import codebooks

SHAPES = [(), (1,), (0,), (3, 0), (255,), (1000,), (7, 300), (2, 3, 129)]


def _normal(shape, dtype="float32", seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _numpy_quantize(x, code, block_size):
  """Independent float64 nearest-code quantizer for the reference math."""
  flat = np.asarray(x, np.float32).reshape(-1)
  pad = (-flat.size) % block_size
  blocks = np.pad(flat, (0, pad)).reshape(-1, block_size)
  absmax = np.abs(blocks).max(axis=1)
  scaled = blocks / np.where(absmax > 0, absmax, 1)[:, None]
  dist = np.abs(scaled[..., None].astype(np.float64) - np.asarray(code, np.float64))
  return dist.argmin(-1).reshape(-1)[:flat.size], absmax


@pytest.mark.parametrize("block_size", [64, 256, 4096])
@pytest.mark.parametrize("signed", [True, False])
def test_reference_matches_numpy_nearest(block_size, signed):
  x = _normal((5000,), seed=1)
  x = x if signed else jnp.abs(x)
  code = codebooks.dynamic(signed)
  q = jlowbit.quantize_blockwise(x, code, block_size=block_size, impl="xla")
  codes, absmax = _numpy_quantize(x, code, block_size)
  np.testing.assert_array_equal(q.absmax, absmax)
  # float32 vs float64 distances may disagree only on exact float32 ties.
  assert np.mean(np.asarray(q.codes) != codes) < 1e-3


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_shapes(impl, shape):
  x = _normal(shape)
  q = jlowbit.quantize_blockwise(x, block_size=64, impl=impl)
  assert q.codes.shape == shape and q.codes.dtype == jnp.uint8
  assert q.absmax.shape == (-(-x.size // 64),) and q.absmax.dtype == jnp.float32
  y = jlowbit.dequantize_blockwise(q, impl=impl)
  assert y.shape == shape and y.dtype == x.dtype
  if x.size:
    assert float(jnp.max(jnp.abs(y - x))) <= float(jnp.max(q.absmax)) * 0.01


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("block_size", [64, 128, 512, 4096])
@pytest.mark.parametrize("signed", [True, False])
def test_kernel_matches_xla(impl, dtype, block_size, signed):
  n = 3 * block_size + 37 if impl == "interpret" else 1_000_003
  x = _normal((n,), dtype, seed=block_size)
  x = x if signed else jnp.abs(x)
  code = codebooks.dynamic(signed)
  want = jlowbit.quantize_blockwise(x, code, block_size=block_size, impl="xla")
  got = jlowbit.quantize_blockwise(x, code, block_size=block_size, impl=impl)
  np.testing.assert_array_equal(got.codes, want.codes)
  np.testing.assert_array_equal(got.absmax, want.absmax)
  for out_dtype in FLOAT_DTYPES:
    assert_same_cast(
        jlowbit.dequantize_blockwise(got, out_dtype, impl=impl),
        jlowbit.dequantize_blockwise(want, out_dtype, impl="xla"), impl)


OTHER_CODES = {
    # one bucketed comparison suffices (thresholds down to 2**-32)
    "linear": np.linspace(-1, 1, 256, dtype=np.float32),
    # 256 codes within 2%: too many per bucket, the kernel descends the tree
    "clustered": np.linspace(0.98, 1.0, 256, dtype=np.float32),
}


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("name", sorted(OTHER_CODES))
def test_kernel_matches_xla_other_codebooks(impl, name):
  code = OTHER_CODES[name]
  assert (jlowbit._search.code_search(code)[2] > 0) == (name == "linear")
  x = _normal((3 * 256 + 37,), seed=4)
  x = x if name == "linear" else 0.98 + 0.02 * jax.nn.sigmoid(x)
  want = jlowbit.quantize_blockwise(x, code, block_size=256, impl="xla")
  got = jlowbit.quantize_blockwise(x, code, block_size=256, impl=impl)
  np.testing.assert_array_equal(got.codes, want.codes)
  np.testing.assert_array_equal(got.absmax, want.absmax)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("signed", [True, False])
def test_kernel_matches_xla_at_extremes(impl, signed):
  """Blocks scaled by 1e-30 .. 1e38, values one ulp around every scaled
  threshold, and blocks holding +-inf or NaN: the same codes as the
  reference (normal floats only: XLA on CPU flushes subnormals)."""
  code = codebooks.dynamic(signed)
  thresholds = jlowbit._search.decision_thresholds(code)
  unit = np.concatenate([code, thresholds, np.nextafter(thresholds, np.float32(-2)),
                         np.nextafter(thresholds, np.float32(2))])[:768]
  blocks = [unit[i:i + 256] * np.float32(s) for i, s in
            zip(range(0, 768, 256), (1e-30, 3e-20, 1e38))]
  special = np.resize(unit, 256).astype(np.float32)
  special[[3, 77]] = [np.inf, -np.inf]
  nan_block = np.resize(unit, 256).astype(np.float32)
  nan_block[5] = np.nan
  x = jnp.asarray(np.concatenate(blocks + [special, -special, nan_block]))
  want = jlowbit.quantize_blockwise(x, code, block_size=256, impl="xla")
  got = jlowbit.quantize_blockwise(x, code, block_size=256, impl=impl)
  np.testing.assert_array_equal(got.codes, want.codes)
  np.testing.assert_array_equal(got.absmax, want.absmax)


def _dense_sweep(code):
  """float32 values in [-1, 1] and beyond around every decision of ``code``:
  every code, every threshold and every float32 midpoint of neighbouring
  codes with two float32 neighbours on each side, signed zeros, tiny and
  subnormal magnitudes, and a uniform sweep."""
  code = np.asarray(code, np.float32)
  thresholds = jlowbit._search.decision_thresholds(code)
  midpoints = (code[:-1] + code[1:]) / np.float32(2)
  near = np.concatenate([code, thresholds, midpoints])
  probes = [near]
  for direction in (-np.inf, np.inf):
    step = near
    for _ in range(2):
      step = np.nextafter(step, np.float32(direction))
      probes.append(step)
  tiny = np.float32([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1e-30, 1e-8])
  probes += [tiny, -tiny, np.linspace(-1, 1, 20_001, dtype=np.float32)]
  return np.concatenate(probes).astype(np.float32)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("signed", [True, False])
def test_kernel_matches_xla_on_a_dense_sweep(impl, signed):
  """The bucketed search of the kernels on every decision of the codebook:
  blocks of scale 1 (the probes' own values, exactly), 0.37, 2**-70 (the
  tiny-scale path), 3e38, and blocks of scale inf holding any finite value
  (every exponent) and +-inf. Codes equal the reference's decision tree."""
  code = codebooks.dynamic(signed)
  sweep = _dense_sweep(code)
  sweep = sweep if signed else np.abs(sweep)
  block_size = 256
  blocks = []
  for scale in (1.0, 0.37, 2.0**-70, 3e38):
    values = np.resize(sweep, (-(-sweep.size // (block_size - 1)), block_size - 1))
    values = (values * np.float32(scale)).astype(np.float32)
    blocks.append(np.concatenate(  # the block's absmax is the scale itself
        [np.full((values.shape[0], 1), np.float32(scale)), values], axis=1))
  finite = (((np.arange(255, dtype=np.uint32)[:, None] << 23)
             | np.uint32([0, 1, 0x400000, 0x7FFFFF])).ravel().view(np.float32))
  finite = np.concatenate([finite, -finite] if signed else [finite])
  infinite = np.resize(finite, (-(-finite.size // (block_size - 2)), block_size - 2))
  blocks.append(np.concatenate(
      [np.full((infinite.shape[0], 1), np.inf, np.float32),
       np.full((infinite.shape[0], 1), -np.inf if signed else np.inf, np.float32),
       infinite], axis=1))
  x = jnp.asarray(np.concatenate([b.reshape(-1) for b in blocks]))
  want = jlowbit.quantize_blockwise(x, code, block_size=block_size, impl="xla")
  got = jlowbit.quantize_blockwise(x, code, block_size=block_size, impl=impl)
  np.testing.assert_array_equal(got.codes, want.codes)
  np.testing.assert_array_equal(got.absmax, want.absmax)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("shape", [(5, 7, 300), (4097,), (64,)])
def test_kernel_matches_xla_shapes(impl, shape):
  x = _normal(shape, "bfloat16", seed=3)
  want = jlowbit.quantize_blockwise(x, block_size=256, impl="xla")
  got = jlowbit.quantize_blockwise(x, block_size=256, impl=impl)
  np.testing.assert_array_equal(got.codes, want.codes)
  np.testing.assert_array_equal(got.absmax, want.absmax)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_zero_blocks_give_zeros(impl):
  x = jnp.zeros((300,)).at[200:].set(1.5)
  q = jlowbit.quantize_blockwise(x, block_size=64, impl=impl)
  y = jlowbit.dequantize_blockwise(q, impl=impl)
  assert not jnp.isnan(y).any()
  np.testing.assert_array_equal(y[:192], 0.0)
  np.testing.assert_allclose(y[200:], 1.5, rtol=1e-6)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_non_finite_poisons_its_block_only(impl):
  x = _normal((256,)).at[10].set(jnp.nan).at[130].set(jnp.inf)
  q = jlowbit.quantize_blockwise(x, block_size=64, impl=impl)
  assert jnp.isnan(q.absmax[0]) and jnp.isinf(q.absmax[2])
  y = jlowbit.dequantize_blockwise(q, impl=impl)
  assert jnp.isnan(y[:64]).all()
  assert not jnp.isfinite(y[130])
  assert jnp.isfinite(y[64:128]).all() and jnp.isfinite(y[192:]).all()


def test_error_bound_normal_data():
  x = _normal((1 << 20,), seed=7)
  q = jlowbit.quantize_blockwise(x, block_size=4096, impl="xla")
  err = float(jnp.mean(jnp.abs(jlowbit.dequantize_blockwise(q, impl="xla") - x)))
  assert err < 0.011


def test_unsigned_code_for_non_negative_data_is_finer():
  x = jnp.abs(_normal((1 << 16,), seed=8))
  errors = []
  for signed in (True, False):
    q = jlowbit.quantize_blockwise(x, codebooks.dynamic(signed), block_size=256, impl="xla")
    errors.append(float(jnp.mean(jnp.abs(jlowbit.dequantize_blockwise(q) - x))))
  assert errors[1] < errors[0]


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_jit_matches_eager(impl):
  x = _normal((777,), seed=4)

  @jax.jit
  def round_trip(x):
    q = jlowbit.quantize_blockwise(x, block_size=128, impl=impl)
    return q, jlowbit.dequantize_blockwise(q, impl=impl)

  q_jit, y_jit = round_trip(x)
  q = jlowbit.quantize_blockwise(x, block_size=128, impl=impl)
  np.testing.assert_array_equal(q_jit.codes, q.codes)
  np.testing.assert_array_equal(y_jit, jlowbit.dequantize_blockwise(q, impl=impl))


def test_pytree_and_save_restore(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  q = jlowbit.quantize_blockwise(_normal((3, 100)), block_size=64)
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert [l.dtype for l in leaves] == [jnp.uint8, jnp.float32, jnp.float32]
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "q", q)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "q", q)
  assert jax.tree_util.tree_structure(restored) == treedef
  for a, b in zip(jax.tree_util.tree_leaves(restored), leaves):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jlowbit.dequantize_blockwise(restored),
                                jlowbit.dequantize_blockwise(q))


def test_custom_codebook_linear():
  code = jnp.linspace(-1.0, 1.0, 256)
  x = _normal((1000,), seed=5)
  q = jlowbit.quantize_blockwise(x, code, block_size=256)
  y = jlowbit.dequantize_blockwise(q)
  assert float(jnp.max(jnp.abs(y - x) / jnp.repeat(q.absmax, 256)[:1000])) <= 1 / 255 + 1e-6


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(x=jnp.arange(10)), TypeError, r"x.dtype=int32 .*float32, bfloat16, float16"),
    (dict(x=[1.0, 2.0]), TypeError, r"x must be a jax.Array or numpy.ndarray, got list"),
    (dict(x=jnp.ones(10), block_size=100), ValueError, r"block_size=100 .*64, 128"),
    (dict(x=jnp.ones(10), block_size=8192), ValueError, r"block_size=8192"),
    # Regression: floats used to pass and fail deep inside (pad_width).
    (dict(x=jnp.ones(10), block_size=256.0), TypeError,
     r"block_size=256.0 must be an int; allowed values: 64, 128"),
    (dict(x=jnp.ones(10), block_size=True), TypeError, r"block_size=True must be an int"),
    (dict(x=jnp.ones(10), code=jnp.ones(16)), ValueError, r"code.shape=\(16,\)"),
    (dict(x=jnp.ones(10), code=jnp.ones(256)), ValueError, r"code must be sorted"),
    (dict(x=jnp.ones(10), impl="cuda"), ValueError, r"impl='cuda' .*'xla'"),
])
def test_quantize_errors(kwargs, exc, match):
  x = kwargs.pop("x")
  with pytest.raises(exc, match=match):
    jlowbit.quantize_blockwise(x, **kwargs)


def test_numpy_integer_block_size_and_float64_numpy_input_are_accepted():
  x = np.linspace(-1, 1, 300)  # float64: converted as JAX converts it
  q = jlowbit.quantize_blockwise(x, block_size=np.int64(256))
  assert q.block_size == 256 and type(q.block_size) is int
  assert q.dtype == "float32" and q.codes.shape == (300,)


def test_dequantize_errors():
  q = jlowbit.quantize_blockwise(jnp.ones(10), block_size=64)
  with pytest.raises(TypeError, match=r"dtype=int8 .*float32"):
    jlowbit.dequantize_blockwise(q, jnp.int8)
  with pytest.raises(TypeError, match=r"q must be a Quantized8bit"):
    jlowbit.dequantize_blockwise(jnp.ones(10))
  with pytest.raises(ValueError, match=r"q.absmax.shape=\(2,\)"):
    jlowbit.dequantize_blockwise(q.replace(absmax=jnp.ones(2)))


def test_env_var_selects_impl(monkeypatch):
  monkeypatch.setenv("JLOWBIT_IMPL", "xla")
  assert jlowbit.resolve_impl(None) == "xla"
  monkeypatch.setenv("JLOWBIT_IMPL", "bogus")
  with pytest.raises(ValueError, match=r"JLOWBIT_IMPL='bogus'"):
    jlowbit.resolve_impl(None)
