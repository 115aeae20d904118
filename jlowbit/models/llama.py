r"""A Llama decoder in Flax NNX, numerically mirroring Hugging Face's
``LlamaForCausalLM``, loadable from float or bitsandbytes 4-bit checkpoints.

Per layer, with :math:`x` the residual stream ``[B, T, hidden]``:

.. math::
  h = x + \mathrm{Attn}(\mathrm{RMSNorm}(x)), \qquad
  y = h + W_\mathrm{down}\big(\mathrm{silu}(W_\mathrm{gate} g) \odot
      W_\mathrm{up} g\big), \; g = \mathrm{RMSNorm}(h)

Attention is grouped-query (each of the ``num_key_value_heads`` key/value
heads serves ``num_attention_heads / num_key_value_heads`` query heads, as
HF's ``repeat_kv``) with rotary embeddings in HF's ``rotate_half``
convention (the two halves of each head, not interleaved pairs). The
projections are ``nnx.Linear`` (so :func:`jlowbit.nn.quantize_model` swaps
them) or :class:`jlowbit.nn.Linear4bit` when loaded from a 4-bit checkpoint.

Decoding runs through a :class:`KVCache` (:meth:`Llama.init_cache`,
:func:`generate`). :func:`fuse_projections` merges each layer's
projections that share an input (q, k, v; gate, up) into one product each,
for decoding with fewer, larger kernel launches.
"""

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlowbit import checkpoints
from jlowbit import quant4
from jlowbit.nn import linear4bit


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """``rope_type: "llama3"`` frequency scaling (Llama 3.1+ long context)."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture, as in a Hugging Face Llama ``config.json``."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Llama3RopeScaling | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not "
                       "a multiple of num_key_value_heads="
                       f"{self.num_key_value_heads}")

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "LlamaConfig":
    """Reads a Hugging Face Llama ``config.json`` dict.

    Rotary settings come from ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling`` (earlier); rope types ``"default"``
    and ``"llama3"`` are supported.

    Raises:
      ValueError: another rope type, or ``hidden_act`` other than silu.
    """
    act = config.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"hidden_act={act!r} is not supported; only 'silu'")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
      scaling = None
    elif rope_type == "llama3":
      scaling = Llama3RopeScaling(
          float(rope["factor"]), float(rope["low_freq_factor"]),
          float(rope["high_freq_factor"]),
          int(rope["original_max_position_embeddings"]))
    else:
      raise ValueError(f"rope type {rope_type!r} is not supported; supported: "
                       "'default', 'llama3'")
    heads = config["num_attention_heads"]
    return cls(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta",
                                  config.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)))


class KVCache(NamedTuple):
  """Keys and values of the tokens seen so far (a pytree).

  Attributes:
    layers: per decoder layer ``(k, v)``, each ``[B, max_length,
      num_key_value_heads, head_dim]`` (rotary already applied to ``k``).
    index: int32 scalar, the number of filled slots; the next tokens go to
      slots ``index, index + 1, ...``.
  """
  layers: tuple[tuple[jax.Array, jax.Array], ...]
  index: jax.Array


def inverse_frequencies(config: LlamaConfig) -> jax.Array:
  r"""Rotary frequencies ``[head_dim / 2]`` float32, ``theta^{-2i/d}``
  (scaled per ``config.rope_scaling``)."""
  dim = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  s = config.rope_scaling
  if s is not None:
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return jnp.asarray(inv, jnp.float32)


def _rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """``x * cos + rotate_half(x) * sin``: ``x`` ``[B, T, heads, head_dim]``,
  ``cos`` / ``sin`` ``[B, T, head_dim]`` in ``x.dtype``."""
  return x * cos[:, :, None] + _rotate_half(x) * sin[:, :, None]


class RMSNorm(nnx.Module):
  r"""``weight * (x / sqrt(mean(x^2) + eps))``, the statistic in float32.

  As HF's ``LlamaRMSNorm``: normalized in float32, cast back to the input's
  dtype, then scaled; the result is cast to ``dtype``.
  """

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps
    self.dtype = jnp.dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., dim]`` -> ``[..., dim]`` in ``dtype``."""
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return (self.weight[...] * h.astype(x.dtype)).astype(self.dtype)


