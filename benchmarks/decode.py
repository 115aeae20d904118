"""Batch-1 greedy decode: tokens/s of jlowbit's Llama (bf16, 4-bit) vs transformers (+ bitsandbytes).

Run on an NVIDIA GPU (nothing is downloaded: every model has random weights)::

  python benchmarks/decode.py [--layers 32] [--quant-types nf4 nf4-nested fp4]
      [--torch] [--impl triton|xla] [--layout bnb|tiled] [--prompt-len 16]
      [--new-tokens 64] [--repeats 5] [--json decode.json]

and as a CPU smoke test (a tiny model, a few tokens, ``impl="xla"``)::

  python benchmarks/decode.py --tiny

The model has Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV
heads, head_dim 128, vocab 128256, rope_theta 500000, untied lm_head), with
``--layers`` decoder layers (default 32: the full 8B). Rows:

* ``jax bf16``: :class:`jlowbit.models.Llama`, bf16 parameters and compute,
  float ``nnx.Linear`` projections (XLA's dense gemv).
* ``jlowbit <type>``: the same model (same seed, rebuilt) after
  ``jlowbit.nn.quantize_model(model, quant_type=..., block_size=64,
  compress_statistics=..., impl=--impl)``: the 7 projections of every layer
  4-bit (``nested``: 8-bit absmax, bitsandbytes' double quantization);
  embedding and ``lm_head`` stay bf16 (bitsandbytes does the same). Batch-1
  steps run jlowbit's fused 4-bit gemv; with ``--layout tiled``
  (``quantize_model(..., layout="tiled")``, row names ending in ``tiled``)
  the tensor-core kernel of tiled weights. With ``--fuse`` (row names
  ending in ``fused``) :func:`jlowbit.models.fuse_projections` then merges
  each layer's q, k, v and gate, up projections: 4 products a layer
  instead of 7 (nested statistics become float32 in the fused weights).
* with ``--torch`` (CUDA torch + transformers; bitsandbytes for 4-bit):
  ``transformers bf16`` is ``LlamaForCausalLM`` of the same shapes, random
  init, bf16, sdpa attention; ``transformers + bnb <type>`` is that model
  saved to a temporary directory and reloaded with
  ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=...,
  bnb_4bit_use_double_quant=nested, bnb_4bit_compute_dtype=bfloat16)``
  (blocksize 64), as users load 4-bit models (``lm_head`` stays bf16).

Each run: a fresh KV cache of ``prompt_len + new_tokens`` slots, the prompt
(random ids, the same for every row), then ``new_tokens`` greedy tokens,
timed from the first decode step until the last token is ready (prefill
excluded); one untimed warm-up run first (it compiles); the median of
``--repeats`` runs. JAX decodes in two ways, each timed:

* ``tok_s``: one ``jax.jit`` call per token (``nnx.split`` model, the
  ``KVCache`` donated), as a generate loop runs. Each call dispatches every
  weight buffer (about 2 us a buffer in jax 0.11; the 4-bit models have
  3 (nested: 6) buffers per projection), so on small or 4-bit models this
  can be host bound (``jlowbit.models.generate``'s ``nnx.jit`` step adds a
  graph traversal per call, so it is not used).
* ``tok_s_loop``: all ``new_tokens`` steps in one jitted ``lax.fori_loop``
  (weights dispatched once): the device's decode rate.

The JAX prompt is fed through the same jitted step, one token at a time
(no second compilation for a prompt-shaped call). torch decodes with a
manual greedy loop (``model(token, past_key_values=cache)``, transformers'
default ``DynamicCache``, eager, no CUDA graphs; the prompt in one forward).

Columns: ``ms_token = 1000 / tok_s``; ``weight_GB``: bytes of all weights
(``jlowbit.nn.memory_report`` total; torch: parameters, buffers and the
bitsandbytes quant states' tensors) / 1e9; ``TBps``: bytes a step must read
(the weights less the embedding table, of which a step gathers one row) over
the time per token; ``vs_bf16``: ``tok_s`` over ``jax bf16``'s. At 32 layers
the weights are 16.06 GB in bf16 (8.03 G parameters: 6.98 G in
projections, 2 x 0.525 G embedding and lm_head), about 6.03 GB with NF4
projections (3.49 GB of codes + 0.44 GB of float32 absmax + 2.10 GB bf16
embedding and lm_head) and 5.70 GB nested (8-bit absmax); a step streams
~15.0 GB (bf16), ~4.98 GB (nf4), ~4.65 GB (nested).

Memory: the bf16 JAX model is built on the device from ``nnx.Rngs`` (no
host arrays) and deleted before the next row is built; a quantized row
holds the bf16 model only while ``quantize_model`` runs (peak ~22 GB at 32
layers). The torch rows run after every JAX row; the bf16 torch model is
deleted before the 4-bit ones load (the temporary checkpoint takes 16 GB of
disk at 32 layers; ``--tmp-dir`` chooses where). JAX is told not to
preallocate GPU memory (unless ``XLA_PYTHON_CLIENT_PREALLOCATE`` is set), so
torch can allocate beside it.

``--profile`` (with the in-jit loop) traces one more loop run of each JAX
row with ``jax.profiler`` and adds ``kernels_per_token``: the GPU kernels
of one decode step by kind (``jlowbit 4-bit``: jlowbit's Triton kernels;
``dense matmul``: cuBLAS / XLA GEMMs, the bf16 projections, lm_head and
attention products; ``XLA fusions``: everything else, norms, rotary,
softmax, the cache update, argmax), each with its launches and microseconds
per token, their sum against the loop's wall time per token (the rest is
time between kernels), and the ten kernels that take the most time. On a
CPU the trace has no GPU kernels and the field is empty.

``--json PATH`` writes every row (and its setup and compile times, a few
generated token ids) with the device, versions, date and command line; the
table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jlowbit
from jlowbit.nn import convert
from jlowbit.models import Llama, LlamaConfig, fuse_projections
from timing import hbm_tbps, table, traced_kernels

# Llama-3-8B (HF config.json), num_hidden_layers set by --layers.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=8192, tie_word_embeddings=False)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rms_norm_eps=1e-5, rope_theta=500000.0,
            max_position_embeddings=128, tie_word_embeddings=False)
QUANT_TYPES = ("nf4", "nf4-nested", "fp4", "fp4-nested")
BLOCK_SIZE = 64
COLUMNS = ["row", "layers", "tok_s", "tok_s_loop", "ms_token", "weight_GB",
           "TBps", "vs_bf16"]


@dataclasses.dataclass(frozen=True)
class Settings:
  prompt_len: int
  new_tokens: int
  repeats: int
  impl: str | None
  seed: int
  quantize_head: bool = False
  layout: str = "bnb"
  profile: bool = False
  fuse: bool = False


def _split_quant_type(name: str) -> tuple[str, bool]:
  """``"nf4-nested"`` -> ``("nf4", True)``."""
  return name.removesuffix("-nested"), name.endswith("-nested")


def _row_name(prefix: str, quant_type: str) -> str:
  base, nested = _split_quant_type(quant_type)
  return f"{prefix} {base}" + (" nested" if nested else "")


def _median_rate(seconds: list[float], tokens: int) -> float:
  return tokens / statistics.median(seconds)


def _log(message: str) -> None:
  print(message, flush=True)


# --- JAX ------------------------------------------------------------------

def _next_token(logits: jax.Array) -> jax.Array:
  """Greedy ids ``[B, 1]`` int32 from logits ``[B, T, vocab]`` (last position)."""
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]


def _jax_step(graphdef):
  """``(state, token [B, 1], cache) -> (next token, cache)``, one jitted call
  (the cache donated)."""
  @functools.partial(jax.jit, donate_argnums=2)
  def step(state, token, cache):
    logits, cache = nnx.merge(graphdef, state)(token, cache=cache)
    return _next_token(logits), cache
  return step


def _jax_loop(graphdef, new_tokens: int):
  """``(state, token, cache) -> (tokens [B, new_tokens], cache)``: every
  decode step in one jitted ``fori_loop`` (the cache donated)."""
  @functools.partial(jax.jit, donate_argnums=2)
  def loop(state, token, cache):
    def body(i, carry):
      token, cache, out = carry
      logits, cache = nnx.merge(graphdef, state)(token, cache=cache)
      token = _next_token(logits)
      return token, cache, jax.lax.dynamic_update_slice(out, token, (0, i))
    out = jnp.zeros((token.shape[0], new_tokens), token.dtype)
    _, cache, out = jax.lax.fori_loop(0, new_tokens, body, (token, cache, out))
    return out, cache
  return loop


def _kernel_kind(name: str) -> str:
  lower = name.lower()
  if "4bit" in lower or "_tiled" in lower:
    return "jlowbit 4-bit"
  if any(k in lower for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas")):
    return "dense matmul"
  return "XLA fusions"


def kernels_per_token(kernels: list[tuple[str, float]], tokens: int,
                      wall_s: float) -> dict:
  """``kernels`` (name, seconds) of ``tokens`` decode steps, per token."""
  if not kernels:
    return {}
  kinds: dict[str, dict] = {}
  by_name: dict[str, float] = {}
  for name, seconds in kernels:
    kind = kinds.setdefault(_kernel_kind(name), dict(launches=0, us=0.0))
    kind["launches"] += 1 / tokens
    kind["us"] += 1e6 * seconds / tokens
    by_name[name] = by_name.get(name, 0.0) + 1e6 * seconds / tokens
  top = sorted(by_name.items(), key=lambda item: -item[1])[:10]
  return dict(kinds=kinds, kernel_us=sum(k["us"] for k in kinds.values()),
              wall_us=1e6 * wall_s / tokens, top_kernels_us=dict(top))


def bench_jax(name: str, config: LlamaConfig, prompt: np.ndarray, s: Settings,
              quant_type: str | None, loop: bool) -> dict:
  """One JAX row: build (and quantize) the model, time greedy decoding."""
  start = time.perf_counter()
  model = Llama(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                rngs=nnx.Rngs(s.seed))
  if quant_type is not None:
    base, nested = _split_quant_type(quant_type)
    # --quantize-head: the lm_head too (the default filter keeps heads float).
    every_linear = lambda path, module: type(module) in convert.FLOAT_LAYERS  # pylint: disable=unidiomatic-typecheck
    jlowbit.nn.quantize_model(model, quant_type=base, block_size=BLOCK_SIZE,
                              compress_statistics=nested, layout=s.layout,
                              impl=s.impl,
                              filter=every_linear if s.quantize_head else None)
    if s.fuse:
      fuse_projections(model, impl=s.impl)
  graphdef, state = nnx.split(model)
  jax.block_until_ready(state)
  setup_s = time.perf_counter() - start
  memory = jlowbit.nn.memory_report(model)
  step = _jax_step(graphdef)
  decode_loop = _jax_loop(graphdef, s.new_tokens) if loop else None
  prompt_ids = [jnp.asarray(prompt[:, t:t + 1]) for t in range(prompt.shape[1])]

  def prefill():
    cache = model.init_cache(prompt.shape[0], s.prompt_len + s.new_tokens)
    for ids in prompt_ids:
      token, cache = step(state, ids, cache)
    jax.block_until_ready(token)
    return token, cache

  def run_steps():
    token, cache = prefill()
    begin = time.perf_counter()
    tokens = []
    for _ in range(s.new_tokens):
      token, cache = step(state, token, cache)
      tokens.append(token)
    jax.block_until_ready(token)
    return time.perf_counter() - begin, np.concatenate(jax.device_get(tokens), 1)

  def run_loop(cache_and_token=None):
    token, cache = cache_and_token or prefill()
    begin = time.perf_counter()
    tokens, cache = decode_loop(state, token, cache)
    jax.block_until_ready(tokens)
    return time.perf_counter() - begin, np.asarray(tokens)

  row = dict(row=name, layers=config.num_hidden_layers, quant_type=quant_type,
             layout=s.layout if quant_type else None,
             impl=(jlowbit.resolve_impl(s.impl) if quant_type else "xla (dense)"),
             method="one jax.jit call per token, KVCache donated",
             setup_s=setup_s, weight_bytes=memory["total"], memory_report=memory)
  start = time.perf_counter()
  _, tokens = run_steps()
  row["first_run_s"] = time.perf_counter() - start  # compile + one run
  seconds = [run_steps()[0] for _ in range(s.repeats)]
  row.update(tok_s=_median_rate(seconds, s.new_tokens), step_run_s=seconds,
             tokens=tokens[0, :8].tolist())
  if loop:
    start = time.perf_counter()
    _, loop_tokens = run_loop()
    row["first_loop_run_s"] = time.perf_counter() - start
    seconds = [run_loop()[0] for _ in range(s.repeats)]
    row.update(tok_s_loop=_median_rate(seconds, s.new_tokens),
               loop_run_s=seconds,
               loop_matches_step=bool((loop_tokens == tokens).all()))
    if s.profile:
      ready = prefill()  # outside the trace: only the loop's steps count
      kernels, seconds = traced_kernels(lambda: run_loop(ready)[0])
      row["kernels_per_token"] = kernels_per_token(kernels, s.new_tokens,
                                                   seconds)
  del model, graphdef, state, step, decode_loop
  gc.collect()
  return row


# --- torch ----------------------------------------------------------------

def _dtype_kwarg(transformers, dtype) -> dict:
  """``dtype=`` on transformers >= 4.56, ``torch_dtype=`` before."""
  major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
  return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _hf_config(transformers, config: LlamaConfig):
  c = config
  major = int(transformers.__version__.split(".")[0])
  rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}}
          if major >= 5 else {"rope_theta": c.rope_theta})
  return transformers.LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_hidden_layers,
      num_attention_heads=c.num_attention_heads,
      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
      rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
      tie_word_embeddings=c.tie_word_embeddings, bos_token_id=1, eos_token_id=2,
      pad_token_id=0, **rope)


def _torch_weight_bytes(model) -> int:
  """Bytes of parameters, buffers and bitsandbytes quant-state tensors
  (absmax, codebooks, nested statistics), each storage counted once."""
  import torch  # pylint: disable=g-import-not-at-top
  seen, total = set(), 0

  def add(t):
    nonlocal total
    if torch.is_tensor(t) and t.data_ptr() not in seen:
      seen.add(t.data_ptr())
      total += t.numel() * t.element_size()

  for p in model.parameters():
    add(p)
    qs = getattr(p, "quant_state", None)
    while qs is not None:
      for field in ("absmax", "code", "offset"):
        add(getattr(qs, field, None))
      qs = getattr(qs, "state2", None)
  for b in model.buffers():
    add(b)
  return total


def _memory_footprint(model) -> int | None:
  """transformers' ``get_memory_footprint()`` (parameters and buffers; not
  bitsandbytes' absmax), for reference."""
  footprint = getattr(model, "get_memory_footprint", None)
  return None if footprint is None else int(footprint())


