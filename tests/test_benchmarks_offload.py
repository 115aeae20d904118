"""benchmarks/offload.py --tiny runs (CPU smoke test of the offload benchmark)."""

import pytest
from conftest import run_benchmark_tiny


def test_offload_benchmark_tiny(tmp_path):
  """The 8-bit rows (optax's runs in the FSDP test; CI time counts)."""
  streamed = "jlowbit adamw_8bit + offload(chunks=8)"
  names = ["jlowbit adamw_8bit", "jlowbit adamw_8bit + offload", streamed]
  results, _ = run_benchmark_tiny("offload.py", tmp_path, "--optimizers",
                                  *names[:2])
  rows = results["rows"]
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


def test_offload_benchmark_tiny_fsdp(tmp_path):
  """--fsdp over 8 host devices: optax, 8-bit and streamed offload (the
  whole offload's path is the non-FSDP test's plus the streamed one's, and
  CI time counts) step with sharded state; the update compiles to no
  collective, the step to FSDP's (weight gathers, gradient reduce-scatters;
  no 8-bit state gathered)."""
  streamed = "jlowbit adamw_8bit + offload(chunks=8)"
  results, _ = run_benchmark_tiny(
      "offload.py", tmp_path, "--fsdp", "--optimizers", "optax adamw",
      "jlowbit adamw_8bit")
  assert results["devices"] == 8
  rows = {r["optimizer"]: r for r in results["rows"]}
  assert list(rows) == ["optax adamw", "jlowbit adamw_8bit", streamed]
  for name, r in rows.items():
    assert r["fits"] and r["step_s"] > 0 and r["devices"] == 8, name
    assert r["batch"] == 16, name  # 2 sequences per device
    assert r["update_collectives"] == {}, name
    # XLA:CPU gathers the bfloat16 weights in float32.
    assert r["collectives"].get("all-gather f32", 0) > 0, name
    assert r["collectives"].get("reduce-scatter f32", 0) > 0, name
    assert not any(k.endswith(" u8") for k in r["collectives"]), name
  assert rows[streamed]["state_memory_kinds"] == ["pinned_host"]
  eight = rows["jlowbit adamw_8bit"]["loss"]
  assert rows[streamed]["loss"] == pytest.approx(eight, rel=1e-5)
  assert rows["optax adamw"]["loss"] == pytest.approx(eight, rel=1e-2)
  # Per device: 1/8 of float32 moments (8 bytes per parameter) or of 8-bit
  # ones (2 bytes and absmax, which in this tiny model's 64- to 256-wide
  # rows is 0.05 to 0.125 bytes per parameter), plus the replicated float
  # moments of the norms.
  assert rows["optax adamw"]["state_bytes_per_param"] == pytest.approx(1.02, abs=0.01)
  for name in list(rows)[1:]:
    assert rows[name]["state_bytes_per_param"] == pytest.approx(0.28, abs=0.01)
  summary = results["summary"]["at_optax_largest"]
  assert summary["devices"] == 8 and set(summary["step_vs_optax"]) == set(rows)
