"""Fused projections: ``jlowbit.concatenate_4bit`` and
``jlowbit.models.fuse_projections`` (q|k|v and gate|up as one product)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlowbit
from jlowbit.models import Llama, LlamaConfig, fuse_projections, generate

DATA = pathlib.Path(__file__).parent / "data" / "hf_llama"
# Every projection of this model fits the tiled layout (out % 16, in % 64).
TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   num_hidden_layers=2, max_position_embeddings=64)


def _weights(rows=(64, 32, 32), columns=128):
  keys = jax.random.split(jax.random.key(0), len(rows))
  return [jax.random.normal(k, (n, columns)) for k, n in zip(keys, rows)]


@pytest.mark.parametrize("layout", ["bnb", "tiled"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_concatenate_4bit_is_quantize_of_the_stacked_weight(layout, quant_type):
  weights = _weights()
  parts = [jlowbit.quantize_4bit(w, block_size=64, quant_type=quant_type,
                                 layout=layout) for w in weights]
  got = jlowbit.concatenate_4bit(parts)
  want = jlowbit.quantize_4bit(jnp.concatenate(weights), block_size=64,
                               quant_type=quant_type, layout=layout)
  assert (got.shape, got.layout, got.nested) == ((128, 128), layout, False)
  np.testing.assert_array_equal(got.packed, want.packed)
  np.testing.assert_array_equal(got.absmax, want.absmax)
  np.testing.assert_array_equal(got.quant_map, want.quant_map)


@pytest.mark.parametrize("layout", ["bnb", "tiled"])
def test_concatenate_4bit_expands_nested_statistics(layout):
  parts = [jlowbit.quantize_4bit(w, block_size=64, compress_statistics=True,
                                 layout=layout) for w in _weights()]
  got = jlowbit.concatenate_4bit(parts)
  assert not got.nested and got.absmax.dtype == jnp.float32
  np.testing.assert_array_equal(
      got.absmax,
      jnp.concatenate([jlowbit.quant4.absmax_float32(p) for p in parts]))
  np.testing.assert_array_equal(
      jlowbit.dequantize_4bit(got),
      jnp.concatenate([jlowbit.dequantize_4bit(p) for p in parts]))


def test_concatenate_4bit_bad_input_raises():
  a, b = (jlowbit.quantize_4bit(w, block_size=64) for w in _weights((16, 16)))
  with pytest.raises(ValueError, match="at least one"):
    jlowbit.concatenate_4bit([])
  with pytest.raises(ValueError, match=r"weights\[1\].block_size=128"):
    jlowbit.concatenate_4bit([a, jlowbit.quantize_4bit(_weights((16,))[0],
                                                       block_size=128)])
  with pytest.raises(ValueError, match=r"weights\[1\].quant_type='fp4'"):
    jlowbit.concatenate_4bit([a, jlowbit.quantize_4bit(_weights((16,))[0],
                                                       quant_type="fp4")])
  with pytest.raises(ValueError, match="in_features"):
    jlowbit.concatenate_4bit([a, jlowbit.quantize_4bit(
        _weights((16,), columns=64)[0], block_size=64)])
  with pytest.raises(ValueError, match="must be a multiple of block_size"):
    jlowbit.concatenate_4bit([jlowbit.quantize_4bit(w, block_size=64)
                              for w in _weights((4, 4), columns=96)])
  with pytest.raises(ValueError, match="2-D"):
    jlowbit.concatenate_4bit([jlowbit.quantize_4bit(jnp.ones(128))])
  with pytest.raises(TypeError, match="Quantized4bit"):
    jlowbit.concatenate_4bit([a, jnp.ones((16, 128))])
  assert jlowbit.concatenate_4bit([a, b]).shape == (32, 128)


@pytest.mark.parametrize("quant", [
    None,
    dict(quant_type="nf4"),
    dict(quant_type="nf4", compress_statistics=True, layout="tiled"),
    dict(quant_type="fp4", layout="tiled"),
], ids=["float", "nf4", "nf4-nested-tiled", "fp4-tiled"])
def test_fused_model_computes_the_same_logits(quant):
  model = Llama(TINY, rngs=nnx.Rngs(0))
  if quant is not None:
    jlowbit.nn.quantize_model(model, impl="xla", **quant)
  ids = jnp.arange(12)[None] * 7 % TINY.vocab_size
  want, _ = model(ids)
  assert fuse_projections(model) is model
  attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
  assert not any(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
  assert not any(hasattr(mlp, n) for n in ("gate_proj", "up_proj"))
  kind = nnx.Linear if quant is None else jlowbit.nn.Linear4bit
  assert type(attn.qkv_proj) is kind and type(mlp.gate_up_proj) is kind  # pylint: disable=unidiomatic-typecheck
  if quant is not None:
    assert attn.qkv_proj.kernel.get_value().shape == (64 + 2 * 32, 64)
    assert mlp.gate_up_proj.kernel.get_value().shape == (256, 64)
  got, _ = model(ids)
  # The same products in one dot per fused layer (XLA on the CPU: equal).
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Fusing again changes nothing.
  state = nnx.state(model)
  fuse_projections(model)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), state)


@pytest.mark.parametrize("impl, layout", [
    ("xla", "bnb"),  # xla dequantizes either layout alike
    pytest.param("triton", "bnb", marks=pytest.mark.gpu),
    pytest.param("triton", "tiled", marks=pytest.mark.gpu)])
def test_fused_4bit_checkpoint_generates_like_unfused(impl, layout):
  """bitsandbytes' nested NF4 checkpoint (bfloat16 compute): the fused model
  decodes the same tokens, its logits within bfloat16 rounding (on the GPU
  the fused products run other kernel configurations)."""
  ids = jnp.asarray([[1, 17, 42, 99, 3]])
  plain = Llama.from_hf_checkpoint(DATA / "llama_nf4_dq", layout=layout,
                                   impl=impl)
  fused = fuse_projections(Llama.from_hf_checkpoint(
      DATA / "llama_nf4_dq", layout=layout, impl=impl))
  want, got = plain(ids)[0], fused(ids)[0]
  bf16_ulp = 2.0 ** -8  # the largest logits lie in [0.5, 1)
  assert np.abs(np.asarray(got, np.float32)
                - np.asarray(want, np.float32)).max() <= 2 * bf16_ulp
  np.testing.assert_array_equal(generate(fused, ids, 6), generate(plain, ids, 6))


def test_fuse_rejects_lora_and_mixed_layers():
  model = Llama(TINY, rngs=nnx.Rngs(0))
  jlowbit.nn.quantize_model(model, lora_rank=2, rngs=nnx.Rngs(2), impl="xla")
  with pytest.raises(TypeError, match=r"layers\[0\].self_attn.q_proj.*LoRALinear4bit"):
    fuse_projections(model)
  model = Llama(TINY, rngs=nnx.Rngs(0))
  attn = model.layers[0].self_attn
  attn.k_proj = jlowbit.nn.Linear4bit.from_linear(attn.k_proj, impl="xla")
  with pytest.raises(TypeError, match="all nnx.Linear or all"):
    fuse_projections(model)
  model = Llama(TINY, rngs=nnx.Rngs(0))
  mlp = model.layers[1].mlp
  mlp.up_proj = nnx.Linear(64, 128, use_bias=True, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=r"layers\[1\].mlp.gate_proj.*bias"):
    fuse_projections(model)
