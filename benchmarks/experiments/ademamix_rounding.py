"""AdEMAMix-8bit training quality: stochastic vs nearest rounding of m2.

Trains the example's GPU-sized byte LM (``examples/train_lm.py``) with
AdEMAMix at the example's step and float32 embedding state, per seed: the
32-bit twin and the 8-bit optimizer with each ``--variants`` entry
(``sr``/``rtn``: stochastic/nearest rounding of the slow EMA; ``-xla``
suffix: the pure-jnp backend, else the default one). Writes
``results.json`` and ``loss.png`` to ``--out``::

  python benchmarks/experiments/ademamix_rounding.py --seeds 1 2 --out /tmp/r
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import train_lm  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[1])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--variants", nargs="+", default=["32bit", "sr", "rtn"])
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args()
  config = train_lm.SIZES["gpu"]
  data = train_lm.stdlib_text(16 << 20)
  results = []
  for seed in args.seeds:
    for variant in args.variants:
      name, state_config = "ademamix_32bit", {}
      if variant != "32bit":
        rounding, _, impl = variant.partition("-")
        name = "ademamix_8bit"
        state_config = dict(min_8bit_size=131073, stochastic_rounding=rounding == "sr",
                            impl=impl or None)
      r = train_lm.train(name, config, data, args.steps, 2e-3, seed, progress=False,
                         **state_config)
      r.update(seed=seed, variant=variant)
      print(f"seed {seed} {variant:>10s}: held-out {r['held_out_loss']:.4f} "
            f"train {r['final_train_loss']:.4f} ({r['seconds']:.0f} s)", flush=True)
      results.append(r)
      args.out.mkdir(parents=True, exist_ok=True)
      (args.out / "results.json").write_text(json.dumps(results))
  train_lm.plot([dict(r, optimizer=f"{r['optimizer']} {r['variant']}") for r in results],
                args.out / "loss.png")


if __name__ == "__main__":
  main()
