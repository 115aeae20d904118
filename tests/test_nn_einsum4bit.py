"""Flax NNX Einsum4bit: nnx.Einsum that is a matrix product, 4-bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ALL_IMPLS
from flax import nnx

import jlowbit
from jlowbit import nn
from jlowbit.nn import einsum4bit

# As test_nn_linear4bit.py: relative error of a 4-bit Gaussian weight
# (block size 64) with ~30% margin; the 4-bit layer against the float layer
# holding its dequantized kernel differs only by the compute dtype's rounding.
QUANT_RTOL = {"nf4": 0.12, "fp4": 0.15}
DENSE_RTOL = {"float32": 1e-5, "bfloat16": 2e-2}

# einsum_str, kernel_shape, bias_shape, input shape.
CASES = {
    "q_proj_ellipsis": ("...d,dhk->...hk", (64, 4, 16), (4, 16), (2, 3, 64)),
    "q_proj_batch_letters": ("btd,dnh->btnh", (64, 4, 16), (4, 16), (2, 3, 64)),
    "out_proj": ("...hk,hkd->...d", (4, 16, 64), (64,), (5, 4, 16)),
    "mlp_no_bias": ("bsd,df->bsf", (64, 32), None, (2, 3, 64)),
    # flax's own example: kernel axes (out, in, out), permuted when stored.
    "kernel_permuted": ("nta,hab->nthb", (8, 64, 4), (8, 4), (3, 2, 64)),
    "contracted_reordered": ("b h k , k h d -> b d", (16, 4, 64), (64,),
                             (2, 4, 16)),
}


def _normal(shape, dtype="float32", seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def _einsum(case, dtype=None, seed=0):
  einsum_str, kernel_shape, bias_shape, _ = CASES[case]
  layer = nnx.Einsum(einsum_str, kernel_shape, bias_shape, dtype=dtype,
                     rngs=nnx.Rngs(seed))
  # A Gaussian kernel (the 4-bit error bounds are for one) and a nonzero
  # bias, so that its layout is tested.
  layer.kernel[...] = _normal(kernel_shape, seed=seed + 50) / 8
  if bias_shape is not None:
    layer.bias[...] = _normal(bias_shape, seed=seed + 100)
  return layer


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_close_to_the_float_layer(quant_type, case):
  float_layer = _einsum(case)
  layer = nn.Einsum4bit.from_einsum(float_layer, quant_type=quant_type,
                                    impl="xla")
  x = _normal(CASES[case][3], seed=1)
  y, want = layer(x), float_layer(x)
  assert y.shape == want.shape and y.dtype == want.dtype
  assert _rel(y, want) < QUANT_RTOL[quant_type]
  w4 = layer.kernel.get_value()
  k, n = (int(np.prod(f)) for f in (layer.in_features, layer.out_features))
  assert w4.shape == (n, k) and w4.quant_type == quant_type
  assert _rel(layer.dequantize(), float_layer.kernel[...]) < QUANT_RTOL[quant_type]
  dense = layer.to_einsum()
  assert dense.einsum_str == float_layer.einsum_str
  np.testing.assert_array_equal(dense.kernel[...], layer.dequantize())
  if float_layer.bias is not None:
    np.testing.assert_array_equal(dense.bias[...], float_layer.bias[...])
  np.testing.assert_allclose(dense(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtypes_follow_nnx_einsum(dtype):
  float_layer = _einsum("q_proj_ellipsis", dtype=dtype)
  layer = nn.Einsum4bit.from_einsum(float_layer, impl="xla")
  assert layer.dtype == jnp.dtype(dtype) and layer.param_dtype == jnp.float32
  x = _normal((3, 64), dtype, seed=2)
  y = layer(x)
  assert y.dtype == float_layer(x).dtype == jnp.dtype(dtype)
  assert _rel(y, float_layer(x)) < QUANT_RTOL["nf4"] + DENSE_RTOL[dtype]
  assert _rel(y, layer.to_einsum()(x)) < DENSE_RTOL[dtype]
  promoted = nn.Einsum4bit.from_einsum(_einsum("q_proj_ellipsis"), impl="xla")
  for input_dtype in ("bfloat16", "float32", "int32"):  # dtype=None promotes
    x = jnp.ones((2, 64), input_dtype)
    assert promoted(x).dtype == promoted.to_einsum()(x).dtype, input_dtype


def test_constructor_quantizes_the_kernel_nnx_einsum_draws():
  einsum_str, kernel_shape, bias_shape, _ = CASES["kernel_permuted"]
  layer = nn.Einsum4bit(einsum_str, kernel_shape, bias_shape, block_size=128,
                        impl="xla", rngs=nnx.Rngs(3))
  float_layer = nnx.Einsum(einsum_str, kernel_shape, bias_shape,
                           bias_init=nnx.initializers.normal(),
                           rngs=nnx.Rngs(3))
  # Stored as [N, K]: kernel (h, a, b) -> (a, h, b) -> [a, h * b], transposed.
  flat = jnp.transpose(float_layer.kernel[...], (1, 0, 2))
  want = jlowbit.quantize_4bit(flat.reshape(64, 32).T, block_size=128,
                               impl="xla")
  got = layer.kernel.get_value()
  assert got.shape == (32, 64) and got.block_size == 128
  np.testing.assert_array_equal(got.packed, want.packed)
  np.testing.assert_array_equal(got.absmax, want.absmax)
  assert layer.bias[...].shape == bias_shape
  np.testing.assert_array_equal(layer.bias[...], jnp.zeros(bias_shape))
  with_bias_init = nn.Einsum4bit(einsum_str, kernel_shape, bias_shape,
                                 bias_init=nnx.initializers.normal(),
                                 impl="xla", rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(with_bias_init.bias[...], float_layer.bias[...])


def test_jit_and_gradients():
  float_layer = _einsum("out_proj")
  layer = nn.Einsum4bit.from_einsum(float_layer, impl="xla")
  dense = layer.to_einsum()
  x, target = _normal((6, 4, 16), seed=5), _normal((6, 64), seed=6)
  forward = nnx.jit(lambda model, x: model(x))
  np.testing.assert_allclose(forward(layer, x), layer(x), rtol=1e-6, atol=1e-6)

  def loss(model, x):
    return jnp.mean((model(x) - target) ** 2)

  grad_x = jax.jit(jax.grad(lambda x: loss(layer, x)))(x)
  assert grad_x.shape == x.shape
  np.testing.assert_allclose(grad_x, jax.grad(lambda x: loss(dense, x))(x),
                             rtol=1e-5, atol=1e-7)
  grads = nnx.jit(nnx.grad(loss))(layer, x)
  assert set(grads.keys()) == {"bias"}  # the 4-bit weight is no nnx.Param
  np.testing.assert_allclose(grads["bias"][...], nnx.grad(loss)(dense, x)["bias"][...],
                             rtol=1e-5, atol=1e-7)


def test_the_4bit_weight_is_not_a_param():
  layer = nn.Einsum4bit.from_einsum(_einsum("q_proj_ellipsis"), impl="xla")
  params = nnx.state(layer, nnx.Param)
  assert set(params.keys()) == {"bias"}
  assert not any(isinstance(leaf, jlowbit.Quantized4bit) for leaf in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, jlowbit.Quantized4bit)))
  assert list(nnx.state(layer, nn.QuantizedWeight).keys()) == ["kernel"]


@pytest.mark.parametrize("impl", [i for i in ALL_IMPLS if i != "xla"])
@pytest.mark.parametrize("rows", [1, 3])  # 1: the fused gemv
def test_impls_agree_with_xla(rows, impl):
  float_layer = nnx.Einsum("...d,dhk->...hk", (64, 2, 16), (2, 16),
                           rngs=nnx.Rngs(7))
  want = nn.Einsum4bit.from_einsum(float_layer, impl="xla")
  layer = nn.Einsum4bit.from_einsum(float_layer, impl=impl)
  np.testing.assert_array_equal(layer.kernel.get_value().packed,
                                want.kernel.get_value().packed)
  x = _normal((rows, 64), seed=8)
  np.testing.assert_allclose(layer(x), want(x), rtol=1e-5, atol=1e-5)


UNSUPPORTED = {
    "bd,bdk->bk": ("kernel axis 'b' is in the input and the output", (2, 4, 8)),
    "bd,dkz->bk": ("kernel axis 'z' is in neither", (4, 8, 2)),
    "db,dk->bk": ("contracted axes 'd' must be the input's trailing", (4, 8)),
    "bd,dk->kb": ("output must be the input's other axes 'b'", (4, 8)),
    "btd,dk->bk": ("output must be the input's other axes 'bt'", (4, 8)),
    "...d,dk->k": ("output must be the input's other axes '...'", (4, 8)),
    "bdd,dk->bk": ("repeats 'd'", (4, 8)),
}


def test_unsupported_layouts_are_named():
  rngs = nnx.Rngs(0)
  for case in CASES.values():
    assert einsum4bit.einsum_layout_error(nnx.Einsum(*case[:3], rngs=rngs)) is None
  for einsum_str, (message, kernel_shape) in UNSUPPORTED.items():
    layer = nnx.Einsum(einsum_str, kernel_shape, rngs=rngs)
    assert message in einsum4bit.einsum_layout_error(layer), einsum_str
    with pytest.raises(ValueError, match=f"from_einsum: einsum_str='{einsum_str}'"):
      nn.Einsum4bit.from_einsum(layer)
    with pytest.raises(ValueError, match="einsum_str="):
      nn.Einsum4bit(einsum_str, kernel_shape, rngs=rngs)
  with pytest.raises(ValueError, match=r"may not hold '...' \(its shape"):
    einsum4bit.einsum_layout("bd,...dk->bk", (4, 8))
  with pytest.raises(ValueError, match="names 2 kernel axes but kernel_shape"):
    einsum4bit.einsum_layout("bd,dk->bk", (4, 8, 1))
  with pytest.raises(ValueError, match="must be explicit with two operands"):
    einsum4bit.einsum_layout("bd,dk", (4, 8))


def test_errors_name_the_argument():
  rngs = nnx.Rngs(0)
  with pytest.raises(TypeError, match="einsum must be an nnx.Einsum, got Linear"):
    nn.Einsum4bit.from_einsum(nnx.Linear(4, 4, rngs=rngs))
  with pytest.raises(ValueError, match=r"bias_shape=\(4, 8\) must have 64 elements"):
    nn.Einsum4bit("...d,dhk->...hk", (64, 4, 16), (4, 8), rngs=rngs)
  with pytest.raises(ValueError, match="quant_type='int4'"):
    nn.Einsum4bit("...d,dk->...k", (64, 8), quant_type="int4", rngs=rngs)
  with pytest.raises(ValueError, match=r"kernel_init returned shape \(64, 8, 1\)"):
    nn.Einsum4bit("...d,dk->...k", (64, 8), rngs=rngs,
                  kernel_init=lambda key, shape, dtype: jnp.ones((64, 8, 1)))
  layer = nn.Einsum4bit.from_einsum(_einsum("q_proj_batch_letters"), impl="xla")
  with pytest.raises(ValueError, match=r"inputs.shape=\(2, 3, 32\) does not fit"):
    layer(jnp.ones((2, 3, 32)))
  with pytest.raises(ValueError, match=r"inputs.shape=\(3, 64\) does not fit"):
    layer(jnp.ones((3, 64)))  # "btd": two leading axes, not one
  with pytest.raises(ValueError, match="differs from the layer's 'btd,dnh->btnh'"):
    layer(jnp.ones((2, 3, 64)), "btd,dhn->bthn")
  assert layer(jnp.ones((2, 3, 64)), "btd, dnh -> btnh").shape == (2, 3, 4, 16)
