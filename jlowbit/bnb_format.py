"""bitsandbytes / Hugging Face serialization of 4-bit weights.

bitsandbytes' ``Linear4bit`` saves its weight as the packed bytes plus
``QuantState.as_dict(packed=True)`` (the layout of HF safetensors
checkpoints)::

  weight                          quant_storage [ceil(n / 2 / itemsize), 1]
  absmax                          float32 [blocks] (uint8 codes when nested)
  quant_map                       float32 [16]
  nested_absmax                   float32 [ceil(blocks / 256)]  (nested only)
  nested_quant_map                float32 [256]                 (nested only)
  quant_state.bitsandbytes__nf4   uint8: UTF-8 JSON (``__fp4`` for FP4)

The JSON is ``json.dumps`` of ``{"quant_type", "blocksize", "dtype",
"shape"}`` followed, when nested, by ``{"nested_blocksize", "nested_dtype",
"nested_offset"}``; dtypes are written without ``torch.`` (``"bfloat16"``).
These JSON keys keep bitsandbytes' spelling ``blocksize``; everywhere else
jlowbit says ``block_size``.

Key naming: with ``prefix=""`` the keys are the bare names above. With a
prefix, ``prefix`` is the weight's own state-dict key (e.g.
``"model.layers.0.mlp.down_proj.weight"``) and each statistic lives at
``prefix + "." + name`` (``"...down_proj.weight.absmax"``), as in HF
checkpoints.

``quant_storage`` other than uint8 views the same bytes as another dtype;
the bytes are zero-padded to a whole number of storage elements (bitsandbytes
allocates ``(n + 1) // (2 * itemsize)`` elements, which drops the tail when
that does not divide; such a truncated weight is rejected on load).
"""

import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlowbit import _formats
from jlowbit import _validation as val
from jlowbit import blockwise8
from jlowbit import quant4

STATE_PREFIX = "quant_state.bitsandbytes__"
_JSON_KEYS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_JSON_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")


def _key(prefix: str, name: str) -> str:
  if not prefix:
    return name
  return prefix if name == "weight" else f"{prefix}.{name}"


def to_bnb(w4: quant4.Quantized4bit, *, prefix: str = "") -> dict[str, np.ndarray]:
  """The bitsandbytes ``Linear4bit`` state-dict entries of ``w4`` (numpy).

  Args:
    w4: a :class:`jlowbit.Quantized4bit`; a tiled one
      (:func:`jlowbit.tile_4bit`) is written in bitsandbytes' order, the
      same bytes as before tiling.
    prefix: the weight's state-dict key, or ``""`` for bare names (see the
      module docstring).

  Returns:
    ``{"weight", "absmax", "quant_map", ["nested_absmax",
    "nested_quant_map"], "quant_state.bitsandbytes__<type>"}`` (prefixed),
    in that order, ready for ``safetensors.numpy.save_file``.
  """
  w4 = quant4.untile_4bit(w4)
  storage = np.dtype(jnp.dtype(w4.quant_storage))
  raw = np.asarray(w4.packed, np.uint8)
  raw = np.pad(raw, (0, (-raw.size) % storage.itemsize))
  meta = {"quant_type": w4.quant_type, "blocksize": w4.block_size,
          "dtype": w4.dtype, "shape": list(w4.shape)}
  out = {"weight": raw.view(storage).reshape(-1, 1)}
  if w4.nested:
    out["absmax"] = np.asarray(w4.absmax.codes, np.uint8)
    out["quant_map"] = np.asarray(w4.quant_map, np.float32)
    out["nested_absmax"] = np.asarray(w4.absmax.absmax, np.float32)
    out["nested_quant_map"] = np.asarray(w4.absmax.code, np.float32)
    meta.update(nested_blocksize=w4.absmax.block_size, nested_dtype="float32",
                nested_offset=float(np.float32(w4.offset)))
  else:
    out["absmax"] = np.asarray(w4.absmax, np.float32)
    out["quant_map"] = np.asarray(w4.quant_map, np.float32)
  out[STATE_PREFIX + w4.quant_type] = np.frombuffer(
      json.dumps(meta).encode("utf-8"), np.uint8).copy()
  return {_key(prefix, name): value for name, value in out.items()}


def _state_key(state: Mapping[str, Any], prefix: str) -> str:
  """The one ``quant_state.bitsandbytes__<type>`` key under ``prefix``."""
  start = _key(prefix, "quant_state.")
  found = [k for k in state if k.startswith(start)]
  if len(found) != 1:
    raise KeyError(
        f"expected exactly one key {start}bitsandbytes__<nf4|fp4> in the "
        f"state dict, found {found or 'none'}")
  expected = _key(prefix, STATE_PREFIX)
  if not found[0].startswith(expected):
    raise KeyError(f"{found[0]!r} is not a bitsandbytes quant state key; "
                   f"expected {expected}<nf4|fp4>")
  val.check_choice(found[0][len(expected):], "quant_type", _formats.QUANT_TYPES)
  return found[0]


