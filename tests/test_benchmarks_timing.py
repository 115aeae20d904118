"""benchmarks/timing.py: kernel durations from a JAX profiler trace."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import timing  # noqa: E402  pylint: disable=g-import-not-at-top


def _thread(pid, tid, name):
  return {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
          "args": {"name": name}}


def _complete(pid, tid, name, ts, dur):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_device_kernel_events_keeps_gpu_stream_kernels_only():
  # The shape of a JAX GPU trace (seen on an H200): kernels are complete
  # events on "Stream #N(Compute)" threads; host threads also have them.
  events = [
      _thread(1, 10, "Stream #14(Compute)"),
      _thread(1, 11, "Stream #15(MemcpyD2H)"),
      _thread(2, 20, "python3"),
      _complete(1, 10, "gemv_4bit_kernel", 5.0, 24.5),
      _complete(1, 10, "loop_convert_fusion", 40.0, 1.5),
      _complete(1, 11, "memcpy", 50.0, 3.0),
      _complete(2, 20, "PjitFunction(many)", 0.0, 90.0),
      {"ph": "i", "pid": 1, "tid": 10, "name": "marker", "ts": 1.0},
  ]
  got = timing.device_kernel_events(events)
  assert [name for name, _ in got] == ["gemv_4bit_kernel", "loop_convert_fusion", "memcpy"]
  assert sum(seconds for _, seconds in got) == pytest.approx(29e-6)


def test_gpu_busy_counts_overlapping_kernels_once():
  events = [
      _thread(1, 10, "Stream #14(Compute)"),
      _thread(1, 12, "Stream #16(Compute)"),
      _thread(2, 20, "python3"),
      _complete(1, 10, "update_kernel", 0.0, 10.0),
      _complete(1, 12, "loop_add_fusion", 4.0, 10.0),
      _complete(1, 10, "loop_add_fusion_2", 20.0, 2.0),
      _complete(2, 20, "PjitFunction(step)", 0.0, 90.0),
  ]
  kernels, busy, streams = timing.gpu_busy(events)
  assert kernels == pytest.approx(22e-6)
  assert busy == pytest.approx(16e-6)  # [0, 14] and [20, 22]
  assert streams == 2
  assert timing.gpu_busy(events[:3]) == (0.0, 0.0, 0)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU error path")
def test_time_jax_device_needs_a_gpu():
  with pytest.raises(RuntimeError, match="no GPU kernels"):
    timing.time_jax_device(lambda x: x * 2, [(jnp.ones(8),)], repeats=1)
