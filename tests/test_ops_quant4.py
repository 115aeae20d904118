"""4-bit NF4/FP4 quantization: reference math, kernels vs reference, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ALL_IMPLS, FLOAT_DTYPES, KERNEL_IMPLS, assert_same_cast

import jlowbit
from jlowbit import codebooks
from jlowbit import quant4

SHAPES = [(), (2,), (0,), (3, 0), (63,), (7, 33), (2, 3, 129)]
QUANT_TYPES = ["nf4", "fp4"]


def _normal(shape, dtype="float32", seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _numpy_codes(x, quant_type, block_size):
  """Independent float64 nearest-value 4-bit coder (no packing)."""
  flat = np.asarray(x, np.float32).reshape(-1)
  blocks = np.pad(flat, (0, (-flat.size) % block_size)).reshape(-1, block_size)
  absmax = np.abs(blocks).max(axis=1)
  v = (blocks * (np.float32(1) / np.where(absmax > 0, absmax, 1))[:, None])
  v = v.astype(np.float64)
  if quant_type == "nf4":
    codes = np.abs(v[..., None] - codebooks.nf4().astype(np.float64)).argmin(-1)
  else:
    magnitude = np.abs(np.abs(v)[..., None] - codebooks.fp4()[:8]).argmin(-1)
    codes = np.where(v < 0, magnitude | 8, magnitude)
  return codes.reshape(-1)[:flat.size], absmax


def _unpack(packed, n):
  packed = np.asarray(packed)
  return np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("block_size", [32, 64, 1024])
def test_reference_matches_numpy_nearest(quant_type, block_size):
  x = _normal((5001,), seed=1)
  w4 = jlowbit.quantize_4bit(x, block_size=block_size, quant_type=quant_type,
                             impl="xla")
  codes, absmax = _numpy_codes(x, quant_type, block_size)
  np.testing.assert_array_equal(w4.absmax, absmax)
  # float32 vs float64 distances may disagree only on exact float32 ties.
  assert np.mean(_unpack(w4.packed, x.size) != codes) < 1e-3


def test_nibble_order_hand_checked():
  # nf4: -1 -> 0, 1 -> 15, 0 -> 7, 0.5 -> 12 (0.4407 is nearer than 0.5626).
  x = jnp.array([-1.0, 1.0, 0.0, 0.5, 1.0])
  w4 = jlowbit.quantize_4bit(x, block_size=64, impl="xla")
  np.testing.assert_array_equal(w4.packed, [0x0F, 0x7C, 0xF0])
  np.testing.assert_array_equal(w4.absmax, [1.0])


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_fp4_sign_magnitude_and_negative_zero(impl):
  # 1.0 is FP4 pattern 0b011; -1e-6 is "-0" (0b1000); 0.0 and -0.0 are 0b0000.
  x = jnp.array([1.0, -1e-6, 0.0, -0.0, -1.0, 0.5])
  w4 = jlowbit.quantize_4bit(x, block_size=64, quant_type="fp4", impl=impl)
  np.testing.assert_array_equal(w4.packed, [0x38, 0x00, 0xB5])
  y = jlowbit.dequantize_4bit(w4, impl=impl)
  np.testing.assert_array_equal(y, [1.0, 0.0, 0.0, 0.0, -1.0, 0.5])


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_levels_are_exact(impl, quant_type):
  levels = jnp.asarray(quant4.default_quant_map(quant_type)) * 3.0
  w4 = jlowbit.quantize_4bit(levels, block_size=32, quant_type=quant_type,
                             impl=impl)
  np.testing.assert_array_equal(jlowbit.dequantize_4bit(w4, impl=impl), levels)
  if quant_type == "nf4":
    np.testing.assert_array_equal(_unpack(w4.packed, 16), np.arange(16))


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_shapes(impl, shape):
  x = _normal(shape, "bfloat16")
  w4 = jlowbit.quantize_4bit(x, block_size=32, impl=impl)
  n = x.size
  assert w4.shape == shape and w4.dtype == "bfloat16"
  assert w4.packed.shape == (-(-n // 2),) and w4.packed.dtype == jnp.uint8
  assert w4.absmax.shape == (-(-n // 32),) and w4.absmax.dtype == jnp.float32
  assert w4.quant_map.shape == (16,) and w4.quant_map.dtype == jnp.float32
  if n % 2:
    assert int(w4.packed[-1]) & 15 == 0
  y = jlowbit.dequantize_4bit(w4, impl=impl)
  assert y.shape == shape and y.dtype == jnp.bfloat16
  if n:
    err = jnp.max(jnp.abs(y.astype(jnp.float32) - x.astype(jnp.float32)))
    assert float(err) <= float(jnp.max(w4.absmax)) * 0.17  # half the widest gap


@pytest.mark.parametrize("quant_type, expected", [("nf4", 0.0728), ("fp4", 0.0965)])
def test_error_bound_normal_data(quant_type, expected):
  x = _normal((1 << 20,), seed=7)
  w4 = jlowbit.quantize_4bit(x, quant_type=quant_type, impl="xla")
  err = float(jnp.mean(jnp.abs(jlowbit.dequantize_4bit(w4, impl="xla") - x)))
  assert abs(err - expected) <= 0.01 * expected


def _assert_same_quantized(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("dtype, block_size", [
    ("float32", 32), ("bfloat16", 64), ("float16", 256), ("float32", 4096),
    ("bfloat16", 4096)])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_kernel_matches_xla(impl, dtype, block_size, quant_type):
  n = 3 * block_size + 37 if impl == "interpret" else 1_000_003
  x = _normal((n,), dtype, seed=block_size)
  want = jlowbit.quantize_4bit(x, block_size=block_size, quant_type=quant_type,
                               impl="xla")
  got = jlowbit.quantize_4bit(x, block_size=block_size, quant_type=quant_type,
                              impl=impl)
  _assert_same_quantized(got, want)
  for out_dtype in FLOAT_DTYPES:
    assert_same_cast(jlowbit.dequantize_4bit(got, out_dtype, impl=impl),
                     jlowbit.dequantize_4bit(want, out_dtype, impl="xla"), impl)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("n", [2 * 4096, 2 * 4096 + 1, 4096 + 38])
@pytest.mark.parametrize("dtype, block_size, quant_type", [
    ("bfloat16", 64, "nf4"), ("float32", 4096, "fp4"), ("float16", 32, "fp4")])
def test_kernel_full_and_partial_tiles(impl, n, dtype, block_size, quant_type):
  # Kernels work in tiles of 4096 elements: whole tiles take the unmasked
  # path, the last partial one (odd or even length) the masked path.
  x = _normal((n,), dtype, seed=n)
  kwargs = dict(block_size=block_size, quant_type=quant_type)
  want = jlowbit.quantize_4bit(x, **kwargs, impl="xla")
  got = jlowbit.quantize_4bit(x, **kwargs, impl=impl)
  _assert_same_quantized(got, want)
  for out_dtype in ("float32", "bfloat16"):
    assert_same_cast(jlowbit.dequantize_4bit(got, out_dtype, impl=impl),
                     jlowbit.dequantize_4bit(want, out_dtype, impl="xla"), impl)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("shape", [(5, 7, 33), (4097,)])
def test_kernel_matches_xla_nested(impl, quant_type, shape):
  if impl == "triton":
    shape = (4099, 1023)
  x = _normal(shape, "float16", seed=3)
  kwargs = dict(block_size=32, quant_type=quant_type, compress_statistics=True)
  want = jlowbit.quantize_4bit(x, **kwargs, impl="xla")
  got = jlowbit.quantize_4bit(x, **kwargs, impl=impl)
  _assert_same_quantized(got, want)
  assert_same_cast(jlowbit.dequantize_4bit(got, impl=impl),
                   jlowbit.dequantize_4bit(want, impl="xla"), impl)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_nested_statistics(quant_type):
  x = _normal((100, 129), seed=11) * jnp.linspace(0.1, 3.0, 129)
  plain = jlowbit.quantize_4bit(x, quant_type=quant_type, impl="xla")
  nested = jlowbit.quantize_4bit(x, quant_type=quant_type,
                                 compress_statistics=True, impl="xla")
  blocks = plain.absmax.shape[0]
  assert nested.nested and not plain.nested
  np.testing.assert_array_equal(nested.packed, plain.packed)
  assert isinstance(nested.absmax, jlowbit.Quantized8bit)
  assert nested.absmax.block_size == 256 and nested.absmax.dtype == "float32"
  codes = nested.absmax.codes
  assert codes.dtype == jnp.uint8 and codes.shape == (blocks,)
  assert nested.absmax.absmax.shape == (-(-blocks // 256),)
  assert nested.absmax.absmax.dtype == jnp.float32
  np.testing.assert_array_equal(nested.absmax.code, codebooks.dynamic(True))
  assert nested.offset.shape == () and nested.offset.dtype == jnp.float32
  np.testing.assert_allclose(nested.offset, jnp.mean(plain.absmax), rtol=1e-6)
  # absmax = dynamic[codes] * (its absmax) + offset (float32).
  restored = quant4.absmax_float32(nested, impl="xla")
  manual = (codebooks.dynamic(True)[np.asarray(codes)]
            * np.repeat(np.asarray(nested.absmax.absmax), 256)[:blocks]
            + np.float32(nested.offset))
  np.testing.assert_array_equal(restored, manual)
  np.testing.assert_allclose(restored, plain.absmax, rtol=0.02)
  err_plain = jnp.mean(jnp.abs(jlowbit.dequantize_4bit(plain) - x))
  err_nested = jnp.mean(jnp.abs(jlowbit.dequantize_4bit(nested) - x))
  assert float(err_nested) < 1.02 * float(err_plain)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_zero_blocks_give_zeros(impl):
  x = jnp.zeros((300,)).at[200:].set(1.5)
  w4 = jlowbit.quantize_4bit(x, block_size=64, quant_type="fp4", impl=impl)
  y = jlowbit.dequantize_4bit(w4, impl=impl)
  assert not jnp.isnan(y).any()
  np.testing.assert_array_equal(y[:192], 0.0)
  np.testing.assert_allclose(y[200:], 1.5, rtol=1e-6)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_non_finite_poisons_its_block_only(impl):
  x = _normal((256,)).at[10].set(jnp.nan).at[130].set(jnp.inf)
  w4 = jlowbit.quantize_4bit(x, block_size=64, impl=impl)
  assert jnp.isnan(w4.absmax[0]) and jnp.isinf(w4.absmax[2])
  y = jlowbit.dequantize_4bit(w4, impl=impl)
  assert jnp.isnan(y[:64]).all()
  assert not jnp.isfinite(y[130])
  assert jnp.isfinite(y[64:128]).all() and jnp.isfinite(y[192:]).all()


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("nested", [False, True])
def test_jit_matches_eager(impl, nested):
  x = _normal((777,), seed=4)
  kwargs = dict(block_size=32, compress_statistics=nested, impl=impl)

  @jax.jit
  def round_trip(x):
    w4 = jlowbit.quantize_4bit(x, **kwargs)
    return w4, jlowbit.dequantize_4bit(w4, impl=impl)

  w4_jit, y_jit = round_trip(x)
  w4 = jlowbit.quantize_4bit(x, **kwargs)
  y = jlowbit.dequantize_4bit(w4, impl=impl)
  if not nested:
    _assert_same_quantized(w4_jit, w4)
    np.testing.assert_array_equal(y_jit, y)
    return
  # Nested statistics under jit may differ by an ulp of the offset (fused
  # multiply-add); the 4-bit codes never do.
  np.testing.assert_array_equal(w4_jit.packed, w4.packed)
  np.testing.assert_allclose(w4_jit.offset, w4.offset, rtol=1e-6)
  np.testing.assert_allclose(quant4.absmax_float32(w4_jit),
                             quant4.absmax_float32(w4), rtol=1e-2)
  np.testing.assert_allclose(y_jit, y, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("nested", [False, True])
def test_pytree_and_save_restore(tmp_path, nested):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  w4 = jlowbit.quantize_4bit(_normal((3, 100)), compress_statistics=nested)
  leaves, treedef = jax.tree_util.tree_flatten(w4)
  expected = [jnp.uint8, jnp.uint8 if nested else jnp.float32, jnp.float32]
  expected += [jnp.float32] * 3 if nested else []
  assert [l.dtype for l in leaves] == expected
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "w4", w4)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "w4", w4)
  assert isinstance(restored, jlowbit.Quantized4bit)
  assert jax.tree_util.tree_structure(restored) == treedef
  _assert_same_quantized(restored, w4)
  np.testing.assert_array_equal(jlowbit.dequantize_4bit(restored),
                                jlowbit.dequantize_4bit(w4))


@pytest.mark.parametrize("storage", [jnp.uint8, jnp.int8, jnp.bfloat16,
                                     jnp.float16, jnp.float32, "float32"])
def test_quant_storage_only_changes_the_view(storage):
  x = _normal((5, 64))
  w4 = jlowbit.quantize_4bit(x, quant_storage=storage)
  plain = jlowbit.quantize_4bit(x)
  assert w4.quant_storage == jnp.dtype(storage).name
  np.testing.assert_array_equal(w4.packed, plain.packed)
  assert w4.packed.dtype == jnp.uint8


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(x=jnp.arange(10)), TypeError, r"x.dtype=int32 .*float32, bfloat16, float16"),
    (dict(x=[1.0, 2.0]), TypeError, r"x must be a jax.Array or numpy.ndarray"),
    (dict(x=jnp.ones(10), block_size=48), ValueError, r"block_size=48 .*32, 64"),
    # Regression: floats used to pass and fail deep inside (pad_width).
    (dict(x=jnp.ones(10), block_size=64.0), TypeError,
     r"block_size=64.0 must be an int; allowed values: 32, 64"),
    (dict(x=jnp.ones(10), block_size=16), ValueError, r"block_size=16"),
    (dict(x=jnp.ones(10), block_size=8192), ValueError, r"block_size=8192"),
    (dict(x=jnp.ones(10), quant_type="int4"), ValueError,
     r"quant_type='int4' .*'nf4', 'fp4'"),
    (dict(x=jnp.ones(10), quant_storage=jnp.int32), TypeError,
     r"quant_storage=int32 .*uint8, int8, bfloat16"),
    (dict(x=jnp.ones(10), quant_storage="bogus"), TypeError,
     r"quant_storage='bogus' is not a dtype"),
    (dict(x=jnp.ones(10), compress_statistics="yes"), TypeError,
     r"compress_statistics='yes' must be a bool"),
    (dict(x=jnp.ones(10), impl="cuda"), ValueError, r"impl='cuda' .*'xla'"),
])
def test_quantize_errors(kwargs, exc, match):
  x = kwargs.pop("x")
  with pytest.raises(exc, match=match):
    jlowbit.quantize_4bit(x, **kwargs)


def test_dequantize_errors():
  w4 = jlowbit.quantize_4bit(jnp.ones(100), block_size=64)
  with pytest.raises(TypeError, match=r"dtype=int8 .*float32"):
    jlowbit.dequantize_4bit(w4, jnp.int8)
  with pytest.raises(TypeError, match=r"w4 must be a Quantized4bit"):
    jlowbit.dequantize_4bit(jnp.ones(10))
  with pytest.raises(ValueError, match=r"w4.absmax.shape=\(3,\) .*expected \(2,\)"):
    jlowbit.dequantize_4bit(w4.replace(absmax=jnp.ones(3)))
  with pytest.raises(ValueError, match=r"w4.packed.shape=\(7,\) .*expected \(50,\)"):
    jlowbit.dequantize_4bit(w4.replace(packed=jnp.zeros(7, jnp.uint8)))
