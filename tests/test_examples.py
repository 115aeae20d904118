"""The examples in examples/, run in-process with tiny settings."""

import importlib
import json
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
TINY = ["--text-bytes", str(1 << 18), "--quiet"]


@pytest.fixture(scope="module")
def examples():
  """``name -> module`` of examples/ (whose scripts import one another by name)."""
  sys.path.insert(0, str(EXAMPLES))
  try:
    yield importlib.import_module
  finally:
    sys.path.remove(str(EXAMPLES))


def test_quantize_and_generate(examples, capsys):
  script = examples("quantize_and_generate")
  results = script.main(["--steps", "10", "--new-bytes", "12", *TINY])
  out = capsys.readouterr().out
  assert "x smaller" in out and "max |diff|" in out
  assert results["linear_bytes_float"] > 6 * results["linear_bytes_nf4"]
  assert results["memory_nf4"]["total"] < results["memory_float"]["total"]
  assert results["memory_nf4"]["4bit_weights"] > 0 == results["memory_float"]["4bit_weights"]
  assert 0 < results["mean_logit_diff"] <= results["max_logit_diff"] < 1
  assert {name: len(text) for name, text in results["generations"].items()} == {"float": 12, "NF4": 12}


def test_generate_from_hf_checkpoint(examples, capsys):
  script = examples("quantize_and_generate")
  results = script.main(["--checkpoint", str(script.DEFAULT_CHECKPOINT), "--new-bytes", "8"])
  assert "gibberish" in capsys.readouterr().out
  assert len(results["generations"]["checkpoint"]) == 8


def test_qlora(examples, tmp_path):
  script = examples("qlora")
  results = script.main(["--base-steps", "20", "--steps", "30", "--out", str(tmp_path), *TINY])
  assert results["last_loss"] < results["first_loss"]
  assert results["held_out_after"] < results["held_out_before"]
  assert results["weights_unchanged"] is True
  assert results["restored_max_logit_diff"] == 0.0
  assert json.loads((tmp_path / "results.json").read_text())["losses"] == results["losses"]
  assert (tmp_path / "loss.png").stat().st_size > 0
  assert (tmp_path / "adapters").is_dir()
  assert np.isfinite(results["base_losses"]).all()