class LlamaAttention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings and a KV cache."""

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    c = config
    linear = functools.partial(nnx.Linear, use_bias=c.attention_bias,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(c.hidden_size, c.num_attention_heads * c.head_dim)
    self.k_proj = linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
    self.v_proj = linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
    self.o_proj = linear(c.num_attention_heads * c.head_dim, c.hidden_size)
    self.num_heads = c.num_attention_heads
    self.num_kv_heads = c.num_key_value_heads
    self.head_dim = c.head_dim
    self.dtype = jnp.dtype(dtype)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None, index: jax.Array | int
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    r"""Attends ``x`` ``[B, T, hidden]`` causally.

    Args:
      x: the normalized hidden states.
      cos, sin: rotary tables ``[B, T, head_dim]`` of the tokens' positions.
      kv: this layer's cache ``(k, v)`` ``[B, S, kv_heads, head_dim]``, or
        ``None`` (attend within ``x`` only).
      index: the cache slot of ``x``'s first token (0 without a cache).

    Returns:
      ``([B, T, hidden], kv)``: the output and the updated cache.
    """
    b, t, _ = x.shape
    if hasattr(self, "qkv_proj"):  # fuse_projections
      q_size = self.num_heads * self.head_dim
      q, k, v = jnp.split(
          self.qkv_proj(x),
          [q_size, q_size + self.num_kv_heads * self.head_dim], axis=-1)
    else:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    cos, sin = cos.astype(q.dtype), sin.astype(q.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if kv is not None:
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
      kv = (k, v)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    groups = self.num_heads // self.num_kv_heads
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    # Query t sits in slot index + t and sees slots 0..index + t (unfilled
    # slots of the cache lie beyond).
    visible = (jnp.arange(k.shape[1])[None, :]
               <= index + jnp.arange(t)[:, None])
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * (self.head_dim ** -0.5)
    scores = jnp.where(visible, scores.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bhts,bshd->bthd", probs, v)
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), kv


class LlamaMLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    c = config
    linear = functools.partial(nnx.Linear, use_bias=c.mlp_bias,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = linear(c.hidden_size, c.intermediate_size)
    self.up_proj = linear(c.hidden_size, c.intermediate_size)
    self.down_proj = linear(c.intermediate_size, c.hidden_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., hidden]`` -> ``[..., hidden]``."""
    if hasattr(self, "gate_up_proj"):  # fuse_projections
      gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(jax.nn.silu(gate) * up)


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm attention and MLP blocks, each with a residual connection."""

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(config.hidden_size, **norm)
    self.self_attn = LlamaAttention(config, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
    self.mlp = LlamaMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, kv, index):
    """See :meth:`LlamaAttention.__call__`; returns ``(x', kv')``."""
    h, kv = self.self_attn(self.input_layernorm(x), cos, sin, kv, index)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), kv


class Llama(nnx.Module):
  r"""Hugging Face's ``LlamaForCausalLM`` in Flax NNX.

  Module paths follow HF's state-dict names without the ``model.`` prefix:
  ``embed_tokens``, ``layers[i].self_attn.q_proj``, ``layers[i].mlp.up_proj``,
  ``norm``, ``lm_head`` (``None`` when ``tie_word_embeddings``: the logits
  then use ``embed_tokens``' table).

  Args:
    config: the architecture.
    dtype: compute dtype of activations, attention and logits.
    param_dtype: dtype of the float parameters.
    rngs: initialization keys.
  """

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size,
                                  dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
    self.layers = nnx.List([
        LlamaDecoderLayer(config, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
        for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                        dtype=dtype, param_dtype=param_dtype)
    self.lm_head: nnx.Linear | None
    if config.tie_word_embeddings:
      self.lm_head = nnx.data(None)
    else:
      self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size,
                                use_bias=False, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)

  def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
    """An empty :class:`KVCache` of ``max_length`` slots (``dtype``: default
    the compute dtype)."""
    c = self.config
    shape = (batch, max_length, c.num_key_value_heads, c.head_dim)
    dtype = self.dtype if dtype is None else dtype
    layers = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                   for _ in range(c.num_hidden_layers))
    return KVCache(layers, jnp.zeros((), jnp.int32))

  def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
               cache: KVCache | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    r"""Logits of every position.

    Args:
      input_ids: int ``[B, T]``.
      positions: int ``[B, T]`` rotary positions; default ``index + arange(T)``
        (``index`` the cache's fill, 0 without a cache).
      cache: ``None`` (the tokens attend among themselves, causally) or a
        :class:`KVCache` whose slots ``index .. index + T - 1`` receive these
        tokens, which attend to every earlier slot; ``index + T`` must not
        exceed its ``max_length`` (not checked under ``jit``).

    Returns:
      ``(logits [B, T, vocab] in dtype, new cache or None)``.
    """
    b, t = input_ids.shape
    index = jnp.zeros((), jnp.int32) if cache is None else cache.index
    if cache is not None and t > cache.layers[0][0].shape[1]:
      raise ValueError(f"{t} tokens do not fit a cache of "
                       f"{cache.layers[0][0].shape[1]} slots")
    if positions is None:
      positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    angles = positions[..., None].astype(jnp.float32) * inverse_frequencies(self.config)
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x = self.embed_tokens(input_ids)
    new_layers = []
    for i, layer in enumerate(self.layers):
      x, kv = layer(x, cos, sin, None if cache is None else cache.layers[i],
                    index)
      new_layers.append(kv)
    x = self.norm(x)
    logits = (self.embed_tokens.attend(x) if self.lm_head is None
              else self.lm_head(x))
    if cache is None:
      return logits, None
    return logits, KVCache(tuple(new_layers), cache.index + t)

  @classmethod
  def from_hf_checkpoint(cls, path: str | os.PathLike, *, dtype=None,
                         layout: str = "bnb",
                         impl: str | None = None) -> "Llama":
    """Loads a Hugging Face Llama checkpoint directory, float or bitsandbytes
    4-bit (:func:`jlowbit.load_bnb_checkpoint`); see :meth:`from_hf_tensors`.

    ``layout="tiled"`` stores the 4-bit weights that fit in the tiled order
    (:func:`jlowbit.tile_4bit`): with a bfloat16 / float16 compute ``dtype``
    on a GPU, decoding (1-16 rows a step) then runs the tensor-core kernel.
    """
    tensors, config = checkpoints.load_bnb_checkpoint(path, layout=layout)
    return cls.from_hf_tensors(tensors, config, dtype=dtype, impl=impl)

  @classmethod
  def from_hf_tensors(cls, tensors: Mapping[str, Any], config: Mapping[str, Any],
                      *, dtype=None, impl: str | None = None) -> "Llama":
    r"""A model holding ``tensors`` (HF state-dict names).

    Float linear weights ``[out, in]`` are transposed into ``nnx.Linear``
    kernels ``[in, out]``; each :class:`jlowbit.Quantized4bit` becomes a
    :class:`jlowbit.nn.Linear4bit` (``from_quantized``, same bytes). Float
    tensors keep their stored dtype. A ``lm_head.weight`` of a tied model
    and rotary ``inv_freq`` buffers are ignored.

    Args:
      tensors: ``{name: Quantized4bit | array}`` as
        :func:`jlowbit.load_bnb_checkpoint` returns.
      config: the ``config.json`` dict.
      dtype: compute dtype; default ``quantization_config``'s
        ``bnb_4bit_compute_dtype``, else the embedding table's dtype.
      impl: the 4-bit layers' ``impl``.

    Raises:
      ValueError: names missing from or unexpected in ``tensors`` (all
        listed), or a tensor whose shape or kind (4-bit / float) does not fit
        its slot (named).
    """
    cfg = LlamaConfig.from_hf(config)
    embed = tensors.get("model.embed_tokens.weight")
    param_dtype = embed.dtype if hasattr(embed, "dtype") else jnp.float32
    if dtype is None:
      qc = config.get("quantization_config") or {}
      dtype = qc.get("bnb_4bit_compute_dtype") or param_dtype
    model = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype,
                                       rngs=nnx.Rngs(0)))
    linears, variables = _slots(model)
    expected = set(variables)
    for prefix, (parent, attr) in linears.items():
      expected.add(f"{prefix}.weight")
      if getattr(parent, attr).use_bias:
        expected.add(f"{prefix}.bias")
    ignored = {k for k in tensors if k.endswith("rotary_emb.inv_freq")
               or (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected - ignored)
    if missing or unexpected:
      raise ValueError(f"checkpoint does not match the Llama model: missing "
                       f"{missing}, unexpected {unexpected}")
    for name, var in variables.items():
      value = _float(tensors, name)
      _check_shape(name, value.shape, var.get_value().shape)
      var.set_value(value)
    for prefix, (parent, attr) in linears.items():
      layer = getattr(parent, attr)
      weight = tensors[f"{prefix}.weight"]
      bias = (_float(tensors, f"{prefix}.bias") if layer.use_bias else None)
      out_in = (layer.out_features, layer.in_features)
      _check_shape(f"{prefix}.weight", weight.shape, out_in)
      if bias is not None:
        _check_shape(f"{prefix}.bias", bias.shape, (layer.out_features,))
      if isinstance(weight, quant4.Quantized4bit):
        setattr(parent, attr, linear4bit.Linear4bit.from_quantized(
            weight, bias, dtype=dtype, impl=impl))
      else:
        layer.kernel.set_value(_float(tensors, f"{prefix}.weight").T)
        if bias is not None:
          layer.bias.set_value(bias)
    return model


# Per block of a decoder layer: the fused projection and the ones it replaces
# (in the order of its output features).
FUSED_PROJECTIONS = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
                     "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}
# nnx.Linear settings the fused layer takes from its parts (which must agree).
_LINEAR_SETTINGS = ("dtype", "param_dtype", "precision", "dot_general",
                    "promote_dtype", "preferred_element_type")


def fuse_projections(model: Llama, *, impl: str | None = None) -> Llama:
  r"""Merges each layer's projections that share an input, in place.

  ``self_attn.q_proj``, ``k_proj`` and ``v_proj`` become one
  ``self_attn.qkv_proj`` (:math:`[W_q; W_k; W_v]`, its output split after
  the product) and ``mlp.gate_proj`` and ``up_proj`` one ``mlp.gate_up_proj``:
  per layer 4 products instead of 7, so batch-1 decoding launches fewer
  and larger matrix-vector kernels. Float ``nnx.Linear`` projections are
  concatenated as they are; 4-bit ones (:class:`jlowbit.nn.Linear4bit`)
  with :func:`jlowbit.concatenate_4bit` (same codes; nested statistics
  become float32), so the outputs are the separate projections' up to the
  summation order of the kernels. Fuse after loading a checkpoint
  (:meth:`Llama.from_hf_checkpoint` fills the separate projections) and
  before or after :func:`jlowbit.nn.quantize_model`. A model already fused
  is returned as it is.

  Args:
    model: the model to change.
    impl: for decoding nested 4-bit statistics.

  Returns:
    ``model``.

  Raises:
    TypeError: a block's projections are not all ``nnx.Linear`` or all
      ``Linear4bit`` (e.g. QLoRA layers, whose adapters belong to one
      projection).
    ValueError: their settings differ (dtype, bias, 4-bit format).
  """
  for i, layer in enumerate(model.layers):
    for block_name, (fused_name, names) in FUSED_PROJECTIONS.items():
      block = getattr(layer, block_name)
      if hasattr(block, fused_name):
        continue
      where = f"layers[{i}].{block_name}"
      fused = _fused_linear([getattr(block, name) for name in names],
                            [f"{where}.{name}" for name in names], impl)
      for name in names:
        delattr(block, name)
      setattr(block, fused_name, fused)
  return model


def _check_same(parts: list[nnx.Module], paths: list[str],
                settings: tuple[str, ...]) -> None:
  """Raises ``ValueError`` naming the first of ``settings`` that differs."""
  for setting in settings:
    values = [getattr(part, setting) for part in parts]
    if any(value != values[0] for value in values[1:]):
      raise ValueError(f"{', '.join(paths)}: {setting} differs: {values}")


def _fused_linear(parts: list[nnx.Module], paths: list[str],
                  impl: str | None) -> nnx.Module:
  """One layer whose output is ``parts``' outputs concatenated."""
  kinds = {type(part) for part in parts}
  uses_bias = {part.bias is not None for part in parts}
  if len(uses_bias) > 1:
    raise ValueError(f"{', '.join(paths)}: some have a bias, some not")
  biases = (jnp.concatenate([part.bias[...] for part in parts])
            if uses_bias == {True} else None)
  if kinds == {nnx.Linear}:
    _check_same(parts, paths, _LINEAR_SETTINGS)
    kernel = jnp.concatenate([part.kernel[...] for part in parts], axis=1)
    settings = {setting: getattr(parts[0], setting)
                for setting in _LINEAR_SETTINGS}
    return nnx.Linear(
        kernel.shape[0], kernel.shape[1], use_bias=biases is not None,
        kernel_init=lambda *_: kernel,
        bias_init=lambda *_: biases, rngs=nnx.Rngs(0), **settings)
  if kinds == {linear4bit.Linear4bit}:
    _check_same(parts, paths, ("dtype", "impl"))
    w4 = quant4.concatenate_4bit([part.kernel.get_value() for part in parts],
                                 impl=impl)
    return linear4bit.Linear4bit.from_quantized(
        w4, biases, dtype=parts[0].dtype, impl=parts[0].impl)
  raise TypeError(f"{', '.join(paths)} must be all nnx.Linear or all "
                  "jlowbit.nn.Linear4bit to be fused, got "
                  f"{', '.join(type(part).__name__ for part in parts)}")


def _slots(model: Llama) -> tuple[dict[str, tuple[nnx.Module, str]],
                                  dict[str, nnx.Variable]]:
  """``({HF prefix: (parent, attribute) of each linear}, {HF name: variable}
  of the embedding and norms)``."""
  linears = {} if model.lm_head is None else {"lm_head": (model, "lm_head")}
  variables = {"model.embed_tokens.weight": model.embed_tokens.embedding,
               "model.norm.weight": model.norm.weight}
  for i, layer in enumerate(model.layers):
    p = f"model.layers.{i}"
    for n in ("q", "k", "v", "o"):
      linears[f"{p}.self_attn.{n}_proj"] = (layer.self_attn, f"{n}_proj")
    for n in ("gate", "up", "down"):
      linears[f"{p}.mlp.{n}_proj"] = (layer.mlp, f"{n}_proj")
    variables[f"{p}.input_layernorm.weight"] = layer.input_layernorm.weight
    variables[f"{p}.post_attention_layernorm.weight"] = (
        layer.post_attention_layernorm.weight)
  return linears, variables


def _float(tensors: Mapping[str, Any], name: str) -> jax.Array:
  value = tensors[name]
  if isinstance(value, quant4.Quantized4bit):
    raise ValueError(f"{name!r} is a 4-bit weight; this slot takes a float "
                     "array")
  if not jnp.issubdtype(value.dtype, jnp.floating):
    raise ValueError(f"{name!r} has dtype {value.dtype}; expected a float array")
  return jnp.asarray(value)


def _check_shape(name: str, shape, expected) -> None:
  if tuple(shape) != tuple(expected):
    raise ValueError(f"{name!r} has shape {tuple(shape)}, but the model "
                     f"(config.json) expects {tuple(expected)}")


@nnx.jit
def _greedy_step(model: Llama, input_ids: jax.Array, cache: KVCache
                 ) -> tuple[jax.Array, KVCache]:
  logits, cache = model(input_ids, cache=cache)
  return jnp.argmax(logits[:, -1], axis=-1).astype(input_ids.dtype), cache


def _model(graphdef: nnx.GraphDef, state: nnx.State) -> Llama:
  """A fresh model of this trace (its own Variables: one trace cannot set
  the values of another trace's)."""
  return nnx.merge(graphdef, state, copy=True)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
              max_new_tokens: int, cache: KVCache) -> jax.Array:
  """The prompt in one step, then ``max_new_tokens - 1`` steps in a
  ``fori_loop``; each trace rebuilds the model from ``state``."""
  token, cache = _greedy_step(_model(graphdef, state), input_ids, cache)
  tokens = jnp.zeros((input_ids.shape[0], max_new_tokens), input_ids.dtype)
  tokens = tokens.at[:, 0].set(token)

  def step(i, carry):
    token, cache, tokens = carry
    token, cache = _greedy_step(_model(graphdef, state), token[:, None], cache)
    return token, cache, tokens.at[:, i].set(token)

  _, _, tokens = jax.lax.fori_loop(1, max_new_tokens, step,
                                   (token, cache, tokens))
  return jnp.concatenate([input_ids, tokens], axis=1)


def generate(model: Llama, input_ids: jax.Array, max_new_tokens: int, *,
             max_length: int | None = None) -> jax.Array:
  r"""Greedy decoding: the prompt in one pass (prefill), then one token per
  step through the :class:`KVCache` (batch 1 steps run the fused 4-bit gemv
  of :class:`jlowbit.nn.Linear4bit` layers).

  The whole generation is one jitted program (``jax.jit``; the decode steps
  in a ``lax.fori_loop``), compiled once per prompt shape, cache length and
  ``max_new_tokens``: a decode step costs the device's time only, not a
  host dispatch of every weight buffer (``benchmarks/decode.py``: 252 vs
  152 tokens/s for an 8B-shaped NF4 model on an H200; JAX bf16 178).

  Args:
    model: the :class:`Llama`.
    input_ids: int ``[B, T]`` prompts (all of length ``T``, no padding).
    max_new_tokens: tokens to append, at least 1.
    max_length: cache slots; default ``T + max_new_tokens``.

  Returns:
    ``[B, T + max_new_tokens]`` of ``input_ids``' dtype: the prompts and
    their continuations.
  """
  b, t = input_ids.shape
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
  length = t + max_new_tokens if max_length is None else max_length
  if length < t + max_new_tokens:
    raise ValueError(f"max_length={length} is shorter than the prompt ({t}) "
                     f"plus max_new_tokens={max_new_tokens}")
  cache = model.init_cache(b, length)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(input_ids),
                   int(max_new_tokens), cache)
