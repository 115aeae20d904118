"""Whole models: quantize_model over Linear / LinearGeneral / Einsum, QLoRA
with lora_rank, and merging the adapters (merge(), merge_lora)."""
# The exact layer types are the point:
# pylint: disable=unidiomatic-typecheck

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlowbit
from jlowbit import nn

# As test_nn_linear4bit.py: relative error of a 4-bit Gaussian weight, NF4,
# block size 64, with ~30% margin.
NF4_RTOL = 0.12
HEADS, HEAD_DIM, WIDTH, HIDDEN, SEQ = 4, 16, 64, 128, 5


def _normal(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


class _Mixed(nnx.Module):
  """Attention-like projections as LinearGeneral and Einsum, an MLP as
  Einsum + Linear, an einsum with a batch axis in its kernel, an einsum head."""

  def __init__(self, rngs):
    self.query = nnx.LinearGeneral(WIDTH, (HEADS, HEAD_DIM), rngs=rngs)
    self.out = nnx.Einsum("...hk,hkd->...d", (HEADS, HEAD_DIM, WIDTH),
                          (WIDTH,), rngs=rngs)
    self.up = nnx.Einsum("btd,df->btf", (WIDTH, HIDDEN), (HIDDEN,), rngs=rngs)
    self.down = nnx.Linear(HIDDEN, WIDTH, rngs=rngs)
    # y[b, d] = sum_t x[b, t, d] w[t, d]: "d" is a batch axis of the kernel.
    self.pool = nnx.Einsum("btd,td->bd", (SEQ, WIDTH), rngs=rngs)
    self.head = nnx.Einsum("bd,dc->bc", (WIDTH, 8), (8,), rngs=rngs)

  def __call__(self, x):
    h = x + self.out(self.query(x))
    h = h + self.down(jax.nn.gelu(self.up(h)))
    return self.head(self.pool(h))


QUANTIZED = {"query": nn.LinearGeneral4bit, "out": nn.Einsum4bit,
             "up": nn.Einsum4bit, "down": nn.Linear4bit}
QLORA = {"query": nn.LoRALinearGeneral4bit, "out": nn.LoRAEinsum4bit,
         "up": nn.LoRAEinsum4bit, "down": nn.LoRALinear4bit}
N_WEIGHTS = 2 * WIDTH * WIDTH + 2 * WIDTH * HIDDEN  # of the swapped layers


def test_quantize_model_swaps_linear_general_and_einsum_layers():
  model = _Mixed(nnx.Rngs(0))
  x = _normal((3, SEQ, WIDTH), seed=1)
  want = model(x)
  before = nn.memory_report(model)
  pool, head = model.pool, model.head
  nn.quantize_model(model, impl="xla")
  for name, cls in QUANTIZED.items():
    assert type(getattr(model, name)) is cls, name
  assert model.pool is pool and model.head is head  # unsupported; a head
  assert _rel(model(x), want) < 2 * NF4_RTOL  # four layers, ~0.09 each
  after = nn.memory_report(model)
  assert after["4bit_weights"] == N_WEIGHTS // 2
  assert after["4bit_statistics"] == 4 * (N_WEIGHTS // 64) + 4 * 16 * 4
  assert before["float_params"] - after["float_params"] == 4 * N_WEIGHTS


def test_a_user_filter_selecting_an_unsupported_einsum_raises():
  model = _Mixed(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"nnx.Einsum at \('pool',\) was "
                     r"selected by filter.*kernel axis 'd' is in the input"):
    nn.quantize_model(model, filter=lambda path, m: path[-1] != "head")
  assert type(model.down) is nnx.Linear  # nothing swapped
  nn.quantize_model(model, filter=lambda path, m: isinstance(m, nnx.Einsum)
                    and path[-1] not in ("head", "pool"), impl="xla")
  assert isinstance(model.up, nn.Einsum4bit)
  assert type(model.down) is nnx.Linear


def _loss(model, x, target):
  return jnp.mean((model(x) - target) ** 2)


def test_qlora_of_a_whole_model_trains_only_the_adapters():
  x = _normal((4, SEQ, WIDTH), seed=2)
  plain = nn.quantize_model(_Mixed(nnx.Rngs(0)), impl="xla")
  model = nn.quantize_model(_Mixed(nnx.Rngs(0)), lora_rank=4, lora_scale=2.0,
                            rngs=nnx.Rngs(1), impl="xla")
  for name, cls in QLORA.items():
    layer = getattr(model, name)
    assert type(layer) is cls and layer.lora_scale == 2.0, name
  assert type(model.pool) is nnx.Einsum and type(model.head) is nnx.Einsum
  # B = 0: the QLoRA model starts equal to the plain 4-bit one.
  np.testing.assert_array_equal(model(x), plain(x))
  target = plain(x) + _normal((4, 8), seed=3)
  frozen = jax.tree.map(np.array, nnx.state(model, nnx.Not(nnx.LoRAParam)))

  optimizer = nnx.Optimizer(model, jlowbit.adamw_8bit(1e-2, impl="xla"),
                            wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer):
    value, grads = nnx.value_and_grad(
        _loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, target)
    optimizer.update(model, grads)
    return value

  losses = [float(step(model, optimizer)) for _ in range(15)]
  assert losses[-1] < 0.8 * losses[0], losses
  adapters = nnx.state(model, nnx.LoRAParam)
  assert len(jax.tree.leaves(adapters)) == 2 * len(QLORA)
  assert any(np.abs(b).max() > 0 for b in jax.tree.leaves(adapters))
  for got, want in zip(jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam))),
                       jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(got, want)  # 4-bit weights, biases, pool, head

  trained = model(x)
  assert nn.merge_lora(model) is model
  for name, cls in QUANTIZED.items():
    assert type(getattr(model, name)) is cls, name
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  # Requantized: within 4-bit error of the adapted model, which the
  # training moved further than that from the plain 4-bit one.
  assert _rel(model(x), trained) < 2 * NF4_RTOL < _rel(plain(x), trained)