def _check_int(value: Any, where: str, allowed: tuple[int, ...]) -> None:
  """ValueError unless ``value`` is a JSON integer among ``allowed``."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{where}={value!r} must be an integer; allowed values: "
                     f"{', '.join(str(a) for a in allowed)}")
  val.check_choice(value, where, allowed)


def _shape(value: Any, where: str) -> tuple[int, ...]:
  """The JSON ``shape``: a list of non-negative integers."""
  if not isinstance(value, list) or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
    raise ValueError(f"{where}={value!r} must be a list of non-negative "
                     "integers")
  return tuple(value)


def _read_meta(state: Mapping[str, Any], key: str, nested: bool) -> dict:
  raw = np.asarray(state[key])
  if raw.dtype != np.uint8 or raw.ndim != 1:
    raise ValueError(f"{key} must be a 1-D uint8 array of UTF-8 JSON, got "
                     f"{raw.dtype}{list(raw.shape)}")
  try:
    meta = json.loads(raw.tobytes().decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"{key} is not UTF-8 text: {e}") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{key} is not valid JSON ({e}): "
                     f"{raw.tobytes()[:80]!r}") from e
  if not isinstance(meta, dict):
    raise ValueError(f"{key} must hold a JSON object, got "
                     f"{type(meta).__name__}: {meta!r:.80}")
  required = _JSON_KEYS + (_NESTED_JSON_KEYS if nested else ())
  missing = [k for k in required if k not in meta]
  if missing:
    raise KeyError(f"{key} lacks {', '.join(missing)}: {meta}")
  val.check_choice(meta["quant_type"], f"{key}['quant_type']", (key[-3:],))
  _check_int(meta["blocksize"], f"{key}['blocksize']", _formats.BLOCK_SIZES_4BIT)
  val.check_choice(meta["dtype"], f"{key}['dtype']", val.FLOAT_DTYPE_NAMES)
  meta["shape"] = _shape(meta["shape"], f"{key}['shape']")
  if nested:
    _check_int(meta["nested_blocksize"], f"{key}['nested_blocksize']",
               _formats.BLOCK_SIZES_8BIT)
    val.check_choice(meta["nested_dtype"], f"{key}['nested_dtype']", ("float32",))
    offset = meta["nested_offset"]
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
      raise ValueError(f"{key}['nested_offset']={offset!r} must be a number")
  return meta


def _array(state: Mapping[str, Any], prefix: str, name: str, dtype,
           shape: tuple[int, ...]) -> np.ndarray:
  key = _key(prefix, name)
  if key not in state:
    raise KeyError(f"missing key {key!r} in the bitsandbytes state dict")
  value = np.asarray(state[key])
  if value.dtype != np.dtype(dtype) or value.shape != shape:
    raise ValueError(f"{key} is {value.dtype}{list(value.shape)}, expected "
                     f"{np.dtype(dtype)}{list(shape)}")
  return value


def _weight_bytes(state: Mapping[str, Any], prefix: str, size: int) -> tuple[np.ndarray, str]:
  key = _key(prefix, "weight")
  if key not in state:
    raise KeyError(f"missing key {key!r} in the bitsandbytes state dict")
  weight = np.ascontiguousarray(np.asarray(state[key]))
  storage = quant4.check_quant_storage(weight.dtype)
  raw = weight.reshape(-1).view(np.uint8)
  n_bytes = -(-size // 2)
  if raw.size != n_bytes + (-n_bytes) % weight.itemsize:
    raise ValueError(f"{key} holds {raw.size} bytes; a weight of {size} "
                     f"elements needs {n_bytes} (zero-padded to whole "
                     f"{storage} elements)")
  return raw[:n_bytes], storage


def from_bnb(state: Mapping[str, Any], *, prefix: str = "") -> quant4.Quantized4bit:
  """Reads a bitsandbytes 4-bit weight (see :func:`to_bnb` for the layout).

  Args:
    state: a mapping of names to arrays (numpy, JAX, or anything
      ``np.asarray`` accepts), e.g. from ``safetensors.numpy.load_file``;
      other keys are ignored.
    prefix: the weight's state-dict key, or ``""`` for bare names.

  Returns:
    A :class:`jlowbit.Quantized4bit`; ``to_bnb`` of it reproduces the entries
    byte for byte.

  Raises:
    KeyError: a required entry is missing.
    ValueError: the quant state is not UTF-8 JSON of an object, or holds an
      unknown quant type, block size or dtype or a malformed shape; or an
      entry has the wrong dtype or shape.
  """
  state_key = _state_key(state, prefix)
  nested = _key(prefix, "nested_absmax") in state
  meta = _read_meta(state, state_key, nested)
  shape = meta["shape"]
  size = int(np.prod(shape, dtype=np.int64))
  blocks = -(-size // meta["blocksize"])
  packed, storage = _weight_bytes(state, prefix, size)
  offset = None
  if nested:
    nested_block_size = meta["nested_blocksize"]
    absmax = blockwise8.Quantized8bit(
        codes=jnp.asarray(_array(state, prefix, "absmax", np.uint8, (blocks,))),
        absmax=jnp.asarray(_array(state, prefix, "nested_absmax", np.float32,
                                  (-(-blocks // nested_block_size),))),
        code=jnp.asarray(_array(state, prefix, "nested_quant_map", np.float32,
                                (256,))),
        block_size=nested_block_size, dtype="float32")
    offset = jnp.asarray(np.float32(meta["nested_offset"]))
  else:
    absmax = jnp.asarray(_array(state, prefix, "absmax", np.float32, (blocks,)))
  quant_map = _array(state, prefix, "quant_map", np.float32, (16,))
  return quant4.Quantized4bit(
      packed=jnp.asarray(packed), absmax=absmax,
      quant_map=jnp.asarray(quant_map), shape=shape, dtype=meta["dtype"],
      block_size=meta["blocksize"], quant_type=meta["quant_type"],
      offset=offset, quant_storage=storage)
