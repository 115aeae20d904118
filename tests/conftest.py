"""Shared test configuration.

Kernel tests compare a kernel implementation against ``impl="xla"``; the
``KERNEL_IMPLS`` parameter list runs them under Triton's interpreter on the
CPU (CI) and with compiled Triton on an NVIDIA GPU (``gpu`` marker, skipped
where no GPU is usable).
"""

import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Eight host (CPU) devices for the sharding tests (tests/test_optax_sharding.py),
# set before JAX initializes its backends; arrays still default to device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=9").strip()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jlowbit import _impl  # noqa: E402

GPU_AVAILABLE = _impl.auto_impl() == "triton"

KERNEL_IMPLS = [
    pytest.param("interpret", id="interpret"),
    pytest.param("triton", id="triton", marks=pytest.mark.gpu),
]
ALL_IMPLS = [pytest.param("xla", id="xla")] + KERNEL_IMPLS
FLOAT_DTYPES = ["float32", "bfloat16", "float16"]


# Modules whose tests take 10-40 s each on a CPU: collected first, so that
# pytest-xdist hands them out early and the run does not end waiting on one.
SLOW_MODULES = ("test_optax_sharding.py", "test_benchmarks_offload.py",
                "test_examples.py", "test_benchmarks_decode.py")


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.path.name not in SLOW_MODULES)
  if GPU_AVAILABLE:
    return
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU with triton + jax-triton")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


def assert_same_cast(got, want, impl):
  """Kernel output equals the reference, bit for bit.

  Exception: Triton 3.6's interpreter rounds float32 -> bfloat16 toward zero
  (compiled Triton and XLA round to nearest even), so interpreted bfloat16
  outputs may sit one bfloat16 ulp below the reference.
  """
  assert got.dtype == want.dtype and got.shape == want.shape
  if impl == "interpret" and got.dtype == jnp.bfloat16:
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(want, np.float32), rtol=2.0**-7, atol=0)
  else:
    np.testing.assert_array_equal(got, want)


ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_benchmark_tiny(script: str, tmp_path, *extra: str) -> tuple[dict, str]:
  """Runs ``benchmarks/<script> --tiny --json ... *extra`` on this checkout's
  jlowbit (also where another one is installed); its JSON results and
  stdout."""
  out = tmp_path / "results.json"
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--json",
       str(out), *extra],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  return json.loads(out.read_text()), result.stdout
