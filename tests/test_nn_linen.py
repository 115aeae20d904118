"""Flax linen 4-bit: Dense4bit, quantize_params / dequantize_params, apply_quantized."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ALL_IMPLS
from flax import nnx

import jlowbit
from jlowbit import nn as lnn


@pytest.fixture(autouse=True)
def _exact_reference_products():
  """Float references (nn.Dense, ``x @ w``) at full float32 precision: on a
  GPU XLA's default is TF32 (~1e-3 relative), while ``matmul_4bit``
  accumulates float32 products exactly."""
  with jax.default_matmul_precision("highest"):
    yield

IN, OUT = 128, 64
# As tests/test_nn_linear4bit.py: the relative error of a 4-bit Gaussian
# matrix (block size 64) is about 0.091 (NF4) and 0.115 (FP4); ~30% margin.
QUANT_RTOL = {"nf4": 0.12, "fp4": 0.15}
# Two models whose kernels are both quantized: the error adds up over layers.
MLP_RTOL = 0.2


def _normal(shape, dtype="float32", seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def _assert_same_bytes(got, want):
  """Two Quantized4bit are the same weight: equal bitsandbytes entries."""
  got, want = jlowbit.to_bnb(got), jlowbit.to_bnb(want)
  assert list(got) == list(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _bias_init(key, shape, dtype):  # a nonzero bias, so that adding it is tested
  return jax.random.normal(key, shape, dtype)


class MLP(nn.Module):
  """A plain linen model: embedding, two hidden nn.Dense, a head."""
  vocab: int = 32

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, IN)(tokens)
    x = nn.relu(nn.Dense(OUT, bias_init=_bias_init)(x))
    x = nn.relu(nn.Dense(IN, bias_init=_bias_init)(x))
    return nn.Dense(self.vocab, name="head")(x)


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dense4bit_is_close_to_dense(quant_type, dtype, batch):
  x = _normal((*batch, IN), dtype, seed=1)
  dense = nn.Dense(OUT, dtype=dtype, bias_init=_bias_init)
  layer = lnn.Dense4bit(OUT, dtype=dtype, bias_init=_bias_init,
                        quant_type=quant_type, impl="xla")
  params = dense.init(jax.random.key(0), x)["params"]
  variables = layer.init(jax.random.key(0), x)
  assert set(variables) == {"params", lnn.QUANTIZED}
  # The same key draws the same kernel as nn.Dense; its transpose is quantized.
  _assert_same_bytes(variables[lnn.QUANTIZED]["kernel"],
                     jlowbit.quantize_4bit(params["kernel"].T,
                                           quant_type=quant_type))
  np.testing.assert_array_equal(variables["params"]["bias"], params["bias"])
  y = jax.jit(layer.apply)(variables, x)
  want = dense.apply({"params": params}, x)
  assert y.shape == want.shape == (*batch, OUT) and y.dtype == want.dtype
  assert _rel(y, want) < QUANT_RTOL[quant_type]


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_dense4bit_gradients_skip_the_4bit_weight(impl):
  x = _normal((3, IN), seed=1)
  layer = lnn.Dense4bit(OUT, bias_init=_bias_init, impl=impl)
  variables = layer.init(jax.random.key(0), x)
  params, frozen = variables["params"], variables[lnn.QUANTIZED]
  w = jlowbit.dequantize_4bit(frozen["kernel"])  # [OUT, IN]

  def loss(params, x):
    return jnp.sum(layer.apply({"params": params, lnn.QUANTIZED: frozen}, x) ** 2)

  grad_params, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  assert jax.tree.structure(grad_params) == jax.tree.structure(params)
  y = x @ w.T + params["bias"]
  np.testing.assert_allclose(grad_params["bias"], 2 * y.sum(0), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(grad_x, 2 * y @ w, rtol=1e-4, atol=1e-4)
  tx = optax.adam(1e-2)
  updates, _ = tx.update(grad_params, tx.init(params), params)
  assert set(optax.apply_updates(params, updates)) == {"bias"}


def test_dense4bit_without_bias_and_promotion():
  x = _normal((2, IN), "bfloat16", seed=1)
  layer = lnn.Dense4bit(OUT, use_bias=False, impl="xla")
  variables = layer.init(jax.random.key(0), x)
  assert "params" not in variables
  # bfloat16 input with a float32 weight computes in float32, as nn.Dense.
  assert layer.apply(variables, x).dtype == jnp.float32
  half = lnn.Dense4bit(OUT, use_bias=False, param_dtype=jnp.bfloat16, impl="xla")
  assert half.apply(half.init(jax.random.key(0), x), x).dtype == jnp.bfloat16


def _quantized_mlp(seed=0, **kwargs):
  model = MLP()
  tokens = jnp.arange(6).reshape(2, 3)
  variables = model.init(jax.random.key(seed), tokens)
  return model, tokens, variables, lnn.quantize_params(variables, **kwargs)


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_params_quantizes_the_transposed_hidden_kernels(
    quant_type, compress_statistics):
  _, _, variables, quantized = _quantized_mlp(
      quant_type=quant_type, compress_statistics=compress_statistics,
      impl="xla")
  params, qparams = variables["params"], quantized["params"]
  assert set(qparams) == set(params) == {"Embed_0", "Dense_0", "Dense_1", "head"}
  for name in ("Dense_0", "Dense_1"):
    kernel, w4 = params[name]["kernel"], qparams[name]["kernel"]
    assert isinstance(w4, jlowbit.Quantized4bit)
    assert w4.shape == kernel.T.shape and w4.quant_type == quant_type
    assert w4.nested == compress_statistics
    _assert_same_bytes(w4, jlowbit.quantize_4bit(
        kernel.T, quant_type=quant_type,
        compress_statistics=compress_statistics))
    assert qparams[name]["bias"] is params[name]["bias"]
  assert qparams["head"]["kernel"] is params["head"]["kernel"]
  assert qparams["Embed_0"]["embedding"] is params["Embed_0"]["embedding"]
  # Quantizing again keeps the 4-bit weights.
  again = lnn.quantize_params(quantized)
  assert again["params"]["Dense_0"]["kernel"] is qparams["Dense_0"]["kernel"]
  # And back: the float kernels [in, out], close to the originals.
  floats = lnn.dequantize_params(quantized)
  assert (jax.tree.map(jnp.shape, floats) == jax.tree.map(jnp.shape, variables))
  for name in ("Dense_0", "Dense_1"):
    np.testing.assert_array_equal(
        floats["params"][name]["kernel"],
        jlowbit.dequantize_4bit(qparams[name]["kernel"]).T)
    assert _rel(floats["params"][name]["kernel"],
                params[name]["kernel"]) < QUANT_RTOL[quant_type]
  assert lnn.dequantize_params(quantized, jnp.bfloat16)["params"]["Dense_0"][
      "kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_apply_quantized_runs_the_unchanged_model(impl):
  model, tokens, variables, quantized = _quantized_mlp(impl="xla")
  want = model.apply(variables, tokens)
  run = jax.jit(lambda q, t: lnn.apply_quantized(model, q, t, impl=impl))
  y = run(quantized, tokens)
  assert y.shape == want.shape and y.dtype == want.dtype
  assert 0 < _rel(y, want) < MLP_RTOL
  # Same as the float model holding the dequantized kernels.
  floats = lnn.dequantize_params(quantized)
  np.testing.assert_allclose(y, model.apply(floats, tokens), rtol=1e-4,
                             atol=1e-4)
  # A filter that keeps everything float: the model is the float one.
  same = lnn.quantize_params(variables, filter=lambda path, x: False)
  np.testing.assert_array_equal(lnn.apply_quantized(model, same, tokens), want)


def test_apply_quantized_filter_selects_the_head():
  model, tokens, variables, _ = _quantized_mlp()
  quantized = lnn.quantize_params(
      variables, filter=lambda path, x: path[-2:] == ("head", "kernel"),
      impl="xla")
  assert isinstance(quantized["params"]["head"]["kernel"],
                    jlowbit.Quantized4bit)
  assert not isinstance(quantized["params"]["Dense_0"]["kernel"],
                        jlowbit.Quantized4bit)
  y = lnn.apply_quantized(model, quantized, tokens, impl="xla")
  assert 0 < _rel(y, model.apply(variables, tokens)) < QUANT_RTOL["nf4"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_nnx_and_linen_agree_on_the_same_weight(impl, dtype):
  w4 = jlowbit.quantize_4bit(_normal((OUT, IN), dtype), compress_statistics=True)
  bias = _normal((OUT,), dtype, seed=2)
  # Through bitsandbytes' serialized form and back: the same bytes.
  w4 = jlowbit.from_bnb(jlowbit.to_bnb(w4))
  x = _normal((2, 3, IN), dtype, seed=1)
  want = nnx.jit(lambda m, x: m(x))(
      lnn.Linear4bit.from_quantized(w4, bias, impl=impl), x)
  layer, variables = lnn.Dense4bit.from_quantized(w4, bias, impl=impl)
  np.testing.assert_array_equal(jax.jit(layer.apply)(variables, x), want)
  dense = nn.Dense(OUT, dtype=dtype)
  got = jax.jit(lambda v, x: lnn.apply_quantized(dense, v, x, impl=impl))(
      {"params": {"kernel": w4, "bias": bias}}, x)
  np.testing.assert_array_equal(got, want)
  assert want.dtype == dtype


def test_errors():
  x = jnp.ones((2, IN))
  with pytest.raises(ValueError, match="quant_type"):
    lnn.Dense4bit(OUT, quant_type="int4")
  with pytest.raises(ValueError, match="block_size"):
    lnn.Dense4bit(OUT, block_size=48)
  with pytest.raises(TypeError, match="block_size"):
    lnn.Dense4bit(OUT, block_size=64.0)
  with pytest.raises(ValueError, match="impl"):
    lnn.Dense4bit(OUT, impl="cuda")
  _, _, variables, _ = _quantized_mlp()
  with pytest.raises(ValueError, match="quant_type"):
    lnn.quantize_params(variables, quant_type="int4")
  with pytest.raises(ValueError, match="block_size"):
    lnn.quantize_params(variables, block_size=48)
  with pytest.raises(TypeError, match="block_size"):
    lnn.quantize_params(variables, block_size=64.0)
  with pytest.raises(ValueError, match="Dense_0/bias.*2-D"):
    lnn.quantize_params(variables, filter=lambda path, x: path[-1] == "bias")
  w4 = jlowbit.quantize_4bit(jnp.ones((OUT, IN)))
  with pytest.raises(ValueError, match="bias.shape"):
    lnn.Dense4bit.from_quantized(w4, jnp.ones((OUT + 1,)))
  with pytest.raises(ValueError, match="2-D"):
    lnn.Dense4bit.from_quantized(jlowbit.quantize_4bit(jnp.ones((OUT * IN,))))
  layer, frozen = lnn.Dense4bit.from_quantized(w4)
  with pytest.raises(ValueError, match="features"):
    lnn.Dense4bit(OUT + 1, use_bias=False).apply(frozen, x)
  with pytest.raises(ValueError, match="features"):
    lnn.apply_quantized(nn.Dense(OUT + 1), {"params": {"kernel": w4, "bias":
                                                         jnp.ones(OUT + 1)}}, x)
  with pytest.raises(ValueError, match="impl"):
    lnn.apply_quantized(layer, frozen, x, impl="cuda")


def test_quantize_params_tiled_layout():
  model, tokens, variables, quantized = _quantized_mlp(impl="xla")
  _, _, _, tiled = _quantized_mlp(layout="tiled", impl="xla")
  for name in ("Dense_0", "Dense_1"):
    w4 = tiled["params"][name]["kernel"]
    assert w4.layout == "tiled"  # [64, 128] and [128, 64] both fit
    _assert_same_bytes(w4, quantized["params"][name]["kernel"])
  np.testing.assert_allclose(lnn.apply_quantized(model, tiled, tokens),
                             lnn.apply_quantized(model, quantized, tokens),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"layout='rows' is not supported"):
    lnn.quantize_params(variables, layout="rows")
