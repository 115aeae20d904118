"""Fused 4-bit gemv and matmul_4bit against the dense reference; autodiff."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ALL_IMPLS, FLOAT_DTYPES, KERNEL_IMPLS

import jlowbit

TRITON = [pytest.param("triton", id="triton", marks=pytest.mark.gpu)]
# (out_features, in_features, block_size, quant_type, nested, x dtype);
# in_features not a multiple of block_size (or odd) takes the general kernel.
CASES = [
    (3, 64, 64, "nf4", False, "float32"),
    (3, 64, 64, "nf4", False, "bfloat16"),
    (3, 64, 64, "nf4", False, "float16"),
    (17, 192, 64, "fp4", False, "bfloat16"),
    (64, 128, 128, "nf4", True, "float16"),
    (5, 100, 64, "nf4", False, "bfloat16"),
    (7, 33, 32, "fp4", True, "float32"),
]
# Relative tolerance per output dtype (bfloat16: Triton's interpreter rounds
# toward zero, one ulp = 2**-7).
RTOL = {"float32": 3e-5, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def _normal(shape, dtype="float32", seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _weight(out_features, in_features, block_size=64, quant_type="nf4",
            nested=False, seed=1):
  w = _normal((out_features, in_features), "bfloat16", seed)
  return jlowbit.quantize_4bit(w, block_size=block_size, quant_type=quant_type,
                               compress_statistics=nested, impl="xla")


def _assert_close_to_dense(y, x, w4):
  """``y`` vs float64 ``x @ W^T``; error scaled by ``|ref| + sum |x||W|``."""
  w = np.asarray(jlowbit.dequantize_4bit(w4, jnp.float32, impl="xla"), np.float64)
  x = np.asarray(x, np.float64).reshape(-1, w.shape[1])
  ref = x @ w.T
  scale = np.abs(ref) + np.abs(x) @ np.abs(w).T
  assert y.shape[-1] == w.shape[0]
  got = np.asarray(y, np.float64).reshape(ref.shape)
  bound = RTOL[jnp.dtype(y.dtype).name] * scale + 1e-30
  assert np.all(np.abs(got - ref) <= bound), np.max(np.abs(got - ref) / bound)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gemv_matches_dense(impl, case):
  *weight_case, dtype = case
  w4 = _weight(*weight_case)
  x = _normal((case[1],), dtype, seed=2)
  y = jlowbit.gemv_4bit(x, w4, impl=impl)
  assert y.shape == (case[0],) and y.dtype == jnp.dtype(dtype)
  _assert_close_to_dense(y, x, w4)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_gemv_row_vector_keeps_its_shape(impl):
  w4 = _weight(6, 64)
  x = _normal((1, 64), seed=3)
  y = jlowbit.gemv_4bit(x, w4, impl=impl)
  assert y.shape == (1, 6)
  np.testing.assert_array_equal(y[0], jlowbit.gemv_4bit(x[0], w4, impl=impl))


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("block_size", [32, 256])
@pytest.mark.parametrize("block_n, block_k, split_k",
                         [(1, 32, 1), (4, 64, 2), (8, 512, 4)])
def test_gemv_tile_configs(impl, block_size, block_n, block_k, split_k):
  config = jlowbit.GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k)
  # in_features 256: whole steps; 288: a ragged last step (block_size 32) or
  # the general kernel (block_size 256). 9 rows leave a partial row block,
  # 8 rows fill every one (block_n <= 8).
  for (out_features, in_features), dtype in itertools.product(
      ((9, 256), (8, 288)), ("float32", "bfloat16")):
    w4 = _weight(out_features, in_features, block_size)
    x = _normal((in_features,), dtype, seed=4)
    _assert_close_to_dense(jlowbit.gemv_4bit(x, w4, impl=impl, config=config),
                           x, w4)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gemv_reads_nested_statistics_in_kernel(impl, quant_type):
  # 8-bit absmax with a second level of 256-block scales: more than 256
  # blocks, a ragged last step (288 = 4 * 64 + 32) and split K.
  w4 = _weight(33, 288, 32, quant_type, nested=True)
  assert w4.nested and w4.absmax.absmax.shape[0] > 1
  x = _normal((288,), "float32", seed=13)
  for config in (jlowbit.GemvConfig(block_n=4, block_k=64, split_k=1),
                 jlowbit.GemvConfig(block_n=2, block_k=32, split_k=2)):
    _assert_close_to_dense(jlowbit.gemv_4bit(x, w4, impl=impl, config=config),
                           x, w4)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("rows, out_features, in_features, block_size, nested, dtype", [
    (2, 32, 128, 64, False, "bfloat16"),   # whole tiles
    (5, 40, 160, 32, True, "float16"),     # partial row and column tiles, ragged K
    (16, 17, 64, 64, False, "bfloat16"),   # a full block_m, one K step
])
def test_small_batch_kernel_matches_dense(impl, rows, out_features, in_features,
                                          block_size, nested, dtype):
  w4 = _weight(out_features, in_features, block_size, nested=nested)
  x = _normal((rows, in_features), dtype, seed=14)
  for split_k in (1, 2):
    config = jlowbit.SmallBatchConfig(block_n=16, block_k=64, split_k=split_k)
    y = jlowbit.matmul_4bit(x, w4, impl=impl, config=config)
    assert y.shape == (rows, out_features) and y.dtype == jnp.dtype(dtype)
    # The tile is rounded to x's dtype before the tensor-core product: one
    # more rounding than the dense reference, within the same bound.
    _assert_close_to_dense(y, x, w4)


def test_small_batch_config_errors():
  assert jlowbit.SmallBatchConfig() == jlowbit.SmallBatchConfig(
      block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=1,
      split_k=1)
  # K is split 4 ways unless in_features is too narrow for two steps each.
  assert jlowbit.SmallBatchConfig.get_default(8192, 8192).split_k == 4
  assert jlowbit.SmallBatchConfig.get_default(28672, 4096).split_k == 4
  assert jlowbit.SmallBatchConfig.get_default(64, 512).split_k == 2
  assert jlowbit.SmallBatchConfig.get_default(64, 256).split_k == 1
  assert jlowbit.SmallBatchConfig.get_default().split_k == 1
  with pytest.raises(ValueError, match=r"split_k=3 must be a power of two"):
    jlowbit.SmallBatchConfig(split_k=3)
  with pytest.raises(ValueError, match=r"block_m=8 must be a power of two >= 16"):
    jlowbit.SmallBatchConfig(block_m=8)
  with pytest.raises(TypeError, match=r"block_n=64.0 must be an int"):
    jlowbit.SmallBatchConfig(block_n=64.0)
  with pytest.raises(TypeError, match=r"config must be a GemvConfig, a "
                     r"SmallBatchConfig, a TiledConfig or None"):
    jlowbit.matmul_4bit(jnp.ones((2, 64)), _weight(3, 64), config=(16, 64))


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_gemv_split_k_matches_unsplit(impl):
  w4 = _weight(6, 1024, 64)
  x = _normal((1024,), "float32", seed=12)
  whole = jlowbit.gemv_4bit(x, w4, impl=impl,
                            config=jlowbit.GemvConfig(block_k=256))
  split = jlowbit.gemv_4bit(x, w4, impl=impl,
                            config=jlowbit.GemvConfig(block_k=256, split_k=4))
  np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)
  _assert_close_to_dense(split, x, w4)


def test_gemv_config_defaults_and_errors():
  default = jlowbit.GemvConfig.get_default()
  assert default == jlowbit.GemvConfig(block_n=4, block_k=1024, num_warps=4,
                                       split_k=1)
  assert jlowbit.GemvConfig.get_default(4096, 4096) == default
  assert jlowbit.GemvConfig.get_default(1024, 8192) == jlowbit.GemvConfig(split_k=2)
  assert jlowbit.GemvConfig.get_default(256, 8192) == jlowbit.GemvConfig(split_k=4)
  small = jlowbit.GemvConfig.get_default(3, 40)
  assert (small.block_n, small.block_k, small.split_k) == (4, 64, 1)
  with pytest.raises(ValueError, match=r"block_n=3 must be a power of two"):
    jlowbit.GemvConfig(block_n=3)
  with pytest.raises(ValueError, match=r"block_k=16 must be a power of two >= 32"):
    jlowbit.GemvConfig(block_k=16)
  with pytest.raises(ValueError, match=r"split_k=3 must be a power of two"):
    jlowbit.GemvConfig(split_k=3)
  with pytest.raises(ValueError, match=r"num_stages=0 must be >= 1"):
    jlowbit.GemvConfig(num_stages=0)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("batch, dtype", [
    ((2, 3), "float32"), ((4,), "bfloat16"), ((1, 1), "bfloat16"),
    ((0,), "float32")], ids=str)
def test_matmul_batch_shapes(impl, dtype, batch):
  w4 = _weight(17, 192, quant_type="fp4", nested=True)
  x = _normal((*batch, 192), dtype, seed=5)
  y = jlowbit.matmul_4bit(x, w4, impl=impl)
  assert y.shape == (*batch, 17) and y.dtype == jnp.dtype(dtype)
  _assert_close_to_dense(y, x, w4)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("rows", [1, 3])
def test_grad_matches_dense(impl, rows):
  w4 = _weight(9, 96, block_size=32, nested=True)
  w = jlowbit.dequantize_4bit(w4, jnp.float32, impl="xla")
  x = _normal((rows, 96), seed=6)
  weights = _normal((rows, 9), seed=7)

  def loss(x):
    return jnp.sum(weights * jlowbit.matmul_4bit(x, w4, impl=impl) ** 2)

  def dense_loss(x):
    return jnp.sum(weights * jnp.dot(x, w.T, precision="highest") ** 2)

  want = jax.grad(dense_loss)(x)
  got = jax.grad(loss)(x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), got, rtol=1e-5, atol=1e-5)


def test_grad_keeps_dtype_and_weight_gets_no_gradient():
  w4 = _weight(5, 64)
  x = _normal((2, 64), "bfloat16", seed=8)
  grad_x = jax.grad(lambda x: jnp.sum(jlowbit.matmul_4bit(x, w4).astype(
      jnp.float32)))(x)
  assert grad_x.dtype == jnp.bfloat16 and grad_x.shape == x.shape
  grad_w = jax.grad(lambda w4: jnp.sum(jlowbit.matmul_4bit(
      x.astype(jnp.float32), w4)), allow_int=True)(w4)
  for leaf in jax.tree.leaves(grad_w):
    if leaf.dtype != jax.dtypes.float0:
      np.testing.assert_array_equal(leaf, 0)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("rows", [1, 4])
def test_jit_matches_eager(impl, rows):
  w4 = _weight(17, 192, nested=True)
  x = _normal((rows, 192), "float16", seed=9)
  f = jax.jit(lambda x, w4: jlowbit.matmul_4bit(x, w4, impl=impl))
  np.testing.assert_array_equal(f(x, w4), jlowbit.matmul_4bit(x, w4, impl=impl))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_empty_shapes(impl):
  no_rows = jlowbit.matmul_4bit(jnp.zeros((0, 64)), _weight(3, 64), impl=impl)
  assert no_rows.shape == (0, 3)
  no_out = jlowbit.gemv_4bit(jnp.ones(64), _weight(0, 64), impl=impl)
  assert no_out.shape == (0,)
  no_in = jlowbit.gemv_4bit(jnp.ones(0), _weight(3, 0), impl=impl)
  np.testing.assert_array_equal(no_in, jnp.zeros(3))


def test_errors():
  w4 = _weight(3, 64)
  with pytest.raises(TypeError, match=r"x.dtype=int32 .*float32"):
    jlowbit.gemv_4bit(jnp.ones(64, jnp.int32), w4)
  with pytest.raises(ValueError, match=r"x.shape=\(65,\) does not match w4.shape=\(3, 64\)"):
    jlowbit.gemv_4bit(jnp.ones(65), w4)
  with pytest.raises(ValueError, match=r"x.shape=\(2, 64\) .*use matmul_4bit"):
    jlowbit.gemv_4bit(jnp.ones((2, 64)), w4)
  with pytest.raises(ValueError, match=r"x.shape=\(\) does not match"):
    jlowbit.matmul_4bit(jnp.float32(1), w4)
  with pytest.raises(ValueError, match=r"x.shape=\(4, 63\) .*x must be \[..., 64\]"):
    jlowbit.matmul_4bit(jnp.ones((4, 63)), w4)
  vector = jlowbit.quantize_4bit(jnp.ones(64))
  with pytest.raises(ValueError, match=r"w4.shape=\(64,\) must be 2-D"):
    jlowbit.gemv_4bit(jnp.ones(64), vector)
  with pytest.raises(TypeError, match=r"w4 must be a Quantized4bit"):
    jlowbit.matmul_4bit(jnp.ones(64), jnp.ones((3, 64)))
  with pytest.raises(ValueError, match=r"impl='cuda'"):
    jlowbit.matmul_4bit(jnp.ones(64), w4, impl="cuda")


@pytest.mark.parametrize("impl", TRITON)
@pytest.mark.parametrize("shape, block_size, nested", [
    ((4096, 4096), 64, False),
    ((11008, 4096), 64, True),
    ((4096, 11008), 128, False),
    ((1000, 4097), 64, False),
    ((4099, 4160), 4096, True),
], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gemv_large_gpu(impl, shape, block_size, nested, dtype):
  w4 = _weight(*shape, block_size=block_size, nested=nested)
  x = _normal((shape[1],), dtype, seed=10)
  _assert_close_to_dense(jlowbit.gemv_4bit(x, w4, impl=impl), x, w4)
  rows = _normal((5, shape[1]), dtype, seed=11)
  _assert_close_to_dense(jlowbit.matmul_4bit(rows, w4, impl=impl), rows, w4)
