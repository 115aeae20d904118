"""benchmarks/offload.py --tiny runs (CPU smoke test of the offload benchmark)."""

import pytest
from conftest import run_benchmark_tiny


def test_offload_benchmark_tiny(tmp_path):
  results, _ = run_benchmark_tiny("offload.py", tmp_path)
  rows = results["rows"]
  streamed = "jlowbit adamw_8bit + offload(chunks=8)"
  names = ["optax adamw", "jlowbit adamw_8bit", "jlowbit adamw_8bit + offload",
           streamed]
  assert [(r["optimizer"], r["depth"]) for r in rows] == [
      (name, 2) for name in names]
  for r in rows:
    assert r["fits"] and r["step_s"] > 0 and r["error"] is None
  # Same initial weights and tokens: the 8-bit runs agree with each other,
  # offloaded or not (the loss is taken before the timed steps' updates
  # diverge by an ulp: see tests/test_optax_offload_stream.py), and the
  # offloaded state lives in host memory.
  by = {(r["optimizer"], r["depth"]): r for r in rows}
  depth = 2
  eight = by[("jlowbit adamw_8bit", depth)]["loss"]
  assert by[("jlowbit adamw_8bit + offload", depth)]["loss"] == eight
  assert by[(streamed, depth)]["loss"] == pytest.approx(eight, rel=1e-5)
  for name in ("jlowbit adamw_8bit + offload", streamed):
    assert by[(name, depth)]["state_memory_kinds"] == ["pinned_host"]
  assert by[("jlowbit adamw_8bit", depth)]["state_memory_kinds"] == ["device"]
  assert results["summary"]["offload_step_cost"]["depth"] == 2
  assert set(results["summary"]["step_cost_vs_8bit"]["ratio"]) == {
      "jlowbit adamw_8bit + offload", streamed}
