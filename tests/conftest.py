"""Shared test configuration.

Kernel tests compare a kernel implementation against ``impl="xla"``; the
``KERNEL_IMPLS`` parameter list runs them under Triton's interpreter on the
CPU (CI) and with compiled Triton on an NVIDIA GPU (``gpu`` marker, skipped
where no GPU is usable).
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import pytest  # noqa: E402

from jlowbit import _impl  # noqa: E402

GPU_AVAILABLE = _impl.auto_impl() == "triton"

KERNEL_IMPLS = [
    pytest.param("interpret", id="interpret"),
    pytest.param("triton", id="triton", marks=pytest.mark.gpu),
]
ALL_IMPLS = [pytest.param("xla", id="xla")] + KERNEL_IMPLS
FLOAT_DTYPES = ["float32", "bfloat16", "float16"]


def pytest_collection_modifyitems(config, items):
  del config
  if GPU_AVAILABLE:
    return
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU with triton + jax-triton")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