def _lora_layer(kind):
  """A QLoRA layer of ``kind``, its float base layer and an input shape."""
  rngs = nnx.Rngs(4)
  lora = dict(lora_rank=4, lora_scale=0.5, impl="xla", rngs=rngs)
  if kind == "linear":
    base = nnx.Linear(WIDTH, HIDDEN, rngs=rngs)
    layer = nn.LoRALinear4bit.from_linear(base, **lora)
    shape = (3, WIDTH)
  elif kind == "linear_general":
    base = nnx.LinearGeneral((HEADS, HEAD_DIM), WIDTH, axis=(-2, -1), rngs=rngs)
    layer = nn.LoRALinearGeneral4bit.from_linear_general(base, **lora)
    shape = (3, HEADS, HEAD_DIM)
  else:  # kernel (h, a, b) contracted over its middle axis
    base = nnx.Einsum("nta,hab->nthb", (8, WIDTH, 16), (8, 16), rngs=rngs)
    layer = nn.LoRAEinsum4bit.from_einsum(base, **lora)
    shape = (3, 2, WIDTH)
  base.bias[...] = _normal(base.bias[...].shape, seed=5) / 10
  layer.bias[...] = base.bias[...]
  return layer, base, shape


PLAIN = {"linear": nn.Linear4bit, "linear_general": nn.LinearGeneral4bit,
         "einsum": nn.Einsum4bit}


