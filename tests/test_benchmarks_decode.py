"""benchmarks/decode.py --tiny runs (CPU smoke test of the decode benchmark)."""

from conftest import run_benchmark_tiny


def test_decode_benchmark_tiny(tmp_path):
  results, stdout = run_benchmark_tiny("decode.py", tmp_path)
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
  # Every projection of both layers is 4-bit (two codes a byte); the
  # embedding and lm_head stay bf16.
  linear = 2 * 64 * (64 + 32 + 32 + 64 + 3 * 128)
  for name in ("jlowbit nf4", "jlowbit nf4 nested"):
    assert rows[name]["memory_report"]["4bit_weights"] == linear // 2
    assert rows[name]["weight_bytes"] < rows["jax bf16"]["weight_bytes"]
  assert rows["jax bf16"]["weight_bytes"] == 2 * (2 * 256 * 64 + linear + 5 * 64)
  assert rows["jax bf16"]["vs_bf16"] == 1.0
  assert stdout.rstrip().splitlines()[-1].split()[:2] == ["jlowbit", "nf4"]
