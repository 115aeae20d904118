"""Timing helpers shared by the benchmarks (JAX and, for anchors, torch)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax

# HBM bandwidth the %HBM columns divide by: the device-to-device copy
# bandwidth measured on the H100 used, and the H200's nominal figure.
HBM_TBPS_BY_DEVICE = {"H100": 3.0, "H200": 4.8}


def hbm_tbps() -> float:
  """HBM bandwidth (TB/s) of the first JAX device (3.0 when unknown)."""
  kind = jax.devices()[0].device_kind
  return next((v for k, v in HBM_TBPS_BY_DEVICE.items() if k in kind), 3.0)


def time_jax(fn: Callable, inputs: Sequence, repeats: int = 20) -> float:
  """Median seconds per call of ``fn`` over distinct ``inputs``.

  All calls run inside one jitted executable (one per input set, so the data
  is not cache resident and Python dispatch is amortized); the median of
  ``repeats`` runs of that executable is divided by ``len(inputs)``.
  """
  many = jax.jit(lambda xs: [fn(*x) for x in xs])
  jax.block_until_ready(many(inputs))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(many(inputs))
    samples.append(time.perf_counter() - start)
  return statistics.median(samples) / len(inputs)


def time_torch(fn: Callable, inputs: Sequence, repeats: int = 20) -> float:
  """Median seconds per call of a torch ``fn`` over ``inputs`` (CUDA events)."""
  import torch  # pylint: disable=g-import-not-at-top
  for x in inputs:
    fn(*x)
  torch.cuda.synchronize()
  samples = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for x in inputs:
      fn(*x)
    end.record()
    torch.cuda.synchronize()
    samples.append(start.elapsed_time(end) / 1e3)
  return statistics.median(samples) / len(inputs)


def table(rows: list[dict], columns: Sequence[str]) -> str:
  """A plain-text table of ``rows`` (dicts) in the given column order."""
  cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
  return str(value)
