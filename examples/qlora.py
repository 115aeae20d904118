"""QLoRA: fine-tune low-rank adapters on a frozen 4-bit (NF4) Flax NNX model.

Trains the byte-level LM of ``train_lm.py`` briefly on the start of the Python
standard library's source (the base model), quantizes its linear layers (the
MLPs' ``nnx.Linear``, attention's ``nnx.LinearGeneral`` projections; not the
tied embedding head) to NF4 with LoRA adapters in one call,
``jlowbit.nn.quantize_model(model, lora_rank=...)``, and trains only the
adapters (``nnx.LoRAParam``, 8-bit AdamW) on a later, unseen part of the
source. It checks that the 4-bit weights stay bit-identical, reports the loss
before and after, and saves the adapters with orbax, restores them into a
fresh QLoRA model and checks that it gives identical logits::

  python examples/qlora.py                     # 1-2 minutes on a CPU
  python examples/qlora.py --base-steps 1000 --steps 1000 --lora-rank 16 --out results/

``--out DIR`` writes ``results.json``, the loss plot ``loss.png`` and the
adapter checkpoint ``adapters/`` there (else the checkpoint goes to a
temporary folder).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import jlowbit as lowbit
import train_lm
from quantize_and_generate import loss_fn, print_report, train_base, train_steps


def finetune(model: nnx.Module, config: train_lm.Config, data: np.ndarray, steps: int,
             lr: float, seed: int, progress: bool) -> list[float]:
  """Trains only ``model``'s ``nnx.LoRAParam`` s; returns the losses."""
  optimizer = nnx.Optimizer(model, lowbit.adamw_8bit(lr), wrt=nnx.LoRAParam)
  # Gradients of the adapters only: the 4-bit weights are QuantizedWeight
  # variables (no gradient in any case) and the float embedding, norms and
  # biases are nnx.Param, which this filter leaves out too.
  grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
  return train_steps(model, optimizer, grad_fn,
                     train_lm.batches(data, config, steps, seed), steps, "QLoRA",
                     progress)


