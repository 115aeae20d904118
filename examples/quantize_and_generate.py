"""Quantize a trained Flax NNX model to 4 bits (NF4) and generate text with it.

Trains the byte-level LM of ``train_lm.py`` briefly on the Python standard
library's source (8-bit AdamW), swaps its ``nnx.Linear`` (MLP) and
``nnx.LinearGeneral`` (attention) layers for ``jlowbit.nn.Linear4bit`` /
``jlowbit.nn.LinearGeneral4bit`` with ``quantize_model``, then compares the two
models: bytes held (``memory_report``), logits on held-out text, and greedy
generations from one prompt (a model this small, trained for a minute,
soon repeats itself; the point is that the float and NF4 models agree).
``--checkpoint DIR`` instead loads a Hugging
Face bitsandbytes 4-bit Llama checkpoint and generates from it (the default
directory, a tiny test checkpoint with random weights and a 256-token
vocabulary, works offline)::

  python examples/quantize_and_generate.py                  # about 1 minute on a CPU
  python examples/quantize_and_generate.py --steps 1000 --new-bytes 200
  python examples/quantize_and_generate.py --checkpoint tests/data/hf_llama/llama_nf4_dq
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import jlowbit as lowbit
from jlowbit.models import Llama, generate
import train_lm

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO / "tests" / "data" / "hf_llama" / "llama_nf4_dq"
PROMPT = "class Cache:\n    def __init__(self"


def train_base(config: train_lm.Config, data: np.ndarray, steps: int, lr: float,
               seed: int = 0, progress: bool = True) -> tuple[train_lm.ByteLM, list[float]]:
  """``train_lm``'s ByteLM trained ``steps`` steps with 8-bit AdamW; returns it and its losses."""
  model = train_lm.ByteLM(config, nnx.Rngs(seed))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr / 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0), lowbit.adamw_8bit(schedule, weight_decay=0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  losses = train_steps(model, optimizer, nnx.value_and_grad(loss_fn),
                       train_lm.batches(data, config, steps, seed), steps,
                       "base model", progress)
  return model, losses


def train_steps(model: nnx.Module, optimizer: nnx.Optimizer, grad_fn, batches,
                steps: int, desc: str, progress: bool) -> list[float]:
  """Runs ``optimizer`` over ``batches`` (jitted steps, a tqdm bar);
  ``grad_fn(model, tokens, targets) -> (loss, grads)``. Returns the losses."""
  @nnx.jit
  def step(model, optimizer, tokens, targets):
    loss, grads = grad_fn(model, tokens, targets)
    optimizer.update(model, grads)
    return loss

  losses = []
  bar = tqdm(batches, total=steps, desc=desc, disable=not progress)
  for tokens, targets in bar:
    losses.append(step(model, optimizer, tokens, targets))
    if len(losses) % 25 == 0:
      bar.set_postfix(loss=f"{float(losses[-1]):.3f}")
  return [float(l) for l in jax.device_get(losses)]


def loss_fn(model, tokens, targets):
  """Mean next-byte cross-entropy, nats/byte."""
  return optax.softmax_cross_entropy_with_integer_labels(model(tokens), targets).mean()


def generate_bytes(model: train_lm.ByteLM, prompt: bytes, new_bytes: int, context: int) -> bytes:
  """Greedy decoding of a ByteLM (no KV cache).

  Every step runs the model on one ``[1, context]`` window (one compilation):
  the text so far right-padded while it is shorter than the window (causal
  attention leaves the padding unseen), else its last ``context`` bytes.
  """
  forward = nnx.jit(lambda model, window: model(window)[0])
  text = list(prompt)
  for _ in range(new_bytes):
    window = np.zeros((1, context), np.int32)
    tail = text[-context:]
    window[0, :len(tail)] = tail
    logits = forward(model, window)
    text.append(int(jnp.argmax(logits[len(tail) - 1])))
  return bytes(text[len(prompt):])


def show(text: bytes) -> str:
  return text.decode("utf-8", errors="replace")


def print_report(name: str, report: dict[str, int]) -> None:
  print(f"  {name:<6s} total {report['total'] / 1e6:6.3f} MB: 4-bit weights "
        f"{report['4bit_weights'] / 1e6:.3f} MB + statistics "
        f"{report['4bit_statistics'] / 1e6:.3f} MB + float params "
        f"{report['float_params'] / 1e6:.3f} MB")


def quantize_byte_lm(args) -> dict:
  config = train_lm.SIZES["cpu"]
  data = train_lm.stdlib_text(args.text_bytes)
  split = int(0.95 * data.size)
  print(f"device: {jax.devices()[0].device_kind} | impl: {lowbit.resolve_impl(None)} | "
        f"text: {data.size / 1e6:.1f} MB | model: {config}")
  start = time.perf_counter()
  model, losses = train_base(config, data[:split], args.steps, args.lr, args.seed,
                             progress=not args.quiet)
  print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s: "
        f"loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f} nats/byte")

  # quantize_model mutates its argument: quantize a copy, keep the float model.
  quantized = lowbit.nn.quantize_model(nnx.clone(model), quant_type="nf4",
                                       block_size=args.block_size)
  before, after = lowbit.nn.memory_report(model), lowbit.nn.memory_report(quantized)
  linear_float = sum(layer.kernel[...].nbytes for block in model.blocks
                     for layer in (block.up, block.down, block.attn.query, block.attn.key,
                                   block.attn.value, block.attn.out))
  linear_4bit = after["4bit_weights"] + after["4bit_statistics"]
  print("memory_report (the MLP's nnx.Linear layers become Linear4bit, attention's "
        "nnx.LinearGeneral ones LinearGeneral4bit; the tied embedding / head stay float):")
  print_report("float", before)
  print_report("NF4", after)
  print(f"  quantized layers' weights: {linear_float / 1e6:.3f} MB float32 -> "
        f"{linear_4bit / 1e6:.3f} MB NF4 ({linear_float / linear_4bit:.1f}x smaller); "
        f"whole model {before['total'] / after['total']:.2f}x smaller")

  held_out = list(train_lm.batches(data[split:], config, 4, args.seed + 1))
  forward = nnx.jit(lambda model, tokens: model(tokens))
  diffs = np.concatenate([np.abs(np.asarray(forward(model, t) - forward(quantized, t))).ravel()
                          for t, _ in held_out])
  eval_loss = nnx.jit(loss_fn)
  float_loss = float(np.mean([eval_loss(model, t, y) for t, y in held_out]))
  nf4_loss = float(np.mean([eval_loss(quantized, t, y) for t, y in held_out]))
  print(f"held-out logits, NF4 vs float: max |diff| {diffs.max():.4f}, "
        f"mean |diff| {diffs.mean():.4f}; held-out loss float {float_loss:.4f}, "
        f"NF4 {nf4_loss:.4f} nats/byte")

  prompt = args.prompt.encode()
  generations = {}
  for name, m in (("float", model), ("NF4", quantized)):
    generations[name] = generate_bytes(m, prompt, args.new_bytes, config.context)
    print(f"--- {name} model, greedy, {args.new_bytes} bytes after {args.prompt!r}:\n"
          f"{show(prompt + generations[name])}")
  return dict(losses=losses, memory_float=before, memory_nf4=after,
              linear_bytes_float=int(linear_float), linear_bytes_nf4=int(linear_4bit),
              max_logit_diff=float(diffs.max()), mean_logit_diff=float(diffs.mean()),
              held_out_loss_float=float_loss, held_out_loss_nf4=nf4_loss,
              generations=generations)


