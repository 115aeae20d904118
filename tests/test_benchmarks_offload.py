"""benchmarks/offload.py --tiny runs (CPU smoke test of the offload benchmark)."""

from conftest import run_benchmark_tiny


def test_offload_benchmark_tiny(tmp_path):
  results, _ = run_benchmark_tiny("offload.py", tmp_path)
  rows = results["rows"]
  names = ["optax adamw", "jlowbit adamw_8bit", "jlowbit adamw_8bit + offload"]
  assert [(r["optimizer"], r["depth"]) for r in rows] == [
      (name, depth) for name in names for depth in (1, 2)]
  for r in rows:
    assert r["fits"] and r["step_s"] > 0 and r["error"] is None
  # Same initial weights and tokens: the 8-bit runs agree with each other,
  # offloaded or not, and the offloaded state lives in host memory.
  by = {(r["optimizer"], r["depth"]): r for r in rows}
  for depth in (1, 2):
    assert (by[("jlowbit adamw_8bit + offload", depth)]["loss"]
            == by[("jlowbit adamw_8bit", depth)]["loss"])
    assert by[("jlowbit adamw_8bit + offload", depth)]["state_memory_kinds"] == [
        "pinned_host"]
    assert by[("jlowbit adamw_8bit", depth)]["state_memory_kinds"] == ["device"]
  assert results["summary"]["offload_step_cost"]["depth"] == 2