def save_and_restore(model: nnx.Module, base: nnx.Module, directory: pathlib.Path,
                     args) -> nnx.Module:
  """Saves ``model``'s adapters with orbax and loads them into a fresh QLoRA model of ``base``."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, nnx.state(model, nnx.LoRAParam), force=True)
  checkpointer.wait_until_finished()
  # Same 4-bit weights (quantization is deterministic), other initial adapters.
  fresh = lowbit.nn.quantize_model(nnx.clone(base), lora_rank=args.lora_rank,
                                   rngs=nnx.Rngs(args.seed + 1), quant_type="nf4",
                                   block_size=args.block_size)
  adapters = checkpointer.restore(directory, nnx.state(fresh, nnx.LoRAParam))
  nnx.update(fresh, adapters)
  return fresh


def plot(base_losses: list[float], losses: list[float], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 5))
  ax.plot(np.arange(len(base_losses)), base_losses, label="base model (float, all params)")
  ax.plot(len(base_losses) + np.arange(len(losses)), losses,
          label="QLoRA (NF4 base, adapters only, unseen text)")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss, nats/byte")
  ax.set_title("Byte-level LM on Python stdlib source: base training, then QLoRA")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--base-steps", type=int, default=300, help="training steps of the base model")
  parser.add_argument("--base-lr", type=float, default=3e-3)
  parser.add_argument("--steps", type=int, default=300, help="QLoRA steps")
  parser.add_argument("--lr", type=float, default=5e-3, help="QLoRA learning rate")
  parser.add_argument("--lora-rank", type=int, default=8)
  parser.add_argument("--block-size", type=int, default=64, help="NF4 absmax block")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--text-bytes", type=int, default=2 << 20,
                      help="bytes of stdlib source for the base model; QLoRA trains on the next ones")
  parser.add_argument("--out", type=pathlib.Path,
                      help="folder for results.json, loss.png and the adapter checkpoint")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)

  config = train_lm.SIZES["cpu"]
  text = train_lm.stdlib_text(2 * args.text_bytes)
  base_text, new_text = text[:args.text_bytes], text[args.text_bytes:]
  split = int(0.95 * new_text.size)
  held_out = list(train_lm.batches(new_text[split:], config, 8, args.seed + 1))
  eval_loss = nnx.jit(loss_fn)
  def held_out_loss(model):
    return float(np.mean([eval_loss(model, t, y) for t, y in held_out]))
  print(f"device: {jax.devices()[0].device_kind} | impl: {lowbit.resolve_impl(None)} | "
        f"base text: {base_text.size / 1e6:.1f} MB | QLoRA text: {new_text.size / 1e6:.1f} MB "
        f"(later stdlib files) | model: {config}")

  start = time.perf_counter()
  base, base_losses = train_base(config, base_text, args.base_steps, args.base_lr, args.seed,
                                 progress=not args.quiet)
  print(f"base model: {args.base_steps} steps in {time.perf_counter() - start:.1f} s, "
        f"loss {np.mean(base_losses[:10]):.3f} -> {np.mean(base_losses[-10:]):.3f}")

  # Every nnx.Linear / nnx.LinearGeneral (lowbit.nn.default_filter) -> NF4
  # weight + adapters A [in, rank], B [rank, out] (zero: the model starts
  # equal to its plain 4-bit version); biases, norms, embedding stay float.
  model = lowbit.nn.quantize_model(nnx.clone(base), lora_rank=args.lora_rank,
                                   rngs=nnx.Rngs(args.seed), quant_type="nf4",
                                   block_size=args.block_size)
  n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  n_frozen = sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
  print(f"QLoRA model: {n_lora} trainable adapter params (rank {args.lora_rank}), "
        f"{n_frozen} frozen base params")
  print_report("QLoRA", lowbit.nn.memory_report(model))
  frozen_4bit = jax.tree.map(np.array, nnx.state(model, lowbit.nn.QuantizedWeight))
  before = held_out_loss(model)

  start = time.perf_counter()
  losses = finetune(model, config, new_text[:split], args.steps, args.lr, args.seed,
                    progress=not args.quiet)
  seconds = time.perf_counter() - start
  after = held_out_loss(model)
  window = max(len(losses) // 10, 1)
  first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
  print(f"QLoRA: {args.steps} steps in {seconds:.1f} s, training loss {first:.3f} -> {last:.3f} "
        f"(mean of first / last {window} steps); held-out loss on the new text "
        f"{before:.4f} -> {after:.4f} nats/byte")
  unchanged = all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(frozen_4bit), jax.tree.leaves(nnx.state(model, lowbit.nn.QuantizedWeight))))
  print(f"4-bit weights bit-identical after fine-tuning: {unchanged}")

  with tempfile.TemporaryDirectory() as tmp:
    directory = ((args.out or pathlib.Path(tmp)) / "adapters").resolve()
    restored = save_and_restore(model, base, directory, args)
  forward = nnx.jit(lambda model, tokens: model(tokens))
  diff = max(float(np.abs(np.asarray(forward(model, t) - forward(restored, t))).max())
             for t, _ in held_out)
  print(f"adapters saved with orbax{f' to {directory}' if args.out else ''} and restored "
        f"into a fresh QLoRA model: max |logit diff| {diff}")

  results = dict(base_losses=base_losses, losses=losses, first_loss=first, last_loss=last,
                 held_out_before=before, held_out_after=after, weights_unchanged=unchanged,
                 restored_max_logit_diff=diff, lora_params=int(n_lora),
                 frozen_params=int(n_frozen), seconds=seconds)
  if args.out:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results))
    plot(base_losses, losses, args.out / "loss.png")
  return results


if __name__ == "__main__":
  main()