def generate_from_checkpoint(args) -> dict:
  model = Llama.from_hf_checkpoint(args.checkpoint)
  config = model.config
  print(f"loaded {args.checkpoint}: {config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, vocab {config.vocab_size}, compute dtype {model.dtype}")
  print_report("4-bit", lowbit.nn.memory_report(model))
  prompt = args.prompt.encode()
  if config.vocab_size != 256:
    raise SystemExit(f"this example feeds bytes as token ids; the checkpoint's vocabulary "
                     f"has {config.vocab_size} tokens (use its tokenizer instead)")
  input_ids = jnp.asarray([list(prompt)], jnp.int32)
  tokens = generate(model, input_ids, args.new_bytes)
  new = bytes(np.asarray(tokens[0, len(prompt):]).astype(np.uint8).tolist())
  print(f"--- greedy, {args.new_bytes} tokens (byte ids) after {args.prompt!r}:\n{new!r}")
  if args.checkpoint.resolve() == DEFAULT_CHECKPOINT:
    print("(the test checkpoint has random weights: the output is gibberish by design)")
  return dict(generations={"checkpoint": new})


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400, help="training steps of the float model")
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--text-bytes", type=int, default=2 << 20, help="bytes of stdlib source")
  parser.add_argument("--block-size", type=int, default=64, help="NF4 absmax block")
  parser.add_argument("--prompt", default=PROMPT)
  parser.add_argument("--new-bytes", type=int, default=100, help="bytes (tokens) to generate")
  parser.add_argument("--checkpoint", type=pathlib.Path, nargs="?", const=DEFAULT_CHECKPOINT,
                      help="generate from this HF bitsandbytes 4-bit Llama checkpoint "
                           f"instead (default {DEFAULT_CHECKPOINT.relative_to(REPO)})")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  if args.checkpoint is not None:
    return generate_from_checkpoint(args)
  return quantize_byte_lm(args)


if __name__ == "__main__":
  main()
