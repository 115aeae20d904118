"""Flax NNX 4-bit layers: Linear4bit, quantize_model, memory_report, QLoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ALL_IMPLS
from flax import nnx

import jlowbit
from jlowbit import nn

IN, OUT = 128, 64
# Relative Frobenius error of a quantized Gaussian matrix, block size 64:
# about 0.091 for NF4 and 0.115 for FP4 (measured over seeds); for an
# isotropic input the outputs' relative error is the weight's. Bounds with
# ~30% margin.
QUANT_RTOL = {"nf4": 0.12, "fp4": 0.15}
# The 4-bit layer against the float layer holding its dequantized kernel:
# only the compute dtype's rounding differs.
DENSE_RTOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _normal(shape, dtype="float32", seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def _linear(dtype=None, seed=0, use_bias=True):
  linear = nnx.Linear(IN, OUT, dtype=dtype, use_bias=use_bias,
                      rngs=nnx.Rngs(seed))
  if use_bias:  # a nonzero bias, so that adding it is tested
    linear.bias[...] = _normal((OUT,), seed=seed + 100)
  return linear


def _is_quantized(x):
  return isinstance(x, jlowbit.Quantized4bit)


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_from_linear_is_close_to_the_float_layer(quant_type, dtype, batch):
  linear = _linear(dtype)
  layer = nn.Linear4bit.from_linear(linear, quant_type=quant_type, impl="xla")
  x = _normal((*batch, IN), dtype, seed=1)
  y, want = layer(x), linear(x)
  assert y.shape == want.shape == (*batch, OUT) and y.dtype == want.dtype
  assert _rel(y, want) < QUANT_RTOL[quant_type]
  dense = layer.to_linear()
  assert _rel(y, dense(x)) < DENSE_RTOL[dtype]
  np.testing.assert_array_equal(dense.kernel[...], layer.dequantize())
  np.testing.assert_array_equal(dense.bias[...], linear.bias[...])


def test_constructor_quantizes_the_kernel_nnx_linear_draws():
  layer = nn.Linear4bit(IN, OUT, block_size=128, impl="xla", rngs=nnx.Rngs(3))
  linear = nnx.Linear(IN, OUT, rngs=nnx.Rngs(3))
  want = jlowbit.quantize_4bit(linear.kernel[...].T, block_size=128, impl="xla")
  got = layer.kernel.get_value()
  assert got.shape == (OUT, IN) and got.block_size == 128
  np.testing.assert_array_equal(got.packed, want.packed)
  np.testing.assert_array_equal(got.absmax, want.absmax)
  np.testing.assert_array_equal(layer.bias[...], linear.bias[...])


def test_default_dtype_promotes_like_nnx_linear():
  linear = _linear()
  layer = nn.Linear4bit.from_linear(linear, impl="xla")
  for dtype in ("bfloat16", "float32", "int32"):
    x = jnp.ones((2, IN), dtype)
    assert layer(x).dtype == linear(x).dtype, dtype
  half = nn.Linear4bit.from_linear(_linear("bfloat16"), impl="xla")
  assert half(jnp.ones((2, IN))).dtype == jnp.bfloat16


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_impls_agree_with_xla(impl, rows):
  """One row runs the fused gemv kernel, more rows dequantize + dot."""
  linear = _linear()
  layer = nn.Linear4bit.from_linear(linear, impl=impl)
  reference = nn.Linear4bit.from_linear(linear, impl="xla")
  np.testing.assert_array_equal(layer.kernel.get_value().packed,
                                reference.kernel.get_value().packed)
  x = _normal((rows, IN), seed=2)
  np.testing.assert_allclose(layer(x), reference(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer(x[0]), reference(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nested", [False, True])
def test_bnb_layout_round_trips_byte_exactly(nested):
  linear = _linear()
  layer = nn.Linear4bit.from_linear(linear, compress_statistics=nested,
                                    impl="xla")
  state = jlowbit.to_bnb(layer.kernel.get_value(), prefix="fc.weight")
  direct = jlowbit.to_bnb(jlowbit.quantize_4bit(
      linear.kernel[...].T, compress_statistics=nested, impl="xla"),
      prefix="fc.weight")
  w4 = jlowbit.from_bnb(state, prefix="fc.weight")
  again = jlowbit.to_bnb(w4, prefix="fc.weight")
  for want in (direct, again):
    assert list(state) == list(want)
    for key in want:
      assert state[key].dtype == want[key].dtype, key
      assert state[key].tobytes() == want[key].tobytes(), key
  loaded = nn.Linear4bit.from_quantized(w4, linear.bias[...], impl="xla")
  assert (loaded.in_features, loaded.out_features) == (IN, OUT)
  assert loaded.compress_statistics is nested
  x = _normal((3, IN), seed=4)
  np.testing.assert_array_equal(loaded(x), layer(x))


def test_params_hold_no_quantized_weight_and_grads_flow():
  linear = _linear()
  layer = nn.Linear4bit.from_linear(linear, impl="xla")
  params = nnx.state(layer, nnx.Param)
  assert not any(_is_quantized(leaf) for leaf in jax.tree.leaves(
      params, is_leaf=_is_quantized))
  assert set(params.keys()) == {"bias"}
  assert list(nnx.state(layer, nn.QuantizedWeight).keys()) == ["kernel"]

  x, target = _normal((6, IN), seed=5), _normal((6, OUT), seed=6)
  dense = layer.to_linear()

  def loss(model, x):
    return jnp.mean((model(x) - target) ** 2)

  grad_fn = nnx.jit(nnx.grad(loss))
  grads = grad_fn(layer, x)
  assert set(grads.keys()) == {"bias"}
  np.testing.assert_allclose(grads["bias"][...], grad_fn(dense, x)["bias"][...],
                             rtol=1e-5, atol=1e-7)
  grad_x = jax.grad(lambda x: loss(layer, x))(x)
  np.testing.assert_allclose(grad_x, jax.grad(lambda x: loss(dense, x))(x),
                             rtol=1e-5, atol=1e-7)


class _Model(nnx.Module):
  """Embedding, a list of MLP blocks, a dict of projections, norm, head."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(16, IN, rngs=rngs)
    self.blocks = nnx.List([nnx.Sequential(
        nnx.Linear(IN, 2 * IN, rngs=rngs), nnx.relu,
        nnx.Linear(2 * IN, IN, rngs=rngs)) for _ in range(2)])
    self.proj = nnx.Dict(up=nnx.Linear(IN, IN, rngs=rngs))
    self.norm = nnx.LayerNorm(IN, rngs=rngs)
    self.head = nnx.Linear(IN, 16, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    for block in self.blocks:
      h = h + block(h)
    h = h + self.proj["up"](h)
    return self.head(self.norm(h))


def test_quantize_model_swaps_the_selected_linears():
  model = _Model(nnx.Rngs(0))
  tokens = jnp.arange(8) % 16
  want = model(tokens)
  before = nn.memory_report(model)
  embed, norm, head = model.embed, model.norm, model.head
  assert nn.quantize_model(model, impl="xla") is model
  assert model.embed is embed and model.norm is norm and model.head is head
  for block in model.blocks:
    assert isinstance(block.layers[0], nn.Linear4bit)
    assert isinstance(block.layers[2], nn.Linear4bit)
  assert isinstance(model.proj["up"], nn.Linear4bit)
  # Five quantized layers, each ~0.09 relative error: about sqrt(5) times
  # that at the output.
  assert _rel(model(tokens), want) < np.sqrt(5) * QUANT_RTOL["nf4"]

  after = nn.memory_report(model)
  assert after["total"] == sum(v for k, v in after.items() if k != "total")
  quantized = 4 * 2 * IN * IN + IN * IN  # weights of the swapped layers
  blocks = quantized // 64
  assert after["4bit_weights"] == quantized // 2
  assert after["4bit_statistics"] == 4 * blocks + 5 * 16 * 4  # absmax, maps
  assert before["float_params"] - after["float_params"] == 4 * quantized
  assert before["4bit_weights"] == 0 and after["other"] == before["other"]


def test_quantize_model_filter_and_shared_layers():
  shared = nnx.Linear(IN, IN, rngs=nnx.Rngs(0))
  model = nnx.Sequential(shared, nnx.Linear(IN, IN, rngs=nnx.Rngs(1)), shared)
  nn.quantize_model(model, filter=lambda path, m: path[-1] != 1, impl="xla")
  layers = model.layers
  assert isinstance(layers[0], nn.Linear4bit) and layers[0] is layers[2]
  assert type(layers[1]) is nnx.Linear  # pylint: disable=unidiomatic-typecheck
  with pytest.raises(ValueError, match="Linear4bit.from_linear"):
    nn.quantize_model(nnx.Linear(IN, IN, rngs=nnx.Rngs(0)),
                      filter=lambda path, m: True)


def _qlora_model():
  base = _linear(seed=7)
  return nn.LoRALinear4bit.from_linear(base, lora_rank=8, impl="xla",
                                       rngs=nnx.Rngs(8))


def test_qlora_trains_only_the_adapters(tmp_path):
  model = _qlora_model()
  frozen = model.kernel.get_value()
  x = _normal((32, IN), seed=9)
  np.testing.assert_array_equal(model(x), nn.Linear4bit.from_quantized(
      frozen, model.bias[...], impl="xla")(x))  # B = 0 at the start
  delta = _normal((IN, 4), seed=10) @ _normal((4, OUT), seed=11) / 8
  target = model(x) + x @ delta

  def loss(model):
    return jnp.mean((model(x) - target) ** 2)

  optimizer = nnx.Optimizer(model, jlowbit.adamw_8bit(1e-2, impl="xla"),
                            wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer):
    value, grads = nnx.value_and_grad(
        loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return value

  losses = [float(step(model, optimizer)) for _ in range(20)]
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < 0.5 * losses[0], losses
  after = model.kernel.get_value()
  for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(model.bias[...], _linear(seed=7).bias[...])

  lora = nnx.state(model, nnx.LoRAParam)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "lora", lora)
    checkpointer.wait_until_finished()
    fresh = _qlora_model()
    restored = checkpointer.restore(tmp_path / "lora",
                                    nnx.state(fresh, nnx.LoRAParam))
  nnx.update(fresh, restored)
  for got, want in zip(jax.tree.leaves(nnx.state(fresh, nnx.LoRAParam)),
                       jax.tree.leaves(lora)):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(fresh(x), model(x))


def test_quantized_model_state_round_trips_through_orbax(tmp_path):
  model = nn.quantize_model(_Model(nnx.Rngs(0)), compress_statistics=True,
                            impl="xla")
  graphdef, state = nnx.split(model)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "model", state)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = checkpointer.restore(tmp_path / "model", abstract)
  leaves = jax.tree.leaves(restored)
  assert len(leaves) == len(jax.tree.leaves(state))
  for got, want in zip(leaves, jax.tree.leaves(state)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
  merged = nnx.merge(graphdef, restored)
  assert isinstance(merged.proj["up"], nn.Linear4bit)
  assert merged.proj["up"].kernel.get_value().nested
  tokens = jnp.arange(8) % 16
  np.testing.assert_array_equal(merged(tokens), model(tokens))


def test_errors_name_the_argument():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="quant_type='int4'.*'nf4', 'fp4'"):
    nn.Linear4bit(IN, OUT, quant_type="int4", rngs=rngs)
  with pytest.raises(ValueError, match="block_size=48"):
    nn.Linear4bit(IN, OUT, block_size=48, rngs=rngs)
  with pytest.raises(TypeError, match="block_size=64.0 must be an int"):
    nn.Linear4bit(IN, OUT, block_size=64.0, rngs=rngs)
  with pytest.raises(TypeError, match="dtype=int8"):
    nn.Linear4bit(IN, OUT, dtype=jnp.int8, rngs=rngs)
  with pytest.raises(ValueError, match="impl='cuda'"):
    nn.Linear4bit(IN, OUT, impl="cuda", rngs=rngs)
  with pytest.raises(ValueError, match="must be 2-D"):
    nn.Linear4bit(IN, OUT, rngs=rngs,
                  kernel_init=lambda key, shape, dtype: jnp.ones((IN, OUT, 1)))
  with pytest.raises(ValueError, match=r"w4.shape=\(4, 8, 64\) must be 2-D"):
    nn.Linear4bit.from_quantized(jlowbit.quantize_4bit(jnp.ones((4, 8, 64))))
  with pytest.raises(TypeError, match="linear must be an nnx.Linear, got Embed"):
    nn.Linear4bit.from_linear(nnx.Embed(4, 8, rngs=rngs))
  with pytest.raises(TypeError, match="subclass LoRALinear"):
    nn.Linear4bit.from_linear(nnx.LoRALinear(IN, OUT, lora_rank=2, rngs=rngs))
  with pytest.raises(ValueError, match="lora_rank=0"):
    nn.LoRALinear4bit(IN, OUT, lora_rank=0, rngs=rngs)
