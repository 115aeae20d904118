"""benchmarks/decode.py --tiny runs (CPU smoke test of the decode benchmark)."""

import importlib
import sys

import pytest
from conftest import ROOT, run_benchmark_tiny


def test_decode_benchmark_tiny(tmp_path):
  results, stdout = run_benchmark_tiny("decode.py", tmp_path, "--profile")
  rows = {r["row"]: r for r in results["rows"]}
  assert list(rows) == ["jax bf16", "jlowbit nf4", "jlowbit nf4 nested"]
  assert results["config"]["num_hidden_layers"] == 2
  assert results["torch_skipped"] is None  # --torch not given
  for r in rows.values():
    assert r["layers"] == 2
    assert r["tok_s"] > 0 and r["tok_s_loop"] > 0
    assert len(r["step_run_s"]) == len(r["loop_run_s"]) == 2
    assert isinstance(r["loop_matches_step"], bool)
    assert len(r["tokens"]) == 8
    assert r["kernels_per_token"] == {}  # the CPU's trace has no GPU kernels
  # Every projection of both layers is 4-bit (two codes a byte); the
  # embedding and lm_head stay bf16.
  linear = 2 * 64 * (64 + 32 + 32 + 64 + 3 * 128)
  for name in ("jlowbit nf4", "jlowbit nf4 nested"):
    assert rows[name]["memory_report"]["4bit_weights"] == linear // 2
    assert rows[name]["weight_bytes"] < rows["jax bf16"]["weight_bytes"]
  assert rows["jax bf16"]["weight_bytes"] == 2 * (2 * 256 * 64 + linear + 5 * 64)
  assert rows["jax bf16"]["vs_bf16"] == 1.0
  assert stdout.rstrip().splitlines()[-1].split()[:2] == ["jlowbit", "nf4"]


def test_kernels_per_token_groups_a_trace_by_kind(monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
  decode = importlib.import_module("decode")
  try:
    kernels = [("gemv_4bit_kernel", 10e-6), ("loop_add_fusion", 2e-6),
               ("nvjet_tst_128x8_64x3_1x1_v_bz", 30e-6),
               ("gemv_4bit_kernel", 10e-6), ("matmul_4bit_tiled_kernel", 5e-6)]
    got = decode.kernels_per_token(kernels, tokens=2, wall_s=1e-3)
  finally:
    sys.modules.pop("decode", None)
  assert got["kinds"] == {
      "jlowbit 4-bit": dict(launches=1.5, us=pytest.approx(12.5)),
      "XLA fusions": dict(launches=0.5, us=pytest.approx(1.0)),
      "dense matmul": dict(launches=0.5, us=pytest.approx(15.0))}
  assert got["kernel_us"] == pytest.approx(28.5)
  assert got["wall_us"] == pytest.approx(500.0)
  assert list(got["top_kernels_us"]) == [
      "nvjet_tst_128x8_64x3_1x1_v_bz", "gemv_4bit_kernel",
      "matmul_4bit_tiled_kernel", "loop_add_fusion"]
  assert decode.kernels_per_token([], tokens=2, wall_s=1e-3) == {}
