"""Hugging Face checkpoints of bitsandbytes 4-bit models (safetensors).

A checkpoint directory, as ``transformers``' ``save_pretrained`` writes it for
a model loaded with ``BitsAndBytesConfig(load_in_4bit=True, ...)``::

  config.json                     the model config, with "quantization_config"
  model.safetensors               every tensor, or sharded:
  model.safetensors.index.json    {"metadata": {"total_size": N},
                                   "weight_map": {name: shard file}}
  model-00001-of-0000K.safetensors ...

Each 4-bit weight is stored as its packed bytes under its own key plus its
statistics under ``<key>.absmax``, ``<key>.quant_map``, (double quantization)
``<key>.nested_absmax``, ``<key>.nested_quant_map`` and the JSON
``<key>.quant_state.bitsandbytes__<nf4|fp4>`` (:mod:`jlowbit.bnb_format`).

:func:`load_bnb_checkpoint` returns a flat ``{name: value}`` dict in which
each 4-bit weight is one :class:`jlowbit.Quantized4bit` and every other
tensor a JAX array in its stored dtype (bfloat16 included, without torch);
:func:`save_bnb_checkpoint` is its inverse, tensor bytes and dtypes exact.

The ``quantization_config`` of ``config.json`` is checked against the
weights (quant type, double quantization, quant storage, skipped modules);
:func:`bnb_quantization_config` derives one from the weights.
"""

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlowbit import _tiling
from jlowbit import _validation as val
from jlowbit import bnb_format
from jlowbit import quant4

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# The statistics bnb_format writes next to a weight's own key.
_STAT_NAMES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_STATE_MARK = "." + bnb_format.STATE_PREFIX

# safetensors dtype strings -> numpy dtypes (bfloat16 / float8: ml_dtypes'
# types, which are JAX's).
_DTYPES = {
    "BOOL": np.dtype(bool),
    "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(jnp.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(jnp.float8_e4m3fn), "F8_E5M2": np.dtype(jnp.float8_e5m2),
    "C64": np.dtype(np.complex64),
}

# transformers' BitsAndBytesConfig defaults for the keys checked here.
_QC_DEFAULTS = {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
                "bnb_4bit_quant_storage": "uint8"}


# ---------------------------------------------------------------------------
# safetensors files