def _torch_decode(model, prompt, new_tokens: int):
  """Seconds for ``new_tokens`` greedy steps after a one-pass prefill, and
  the tokens."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.inference_mode():
    out = model(input_ids=prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    tokens = []
    for _ in range(new_tokens):
      out = model(input_ids=token, past_key_values=cache, use_cache=True)
      cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
      tokens.append(token)
    torch.cuda.synchronize()
    return time.perf_counter() - begin, torch.cat(tokens, 1).cpu().numpy()


def _bench_torch_model(name: str, model, prompt, s: Settings, setup_s: float,
                       layers: int, quant_type: str | None) -> dict:
  start = time.perf_counter()
  _, tokens = _torch_decode(model, prompt, s.new_tokens)
  first = time.perf_counter() - start
  seconds = [_torch_decode(model, prompt, s.new_tokens)[0] for _ in range(s.repeats)]
  return dict(row=name, layers=layers, quant_type=quant_type,
              impl="bitsandbytes" if quant_type else "torch (dense)",
              method=("torch eager, manual greedy loop, DynamicCache, "
                      f"attn {model.config._attn_implementation}"),  # pylint: disable=protected-access
              setup_s=setup_s, weight_bytes=_torch_weight_bytes(model),
              memory_footprint=_memory_footprint(model),
              first_run_s=first, tok_s=_median_rate(seconds, s.new_tokens),
              step_run_s=seconds, tokens=tokens[0, :8].tolist())


def torch_available() -> str | None:
  """``None`` if torch with CUDA and transformers import, else why not."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return f"not importable: {e}"
  if not torch.cuda.is_available():
    return "torch sees no CUDA device"
  return None


