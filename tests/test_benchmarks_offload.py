"""benchmarks/offload.py --tiny runs (CPU smoke test of the offload benchmark)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_offload_benchmark_tiny(tmp_path):
  out = tmp_path / "offload.json"
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "offload.py"), "--tiny",
       "--json", str(out)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  results = json.loads(out.read_text())
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
