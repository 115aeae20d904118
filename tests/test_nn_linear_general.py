"""Flax NNX LinearGeneral4bit: nnx.LinearGeneral over trailing axes, 4-bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ALL_IMPLS
from flax import nnx

from jlowbit import nn

NF4_RTOL = 0.12  # as QUANT_RTOL["nf4"] in test_nn_linear4bit.py
HEADS, HEAD_DIM, WIDTH = 4, 16, 64


def _normal(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def _q_proj(seed=0):  # [..., D] -> [..., heads, head_dim]
  layer = nnx.LinearGeneral(WIDTH, (HEADS, HEAD_DIM), rngs=nnx.Rngs(seed))
  layer.bias[...] = _normal((HEADS, HEAD_DIM), seed + 100)
  return layer


def _out_proj(seed=0):  # [..., heads, head_dim] -> [..., D]
  layer = nnx.LinearGeneral((HEADS, HEAD_DIM), WIDTH, axis=(-2, -1),
                            rngs=nnx.Rngs(seed))
  layer.bias[...] = _normal((WIDTH,), seed + 100)
  return layer


LAYERS = {"q_proj": _q_proj, "out_proj": _out_proj}


@pytest.mark.parametrize("batch", [(), (1,), (5,), (2, 3)], ids=str)
@pytest.mark.parametrize("kind", LAYERS)
def test_close_to_the_float_layer(kind, batch):
  float_layer = LAYERS[kind]()
  layer = nn.LinearGeneral4bit.from_linear_general(float_layer, impl="xla")
  assert layer.kernel.get_value().shape == (  # [N, K], bitsandbytes' layout
      int(np.prod(float_layer.out_features)),
      int(np.prod(float_layer.in_features)))
  assert layer.bias[...].shape == tuple(float_layer.out_features)
  x = _normal((*batch, *float_layer.in_features), seed=1)
  y, want = layer(x), float_layer(x)
  assert y.shape == want.shape == (*batch, *float_layer.out_features)
  assert y.dtype == want.dtype
  assert _rel(y, want) < NF4_RTOL
  dense = layer.to_linear_general()
  assert dense.kernel[...].shape == float_layer.kernel[...].shape
  np.testing.assert_array_equal(dense.kernel[...], layer.dequantize())
  np.testing.assert_array_equal(dense.bias[...], float_layer.bias[...])
  np.testing.assert_allclose(dense(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [i for i in ALL_IMPLS if i != "xla"])
@pytest.mark.parametrize("rows", [1, 3])  # 1: the fused gemv
@pytest.mark.parametrize("kind", LAYERS)
def test_impls_agree_with_xla(kind, rows, impl):
  float_layer = LAYERS[kind]()
  want = nn.LinearGeneral4bit.from_linear_general(float_layer, impl="xla")
  layer = nn.LinearGeneral4bit.from_linear_general(float_layer, impl=impl)
  np.testing.assert_array_equal(layer.kernel.get_value().packed,
                                want.kernel.get_value().packed)
  x = _normal((rows, *float_layer.in_features), seed=2)
  np.testing.assert_allclose(layer(x), want(x), rtol=1e-5, atol=1e-5)


def test_constructor_draws_what_nnx_linear_general_draws():
  layer = nn.LinearGeneral4bit((HEADS, HEAD_DIM), WIDTH, impl="xla",
                               rngs=nnx.Rngs(3))
  float_layer = nnx.LinearGeneral((HEADS, HEAD_DIM), WIDTH, axis=(-2, -1),
                                  rngs=nnx.Rngs(3))
  want = nn.LinearGeneral4bit.from_linear_general(float_layer, impl="xla")
  np.testing.assert_array_equal(layer.kernel.get_value().packed,
                                want.kernel.get_value().packed)
  np.testing.assert_array_equal(layer.bias[...], float_layer.bias[...])
  assert layer.axis == (-2, -1)


class _Attention(nnx.Module):

  def __init__(self, rngs):
    self.query = _q_proj(0)
    self.out = _out_proj(1)
    self.mlp = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.head = nnx.LinearGeneral(WIDTH, 8, rngs=rngs)  # a head: stays float
    self.batched = nnx.LinearGeneral(WIDTH, 8, batch_axis={0: 2}, rngs=rngs)

  def __call__(self, x):
    return self.head(self.mlp(self.out(self.query(x))))


def test_quantize_model_swaps_linear_general_layers():
  model = _Attention(nnx.Rngs(5))
  x = _normal((3, WIDTH), seed=4)
  want = model(x)
  before = nn.memory_report(model)
  batched, head = model.batched, model.head
  nn.quantize_model(model, impl="xla")
  assert isinstance(model.query, nn.LinearGeneral4bit)
  assert isinstance(model.out, nn.LinearGeneral4bit)
  assert isinstance(model.mlp, nn.Linear4bit)
  assert model.head is head and model.batched is batched  # skipped silently
  assert _rel(model(x), want) < np.sqrt(3) * NF4_RTOL
  after = nn.memory_report(model)
  quantized = 3 * WIDTH * WIDTH  # weights of the three swapped layers
  assert after["4bit_weights"] == quantized // 2
  assert after["4bit_statistics"] == 4 * (quantized // 64) + 3 * 16 * 4
  assert before["float_params"] - after["float_params"] == 4 * quantized


def test_quantize_model_swaps_multi_head_attention_projections():
  attention = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False,
                                     rngs=nnx.Rngs(6))
  x = _normal((2, 5, WIDTH), seed=7)
  want = attention(x)
  nn.quantize_model(attention, impl="xla")
  for name in ("query", "key", "value", "out"):
    assert isinstance(getattr(attention, name), nn.LinearGeneral4bit), name
  assert _rel(attention(x), want) < 2 * NF4_RTOL


def test_errors_name_the_layout():
  rngs = nnx.Rngs(0)
  batched = nnx.LinearGeneral(WIDTH, 8, batch_axis={0: 2}, rngs=rngs)
  with pytest.raises(ValueError, match="batch_axis"):
    nn.LinearGeneral4bit.from_linear_general(batched)
  leading = nnx.LinearGeneral(HEADS, WIDTH, axis=-2, rngs=rngs)
  with pytest.raises(ValueError, match=r"axis=\(-2,\) is not supported"):
    nn.LinearGeneral4bit.from_linear_general(leading)
  reversed_ = nnx.LinearGeneral((HEAD_DIM, HEADS), WIDTH, axis=(-1, -2),
                                rngs=rngs)
  with pytest.raises(ValueError, match=r"axis=\(-1, -2\)"):
    nn.LinearGeneral4bit.from_linear_general(reversed_)
  positive = nnx.LinearGeneral(WIDTH, 8, axis=1, rngs=rngs)
  with pytest.raises(ValueError, match=r"axis=\(1,\)"):
    nn.LinearGeneral4bit.from_linear_general(positive)
  with pytest.raises(TypeError, match="nnx.LinearGeneral, got Linear"):
    nn.LinearGeneral4bit.from_linear_general(nnx.Linear(4, 4, rngs=rngs))
  with pytest.raises(ValueError, match="axis=.*not supported"):
    nn.LinearGeneral4bit(WIDTH, 8, axis=0, rngs=rngs)
  layer = nn.LinearGeneral4bit.from_linear_general(_q_proj(), impl="xla")
  with pytest.raises(ValueError, match=r"inputs.shape=\(2, 32\) must end"):
    layer(jnp.ones((2, 32)))
  # A user filter that selects an unsupported layout raises.
  model = nnx.Sequential(nnx.Linear(WIDTH, WIDTH, rngs=rngs), leading)
  with pytest.raises(ValueError, match=r"\(\'layers\', 1\).*axis=\(-2,\)"):
    nn.quantize_model(model, filter=lambda path, m: True, impl="xla")
  assert isinstance(model.layers[0], nnx.Linear)  # nothing swapped
