"""Timing helpers shared by the benchmarks (JAX and, for anchors, torch)."""

from __future__ import annotations

import glob
import gzip
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence

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
  ``repeats`` runs of that executable is divided by ``len(inputs)``. This
  is wall-clock time: it includes the host's dispatch of the executable and
  its arguments, which overstates kernels of tens of microseconds (an
  8192 x 8192 4-bit gemv: 57 us here, 24 us of kernel time on an H200);
  :func:`time_jax_device` gives the kernels' own time.
  """
  many = jax.jit(lambda xs: [fn(*x) for x in xs])
  jax.block_until_ready(many(inputs))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(many(inputs))
    samples.append(time.perf_counter() - start)
  return statistics.median(samples) / len(inputs)


def _gpu_stream_kernels(trace_events: Iterable[dict]) -> list[dict]:
  """The complete (``"X"``) events of the threads named ``"Stream #N(...)"``,
  the GPU streams of a JAX trace; host threads and metadata are skipped."""
  events = list(trace_events)
  streams = {(e.get("pid"), e.get("tid")) for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"
             and str(e.get("args", {}).get("name", "")).startswith("Stream #")}
  return [e for e in events if e.get("ph") == "X" and "dur" in e
          and (e.get("pid"), e.get("tid")) in streams]


def device_kernel_events(trace_events: Iterable[dict]) -> list[tuple[str, float]]:
  """(name, seconds) of every kernel a Perfetto trace recorded on a GPU stream.

  ``trace_events``: the ``traceEvents`` of a ``jax.profiler.trace(...,
  create_perfetto_trace=True)`` file.
  """
  return [(e["name"], e["dur"] * 1e-6) for e in _gpu_stream_kernels(trace_events)]


def gpu_busy(trace_events: Iterable[dict]) -> tuple[float, float, int]:
  """(summed kernel seconds, seconds some GPU stream was busy, streams used)
  of a trace's GPU kernels: the busy time is the union of the kernels'
  intervals, less than the sum where kernels overlapped."""
  kernels = sorted((e["ts"], e["ts"] + e["dur"], (e["pid"], e["tid"]))
                   for e in _gpu_stream_kernels(trace_events))
  busy, reach = 0.0, float("-inf")
  for start, end, _ in kernels:
    busy += max(0.0, end - max(start, reach))
    reach = max(reach, end)
  total = sum(end - start for start, end, _ in kernels)
  return total * 1e-6, busy * 1e-6, len({stream for _, _, stream in kernels})


def traced_events(run: Callable) -> tuple[list[dict], object]:
  """``run()`` under ``jax.profiler``: the trace's events (the
  ``traceEvents`` of its Perfetto files) and what ``run`` returned."""
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      result = run()
    events = []
    for path in glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True):
      with gzip.open(path) as f:
        events += json.load(f)["traceEvents"]
  return events, result


def traced_kernels(run: Callable) -> tuple[list[tuple[str, float]], object]:
  """``run()`` under ``jax.profiler``: the GPU kernels it launched ((name,
  seconds), :func:`device_kernel_events`; none on a CPU-only JAX) and what
  it returned."""
  events, result = traced_events(run)
  return device_kernel_events(events), result


def time_jax_device(fn: Callable, inputs: Sequence, repeats: int = 10,
                    kernel: str | None = None) -> float:
  """Median GPU time per call of ``fn``: the kernels' own durations.

  Runs the executable of :func:`time_jax` under ``jax.profiler`` and sums
  the durations of the kernels it launched (:func:`device_kernel_events`),
  so host dispatch and launch gaps, which :func:`time_jax`'s wall clock
  includes, are left out: the figure to set against the HBM floor. Each of
  ``repeats`` runs is traced separately; the median is divided by
  ``len(inputs)``. ``kernel``: count only the kernels whose name contains
  it.

  Raises:
    RuntimeError: the trace has no GPU stream (e.g. a CPU-only JAX), or no
      kernel named like ``kernel``.
  """
  many = jax.jit(lambda xs: [fn(*x) for x in xs])
  jax.block_until_ready(many(inputs))
  samples = []
  for _ in range(repeats):
    kernels, _ = traced_kernels(lambda: jax.block_until_ready(many(inputs)))
    if not kernels:
      raise RuntimeError("the profiler trace has no GPU kernels: "
                         "time_jax_device needs a GPU backend")
    chosen = [s for name, s in kernels if kernel is None or kernel in name]
    if not chosen:
      raise RuntimeError(f"no kernel named like {kernel!r} in the trace; "
                         f"kernels: {sorted({name for name, _ in kernels})}")
    samples.append(sum(chosen))
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