@pytest.mark.parametrize("kind", PLAIN)
def test_merge_folds_the_adapters_into_the_4bit_weight(kind):
  layer, base, shape = _lora_layer(kind)
  x = _normal(shape, seed=6)
  # Adapters about as large as the weight (A: he_uniform, var 2 / K), so
  # that a merge dropping them would fail the last check.
  b = layer.lora.lora_b
  b[...] = _normal(b[...].shape, seed=7) * float(jnp.std(base.kernel[...])) * 8
  adapted = layer(x)
  assert _rel(adapted, base(x)) > 0.5
  merged = layer.merge()
  assert type(merged) is PLAIN[kind]
  assert merged.dtype == layer.dtype and merged.impl == layer.impl
  np.testing.assert_array_equal(merged.bias[...], base.bias[...])
  # W' = quantize(dequantize(W) + s (A B)^T), same format.
  w4 = layer.kernel.get_value()
  delta = 0.5 * jnp.matmul(layer.lora.lora_a[...], layer.lora.lora_b[...],
                           precision="highest").T
  want = jlowbit.quantize_4bit(jlowbit.dequantize_4bit(w4, impl="xla") + delta,
                               impl="xla")
  got = merged.kernel.get_value()
  assert got.shape == w4.shape and got.quant_type == w4.quant_type
  np.testing.assert_array_equal(got.packed, want.packed)
  np.testing.assert_allclose(got.absmax, want.absmax, rtol=1e-6)
  # Requantizing loses precision: about one 4-bit error, not the adapters.
  assert _rel(merged(x), adapted) < NF4_RTOL


def test_shared_layers_get_one_qlora_layer_and_one_merge():
  shared = nnx.Linear(WIDTH, WIDTH, rngs=nnx.Rngs(0))
  model = nnx.Sequential(shared, nnx.Linear(WIDTH, WIDTH, rngs=nnx.Rngs(1)),
                         shared)
  nn.quantize_model(model, lora_rank=2, rngs=nnx.Rngs(2), impl="xla")
  layers = model.layers
  assert isinstance(layers[0], nn.LoRALinear4bit) and layers[0] is layers[2]
  assert layers[1] is not layers[0]
  nn.merge_lora(model)
  assert type(layers[0]) is nn.Linear4bit and layers[0] is layers[2]


def test_lora_errors_name_the_argument():
  model = _Mixed(nnx.Rngs(0))
  with pytest.raises(TypeError, match="lora_rank=4 needs rngs"):
    nn.quantize_model(model, lora_rank=4)
  with pytest.raises(ValueError, match="give them with lora_rank"):
    nn.quantize_model(model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="give them with lora_rank"):
    nn.quantize_model(model, lora_scale=2.0)
  with pytest.raises(ValueError, match="lora_rank=0 must be a positive int"):
    nn.quantize_model(model, lora_rank=0, rngs=nnx.Rngs(0))
  assert type(model.down) is nnx.Linear  # nothing swapped
  layer = nn.LoRALinear4bit(WIDTH, WIDTH, lora_rank=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="use model.merge"):
    nn.merge_lora(layer)
  with pytest.raises(ValueError, match="lora_rank=1.5"):
    nn.LoRAEinsum4bit("...d,dk->...k", (WIDTH, 8), lora_rank=1.5,
                      rngs=nnx.Rngs(0))


def test_quantize_model_tiled_layout_where_weights_fit():
  # Every swapped weight of _Mixed fits the tiled layout; the added layer
  # does not (in_features 24 is not a multiple of 64) and stays "bnb".
  model = _Mixed(nnx.Rngs(0))
  model.narrow = nnx.Linear(24, WIDTH, rngs=nnx.Rngs(5))
  reference = nn.quantize_model(_Mixed(nnx.Rngs(0)), impl="xla")
  nn.quantize_model(model, layout="tiled", lora_rank=2, rngs=nnx.Rngs(1),
                    impl="xla")
  for name in QUANTIZED:
    w4 = getattr(model, name).kernel.get_value()
    assert w4.layout == "tiled", name
    # The bytes are bitsandbytes' bytes, permuted.
    want = getattr(reference, name).kernel.get_value()
    np.testing.assert_array_equal(jlowbit.untile_4bit(w4).packed, want.packed)
  assert model.narrow.kernel.get_value().layout == "bnb"
  x = _normal((3, SEQ, WIDTH), seed=1)
  np.testing.assert_allclose(model(x), reference(x), rtol=1e-5, atol=1e-5)
  # Merging requantizes in the same layout.
  nn.merge_lora(model)
  assert model.down.kernel.get_value().layout == "tiled"
  with pytest.raises(ValueError, match=r"layout='rows' is not supported"):
    nn.quantize_model(_Mixed(nnx.Rngs(0)), layout="rows")