def read_safetensors(file: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of one safetensors file as numpy arrays, in stored dtype.

  Parsed with ``safetensors.deserialize`` (the raw bytes of each tensor) and
  viewed with this module's dtype table, so bfloat16 and float8 tensors load
  as ml_dtypes (JAX) arrays with any safetensors version and without torch.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not valid safetensors (truncated, corrupt) or
      holds a dtype numpy cannot represent; the message names the file.
  """
  import safetensors  # pylint: disable=import-outside-toplevel

  file = pathlib.Path(file)
  if not file.is_file():
    raise FileNotFoundError(f"safetensors file {file} does not exist")
  data = file.read_bytes()
  try:
    entries = safetensors.deserialize(data)
  except Exception as e:  # safetensors' SafetensorError and friends
    raise ValueError(f"{file} is not a valid safetensors file "
                     f"({type(e).__name__}: {e})") from e
  out = {}
  for name, entry in sorted(entries, key=lambda item: item[0]):
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
      raise ValueError(f"{file}: tensor {name!r} has dtype {entry['dtype']}, "
                       f"which jlowbit cannot load; supported: "
                       f"{', '.join(_DTYPES)}")
    out[name] = np.frombuffer(entry["data"], dtype).reshape(entry["shape"])
  return out


def _write_safetensors(file: pathlib.Path, tensors: Mapping[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  # transformers refuses safetensors files without metadata format "pt".
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file),
            metadata={"format": "pt"})


def _read_json(file: pathlib.Path, what: str) -> dict:
  if not file.is_file():
    raise FileNotFoundError(f"{what} {file} does not exist")
  try:
    value = json.loads(file.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{file} must hold a JSON object, got "
                     f"{type(value).__name__}")
  return value


def _read_weights(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, pathlib.Path]]:
  """All tensors of the checkpoint and the file each came from."""
  single, index_file = path / WEIGHTS_NAME, path / INDEX_NAME
  if single.is_file():
    tensors = read_safetensors(single)
    return tensors, dict.fromkeys(tensors, single)
  if not index_file.is_file():
    raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor "
                            f"{INDEX_NAME}")
  index = _read_json(index_file, "index")
  weight_map = index.get("weight_map")
  if not isinstance(weight_map, dict) or not all(
      isinstance(v, str) for v in weight_map.values()):
    raise ValueError(f"{index_file}: 'weight_map' must be an object of "
                     "tensor name -> shard file name")
  tensors, source = {}, {}
  for shard_name in sorted(set(weight_map.values())):
    shard = path / shard_name
    if not shard.is_file():
      raise FileNotFoundError(f"{index_file} names shard {shard_name!r}, which "
                              f"does not exist in {path}")
    for name, value in read_safetensors(shard).items():
      if weight_map.get(name) != shard_name:
        where = (f"to {weight_map[name]!r}" if name in weight_map
                 else "to no shard")
        raise ValueError(f"{shard} holds tensor {name!r}, which {index_file} "
                         f"assigns {where}")
      tensors[name], source[name] = value, shard
  missing = sorted(set(weight_map) - set(tensors))
  if missing:
    raise ValueError(f"{index_file} lists tensors its shards lack: "
                     f"{missing[0]!r} (in {weight_map[missing[0]]!r})"
                     + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
  return tensors, source


# ---------------------------------------------------------------------------
# quantization_config


def _qc_get(qc: Mapping[str, Any], key: str) -> Any:
  if key in qc and qc[key] is not None:
    return qc[key]
  return _QC_DEFAULTS.get(key)


def _load_in(qc: Mapping[str, Any], bits: int) -> bool:
  value = qc.get(f"load_in_{bits}bit", qc.get(f"_load_in_{bits}bit", False))
  return bool(value)


def _module_of(weight_name: str) -> str:
  return weight_name.rsplit(".", 1)[0] if "." in weight_name else ""


def _in_module(module: str, skip: str) -> bool:
  """Whether ``module`` is ``skip`` or lies below / at a path ending in it."""
  return f".{skip}." in f".{module}."


def _quantized(tensors: Mapping[str, Any]) -> dict[str, quant4.Quantized4bit]:
  return {k: v for k, v in tensors.items() if isinstance(v, quant4.Quantized4bit)}


def check_quantization_config(qc: Any, tensors: Mapping[str, Any],
                              where: str = CONFIG_NAME) -> None:
  """Raises ValueError unless ``qc`` (a transformers ``quantization_config``
  dict) describes the 4-bit weights of ``tensors``.

  Checked: ``quant_method`` is ``"bitsandbytes"`` and ``load_in_4bit`` is set
  exactly when there are 4-bit weights (8-bit checkpoints are not supported);
  each weight's quant type, double quantization and quant storage against
  ``bnb_4bit_quant_type`` / ``bnb_4bit_use_double_quant`` /
  ``bnb_4bit_quant_storage`` (transformers' defaults when absent: fp4, False,
  uint8); ``bnb_4bit_compute_dtype`` is a float dtype name or absent; no
  4-bit weight lies in a module of ``llm_int8_skip_modules``.
  """
  if not isinstance(qc, Mapping):
    raise ValueError(f"{where}: quantization_config must be an object, got "
                     f"{type(qc).__name__}")
  weights = _quantized(tensors)
  method = qc.get("quant_method")
  if method != "bitsandbytes":
    if weights:
      raise ValueError(f"{where}: quantization_config quant_method={method!r}, "
                       f"but {next(iter(weights))!r} is a bitsandbytes 4-bit "
                       "weight (expected 'bitsandbytes')")
    return
  if _load_in(qc, 8):
    raise ValueError(f"{where}: quantization_config has load_in_8bit=true; "
                     "8-bit (LLM.int8) checkpoints are not supported, only 4-bit")
  if not _load_in(qc, 4):
    if weights:
      raise ValueError(f"{where}: quantization_config lacks load_in_4bit=true, "
                       f"but {next(iter(weights))!r} is a 4-bit weight")
    return
  if not weights:
    raise ValueError(f"{where}: quantization_config has load_in_4bit=true, "
                     "but the checkpoint holds no 4-bit weight")
  compute = qc.get("bnb_4bit_compute_dtype")
  if compute is not None:
    val.check_choice(compute, f"{where}: bnb_4bit_compute_dtype",
                     val.FLOAT_DTYPE_NAMES)
  quant_type = _qc_get(qc, "bnb_4bit_quant_type")
  double = _qc_get(qc, "bnb_4bit_use_double_quant")
  storage = _qc_get(qc, "bnb_4bit_quant_storage")
  skip = qc.get("llm_int8_skip_modules") or ()
  if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
    raise ValueError(f"{where}: llm_int8_skip_modules={skip!r} must be a list "
                     "of module names")
  for name, w4 in weights.items():
    if w4.quant_type != quant_type:
      raise ValueError(f"{where}: quantization_config bnb_4bit_quant_type="
                       f"{quant_type!r}, but {name!r} is {w4.quant_type}")
    if w4.nested != bool(double):
      raise ValueError(f"{where}: quantization_config bnb_4bit_use_double_quant="
                       f"{double!r}, but {name!r} "
                       f"{'has' if w4.nested else 'lacks'} double-quantized "
                       "statistics")
    if w4.quant_storage != storage:
      raise ValueError(f"{where}: quantization_config bnb_4bit_quant_storage="
                       f"{storage!r}, but {name!r} is stored as "
                       f"{w4.quant_storage}")
    module = _module_of(name)
    for s in skip:
      if _in_module(module, s):
        raise ValueError(f"{where}: quantization_config llm_int8_skip_modules "
                         f"lists {s!r}, but {name!r} is a 4-bit weight")


def bnb_quantization_config(tensors: Mapping[str, Any], *,
                            compute_dtype: str | None = None,
                            skip_modules: list[str] | None = None) -> dict | None:
  """The transformers ``quantization_config`` of the 4-bit weights in
  ``tensors`` (``BitsAndBytesConfig.to_dict()``'s keys), or ``None`` when
  there are none.

  Args:
    tensors: ``{name: Quantized4bit | array}``.
    compute_dtype: ``bnb_4bit_compute_dtype``; default: the weights' dtype.
    skip_modules: ``llm_int8_skip_modules`` (default ``None``).

  Raises:
    ValueError: the 4-bit weights differ in quant type, double quantization,
      quant storage or (without ``compute_dtype``) dtype, which one
      ``quantization_config`` cannot describe.
  """
  weights = _quantized(tensors)
  if not weights:
    return None
  first_name, first = next(iter(weights.items()))
  fields = ("quant_type", "nested", "quant_storage") + (
      () if compute_dtype else ("dtype",))
  for name, w4 in weights.items():
    for field in fields:
      if getattr(w4, field) != getattr(first, field):
        raise ValueError(
            f"4-bit weights {first_name!r} and {name!r} differ in {field} "
            f"({getattr(first, field)!r} vs {getattr(w4, field)!r}); one "
            "quantization_config cannot describe both")
  if compute_dtype is not None:
    val.check_choice(compute_dtype, "compute_dtype", val.FLOAT_DTYPE_NAMES)
  return {
      "_load_in_4bit": True,
      "_load_in_8bit": False,
      "bnb_4bit_compute_dtype": compute_dtype or first.dtype,
      "bnb_4bit_quant_storage": first.quant_storage,
      "bnb_4bit_quant_type": first.quant_type,
      "bnb_4bit_use_double_quant": first.nested,
      "llm_int8_enable_fp32_cpu_offload": False,
      "llm_int8_has_fp16_weight": False,
      "llm_int8_skip_modules": skip_modules,
      "llm_int8_threshold": 6.0,
      "load_in_4bit": True,
      "load_in_8bit": False,
      "quant_method": "bitsandbytes",
  }


# ---------------------------------------------------------------------------
# load / save


def _to_jax(value: np.ndarray) -> jax.Array | np.ndarray:
  """A JAX array of ``value``; numpy when JAX would change its dtype (64-bit
  types without ``jax_enable_x64``)."""
  if jax.dtypes.canonicalize_dtype(value.dtype) != value.dtype:
    return value
  return jnp.asarray(value)


def _group_4bit(tensors: Mapping[str, np.ndarray],
                source: Mapping[str, pathlib.Path]) -> dict[str, list[str]]:
  """``{weight key: [its keys]}`` for every 4-bit weight (by quant state)."""
  groups = {}
  for key in tensors:
    i = key.find(_STATE_MARK)
    if i <= 0:
      continue
    name = key[:i]
    if name in groups:
      raise ValueError(f"{source[key]}: {name!r} has two quant states: "
                       f"{groups[name][-1]!r} and {key!r}")
    members = [k for k in (name, *(f"{name}.{s}" for s in _STAT_NAMES))
               if k in tensors]
    groups[name] = members + [key]
  return groups


def load_bnb_checkpoint(path: str | os.PathLike, *,
                        layout: str = "bnb") -> tuple[dict[str, Any], dict]:
  """Loads a Hugging Face checkpoint directory of a bitsandbytes 4-bit model.

  Args:
    path: a directory with ``config.json`` and ``model.safetensors`` or
      ``model.safetensors.index.json`` plus the shards it names.
    layout: ``"bnb"`` keeps the 4-bit weights' bytes as stored; ``"tiled"``
      puts each one that fits into the order of :func:`jlowbit.tile_4bit`
      (fast decoding on a GPU: :func:`jlowbit.matmul_4bit`), the others
      stay as stored. :func:`save_bnb_checkpoint` writes the stored bytes
      back either way.

  Returns:
    ``(tensors, config)``: ``tensors`` maps each name to a
    :class:`jlowbit.Quantized4bit` (a 4-bit weight, under its own key such as
    ``"model.layers.0.mlp.down_proj.weight"``, its statistic keys consumed)
    or a JAX array in its stored dtype (float64 / int64 stay numpy arrays
    unless ``jax_enable_x64``); ``config`` is the parsed ``config.json``,
    whose ``quantization_config`` (if any) was checked against the weights
    (:func:`check_quantization_config`).

  Raises:
    FileNotFoundError: a missing directory, ``config.json``, weights file or
      shard named by the index.
    ValueError: invalid JSON, a corrupt or truncated safetensors file, a
      malformed or inconsistent 4-bit weight, statistics without their quant
      state, or a ``quantization_config`` that contradicts the weights; each
      message names the file and key.
  """
  val.check_choice(layout, "layout", _tiling.LAYOUTS)
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  config = _read_json(path / CONFIG_NAME, "config")
  raw, source = _read_weights(path)
  groups = _group_4bit(raw, source)
  consumed = set()
  out = {}
  for name, keys in groups.items():
    try:
      out[name] = bnb_format.from_bnb({k: raw[k] for k in keys}, prefix=name)
    except (KeyError, ValueError, TypeError) as e:
      message = e.args[0] if e.args else str(e)
      raise ValueError(f"{source[keys[-1]]}: 4-bit weight {name!r}: "
                       f"{message}") from e
    consumed.update(keys)
  for key, value in raw.items():
    if key in consumed:
      continue
    stat = next((s for s in _STAT_NAMES if key.endswith("." + s)), None)
    if stat is not None or ".quant_state." in key:
      owner = key[:-len(stat) - 1] if stat else key.split(".quant_state.")[0]
      raise ValueError(f"{source[key]}: {key!r} is a bitsandbytes statistic "
                       f"without its quant state ({owner}"
                       f"{_STATE_MARK}<nf4|fp4>)")
    out[key] = _to_jax(value)
  out = {k: out[k] for k in sorted(out)}
  qc = config.get("quantization_config")
  if qc is not None:
    check_quantization_config(qc, out, where=str(path / CONFIG_NAME))
  if layout == "tiled":
    out = {k: quant4.prefer_layout(v, layout)
           if isinstance(v, quant4.Quantized4bit) else v
           for k, v in out.items()}
  return out, config


def _flatten(tensors: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
  """Each entry's serialized tensors (a 4-bit weight's together)."""
  groups, seen = [], {}
  for name, value in tensors.items():
    if not isinstance(name, str) or not name:
      raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    if isinstance(value, quant4.Quantized4bit):
      group = bnb_format.to_bnb(value, prefix=name)
    else:
      if not isinstance(value, (jax.Array, np.ndarray, np.generic)):
        raise TypeError(f"tensors[{name!r}] must be a Quantized4bit or an "
                        f"array, got {type(value).__name__}")
      group = {name: np.asarray(value)}
    for key in group:
      if key in seen:
        raise ValueError(f"tensor {key!r} of {name!r} collides with one of "
                         f"{seen[key]!r}")
      seen[key] = name
    groups.append(group)
  return groups


def _shards(groups: list[dict[str, np.ndarray]],
            max_shard_size: int) -> list[dict[str, np.ndarray]]:
  """Greedy packing in order, as transformers does: a new shard when the next
  group would overflow; a group bigger than the limit gets its own."""
  shards, current, size = [], {}, 0
  for group in groups:
    nbytes = sum(v.nbytes for v in group.values())
    if current and size + nbytes > max_shard_size:
      shards.append(current)
      current, size = {}, 0
    current.update(group)
    size += nbytes
  if current or not shards:
    shards.append(current)
  return shards


def save_bnb_checkpoint(path: str | os.PathLike, tensors: Mapping[str, Any],
                        config: Mapping[str, Any], *,
                        max_shard_size: int | None = None) -> None:
  """Writes ``tensors`` and ``config`` as a Hugging Face checkpoint directory
  that ``transformers`` + ``bitsandbytes`` load (the inverse of
  :func:`load_bnb_checkpoint`, tensor bytes and dtypes exact).

  Args:
    path: the directory (created if needed).
    tensors: ``{name: Quantized4bit | array}``; each Quantized4bit is written
      as :func:`jlowbit.to_bnb` ``(w4, prefix=name)``, arrays as they are.
    config: the model config; written to ``config.json`` with a
      ``quantization_config`` from :func:`bnb_quantization_config` added when
      it has none and there are 4-bit weights (otherwise its own is checked
      against the weights).
    max_shard_size: ``None``: one ``model.safetensors``. Bytes: shards
      ``model-0000i-of-0000K.safetensors`` of at most that size (a 4-bit
      weight's entries stay together; one bigger than the limit gets a shard
      of its own) and ``model.safetensors.index.json``; as with transformers,
      a single shard is written as ``model.safetensors``.

  Stale weight files of an earlier save in ``path`` (``model.safetensors``,
  the index, ``model-*-of-*.safetensors``) are removed.
  """
  if not isinstance(config, Mapping):
    raise TypeError(f"config must be a mapping, got {type(config).__name__}")
  if max_shard_size is not None:
    if (isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int)
        or max_shard_size <= 0):
      raise ValueError(f"max_shard_size={max_shard_size!r} must be a positive "
                       "number of bytes or None")
  config = json.loads(json.dumps(dict(config)))  # a deep copy, JSON-able
  if config.get("quantization_config") is None:
    config.pop("quantization_config", None)
    qc = bnb_quantization_config(tensors)
    if qc is not None:
      config["quantization_config"] = qc
  else:
    check_quantization_config(config["quantization_config"], tensors,
                              where="config['quantization_config']")
  groups = _flatten(tensors)
  shards = _shards(groups, max_shard_size) if max_shard_size else [
      {k: v for g in groups for k, v in g.items()}]

  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  for old in path.iterdir():
    if old.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_RE.fullmatch(old.name):
      old.unlink()
  if len(shards) == 1:
    _write_safetensors(path / WEIGHTS_NAME, shards[0])
  else:
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
      name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
      _write_safetensors(path / name, shard)
      for key, value in shard.items():
        weight_map[key] = name
        total += value.nbytes
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n",
                                   encoding="utf-8")
  (path / CONFIG_NAME).write_text(
      json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["bnb_quantization_config", "check_quantization_config",
           "load_bnb_checkpoint", "read_safetensors", "save_bnb_checkpoint"]
