"""bitsandbytes / HF serialization of 4-bit weights (QuantState.as_dict(packed=True))."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlowbit
from jlowbit import codebooks

# bitsandbytes 0.50.2 get_4bit_type("nf4") / ("fp4"), as float32.
BNB_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
BNB_FP4 = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4,
                     -6, -2, -3], np.float32) / np.float32(12))


def _normal(shape, dtype="float32", seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _json_bytes(text):
  return np.frombuffer(text.encode("utf-8"), np.uint8).copy()


def _pack_by_hand(codes):
  codes = np.append(codes, [0] * (len(codes) % 2)).astype(np.uint8)
  return (codes[0::2] * 16 + codes[1::2]).astype(np.uint8)


def _assert_same_dict(got, want):
  assert list(got) == list(want)
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    assert got[key].shape == want[key].shape, key
    assert got[key].tobytes() == want[key].tobytes(), key


def _assert_same_quantized(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_codebooks_match_bitsandbytes():
  np.testing.assert_array_equal(codebooks.nf4(), BNB_NF4)
  np.testing.assert_array_equal(codebooks.fp4(), BNB_FP4)


@pytest.mark.parametrize("quant_type, nested, storage, shape", [
    ("nf4", False, "uint8", (4, 64)),
    ("nf4", True, "uint8", (7, 9)),
    ("fp4", False, "uint8", (5,)),
    ("fp4", True, "bfloat16", (4, 64)),
    ("nf4", False, "bfloat16", (5,)),
    ("nf4", True, "float32", (7, 9)),
    ("fp4", False, "float32", (5,)),
    ("nf4", False, "float16", (0,)),
    ("fp4", True, "int8", (3, 33)),
])
def test_round_trip_byte_for_byte(quant_type, nested, storage, shape):
  w4 = jlowbit.quantize_4bit(_normal(shape, "bfloat16"), block_size=32,
                             quant_type=quant_type, compress_statistics=nested,
                             quant_storage=storage)
  d = jlowbit.to_bnb(w4)
  keys = ["weight", "absmax", "quant_map"]
  keys += ["nested_absmax", "nested_quant_map"] if nested else []
  assert list(d) == keys + [f"quant_state.bitsandbytes__{quant_type}"]
  n_bytes = -(-w4.size // 2)
  itemsize = np.dtype(jnp.dtype(storage)).itemsize
  assert d["weight"].dtype == jnp.dtype(storage)
  assert d["weight"].shape == (-(-n_bytes // itemsize), 1)
  assert d["absmax"].dtype == (np.uint8 if nested else np.float32)
  back = jlowbit.from_bnb(d)
  assert back.quant_storage == storage and back.dtype == "bfloat16"
  assert back.shape == shape
  _assert_same_quantized(back, w4)
  _assert_same_dict(jlowbit.to_bnb(back), d)


def test_quant_state_json():
  w4 = jlowbit.quantize_4bit(_normal((3, 128), "bfloat16"), block_size=64,
                             compress_statistics=True)
  d = jlowbit.to_bnb(w4)
  text = d["quant_state.bitsandbytes__nf4"].tobytes().decode("utf-8")
  offset = float(np.float32(w4.offset))
  assert text == (
      '{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", '
      f'"shape": [3, 128], "nested_blocksize": 256, "nested_dtype": "float32", '
      f'"nested_offset": {offset!r}}}')
  plain = jlowbit.to_bnb(jlowbit.quantize_4bit(jnp.ones((2, 5)), quant_type="fp4"))
  assert plain["quant_state.bitsandbytes__fp4"].tobytes() == (
      b'{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [2, 5]}')


def test_hand_built_bnb_dict_loads_and_dequantizes():
  codes = np.arange(128) % 16
  absmax = np.array([2.0, 0.5], np.float32)
  state = {
      "weight": _pack_by_hand(codes).reshape(-1, 1),
      "absmax": absmax,
      "quant_map": BNB_NF4,
      "quant_state.bitsandbytes__nf4": _json_bytes(
          '{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", '
          '"shape": [2, 64]}'),
  }
  w4 = jlowbit.from_bnb(state)
  assert w4.shape == (2, 64) and w4.quant_type == "nf4" and not w4.nested
  expected = (BNB_NF4[codes] * np.repeat(absmax, 64)).reshape(2, 64)
  np.testing.assert_array_equal(jlowbit.dequantize_4bit(w4), expected)
  _assert_same_dict(jlowbit.to_bnb(w4), state)
  # Quantizing the same values reproduces the checkpoint.
  _assert_same_dict(jlowbit.to_bnb(jlowbit.quantize_4bit(jnp.asarray(expected))),
                    state)


def test_hand_built_nested_fp4_dict():
  codes = (np.arange(3 * 64) * 7) % 16
  absmax_codes = np.array([200, 17, 255], np.uint8)
  dynamic = codebooks.dynamic(True)
  state = {
      "weight": _pack_by_hand(codes).reshape(-1, 1),
      "absmax": absmax_codes,
      "quant_map": BNB_FP4,
      "nested_absmax": np.array([0.5], np.float32),
      "nested_quant_map": dynamic.copy(),
      "quant_state.bitsandbytes__fp4": _json_bytes(
          '{"quant_type": "fp4", "blocksize": 64, "dtype": "float16", '
          '"shape": [3, 64], "nested_blocksize": 256, "nested_dtype": '
          '"float32", "nested_offset": 1.25}'),
  }
  w4 = jlowbit.from_bnb(state)
  assert w4.nested and w4.absmax.block_size == 256 and w4.dtype == "float16"
  absmax = dynamic[absmax_codes] * np.float32(0.5) + np.float32(1.25)
  expected = (BNB_FP4[codes] * np.repeat(absmax, 64)).reshape(3, 64)
  y = jlowbit.dequantize_4bit(w4)
  assert y.dtype == jnp.float16
  np.testing.assert_array_equal(y, expected.astype(np.float16))
  _assert_same_dict(jlowbit.to_bnb(w4), state)


def test_prefix_reads_one_weight_of_a_checkpoint():
  w_a = jlowbit.quantize_4bit(_normal((4, 64), seed=1))
  w_b = jlowbit.quantize_4bit(_normal((2, 32), seed=2), quant_type="fp4",
                              compress_statistics=True)
  checkpoint = {
      **jlowbit.to_bnb(w_a, prefix="model.layers.0.q_proj.weight"),
      **jlowbit.to_bnb(w_b, prefix="model.layers.0.k_proj.weight"),
      "model.layers.0.q_proj.bias": np.zeros(4, np.float32),
  }
  assert "model.layers.0.q_proj.weight" in checkpoint
  assert "model.layers.0.q_proj.weight.absmax" in checkpoint
  assert "model.layers.0.k_proj.weight.quant_state.bitsandbytes__fp4" in checkpoint
  _assert_same_quantized(
      jlowbit.from_bnb(checkpoint, prefix="model.layers.0.q_proj.weight"), w_a)
  _assert_same_quantized(
      jlowbit.from_bnb(checkpoint, prefix="model.layers.0.k_proj.weight"), w_b)


def test_accepts_jax_arrays():
  w4 = jlowbit.quantize_4bit(_normal((3, 64)), compress_statistics=True)
  d = {k: jnp.asarray(v) for k, v in jlowbit.to_bnb(w4).items()}
  _assert_same_quantized(jlowbit.from_bnb(d), w4)


def _state(nested=False, **kwargs):
  w4 = jlowbit.quantize_4bit(_normal((3, 64)), compress_statistics=nested, **kwargs)
  return jlowbit.to_bnb(w4)


def _with_json(state, **changes):
  key = "quant_state.bitsandbytes__nf4"
  meta = json.loads(state[key].tobytes())
  meta.update(changes)
  meta = {k: v for k, v in meta.items() if v is not None}
  return {**state, key: _json_bytes(json.dumps(meta))}


def _rename(state, old, new):
  return {new if k == old else k: v for k, v in state.items()}


def _without(state, key):
  return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize("make_state, exc, match", [
    (lambda: _without(_state(), "quant_state.bitsandbytes__nf4"), KeyError,
     r"expected exactly one key quant_state.bitsandbytes__<nf4\|fp4>.*none"),
    (lambda: _rename(_state(), "quant_state.bitsandbytes__nf4",
                     "quant_state.bitsandbytes__int4"), ValueError,
     r"quant_type='int4' .*'nf4', 'fp4'"),
    (lambda: {**_state(), "quant_state.bitsandbytes__fp4": np.zeros(2, np.uint8)},
     KeyError, r"expected exactly one key"),
    (lambda: _rename(_state(), "quant_state.bitsandbytes__nf4", "quant_state.x"),
     KeyError, r"not a bitsandbytes quant state key"),
    (lambda: _without(_state(), "weight"), KeyError, r"missing key 'weight'"),
    (lambda: _without(_state(), "absmax"), KeyError, r"missing key 'absmax'"),
    (lambda: _without(_state(), "quant_map"), KeyError, r"missing key 'quant_map'"),
    (lambda: _without(_state(True), "nested_quant_map"), KeyError,
     r"missing key 'nested_quant_map'"),
    (lambda: {**_state(), "absmax": np.ones(4, np.float32)}, ValueError,
     r"absmax is float32\[4\], expected float32\[3\]"),
    (lambda: {**_state(True), "absmax": np.ones(3, np.float32)}, ValueError,
     r"absmax is float32\[3\], expected uint8\[3\]"),
    (lambda: {**_state(), "weight": np.zeros((95, 1), np.uint8)}, ValueError,
     r"weight holds 95 bytes; a weight of 192 elements needs 96"),
    (lambda: _with_json(_state(), shape=None), KeyError, r"lacks shape"),
    (lambda: _with_json(_state(), dtype="torch.bfloat16"), ValueError,
     r"\['dtype'\]='torch.bfloat16' .*'float32', 'bfloat16', 'float16'"),
    (lambda: _with_json(_state(), quant_type="fp4"), ValueError,
     r"\['quant_type'\]='fp4' .*'nf4'"),
    (lambda: _with_json(_state(), blocksize=48), ValueError,
     r"\['blocksize'\]=48"),
    (lambda: _with_json(_state(True), nested_offset=None), KeyError,
     r"lacks nested_offset"),
    (lambda: {**_state(), "weight": np.zeros((96, 1), np.int32)}, TypeError,
     r"quant_storage=int32"),
])
def test_from_bnb_errors(make_state, exc, match):
  with pytest.raises(exc, match=match):
    jlowbit.from_bnb(make_state())


def _with_raw_json(state, raw):
  return {**state, "quant_state.bitsandbytes__nf4": np.frombuffer(raw, np.uint8).copy()}


# Regression: these leaked JSONDecodeError / UnicodeDecodeError / TypeError,
# or (shapes) were accepted.
@pytest.mark.parametrize("make_state, match", [
    (lambda: _with_raw_json(_state(), b"not json"),
     r"quant_state.bitsandbytes__nf4 is not valid JSON"),
    (lambda: _with_raw_json(_state(), b'{"quant_type": "nf4", "blocksize'),
     r"quant_state.bitsandbytes__nf4 is not valid JSON"),
    (lambda: _with_raw_json(_state(), b"\xff\xfe{}"),
     r"quant_state.bitsandbytes__nf4 is not UTF-8 text"),
    (lambda: _with_raw_json(_state(), b'["nf4", 64]'),
     r"quant_state.bitsandbytes__nf4 must hold a JSON object, got list"),
    (lambda: _with_json(_state(), shape=[-32, -64]),
     r"\['shape'\]=\[-32, -64\] must be a list of non-negative integers"),
    (lambda: _with_json(_state(), shape=[32.7, 64]),
     r"\['shape'\]=\[32.7, 64\] must be a list of non-negative integers"),
    (lambda: _with_json(_state(), shape="3x64"),
     r"\['shape'\]='3x64' must be a list"),
    (lambda: _with_json(_state(), blocksize=64.0),
     r"\['blocksize'\]=64.0 must be an integer"),
    (lambda: _with_json(_state(True), nested_offset="1.5"),
     r"\['nested_offset'\]='1.5' must be a number"),
    (lambda: _with_json(_state(True), nested_blocksize=100),
     r"\['nested_blocksize'\]=100 is not supported"),
])
def test_from_bnb_malformed_quant_state(make_state, match):
  with pytest.raises(ValueError, match=match):
    jlowbit.from_bnb(make_state())



def test_truncated_bitsandbytes_storage_is_rejected():
  # bitsandbytes allocates (n + 1) // (2 * itemsize) storage elements, which
  # drops the tail when that does not divide: 5 elements in bfloat16 -> 1.
  w4 = jlowbit.quantize_4bit(_normal((5,)), quant_storage=jnp.bfloat16)
  state = jlowbit.to_bnb(w4)
  assert state["weight"].shape == (2, 1)
  with pytest.raises(ValueError, match=r"weight holds 2 bytes; .*needs 3"):
    jlowbit.from_bnb({**state, "weight": state["weight"][:1]})


def test_to_bnb_errors():
  with pytest.raises(TypeError, match=r"w4 must be a Quantized4bit"):
    jlowbit.to_bnb(jnp.ones(3))