def bench_torch(config: LlamaConfig, prompt: np.ndarray, s: Settings,
                quant_types: list[str], tmp_dir: str | None) -> list[dict]:
  """The transformers rows: bf16, then each 4-bit type through bitsandbytes."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  layers = config.num_hidden_layers
  ids = torch.as_tensor(prompt, dtype=torch.long, device="cuda")
  dtype = _dtype_kwarg(transformers, torch.bfloat16)
  start = time.perf_counter()
  torch.manual_seed(s.seed)
  with torch.device("cuda"):
    model = transformers.LlamaForCausalLM._from_config(  # pylint: disable=protected-access
        _hf_config(transformers, config), attn_implementation="sdpa", **dtype)
  model.eval()
  torch.cuda.synchronize()
  rows = [_bench_torch_model("transformers bf16", model, ids, s,
                             time.perf_counter() - start, layers, None)]
  _log(f"  {rows[-1]['row']}: {rows[-1]['tok_s']:.1f} tok/s")
  if not quant_types:
    return rows
  with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
    start = time.perf_counter()
    model.save_pretrained(tmp, safe_serialization=True)
    save_s = time.perf_counter() - start
    del model
    gc.collect()
    torch.cuda.empty_cache()
    for quant_type in quant_types:
      base, nested = _split_quant_type(quant_type)
      bnb_config = transformers.BitsAndBytesConfig(
          load_in_4bit=True, bnb_4bit_quant_type=base,
          bnb_4bit_use_double_quant=nested, bnb_4bit_compute_dtype=torch.bfloat16)
      start = time.perf_counter()
      model = transformers.LlamaForCausalLM.from_pretrained(
          tmp, quantization_config=bnb_config, device_map={"": 0},
          attn_implementation="sdpa", **dtype).eval()
      torch.cuda.synchronize()
      rows.append(_bench_torch_model(
          _row_name("transformers + bnb", quant_type), model, ids, s,
          time.perf_counter() - start, layers, quant_type))
      rows[-1]["save_pretrained_s"] = save_s
      _log(f"  {rows[-1]['row']}: {rows[-1]['tok_s']:.1f} tok/s")
      del model
      gc.collect()
      torch.cuda.empty_cache()
  return rows


# --- main -----------------------------------------------------------------

def _versions(with_torch: bool) -> dict:
  names = ["jax", "jaxlib", "flax", "triton", "jax-triton"]
  if with_torch:
    names += ["torch", "transformers", "bitsandbytes", "accelerate"]
  out = {"python": platform.python_version()}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _finish(rows: list[dict], config: LlamaConfig) -> None:
  """Adds ms_token, weight_GB, TBps, pct_hbm and vs_bf16 to every row."""
  embedding = config.vocab_size * config.hidden_size * 2  # bf16, one row read
  base = next((r for r in rows if r["row"] == "jax bf16"), None)
  for r in rows:
    streamed = r["weight_bytes"] - embedding
    r["ms_token"] = 1e3 / r["tok_s"]
    r["weight_GB"] = r["weight_bytes"] / 1e9
    r["TBps"] = streamed * r["tok_s"] / 1e12
    r["pct_hbm"] = 100 * r["TBps"] / hbm_tbps()
    if "tok_s_loop" in r:
      r["TBps_loop"] = streamed * r["tok_s_loop"] / 1e12
    if base is not None:
      r["vs_bf16"] = r["tok_s"] / base["tok_s"]
      if "tok_s_loop" in r and "tok_s_loop" in base:
        r["vs_bf16_loop"] = r["tok_s_loop"] / base["tok_s_loop"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true",
                      help="CPU smoke test: a tiny model (hidden 64, 2 layers, "
                           "vocab 256), few tokens, impl xla")
  parser.add_argument("--layers", type=int, help="decoder layers (default 32; --tiny: 2)")
  parser.add_argument("--quant-types", nargs="*", choices=QUANT_TYPES,
                      default=["nf4", "nf4-nested"],
                      help="4-bit rows, jlowbit's and (with --torch) bitsandbytes'")
  parser.add_argument("--impl", choices=["triton", "xla", "interpret"],
                      help="jlowbit impl (default: triton on an NVIDIA GPU; --tiny: xla)")
  parser.add_argument("--layout", choices=["bnb", "tiled"], default="bnb",
                      help="jlowbit rows' 4-bit weight layout (tiled: the "
                      "tensor-core kernel for decode steps)")
  parser.add_argument("--prompt-len", type=int, help="default 16 (--tiny: 4)")
  parser.add_argument("--new-tokens", type=int, help="default 64 (--tiny: 8)")
  parser.add_argument("--repeats", type=int, help="timed runs per row, default 5 (--tiny: 2)")
  parser.add_argument("--no-bf16", action="store_true", help="skip the jax bf16 row")
  parser.add_argument("--no-jax", action="store_true",
                      help="skip every JAX row (with --torch: the torch rows alone)")
  parser.add_argument("--no-loop", action="store_true",
                      help="skip the in-jit loop timing (tok_s_loop; one compilation less a row)")
  parser.add_argument("--torch", action="store_true",
                      help="also transformers bf16 and transformers + bitsandbytes rows")
  parser.add_argument("--tmp-dir", help="where the temporary bf16 checkpoint for bitsandbytes goes")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quantize-head", action="store_true",
                      help="jlowbit rows also quantize the lm_head (1.05 GB of "
                      "the 8B model's bf16 weights; bitsandbytes keeps it bf16)")
  parser.add_argument("--fuse", action="store_true",
                      help="jlowbit rows: jlowbit.models.fuse_projections after "
                      "quantizing (q|k|v and gate|up as one product each)")
  parser.add_argument("--profile", action="store_true",
                      help="per-token GPU kernel time by kind (a profiler "
                      "trace of one more in-jit loop run per JAX row)")
  parser.add_argument("--json", help="write all rows and the environment to this file")
  args = parser.parse_args(argv)
  # Before the first device use: JAX then grows its GPU pool on demand, so
  # torch can allocate beside it.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  tiny = args.tiny
  shapes = TINY if tiny else LLAMA3_8B
  layers = args.layers or (2 if tiny else 32)
  config = LlamaConfig(num_hidden_layers=layers, **shapes)
  s = Settings(prompt_len=args.prompt_len or (4 if tiny else 16),
               new_tokens=args.new_tokens or (8 if tiny else 64),
               repeats=args.repeats or (2 if tiny else 5),
               impl=args.impl or ("xla" if tiny else None), seed=args.seed,
               quantize_head=args.quantize_head, layout=args.layout,
               profile=args.profile and not args.no_loop, fuse=args.fuse)
  device = jax.devices()[0].device_kind
  _log(f"device: {device} | jlowbit impl: {jlowbit.resolve_impl(s.impl)} | "
       f"layers: {layers} | prompt {s.prompt_len} + {s.new_tokens} new tokens, "
       f"median of {s.repeats}")
  prompt = np.random.default_rng(s.seed).integers(
      3, config.vocab_size, (1, s.prompt_len), dtype=np.int32)

  rows = []
  jax_rows = ([] if args.no_bf16 else [("jax bf16", None)]) + [
      (_row_name("jlowbit", q) + (" +head" if args.quantize_head else "")
       + (" tiled" if args.layout == "tiled" else "")
       + (" fused" if args.fuse else ""), q)
      for q in args.quant_types]
  if args.no_jax:
    jax_rows = []
  for name, quant_type in jax_rows:
    rows.append(bench_jax(name, config, prompt, s, quant_type, not args.no_loop))
    r = rows[-1]
    _log(f"  {name}: {r['tok_s']:.1f} tok/s"
         + (f", in-jit loop {r['tok_s_loop']:.1f} tok/s" if "tok_s_loop" in r else "")
         + f" (setup {r['setup_s']:.1f} s, first run {r['first_run_s']:.1f} s)")
    profile = r.get("kernels_per_token")
    if profile:
      _log(f"    per token: wall {profile['wall_us']:.0f} us, kernels "
           f"{profile['kernel_us']:.0f} us: " + ", ".join(
               f"{kind} {k['us']:.0f} us / {k['launches']:.0f} launches"
               for kind, k in profile["kinds"].items()))

  torch_skipped = None
  if args.torch:
    torch_skipped = torch_available()
    if torch_skipped is None:
      rows += bench_torch(config, prompt, s, args.quant_types, args.tmp_dir)
    else:
      _log(f"  torch rows skipped: {torch_skipped}")

  _finish(rows, config)
  results = dict(
      device=device, versions=_versions(args.torch and torch_skipped is None),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      command=shlex.join([sys.executable] + sys.argv),
      config=dataclasses.asdict(config), settings=dataclasses.asdict(s),
      resolved_impl=jlowbit.resolve_impl(s.impl), block_size=BLOCK_SIZE,
      hbm_tbps=hbm_tbps(), torch_skipped=torch_skipped, rows=rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  print(table(rows, COLUMNS))
  return results


if __name__ == "__main__":
  main()
