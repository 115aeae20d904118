"""Hugging Face checkpoints of bitsandbytes 4-bit models: synthetic checkpoints
written with jlowbit itself (quantize_4bit, to_bnb, safetensors.numpy)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from safetensors.numpy import save_file

import jlowbit
from jlowbit import checkpoints

QUANTIZED = ("model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.mlp.down_proj.weight",
             "model.layers.1.mlp.up_proj.weight")


def _normal(shape, dtype="bfloat16", seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _model(quant_type="nf4", nested=True, storage="uint8"):
  """{name: Quantized4bit | jax array}: 4-bit linears, bf16 embeddings / norms."""
  tensors = {
      "model.embed_tokens.weight": _normal((32, 16), seed=1),
      "model.norm.weight": jnp.ones((16,), jnp.bfloat16),
      "model.layers.0.input_layernorm.weight": _normal((16,), "float32", seed=2),
      "lm_head.weight": _normal((32, 16), "float16", seed=3),
      "step": jnp.array([3, 4], jnp.int32),
  }
  for i, name in enumerate(QUANTIZED):
    shape = (24, 16) if i != 1 else (9, 7)  # (9, 7): odd size, partial block
    tensors[name] = jlowbit.quantize_4bit(
        _normal(shape, seed=10 + i), block_size=64, quant_type=quant_type,
        compress_statistics=nested, quant_storage=storage)
  return tensors


def _qc(quant_type="nf4", nested=True, storage="uint8", **kw):
  qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": nested,
        "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": storage,
        "llm_int8_skip_modules": ["lm_head"]}
  qc.update(kw)
  return qc


def _state_dict(tensors):
  out = {}
  for name, value in tensors.items():
    if isinstance(value, jlowbit.Quantized4bit):
      out.update(jlowbit.to_bnb(value, prefix=name))
    else:
      out[name] = np.asarray(value)
  return out


def _write(path, tensors=None, config=None, state=None, **qc_kw):
  """A checkpoint written by hand (not with save_bnb_checkpoint)."""
  path.mkdir(parents=True, exist_ok=True)
  state = _state_dict(tensors if tensors is not None else _model()) if state is None else state
  save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
  if config is None:
    config = {"model_type": "llama", "hidden_size": 16,
              "quantization_config": _qc(**qc_kw)}
  (path / "config.json").write_text(json.dumps(config))
  return path


def _raw(path):
  """Every tensor of a checkpoint dir: {name: (dtype string, shape, bytes)}."""
  files = sorted(path.glob("*.safetensors"))
  out = {}
  for file in files:
    for name, entry in safetensors.deserialize(file.read_bytes()):
      assert name not in out
      out[name] = (entry["dtype"], list(entry["shape"]), bytes(entry["data"]))
  return out


def _assert_same_tree(got, want):
  assert list(sorted(got)) == list(sorted(want))
  for name in want:
    a, b = got[name], want[name]
    assert type(a) is type(b) or not isinstance(b, jlowbit.Quantized4bit), name
    assert jax.tree.structure(a) == jax.tree.structure(b), name
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert x.dtype == y.dtype and x.shape == y.shape, name
      assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), name


@pytest.mark.parametrize("quant_type, nested, storage", [
    ("nf4", True, "uint8"), ("fp4", False, "uint8"), ("nf4", False, "bfloat16"),
    ("fp4", True, "float32")])
def test_load_gives_the_original_weights(tmp_path, quant_type, nested, storage):
  tensors = _model(quant_type, nested, storage)
  _write(tmp_path, tensors, quant_type=quant_type, nested=nested, storage=storage)
  loaded, config = jlowbit.load_bnb_checkpoint(tmp_path)
  _assert_same_tree(loaded, tensors)
  assert config["quantization_config"]["bnb_4bit_quant_type"] == quant_type
  for name in QUANTIZED:
    assert isinstance(loaded[name], jlowbit.Quantized4bit)
    np.testing.assert_array_equal(jlowbit.dequantize_4bit(loaded[name]),
                                  jlowbit.dequantize_4bit(tensors[name]))


def test_bfloat16_tensors_load_as_jax_bfloat16(tmp_path):
  _write(tmp_path)
  loaded, _ = jlowbit.load_bnb_checkpoint(tmp_path)
  embed = loaded["model.embed_tokens.weight"]
  assert isinstance(embed, jax.Array) and embed.dtype == jnp.bfloat16
  np.testing.assert_array_equal(embed, _normal((32, 16), seed=1))
  assert loaded["lm_head.weight"].dtype == jnp.float16
  assert loaded["step"].dtype == jnp.int32
  assert loaded["model.norm.weight"].dtype == jnp.bfloat16


@pytest.mark.parametrize("max_shard_size", [None, 1000, 1])
def test_save_of_load_is_byte_exact(tmp_path, max_shard_size):
  src = _write(tmp_path / "src")
  loaded, config = jlowbit.load_bnb_checkpoint(src)
  jlowbit.save_bnb_checkpoint(tmp_path / "dst", loaded, config,
                              max_shard_size=max_shard_size)
  assert _raw(tmp_path / "dst") == _raw(src)
  assert json.loads((tmp_path / "dst" / "config.json").read_text()) == config
  again, config2 = jlowbit.load_bnb_checkpoint(tmp_path / "dst")
  _assert_same_tree(again, loaded)
  assert config2 == config


def test_sharded_layout_is_transformers(tmp_path):
  tensors = _model()
  jlowbit.save_bnb_checkpoint(tmp_path, tensors, {"model_type": "llama"},
                              max_shard_size=1500)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
  assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                    for i in range(1, len(shards) + 1)]
  raw = _raw(tmp_path)
  assert set(index["weight_map"]) == set(raw)
  assert index["metadata"]["total_size"] == sum(len(v[2]) for v in raw.values())
  for name in QUANTIZED:  # a 4-bit weight's entries share one shard
    files = {f for k, f in index["weight_map"].items() if k.startswith(name)}
    assert len(files) == 1, name
  for shard in shards:
    with safetensors.safe_open(str(tmp_path / shard), framework="numpy") as f:
      assert f.metadata() == {"format": "pt"}
  loaded, _ = jlowbit.load_bnb_checkpoint(tmp_path)
  _assert_same_tree(loaded, tensors)
  # Saving again single-file removes the shards and the index.
  jlowbit.save_bnb_checkpoint(tmp_path, tensors, {"model_type": "llama"})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json",
                                                        "model.safetensors"]


def test_save_adds_a_quantization_config(tmp_path):
  tensors = _model("fp4", nested=False)
  jlowbit.save_bnb_checkpoint(tmp_path, tensors, {"model_type": "llama"})
  qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
  assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True
  assert qc["bnb_4bit_quant_type"] == "fp4"
  assert qc["bnb_4bit_use_double_quant"] is False
  assert qc["bnb_4bit_quant_storage"] == "uint8"
  assert qc["bnb_4bit_compute_dtype"] == "bfloat16"
  jlowbit.load_bnb_checkpoint(tmp_path)  # and it validates


def test_save_without_4bit_weights_adds_no_quantization_config(tmp_path):
  jlowbit.save_bnb_checkpoint(tmp_path, {"w": jnp.ones((3,), jnp.bfloat16)},
                              {"model_type": "llama"})
  assert "quantization_config" not in json.loads(
      (tmp_path / "config.json").read_text())
  loaded, _ = jlowbit.load_bnb_checkpoint(tmp_path)
  assert loaded["w"].dtype == jnp.bfloat16


def test_save_refuses_mixed_weights_without_a_config(tmp_path):
  tensors = {"a.weight": jlowbit.quantize_4bit(_normal((8, 8)), quant_type="nf4"),
             "b.weight": jlowbit.quantize_4bit(_normal((8, 8)), quant_type="fp4")}
  with pytest.raises(ValueError, match="differ in quant_type"):
    jlowbit.save_bnb_checkpoint(tmp_path, tensors, {})


def test_save_checks_the_callers_quantization_config(tmp_path):
  with pytest.raises(ValueError, match="bnb_4bit_quant_type='fp4'.*is nf4"):
    jlowbit.save_bnb_checkpoint(tmp_path, _model(),
                                {"quantization_config": _qc("fp4")})


def test_save_refuses_colliding_names(tmp_path):
  tensors = _model()
  name = QUANTIZED[0]
  tensors[name + ".absmax"] = jnp.zeros((3,))
  with pytest.raises(ValueError, match="collides"):
    jlowbit.save_bnb_checkpoint(tmp_path, tensors, {})


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_save_checks_max_shard_size(tmp_path, bad):
  with pytest.raises(ValueError, match="max_shard_size"):
    jlowbit.save_bnb_checkpoint(tmp_path, {}, {}, max_shard_size=bad)


# --- config validation -------------------------------------------------------


@pytest.mark.parametrize("qc_kw, match", [
    ({"quant_type": "fp4"}, r"bnb_4bit_quant_type='fp4', but .*_proj.weight' is nf4"),
    ({"nested": False}, r"bnb_4bit_use_double_quant=False, but .* has double"),
    ({"storage": "bfloat16"}, r"bnb_4bit_quant_storage='bfloat16'.*stored as uint8"),
    ({"llm_int8_skip_modules": ["mlp"]}, r"skip_modules lists 'mlp'.*down_proj"),
    ({"load_in_4bit": False}, "lacks load_in_4bit"),
    ({"load_in_8bit": True}, "8-bit"),
    ({"quant_method": "gptq"}, "quant_method='gptq'"),
    ({"bnb_4bit_compute_dtype": "float64"}, "bnb_4bit_compute_dtype"),
])
def test_config_contradicting_the_weights(tmp_path, qc_kw, match):
  _write(tmp_path, **qc_kw)
  with pytest.raises(ValueError, match=match) as info:
    jlowbit.load_bnb_checkpoint(tmp_path)
  assert "config.json" in str(info.value)


def test_config_defaults_are_transformers(tmp_path):
  # Absent keys mean fp4, no double quant, uint8 storage.
  config = {"quantization_config": {"quant_method": "bitsandbytes",
                                    "_load_in_4bit": True}}
  _write(tmp_path, _model("fp4", nested=False), config=config)
  jlowbit.load_bnb_checkpoint(tmp_path)
  _write(tmp_path, _model("nf4", nested=False), config=config)
  with pytest.raises(ValueError, match="bnb_4bit_quant_type='fp4'"):
    jlowbit.load_bnb_checkpoint(tmp_path)


def test_config_says_4bit_but_no_4bit_weight(tmp_path):
  _write(tmp_path, {"w": jnp.ones((4,))})
  with pytest.raises(ValueError, match="holds no 4-bit weight"):
    jlowbit.load_bnb_checkpoint(tmp_path)


def test_without_quantization_config_loads(tmp_path):
  _write(tmp_path, config={"model_type": "llama"})
  loaded, config = jlowbit.load_bnb_checkpoint(tmp_path)
  assert "quantization_config" not in config
  assert jlowbit.bnb_quantization_config(loaded)["bnb_4bit_quant_type"] == "nf4"


# --- errors naming the file / key ---------------------------------------------


def test_missing_directory_config_and_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    jlowbit.load_bnb_checkpoint(tmp_path / "nowhere")
  path = _write(tmp_path / "a")
  (path / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    jlowbit.load_bnb_checkpoint(path)
  path = _write(tmp_path / "b")
  (path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    jlowbit.load_bnb_checkpoint(path)


def test_invalid_config_json(tmp_path):
  path = _write(tmp_path)
  (path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    jlowbit.load_bnb_checkpoint(path)
  (path / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="config.json must hold a JSON object"):
    jlowbit.load_bnb_checkpoint(path)


def test_index_naming_a_missing_shard(tmp_path):
  jlowbit.save_bnb_checkpoint(tmp_path, _model(), {}, max_shard_size=1000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  shard = sorted(set(index["weight_map"].values()))[-1]
  (tmp_path / shard).unlink()
  with pytest.raises(FileNotFoundError, match=f"names shard '{shard}'"):
    jlowbit.load_bnb_checkpoint(tmp_path)


def test_index_inconsistent_with_shards(tmp_path):
  jlowbit.save_bnb_checkpoint(tmp_path, _model(), {}, max_shard_size=1000)
  index_file = tmp_path / "model.safetensors.index.json"
  index = json.loads(index_file.read_text())
  index["weight_map"]["ghost.weight"] = index["weight_map"]["model.norm.weight"]
  index_file.write_text(json.dumps(index))
  with pytest.raises(ValueError, match="lists tensors its shards lack: 'ghost.weight'"):
    jlowbit.load_bnb_checkpoint(tmp_path)
  del index["weight_map"]["ghost.weight"]
  del index["weight_map"]["model.norm.weight"]
  index_file.write_text(json.dumps(index))
  with pytest.raises(ValueError, match="holds tensor 'model.norm.weight'.*to no shard"):
    jlowbit.load_bnb_checkpoint(tmp_path)
  index_file.write_text("{}")
  with pytest.raises(ValueError, match="weight_map"):
    jlowbit.load_bnb_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "header"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
  path = _write(tmp_path)
  file = path / "model.safetensors"
  data = file.read_bytes()
  if damage == "truncate":
    data = data[:-100]
  elif damage == "garbage":
    data = b"\x00\x01" * 50
  elif damage == "empty":
    data = b""
  else:  # a header length pointing past the end
    data = (10**6).to_bytes(8, "little") + data[8:]
  file.write_bytes(data)
  with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors"):
    jlowbit.load_bnb_checkpoint(path)


def test_quant_state_that_does_not_parse(tmp_path):
  state = _state_dict(_model())
  key = QUANTIZED[1] + ".quant_state.bitsandbytes__nf4"
  state[key] = np.frombuffer(b'{"quant_type": "nf4", "blocksi', np.uint8).copy()
  _write(tmp_path, state=state)
  with pytest.raises(ValueError, match=f"model.safetensors.*{key} is not valid JSON"):
    jlowbit.load_bnb_checkpoint(tmp_path)


def test_4bit_weight_missing_a_statistic(tmp_path):
  state = _state_dict(_model())
  del state[QUANTIZED[0] + ".quant_map"]
  _write(tmp_path, state=state)
  with pytest.raises(ValueError, match=f"{QUANTIZED[0]}.quant_map"):
    jlowbit.load_bnb_checkpoint(tmp_path)


def test_two_quant_states_for_one_weight(tmp_path):
  state = _state_dict(_model())
  key = QUANTIZED[0] + ".quant_state.bitsandbytes__"
  state[key + "fp4"] = state[key + "nf4"]
  _write(tmp_path, state=state)
  with pytest.raises(ValueError, match="two quant states"):
    jlowbit.load_bnb_checkpoint(tmp_path)


@pytest.mark.parametrize("stat", ["absmax", "quant_map", "nested_absmax",
                                  "nested_quant_map"])
def test_orphan_statistics(tmp_path, stat):
  state = _state_dict(_model())
  state["x.weight"] = np.zeros((4, 1), np.uint8)
  state[f"x.weight.{stat}"] = np.zeros((3,), np.float32)
  _write(tmp_path, state=state)
  with pytest.raises(ValueError, match=f"'x.weight.{stat}' is a bitsandbytes "
                     "statistic without its quant state"):
    jlowbit.load_bnb_checkpoint(tmp_path)


def test_orphan_quant_state_with_unknown_suffix(tmp_path):
  state = _state_dict(_model())
  state["x.weight.quant_state.other"] = np.zeros((3,), np.uint8)
  _write(tmp_path, state=state)
  with pytest.raises(ValueError, match="x.weight.quant_state.other"):
    jlowbit.load_bnb_checkpoint(tmp_path)


def test_read_safetensors_loads_bf16_and_64bit(tmp_path):
  import ml_dtypes
  file = tmp_path / "t.safetensors"
  save_file({"b": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16),
             "d": np.arange(3, dtype=np.float64), "i": np.arange(2, dtype=np.int64)},
            str(file))
  got = checkpoints.read_safetensors(file)
  assert got["b"].dtype == jnp.bfloat16 and got["d"].dtype == np.float64
  # 64-bit types stay numpy (JAX would narrow them without x64).
  (tmp_path / "config.json").write_text("{}")
  file.rename(tmp_path / "model.safetensors")
  loaded, _ = jlowbit.load_bnb_checkpoint(tmp_path)
  assert isinstance(loaded["b"], jax.Array) and loaded["b"].dtype == jnp.bfloat16
  assert loaded["d"].dtype == np.float64 and loaded["i"].dtype == np.int64
  jlowbit.save_bnb_checkpoint(tmp_path / "again", loaded, {})
  assert _raw(tmp_path / "again") == _raw(tmp_path)


# --- checkpoints written by transformers + bitsandbytes ------------------------
# tests/fixtures/make_hf_llama_4bit.py writes them (on a GPU); skipped until then.

HF_DATA = __import__("pathlib").Path(__file__).parent / "data" / "hf_llama"


@pytest.mark.skipif(not (HF_DATA / "llama_nf4_dq").is_dir(),
                    reason="run tests/fixtures/make_hf_llama_4bit.py tests/data/hf_llama")
@pytest.mark.parametrize("variant, quant_type, nested", [
    ("llama_nf4_dq", "nf4", True), ("llama_fp4", "fp4", False)])
def test_transformers_checkpoint(tmp_path, variant, quant_type, nested):
  loaded, config = jlowbit.load_bnb_checkpoint(HF_DATA / variant)
  qc = config["quantization_config"]
  assert qc["bnb_4bit_quant_type"] == quant_type
  assert qc["bnb_4bit_use_double_quant"] is nested
  reference = np.load(HF_DATA / f"{variant}.npz")
  dequant = {k[len("dequant/"):]: reference[k] for k in reference.files
             if k.startswith("dequant/")}
  assert sorted(dequant) == sorted(k for k, v in loaded.items()
                                   if isinstance(v, jlowbit.Quantized4bit))
  assert len(dequant) == 2 * 7  # q, k, v, o, gate, up, down per layer
  for name, want in dequant.items():
    w4 = loaded[name]
    assert w4.quant_type == quant_type and w4.nested is nested
    got = np.asarray(jlowbit.dequantize_4bit(w4), np.float32)
    eps = float(jnp.finfo(jnp.dtype(w4.dtype)).eps)
    np.testing.assert_allclose(got, want, rtol=eps, atol=0, err_msg=name)
  assert isinstance(loaded["lm_head.weight"], jax.Array)  # kept unquantized
  jlowbit.save_bnb_checkpoint(tmp_path, loaded, config)
  assert _raw(tmp_path) == _raw(HF_DATA / variant)


@pytest.mark.skipif(not (HF_DATA / "llama_float").is_dir(),
                    reason="run tests/fixtures/make_hf_llama_4bit.py tests/data/hf_llama")
def test_transformers_float_checkpoint():
  loaded, config = jlowbit.load_bnb_checkpoint(HF_DATA / "llama_float")
  assert "quantization_config" not in config
  assert all(v.dtype == jnp.float32 for v in loaded.values())
  assert loaded["model.embed_tokens.weight"].shape == (256, 64)


def test_load_tiled_keeps_the_checkpoint_bytes(tmp_path):
  tensors = _model()
  fits = "model.layers.0.mlp.down_proj.weight"
  tensors[fits] = jlowbit.quantize_4bit(_normal((32, 128), seed=20),
                                        compress_statistics=True)
  src = _write(tmp_path / "src", tensors)
  loaded, config = jlowbit.load_bnb_checkpoint(src, layout="tiled")
  # (32, 128) fits the tiled layout; the (24, 16) weights do not.
  assert {name: loaded[name].layout for name in QUANTIZED} == {
      name: "tiled" if name == fits else "bnb" for name in QUANTIZED}
  jlowbit.save_bnb_checkpoint(tmp_path / "dst", loaded, config)
  assert _raw(tmp_path / "dst") == _raw(src)
  with pytest.raises(ValueError, match=r"layout='rows' is not supported"):
    jlowbit.load_bnb_checkpoint(src, layout="rows")
